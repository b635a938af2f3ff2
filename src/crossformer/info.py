"""Measured facts about the variants (params, GMACs, feature maps) next to the paper's figures.

GMACs are counted by ``torch.utils.flop_counter`` (FLOPs / 2) on a model built on the meta
device: shapes only, nothing allocated or computed, so every variant at any size is quick. The paper's "FLOPs" are multiply-accumulates.
"""
import difflib
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ['variant_names', 'check_model_name', 'paper_figures', 'measure', 'format_table']


def variant_names() -> List[str]:
    import timm
    return timm.list_models('crossformer*')  # registered when this package was imported


def check_model_name(name: str) -> str:
    """``name`` if it is a CrossFormer variant, else a ValueError naming close matches."""
    names = variant_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        raise ValueError(f'unknown model {name!r}' + (f'; did you mean {", ".join(close)}?' if close else '')
                         + f' Known: {", ".join(names)}')
    return name


def paper_figures(name: str) -> Dict[str, Optional[float]]:
    """The paper's ImageNet-1k top-1 (%), params (M) and GFLOPs of a variant."""
    from .models.crossformer import PAPER_RESULTS
    return dict(PAPER_RESULTS.get(name, dict(top1=None, params_m=None, gflops=None)))


def measure(name: str, img_size: Sequence[int] = (224, 224)) -> Dict[str, Any]:
    """Params, GMACs at ``img_size`` (H, W), and per-stage (channels, stride, map size)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):  # shapes only: no memory, no initialization
        model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    stages = [dict(channels=f['num_chs'], stride=f['reduction'],
                   size=tuple(-(-s // f['reduction']) for s in img_size)) for f in model.feature_info]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, *img_size, device='meta'))
    return dict(name=name, params=params, gmacs=counter.get_total_flops() / 2e9, stages=stages,
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
