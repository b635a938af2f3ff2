"""What detect_shapes.py and segment_shapes.py share: the generated scenes and the training loop.

A scene is a noisy plain background with 1 to ``max_shapes`` non-overlapping circles, squares and
triangles in random colours, of log-uniform sides; each example turns its shapes into the targets
it learns (boxes, or a label map). Training is AdamW with a linear warm-up and a cosine decay to 0,
gradients clipped at norm 5. Everything is drawn from the generators given, so a run is
deterministic given its seed and the number of threads.
"""
import argparse
import math
import os
import time
from typing import Callable, List, Tuple

import torch
from tqdm import tqdm

CLASSES = ['background', 'circle', 'square', 'triangle']
SIZE = 64  # image side, pixels


def shape_mask(kind: int, cx: float, cy: float, size: float, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool mask of a circle (1), square (2) or upward triangle (3) of side ``size`` centred at (cx, cy)."""
    r = size / 2
    dx, dy = xx - cx, yy - cy
    if kind == 1:
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == 2:
        return (dx.abs() <= r) & (dy.abs() <= r)
    # triangle: apex at the top, base at the bottom, half-width growing linearly downwards
    return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)


def make_scene(gen: torch.Generator, size: int, min_side: int, max_side: int,
               max_shapes: int) -> Tuple[torch.Tensor, List[Tuple[int, torch.Tensor]]]:
    """One ``(3, size, size)`` image in [0, 1] and its shapes, as ``(kind, (size, size) bool mask)`` pairs."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
    background = rand(3, 1, 1)
    image = (background + 0.08 * torch.randn(3, size, size, generator=gen)).clamp(0, 1)
    shapes, taken = [], torch.zeros(size, size, dtype=torch.bool)
    for _ in range(int(rand(1) * max_shapes) + 1):
        for _attempt in range(10):  # find a place free of earlier shapes, so every shape is fully visible
            side = math.exp(math.log(min_side) + rand(1).item() * math.log(max_side / min_side))  # log-uniform
            cx, cy = (side / 2 + rand(2) * (size - side)).tolist()
            kind = int(rand(1) * 3) + 1
            mask = shape_mask(kind, cx, cy, side, yy, xx)
            if mask.any() and not (mask & taken).any():
                break
        else:
            continue
        colour = rand(3, 1, 1)
        while (colour - background).abs().max() < 0.35:  # keep the shape visible
            colour = rand(3, 1, 1)
        image = torch.where(mask, colour, image)
        taken |= mask
        shapes.append((kind, mask))
    return image, shapes


def training_arguments(description: str, steps: int, batch: int, lr: float, eval_images: int) -> argparse.ArgumentParser:
    """The options both examples take: steps, batch size, learning rate, held-out images, seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--steps', type=int, default=steps, help=f'training steps (default {steps})')
    parser.add_argument('--batch-size', type=int, default=batch)
    parser.add_argument('--lr', type=float, default=lr, help=f'peak learning rate (default {lr})')
    parser.add_argument('--eval-images', type=int, default=eval_images)
    parser.add_argument('--seed', type=int, default=0)
    return parser


def seeded(seed: int) -> Tuple[torch.Generator, torch.Generator]:
    """Uses as many threads as cores we may use (``OMP_NUM_THREADS`` wins; the same count gives the same
    numbers), seeds torch, and returns the generators of the training and the held-out images."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or cores))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)


def train(model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor], steps: int, batch_size: int,
          lr: float, warmup: int) -> List[float]:
    """Trains ``model`` for ``steps`` steps on ``batch_loss()`` (the loss of a new batch) and prints the time
    and the loss at the start and the end; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: the unfused update takes a large part of a CPU step (about 40% for detect_shapes.py)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, fused=True)
    warmup = min(warmup, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 0
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))

    model.train()
    start = time.perf_counter()
    losses: List[float] = []
    for _ in (bar := tqdm(range(steps), desc='training', unit='step', dynamic_ncols=True)):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f'{sum(losses[-10:]) / len(losses[-10:]):.3f}')
    train_time = time.perf_counter() - start
    n = min(10, len(losses))
    print(f'trained {len(losses)} steps of {batch_size} images in {train_time:.0f} s; '
          f'loss (mean of {n} steps) start {sum(losses[:n]) / n:.3f} -> end {sum(losses[-n:]) / n:.3f}')
    return losses
