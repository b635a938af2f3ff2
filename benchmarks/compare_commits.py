"""Speed and memory of two commits of this library, measured in alternating rounds.

    python benchmarks/compare_commits.py OLD NEW                  # e.g. main~5 HEAD
    python benchmarks/compare_commits.py OLD NEW --rounds 9 --model crossformer_t

Each commit is checked out into a temporary git worktree. Every round runs one fresh process per
commit, in turn (old, new, new, old, ...), so slow drift of a shared machine hits both alike; each
process builds the model through timm, warms up, and times eval batches and training steps. The
report gives per commit the median and the spread (min-max) of each figure, and new / old.
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
    args = parser.parse_args()
    repo = Path(subprocess.run(['git', 'rev-parse', '--show-toplevel'], check=True, capture_output=True,
                               text=True).stdout.strip())
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
