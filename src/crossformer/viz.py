"""Pictures that explain a CrossFormer: attention groups and dynamic position biases.

- :func:`plot_groups`: on an ``H x W`` token map, which tokens attend to each other in short-
  distance attention (SDA, adjacent ``G x G`` tokens) and in long-distance attention (LDA, tokens
  ``I`` apart). Each group has its own colour; one group is marked with dots; padding is grey.
- :func:`plot_dpb`: the bias the DPB of a block adds for every relative offset ``(dh, dw)``
  inside a group, one panel per head.
- :func:`explain`: both, for every stage of a model at an input size.

The group maps use the model's own pure grouping functions, so they show exactly what runs.
"""
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .layers import group_layout, group_tokens, relative_offsets

__all__ = ['group_ids', 'plot_groups', 'dpb_table', 'plot_dpb', 'explain']


def group_ids(height: int, width: int, group_size: int,
              interval: int) -> Tuple[torch.Tensor, Tuple[int, int], int]:
    """Group index of every token of the padded map, ``(Hp, Wp)`` int64, the group shape ``(Gh, Gw)``
    and the interval used.

    The small-map rule applies as in the model: a map whose short side is at most G is one group.
    """
    Gh, Gw, I, Hp, Wp = group_layout(height, width, group_size, interval)
    positions = torch.arange(Hp * Wp, dtype=torch.float64).view(1, Hp, Wp, 1)
    grouped = group_tokens(positions, Gh, Gw, I).squeeze(-1).long()  # groups, Gh*Gw
    ids = torch.empty(Hp * Wp, dtype=torch.long)
    ids[grouped.reshape(-1)] = torch.arange(grouped.shape[0]).repeat_interleave(Gh * Gw)
    return ids.view(Hp, Wp), (Gh, Gw), I


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _draw_groups(ax, height: int, width: int, group_size: int, interval: int) -> None:
    ids, (Gh, Gw), I = group_ids(height, width, group_size, interval)
    Hp, Wp = ids.shape
    n = int(ids.max()) + 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # neighbours get distinct colours
    colours = _pyplot().get_cmap('hsv')(np.linspace(0, 1, n, endpoint=False))[order.numpy()]
    rgb = colours[ids.numpy()][..., :3] * 0.75 + 0.25
    pad = np.zeros((Hp, Wp), dtype=bool)
    pad[height:, :] = pad[:, width:] = True
    rgb[pad] = 0.85
    ax.imshow(rgb, interpolation='nearest')
    ys, xs = np.nonzero((ids == ids[0, 0]).numpy())
    ax.scatter(xs, ys, s=max(2, 900 / max(Hp, Wp)), c='black', marker='o')
    kind = 'SDA' if I == 1 else f'LDA, interval {I}'
    ax.set_title(f'{kind}: {n} groups of {Gh}x{Gw}' + (f', padded to {Hp}x{Wp}' if pad.any() else ''), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_groups(height: int, width: int, group_size: int, interval: int, path, title: str = '') -> Path:
    """SDA and LDA groups of an ``height x width`` token map side by side (SDA only if interval is 1), as a PNG."""
    plt = _pyplot()
    intervals = (1, interval) if interval > 1 else (1,)
    fig, axes = plt.subplots(1, len(intervals), figsize=(5 * len(intervals), 5.4), layout='constrained', squeeze=False)
    for ax, i in zip(axes.flat, intervals):
        _draw_groups(ax, height, width, group_size, i)
    fig.suptitle(title or f'{height}x{width} tokens, group size {group_size}')
    return _save(fig, path)


def dpb_table(block: nn.Module, group_size: int) -> torch.Tensor:
    """``(heads, 2G-1, 2G-1)``: the bias of a block's DPB for every offset ``(dh, dw)``."""
    pos = block.attn.pos
    with torch.no_grad():
        ref = next(pos.parameters())
        offsets = relative_offsets(group_size, group_size, ref.device).to(ref.dtype)
        table = pos.table(offsets)  # (2G-1)^2, heads
    side = 2 * group_size - 1
    return table.T.reshape(-1, side, side).float().cpu()


def plot_dpb(block: nn.Module, group_size: int, path, title: str = '') -> Path:
    """One panel per head of :func:`dpb_table`, saved as a PNG."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    table = dpb_table(block, group_size)
    heads, side = table.shape[0], table.shape[-1]
    cols = min(heads, 8)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows + 0.8), squeeze=False, layout='constrained')
    extent = (-(group_size - 0.5), group_size - 0.5, group_size - 0.5, -(group_size - 0.5))
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis('off')
            continue
        im = ax.imshow(table[h].numpy(), cmap='viridis', extent=extent, interpolation='nearest')
        ax.set_title(f'head {h}', fontsize=8)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, format='%.3g')
        bar.locator = MaxNLocator(4)
        bar.update_ticks()
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(title or f'DPB bias by offset (dh down, dw across), {side}x{side} offsets')
    return _save(fig, path)


def _save(fig, path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight'))
    finally:
        _pyplot().close(fig)


def explain(model: nn.Module, img_size: Sequence[int], output, name: str = 'model') -> List[Path]:
    """For every stage at ``img_size`` (H, W): its SDA/LDA groups and the DPBs of its first two blocks."""
    output = Path(output)
    written = []
    for i, stage in enumerate(model.layers):
        stride = model.feature_info[i]['reduction']
        H, W = (-(-s // stride) for s in img_size)
        blocks = list(stage.blocks)
        lda = next((b for b in blocks if b.interval > 1), blocks[0])  # none in a one-block stage
        written.append(plot_groups(H, W, lda.group_size, lda.interval, output / f'groups_stage{i}.png',
                                   title=f'{name} stage {i}: {H}x{W} tokens (stride {stride})'))
        for j, block in enumerate(blocks[:2]):
            G = max(group_layout(H, W, block.group_size, block.interval)[:2])  # offsets of a whole-map group too
            kind = 'SDA' if j % 2 == 0 else 'LDA'
            written.append(plot_dpb(block, G, output / f'dpb_stage{i}_block{j}.png',
                                    title=f'{name} stage {i} block {j} ({kind}): DPB bias for {G}x{G} groups, '
                                          f'offset (dh down, dw across)'))
    return written
