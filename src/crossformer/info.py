"""Measured facts about the variants (params, GMACs, feature maps) next to the paper's figures.

GMACs are counted by ``torch.utils.flop_counter`` (FLOPs / 2) on a model built on the meta
device: shapes only, nothing allocated or computed, so every variant at any size is quick. The paper's "FLOPs" are multiply-accumulates.
"""
from typing import Any, Dict, Optional, Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import variant_names
from .models.crossformer import PAPER_RESULTS

__all__ = ['variant_names', 'paper_figures', 'count_gmacs', 'measure', 'format_table']


def paper_figures(name: str) -> Dict[str, Optional[float]]:
    """The paper's ImageNet-1k top-1 (%), params (M) and GFLOPs of a variant."""
    return dict(PAPER_RESULTS.get(name, dict(top1=None, params_m=None, gflops=None)))


def count_gmacs(model: nn.Module, img_size: Sequence[int], in_chans: int = 3) -> float:
    """Multiply-accumulates (G) of one forward of a ``(1, in_chans, H, W)`` image, by ``torch.utils.flop_counter``.

    The model may live on the meta device: then only shapes are computed.
    """
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, in_chans, *img_size, device=device))
    return counter.get_total_flops() / 2e9


def measure(name: str, img_size: Sequence[int] = (224, 224)) -> Dict[str, Any]:
    """Params, GMACs at ``img_size`` (H, W), and per-stage (channels, stride, map size)."""
    model = timm.create_model(name, device='meta').eval()  # shapes only: no memory, no initialization
    params = sum(p.numel() for p in model.parameters())
    stages = [dict(channels=f['num_chs'], stride=f['reduction'],
                   size=tuple(-(-s // f['reduction']) for s in img_size)) for f in model.feature_info]
    return dict(name=name, params=params, gmacs=count_gmacs(model, img_size), stages=stages,
                img_size=tuple(img_size), paper=paper_figures(name))


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table of :func:`measure` results."""
    size = 'x'.join(str(s) for s in rows[0]['img_size']) if rows else ''
    header = ('model', 'params', 'params M (paper)', f'GMACs @{size}', 'GFLOPs (paper)', 'top-1 % (paper)',
              'strides', 'channels')
    lines = [header]
    for r in rows:
        lines.append((
            r['name'], f'{r["params"]:,}', f'{r["params"] / 1e6:.1f} ({_fmt(r["paper"]["params_m"], ".1f")})',
            f'{r["gmacs"]:.2f}', _fmt(r['paper']['gflops'], '.1f'), _fmt(r['paper']['top1'], '.1f'),
            '/'.join(str(s['stride']) for s in r['stages']), '/'.join(str(s['channels']) for s in r['stages']),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(out)
