"""Dynamic position bias (DPB): an MLP from a relative offset (dy, dx) to one bias per head."""
from typing import Dict, Optional

import torch
from torch import nn

from .capture import capturing

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


class DynamicPosBias(nn.Module):
    """Maps each relative offset to one bias per head, so one set of weights serves any group size.

    ``forward(G)`` returns the bias for a ``G x G`` group: ``(num_heads, G*G, G*G)``.

    Structure (parameter names as in the reference, so its checkpoints load):
    ``pos_proj`` Linear(2 -> D), then ``pos1``, ``pos2``, ``pos3``, each LayerNorm(D) -> ReLU ->
    Linear; the last outputs ``num_heads`` values. With ``residual=True`` the first two steps
    are added to their input.
    """

    def __init__(self, hidden_dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f'DynamicPosBias needs hidden_dim >= 1, got {hidden_dim}')
        self.residual = residual
        self.num_heads = num_heads
        self.pos_proj = nn.Linear(2, hidden_dim)
        self.pos1 = self._step(hidden_dim, hidden_dim)
        self.pos2 = self._step(hidden_dim, hidden_dim)
        self.pos3 = self._step(hidden_dim, num_heads)
        self.cache_bias = True
        self._cache: Dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _step(dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def table(self, offsets: torch.Tensor) -> torch.Tensor:
        """``(M, 2)`` offsets -> ``(M, num_heads)`` biases."""
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
        else:
            pos = self.pos2(self.pos1(pos))
        return self.pos3(pos)

    def bias(self, group_size: int) -> torch.Tensor:
        """The bias for a ``G x G`` group, always computed: ``(num_heads, G*G, G*G)``."""
        device = self.pos_proj.weight.device
        offsets = relative_offsets(group_size, device).to(self.pos_proj.weight.dtype)
        table = self.table(offsets)  # (2G-1)^2, heads
        index = relative_position_index(group_size, device)
        N = group_size * group_size
        return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, group_size: int) -> torch.Tensor:
        """:meth:`bias`, cached per group size while no gradient is recorded.

        The cache key holds the parameters' device, dtype and version counters, so an
        optimizer step or ``load_state_dict`` invalidates it; training recomputes every call.
        """
        if not self.cache_bias or torch.is_grad_enabled() or capturing():
            return self.bias(group_size)
        return self._cached_bias(group_size)

    @torch.jit.unused
    def _cached_bias(self, group_size: int) -> torch.Tensor:
        weight = self.pos_proj.weight
        key = (group_size, weight.device, weight.dtype, tuple(p._version for p in self.parameters()))
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[1:] == key[1:]}  # drop stale entries
            self._cache[key] = self.bias(group_size)
        return self._cache[key]
