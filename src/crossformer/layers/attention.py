"""Attention inside groups (the maths shared by SDA and LDA), biased by the DPB."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import use_fused_attn

from .pos_bias import DynamicPosBias

__all__ = ['GroupAttention', 'dpb_hidden_dim']


def dpb_hidden_dim(dim: int) -> int:
    """Hidden width of the DPB MLP for a block of width ``dim``.

    The reference builds the DPB with ``dim // 4`` and the DPB divides by 4 again; published
    checkpoints depend on it, so it is kept here, written once.
    """
    return dim // 16


class GroupAttention(nn.Module):
    """Multi-head self-attention inside each group of tokens.

    ``forward(x, group_size, mask)``: ``x`` is ``(B * num_groups, G*G, C)``, groups ordered
    image-major; ``mask`` is ``(num_groups, 1, 1, G*G)`` additive or None. Returns the same
    shape as ``x``. Grouping (SDA or LDA) happens outside: to attention a group is a group.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            dpb_residual: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if dpb_hidden_dim(dim) < 1:
            raise ValueError(f'dim {dim} is too small: the position-bias MLP needs dim >= 16')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.pos = DynamicPosBias(dpb_hidden_dim(dim), num_heads, residual=dpb_residual)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, group_size: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B_, heads, N, head_dim
        bias = self.pos(group_size).unsqueeze(0)  # 1, heads, N, N
        if mask is not None:
            bias = bias + mask  # groups, heads, N, N: one per group position, the same for every image
        # On CPU, SDPA falls back to its slow math path when the mask needs a gradient (the DPB
        # while training); the explicit path is faster there (measured in benchmarks/).
        if self.fused_attn and not (bias.requires_grad and q.device.type == 'cpu'):
            if mask is not None:
                # SDPA's fast CPU kernel takes a 4-D mask only, so expand it over the images
                bias = bias.expand(B_ // mask.shape[0], -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.view(-1, mask.shape[0], self.num_heads, N, N)  # B, groups, heads, N, N
            attn = self.attn_drop((attn + bias).softmax(dim=-1))
            x = attn.view(B_, self.num_heads, N, N) @ v
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))
