"""Speed and memory of two commits of this library, measured in alternating rounds.

    python benchmarks/compare_commits.py OLD NEW                  # e.g. main~5 HEAD
    python benchmarks/compare_commits.py OLD NEW --rounds 9 --model crossformer_t
    python benchmarks/compare_commits.py OLD NEW --one-process --batch 1 --rounds 31

Each commit is checked out into a temporary git worktree. Every round runs one fresh process per
commit, in turn (old, new, new, old, ...), so slow drift of a shared machine hits both alike; each
process builds the model through timm, warms up, and times eval batches and training steps. The
report gives per commit the median and the spread (min-max) of each figure, and new / old.

Fresh processes of the same code can differ by 10-20% in speed on a small host (where their
memory lands). ``--one-process`` times eval only, both commits' models in one process, call by
call in turn: each commit's package is imported under its own name (``crossformer_old``,
``crossformer_new``) and its model built by the variant's function, the same weights in both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs inside each commit's process; uses only timm's API, which every commit keeps.
PROBE = r'''
import json, sys, time, statistics, torch, timm
import crossformer  # noqa: F401
name, batch, train_batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = timm.create_model(name).eval()
x = torch.randn(batch, 3, size, size)

def timed(fn, n):
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)

with torch.inference_mode():
    eval_s = timed(lambda: model(x), 3)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
xt, y = x[:train_batch], torch.randint(0, 1000, (train_batch,))

def step():
    torch.nn.functional.cross_entropy(model(xt), y).backward()
    opt.step(); opt.zero_grad(set_to_none=True)

train_s = timed(step, 2)
seen = {}
def pack(t):
    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(xt).sum().backward()
print(json.dumps(dict(eval_img_s=batch / eval_s, train_img_s=train_batch / train_s,
                      activations_mib=sum(seen.values()) / 2 ** 20)))
'''


# Runs once with both commits importable as crossformer_old and crossformer_new.
ONE_PROCESS_PROBE = r'''
import json, sys, time, warnings, torch
warnings.simplefilter('ignore')  # both register the same timm names
import crossformer_old.models.crossformer as old_module
import crossformer_new.models.crossformer as new_module
name, batch, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
models = {'new': getattr(new_module, name)().eval()}
models['old'] = getattr(old_module, name)().eval()
models['old'].load_state_dict(models['new'].state_dict())
x = torch.randn(batch, 3, size, size)
times = {k: [] for k in models}
with torch.inference_mode():
    diff = (models['old'](x) - models['new'](x)).abs().max().item()
    for r in range(rounds):
        for k in (('old', 'new') if r % 2 == 0 else ('new', 'old')):
            t = time.perf_counter(); models[k](x); times[k].append(time.perf_counter() - t)
print(json.dumps(dict(times=times, diff=diff)))
'''


def one_process(repo: Path, args) -> None:
    """Eval of both commits in one process, alternating call by call."""
    with tempfile.TemporaryDirectory() as tmp:
        for label in ('old', 'new'):
            archive = subprocess.run(['git', '-C', str(repo), 'archive', getattr(args, label), 'src/crossformer'],
                                     check=True, capture_output=True).stdout
            subprocess.run(['tar', '-x', '-C', tmp], input=archive, check=True)
            (Path(tmp) / 'src' / 'crossformer').rename(Path(tmp) / f'crossformer_{label}')
        out = subprocess.run([sys.executable, '-c', ONE_PROCESS_PROBE, args.model, str(args.batch), str(args.size),
                              str(args.rounds)], env=dict(os.environ, PYTHONPATH=tmp), check=True,
                             capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    speed = {k: args.batch / statistics.median(v) for k, v in result['times'].items()}
    print(f'{args.model}, eval batch {args.batch}, {args.size}px, {args.rounds} rounds in one process; '
          f'old {args.old}, new {args.new}; max abs diff of logits {result["diff"]:.1e}')
    print('| figure | old | new | new / old |')
    print('|---|---:|---:|---:|')
    print(f'| eval_img_s | {speed["old"]:.2f} | {speed["new"]:.2f} | {speed["new"] / speed["old"]:.3f} |')


def run(worktree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(worktree / 'src'))
    out = subprocess.run([sys.executable, '-c', PROBE, args.model, str(args.batch), str(args.train_batch),
                          str(args.size)], env=env, check=True, capture_output=True, text=True, cwd=worktree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('--model', default='crossformer_s')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--train-batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--one-process', action='store_true', help='eval only, both commits in one process')
    args = parser.parse_args()
    repo = Path(subprocess.run(['git', 'rev-parse', '--show-toplevel'], check=True, capture_output=True,
                               text=True).stdout.strip())
    if args.one_process:
        return one_process(repo, args)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label in ('old', 'new'):
            trees[label] = Path(tmp) / label
            subprocess.run(['git', '-C', str(repo), 'worktree', 'add', '--detach', '-q', str(trees[label]),
                            getattr(args, label)], check=True)
        try:
            results = {'old': [], 'new': []}
            for r in range(args.rounds):
                order = ('old', 'new') if r % 2 == 0 else ('new', 'old')
                for label in order:
                    results[label].append(run(trees[label], args))
                print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
                    f'{k} {results[k][-1]["eval_img_s"]:.2f} img/s eval' for k in order), flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(['git', '-C', str(repo), 'worktree', 'remove', '--force', str(tree)], check=False)
    print(f'\n{args.model}, eval batch {args.batch}, train batch {args.train_batch}, {args.size}px, '
          f'{args.rounds} alternating rounds; old {args.old}, new {args.new}')
    print('| figure | old median (min-max) | new median (min-max) | new / old |')
    print('|---|---:|---:|---:|')
    for key in ('eval_img_s', 'train_img_s', 'activations_mib'):
        old = [r[key] for r in results['old']]
        new = [r[key] for r in results['new']]
        print(f'| {key} | {statistics.median(old):.2f} ({min(old):.2f}-{max(old):.2f}) '
              f'| {statistics.median(new):.2f} ({min(new):.2f}-{max(new):.2f}) '
              f'| {statistics.median(new) / statistics.median(old):.3f} |')


if __name__ == '__main__':
    main()
