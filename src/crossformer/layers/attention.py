"""Attention inside groups (the maths shared by SDA and LDA), biased by the DPB."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import use_fused_attn

from ..errors import ConfigError
from .grouping import exporting
from .pos_bias import DynamicPosBias
from .speedups import AttentionSpeedups

__all__ = ['GroupAttention', 'dpb_hidden_dim', 'group_attention']


def dpb_hidden_dim(dim: int) -> int:
    """Hidden width of the DPB MLP for a block of width ``dim``.

    The reference builds the DPB with ``dim // 4`` and the DPB divides by 4 again; published
    checkpoints depend on it, so it is kept here, written once.
    """
    return dim // 16


def group_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        mask: Optional[torch.Tensor],
        fused: bool,
        dropout_p: float = 0.,
) -> torch.Tensor:
    """Softmax attention of ``(B * groups, heads, Nq, head_dim)`` queries on ``Nk`` keys and values.

    ``bias`` is ``(heads, Nq, Nk)``, the same for every group; ``mask`` is ``(groups, 1, 1, Nk)``
    additive (padded keys) or None. A pure function, so tracing (FX) records it as one call.
    """
    B_, heads, Nq, head_dim = q.shape
    Nk = k.shape[2]
    bias = bias.unsqueeze(0)  # 1, heads, Nq, Nk
    if mask is not None:
        bias = bias + mask  # groups, heads, Nq, Nk: one per group position, the same for every image
        if q.dtype == torch.float16:
            bias = bias.clamp_min(-3e4)  # -1e6 would become -inf: NaN in a group of padding only
    bias = bias.to(q.dtype)
    # On CPU, SDPA falls back to its slow math path when the mask needs a gradient (the DPB
    # while training); the explicit path is faster there (measured in benchmarks/).
    if fused and not (bias.requires_grad and q.device.type == 'cpu'):
        if mask is not None:
            # SDPA's fast CPU kernel takes a 4-D mask only, so expand it over the images
            bias = bias.expand(B_ // mask.shape[0], -1, -1, -1, -1).reshape(B_, heads, Nq, Nk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if not torch.jit.is_scripting() and exporting():
        # torch.export: 3-D products, as symbolic sizes make the 4-D matmul's reshapes guard on Nq != 1
        q, k, v = [t.clone(memory_format=torch.contiguous_format).flatten(0, 1) for t in (q, k, v)]
        attn = torch.bmm(q * head_dim ** -0.5, k.transpose(1, 2)).view(B_, heads, Nq, Nk)
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.view(-1, mask.shape[0], heads, Nq, Nk)  # B, groups, heads, Nq, Nk
    attn = F.dropout((attn + bias).softmax(dim=-1), dropout_p, training=dropout_p > 0.)
    if not torch.jit.is_scripting() and exporting():
        return torch.bmm(attn.reshape(B_ * heads, Nq, Nk), v).view(B_, heads, Nq, head_dim)
    return attn.view(B_, heads, Nq, Nk) @ v


torch.fx.wrap('group_attention')


class GroupAttention(AttentionSpeedups, nn.Module):
    """Multi-head self-attention inside each group of tokens.

    ``forward(x, group_h, group_w, mask)``: ``x`` is ``(B * num_groups, Gh*Gw, C)``, groups
    ordered image-major, tokens row-major inside a ``Gh x Gw`` group; ``mask`` is
    ``(num_groups, 1, 1, Gh*Gw)`` additive or None. Returns the same shape as ``x``. Grouping
    (SDA or LDA) happens outside: to attention a group is a group.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if dpb_hidden_dim(dim) < 1:
            raise ConfigError(f'dim {dim} is too small: the position-bias MLP needs dim >= 16')
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = use_fused_attn()
        self.pos = DynamicPosBias(dpb_hidden_dim(dim), num_heads, **dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.jit.unused
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  mask: Optional[torch.Tensor], dropout_p: float, fused: Optional[bool] = None) -> torch.Tensor:
        """:func:`group_attention`, fused or explicit as ``fused`` says, by default as this layer does."""
        return group_attention(q, k, v, bias, mask, self.fused_attn if fused is None else fused, dropout_p)

    def forward(self, x: torch.Tensor, group_h: int, group_w: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.speedup_applies(x, mask):
            return self.speedup(x, group_h, group_w, mask)  # CPU inference a few groups at a time; huge groups
        B_, N, C = x.shape
        qkv = self.qkv(x).view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B_, heads, N, head_dim
        bias = self.pos(group_h, group_w, q.dtype, q.device)  # heads, N, N
        dropout_p = self.attn_drop.p if self.training else 0.
        x = group_attention(q, k, v, bias, mask, self.fused_attn, dropout_p)
        x = x.transpose(1, 2)  # B_, N, heads, head_dim
        if not torch.jit.is_scripting() and exporting():
            x = x.clone(memory_format=torch.contiguous_format)  # a view under symbolic sizes would guard on N != 1
        x = x.reshape(B_, N, C)
        return self.proj_drop(self.proj(x))
