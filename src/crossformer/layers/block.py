"""CrossFormer block (SDA or LDA attention + MLP, optional activation cooling) and stage."""
from typing import Callable, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, to_ntuple
from timm.models._manipulate import checkpoint_seq
from torch._higher_order_ops.cond import cond_op  # torch.cond without its dynamo pass
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..errors import ConfigError
from .attention import GroupAttention
from .cross_embed import CrossEmbedLayer
from .grouping import grid_layout, group_layout, group_tokens, is_whole_map, key_padding_mask, symbolic_sizes, ungroup_tokens
from .speedups import BlockSpeedups, padding_mask

__all__ = ['CrossFormerBlock', 'Stage', 'has_cooling']

# Shape logic with Python control flow: FX records these calls instead of tracing into them.
torch.fx.wrap('group_layout')
torch.fx.wrap('padding_mask')


def has_cooling(block_index: int, depth: int) -> bool:
    """Where CrossFormer++ puts an activation cooling layer: after every third block but the last."""
    return (block_index + 1) % 3 == 0 and block_index < depth - 1


class CrossFormerBlock(BlockSpeedups, nn.Module):
    """Pre-norm group attention and MLP, each with a residual; ``(B, H, W, C) -> (B, H, W, C)``.

    ``interval=1`` gives short-distance attention (SDA, adjacent ``G x G`` tokens); a larger
    interval gives long-distance attention (LDA, tokens ``interval`` apart). Maps of any size
    are padded to the group grid and the padded keys masked; a map whose short side is at most
    ``group_size`` is one group of all its tokens. With ``cooling=True`` (the
    CrossFormer++ activation cooling layer, ACL) the output is replaced by
    ``LayerNorm(depthwise_conv3x3(x))``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            group_size: int = 7,
            interval: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            cooling: bool = False,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if group_size < 1 or interval < 1:
            raise ConfigError(f'group_size and interval must be >= 1, got {group_size} and {interval}')
        dd = dict(device=device, dtype=dtype)
        self.group_size = group_size
        self.interval = interval
        self.norm1 = norm_layer(dim, **dd)
        self.attn = GroupAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # activation cooling layer; names as in the reference checkpoints
        self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd) if cooling else None
        self.ex_ln = norm_layer(dim, **dd) if cooling else None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """SDA or LDA over the groups of a ``(B, H, W, C)`` map, padded to the group grid and cropped back."""
        B, H, W, C = x.shape
        if not torch.jit.is_scripting() and symbolic_sizes(H, W):
            # torch.export: the choice of layout is part of the graph where the sizes leave it open
            # (torch.compile's dynamo shows sizes as ints, so it decides in Python and recompiles per layout)
            whole = is_whole_map(H, W, self.group_size)
            if statically_known_true(whole):
                return self.attend_whole(x).view(B, H, W, C)
            if statically_known_true(torch.sym_not(whole)):
                return self.attend_grid(x).view(B, H, W, C)
            return self.attend_either(x).view(B, H, W, C)
        Gh, Gw, I, Hp, Wp = group_layout(H, W, self.group_size, self.interval)
        return self.attend_groups(x, Gh, Gw, I, Hp, Wp, padding_mask(H, W, Gh, Gw, I, Hp, Wp, x.device))

    def attend_groups(self, x: torch.Tensor, group_h: int, group_w: int, interval: int, padded_h: int,
                      padded_w: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`attend` with a given layout; the map is padded and cropped where ``mask`` is given."""
        B, H, W, C = x.shape
        if mask is not None:
            x = F.pad(x, (0, 0, 0, padded_w - W, 0, padded_h - H))
        x = self.attn(group_tokens(x, group_h, group_w, interval), group_h, group_w, mask)  # B * groups, Gh*Gw, C
        x = ungroup_tokens(x, group_h, group_w, interval, padded_h, padded_w)
        return x[:, :H, :W] if mask is not None else x

    @torch.jit.unused
    def attend_either(self, x: torch.Tensor) -> torch.Tensor:
        """``cond(min(H, W) <= G, attend_whole, attend_grid)`` on a ``(B, H, W, C)`` map; flat.

        Outside dynamo (non-strict export) the cond is traced as the higher-order op itself:
        ``torch.cond`` would first run dynamo over both branches, which took half an export. What
        dynamo would add, lifting the tensors a branch reads into operands, is done here for the
        attention's parameters.
        """
        whole = is_whole_map(x.shape[1], x.shape[2], self.group_size)
        if torch.compiler.is_dynamo_compiling():  # strict export: dynamo lifts what the branches read
            return torch.cond(whole, self.attend_whole, self.attend_grid, (x,))
        names, params = zip(*self.attn.named_parameters())

        def branch(attend_layout):
            def run(x, *params):
                def attention(tokens, group_h, group_w, mask):
                    return torch.func.functional_call(self.attn, dict(zip(names, params)), (tokens, group_h, group_w, mask))
                return (attend_layout(x, attention),)  # a tuple, as dynamo would return it
            return run

        return cond_op(whole, branch(self.attend_whole), branch(self.attend_grid), (x, *params))[0]

    @torch.jit.unused
    def attend_whole(self, x: torch.Tensor, attention: Optional[Callable] = None) -> torch.Tensor:
        """:meth:`attend` of a map whose short side is at most G, one group of its ``H x W`` tokens; flat.

        ``attention(tokens, Gh, Gw, mask)`` is ``self.attn`` unless given.
        """
        B, H, W, C = x.shape
        attention = attention or self.attn
        return ungroup_tokens(attention(group_tokens(x, H, W, 1), H, W, None), H, W, 1, H, W).reshape(-1)

    @torch.jit.unused
    def attend_grid(self, x: torch.Tensor, attention: Optional[Callable] = None) -> torch.Tensor:
        """:meth:`attend` in ``G x G`` groups, always padded and masked (a zero pad changes nothing); flat."""
        B, H, W, C = x.shape
        attention = attention or self.attn
        Gh, Gw, I, Hp, Wp = grid_layout(H, W, self.group_size, self.interval)
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        x = attention(group_tokens(x, Gh, Gw, I), Gh, Gw, key_padding_mask(H, W, Gh, Gw, I, Hp, Wp, x.device))
        x = ungroup_tokens(x, Gh, Gw, I, Hp, Wp)
        # cropped by gathering rows and columns: a new tensor of exactly H x W (a slice's size would be
        # min(H, Hp), its strides those of the padded map), as attend_whole returns
        x = x.index_select(1, torch.arange(H, device=x.device))
        return x.index_select(2, torch.arange(W, device=x.device)).reshape(-1)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + MLP(norm2(x))`` over tokens ``(..., C)``."""
        if not torch.jit.is_scripting() and self.speedup_applies(x):
            return self.speedup(x)  # in token chunks at CPU inference; GELU recomputed in backward
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attend(self.norm1(x)))
        x = self.mlp_residual(x)
        if self.ex_conv is not None:
            x = self.ex_ln(self.ex_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x


class Stage(nn.Module):
    """One resolution of the hierarchy: optional down-sampling CEL, then blocks alternating SDA and LDA.

    ``(B, H, W, C_in) -> (B, ceil(H/2), ceil(W/2), dim)`` with down-sampling, else ``(B, H, W, dim)``.
    Even-indexed blocks use SDA, odd-indexed blocks LDA with this stage's interval.
    """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            group_size: int = 7,
            interval: int = 1,
            downsample_kernel_sizes: Optional[Sequence[int]] = (2, 4),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            cooling: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[float, Sequence[float]] = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample_kernel_sizes:
            self.downsample = CrossEmbedLayer(
                in_dim, dim, downsample_kernel_sizes, stride=2, norm_first=True, norm_layer=norm_layer, **dd)
        else:
            if in_dim != dim:
                raise ConfigError(f'a stage without down-sampling keeps its width: in_dim {in_dim} != dim {dim}')
            self.downsample = nn.Identity()
        drop_path = to_ntuple(depth)(drop_path)
        self.blocks = nn.Sequential(*[
            CrossFormerBlock(
                dim, num_heads,
                group_size=group_size,
                interval=interval if j % 2 else 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[j],
                cooling=cooling and has_cooling(j, depth),
                norm_layer=norm_layer,
                **dd,
            )
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)
