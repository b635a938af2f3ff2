"""What durability costs per training snapshot: ``save_snapshot`` with and without ``fsync``, interleaved.

    python benchmarks/snapshot_cost.py                               # the digits model and crossformer_s
    python benchmarks/snapshot_cost.py --models crossformer_s --rounds 5 --dir /scratch/runs

Each round saves one snapshot (weights + AdamW state + state.json + manifest with SHA-256) as
``crossformer train`` does, once with ``fsync`` and once with ``os.fsync`` replaced by a no-op, in
turn, into fresh folders under ``--dir`` (the filesystem matters: pass the one your runs write to).
Reports medians, the ratio, and the part of a save spent hashing the files for the manifest.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from crossformer.models import create_model
from crossformer.train.config import load_config
from crossformer.train.snapshot import _sha256, save_snapshot

DIGITS = load_config()


def build(name: str):
    """A model and an AdamW optimizer whose state is filled by one step."""
    if name == 'digits':
        model = create_model(DIGITS.model, 10, DIGITS.model_kwargs)
    else:
        model = create_model(name, 1000, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['digits', 'crossformer_s'])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--dir', default=None, help='where to write (default: the system temp folder)')
    args = parser.parse_args()
    real_fsync = os.fsync
    root = Path(tempfile.mkdtemp(prefix='snapshot_cost_', dir=args.dir))
    try:
        for name in args.models:
            model, optimizer = build(name)
            times = {'fsync': [], 'no fsync': []}
            hashing = []
            for r in range(args.rounds):
                for contender in times:
                    os.fsync = real_fsync if contender == 'fsync' else (lambda fd: None)
                    run = root / f'{name}-{r}-{contender.replace(" ", "_")}'
                    start = time.perf_counter()
                    path = save_snapshot(run, model, optimizer, dict(model=name), dict(step=r + 1, epoch=0, config={}))
                    times[contender].append(time.perf_counter() - start)
                    os.fsync = real_fsync
                    start = time.perf_counter()
                    size = 0
                    for file in path.iterdir():
                        _sha256(file)
                        size += file.stat().st_size
                    hashing.append(time.perf_counter() - start)
                    shutil.rmtree(run)
            durable, plain = (statistics.median(times[c]) for c in ('fsync', 'no fsync'))
            print(f'{name}: snapshot of {size / 2**20:.1f} MiB; save {durable:.3f} s with fsync, {plain:.3f} s without '
                  f'(x{durable / plain:.2f}, +{durable - plain:.3f} s); SHA-256 of its files {statistics.median(hashing):.3f} s '
                  f'(median of {args.rounds} interleaved rounds)')
    finally:
        os.fsync = real_fsync
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
