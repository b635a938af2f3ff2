"""Dynamic position bias (DPB): an MLP from a relative offset (dy, dx) to one bias per head."""
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .speedups import PosBiasSpeedups

__all__ = ['DynamicPosBias', 'relative_offsets', 'relative_position_index']


def relative_offsets(group_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """All ``(2G-1)**2`` offsets ``(dy, dx)`` inside a ``G x G`` group, row-major: ``((2G-1)**2, 2)`` float."""
    r = torch.arange(1 - group_size, group_size, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, indexing='ij'), dim=-1).reshape(-1, 2)


def relative_position_index(group_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Row of :func:`relative_offsets` for each (query, key) pair of a group: ``(G*G, G*G)`` int64.

    Tokens are numbered row-major inside their group; query ``i`` at ``(hi, wi)`` and key ``j``
    at ``(hj, wj)`` look up ``(hi - hj + G - 1) * (2G - 1) + (wi - wj + G - 1)``.
    """
    G = group_size
    r = torch.arange(G, device=device)
    coords = torch.stack(torch.meshgrid(r, r, indexing='ij')).flatten(1)  # 2, G*G
    rel = coords[:, :, None] - coords[:, None, :] + (G - 1)  # 2, G*G, G*G
    return rel[0] * (2 * G - 1) + rel[1]


class DynamicPosBias(PosBiasSpeedups, nn.Module):
    """Maps each relative offset to one bias per head, so one set of weights serves any group size.

    ``forward(G, dtype, device)`` returns the bias for a ``G x G`` group: ``(num_heads, G*G, G*G)``.

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

    def bias(self, group_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The bias for a ``G x G`` group, offsets given in ``dtype`` on ``device``: ``(num_heads, G*G, G*G)``."""
        table = self.table(relative_offsets(group_size, device).to(dtype))  # (2G-1)^2, heads
        index = relative_position_index(group_size, device)
        N = group_size * group_size
        return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, group_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.speedup_applies():
            return self.speedup(group_size, dtype, device)  # cached while no gradient is recorded
        return self.bias(group_size, dtype, device)
