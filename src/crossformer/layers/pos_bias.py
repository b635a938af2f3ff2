"""Dynamic position bias (DPB): an MLP from a relative offset (dy, dx) to one bias per head."""
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .speedups import PosBiasSpeedups

__all__ = ['DynamicPosBias', 'relative_offsets', 'relative_position_index', 'gather_bias']


def relative_offsets(group_h: int, group_w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """All ``(2Gh-1) * (2Gw-1)`` offsets ``(dy, dx)`` inside a ``Gh x Gw`` group, row-major: ``(M, 2)`` float."""
    dy = torch.arange(1 - group_h, group_h, device=device, dtype=torch.float32)
    dx = torch.arange(1 - group_w, group_w, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(dy, dx, indexing='ij'), dim=-1).reshape(-1, 2)


def relative_position_index(group_h: int, group_w: int, device: Optional[torch.device] = None,
                            start: int = 0, stop: int = -1) -> torch.Tensor:
    """Row of :func:`relative_offsets` for each (query, key) pair of a group: ``(N, N)`` int64, ``N = Gh*Gw``.

    Tokens are numbered row-major inside their group; query ``i`` at ``(hi, wi)`` and key ``j``
    at ``(hj, wj)`` look up ``(hi - hj + Gh - 1) * (2Gw - 1) + (wi - wj + Gw - 1)``, that is
    ``p(i) - p(j) + p0`` with ``p(t) = ht * (2Gw - 1) + wt`` and ``p0`` the row of offset (0, 0).
    ``start``/``stop`` give only the rows of queries ``start .. stop-1`` (``stop=-1``: to the end).
    """
    rows = torch.arange(group_h, device=device)
    cols = torch.arange(group_w, device=device)
    p = (rows[:, None] * (2 * group_w - 1) + cols[None, :]).reshape(-1)  # N; no modulo, which ONNX lacks for symbolic sizes
    queries = p[start:] if stop < 0 else p[start:stop]
    return queries[:, None] - (p - (group_h - 1) * (2 * group_w - 1) - (group_w - 1))[None, :]


def gather_bias(table: torch.Tensor, group_h: int, group_w: int, start: int = 0, stop: int = -1) -> torch.Tensor:
    """Bias of queries ``start .. stop-1`` of a ``Gh x Gw`` group for every key, from its offset table.

    ``table`` is ``((2Gh-1) * (2Gw-1), heads)`` (:meth:`DynamicPosBias.offset_table`); returns
    ``(heads, queries, Gh*Gw)``.
    """
    return table.t()[:, relative_position_index(group_h, group_w, table.device, start, stop)]


class DynamicPosBias(PosBiasSpeedups, nn.Module):
    """Maps each relative offset to one bias per head, so one set of weights serves any group shape.

    ``forward(Gh, Gw, dtype, device)`` returns the bias for a ``Gh x Gw`` group:
    ``(num_heads, Gh*Gw, Gh*Gw)``.

    Structure (parameter names as in the reference, so its checkpoints load):
    ``pos_proj`` Linear(2 -> D), then ``pos1``, ``pos2``, ``pos3``, each LayerNorm(D) -> ReLU ->
    Linear; the last outputs ``num_heads`` values.
    """

    def __init__(self, hidden_dim: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if hidden_dim < 1:
            raise ConfigError(f'DynamicPosBias needs hidden_dim >= 1, got {hidden_dim}')
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.pos_proj = nn.Linear(2, hidden_dim, **dd)
        self.pos1 = self._step(hidden_dim, hidden_dim, dd)
        self.pos2 = self._step(hidden_dim, hidden_dim, dd)
        self.pos3 = self._step(hidden_dim, num_heads, dd)

    @staticmethod
    def _step(dim: int, out_dim: int, dd: dict) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(dim, **dd), nn.ReLU(inplace=True), nn.Linear(dim, out_dim, **dd))

    def table(self, offsets: torch.Tensor) -> torch.Tensor:
        """``(M, 2)`` offsets -> ``(M, num_heads)`` biases."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))

    def offset_table(self, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The bias of every offset inside a ``Gh x Gw`` group: ``((2Gh-1) * (2Gw-1), num_heads)``."""
        return self.table(relative_offsets(group_h, group_w, device).to(dtype))

    @torch.jit.unused
    def bias_rows(self, table: torch.Tensor, group_h: int, group_w: int, start: int, stop: int) -> torch.Tensor:
        """:func:`gather_bias`: queries ``start .. stop-1`` of a ``Gh x Gw`` group, from ``table``."""
        return gather_bias(table, group_h, group_w, start, stop)

    def bias(self, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The bias for a ``Gh x Gw`` group, offsets given in ``dtype`` on ``device``: ``(num_heads, N, N)``."""
        return gather_bias(self.offset_table(group_h, group_w, dtype, device), group_h, group_w)

    def forward(self, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.speedup_applies():
            return self.speedup(group_h, group_w, dtype, device)  # cached while no gradient is recorded
        return self.bias(group_h, group_w, dtype, device)
