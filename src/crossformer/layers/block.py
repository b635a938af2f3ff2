"""CrossFormer block (SDA or LDA attention + MLP, optional activation cooling) and stage."""
from typing import Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.models._manipulate import checkpoint_seq

from .attention import GroupAttention
from .cross_embed import CrossEmbedLayer
from .grouping import group_layout, group_tokens, padding_mask, ungroup_tokens
from .capture import eager_cpu_inference
from .mlp import LeanMlp

__all__ = ['CrossFormerBlock', 'Stage', 'has_cooling']

# Shape logic with Python control flow: FX records these calls instead of tracing into them.
torch.fx.wrap('group_layout')
torch.fx.wrap('padding_mask')


def has_cooling(block_index: int, depth: int) -> bool:
    """Where CrossFormer++ puts an activation cooling layer: after every third block but the last."""
    return (block_index + 1) % 3 == 0 and block_index < depth - 1


class CrossFormerBlock(nn.Module):
    """Pre-norm group attention and MLP, each with a residual; ``(B, H, W, C) -> (B, H, W, C)``.

    ``interval=1`` gives short-distance attention (SDA, adjacent ``G x G`` tokens); a larger
    interval gives long-distance attention (LDA, tokens ``interval`` apart). Maps of any size
    are padded to the group grid and the padded keys masked. With ``cooling=True`` (the
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
    ):
        super().__init__()
        if group_size < 1 or interval < 1:
            raise ValueError(f'group_size and interval must be >= 1, got {group_size} and {interval}')
        self.group_size = group_size
        self.interval = interval
        self.norm1 = norm_layer(dim)
        self.attn = GroupAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = LeanMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # activation cooling layer; names as in the reference checkpoints
        self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cooling else None
        self.ex_ln = norm_layer(dim) if cooling else None
        # CPU inference fast path (see _mlp_residual); measured in benchmarks/
        self.fast_paths = True
        self.chunk_tokens = 1024

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        G, I, Hp, Wp = group_layout(H, W, self.group_size, self.interval)
        mask = padding_mask(H, W, G, I, Hp, Wp, x.device)
        if mask is not None:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        x = self.attn(group_tokens(x, G, I), G, mask)  # B * groups, G*G, C
        x = ungroup_tokens(x, G, I, Hp, Wp)
        return x[:, :H, :W] if mask is not None else x

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + MLP(norm2(x))``; at inference on CPU, chunk by chunk of tokens."""
        if not torch.jit.is_scripting() and self._chunks_apply(x):
            return self._chunked_mlp_residual(x)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    @torch.jit.unused
    def _chunks_apply(self, x: torch.Tensor) -> bool:
        return self.fast_paths and not self.training and eager_cpu_inference(x)

    @torch.jit.unused
    def _chunked_mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Over a whole map the MLP's 4x wide hidden layer streams through memory; chunk by chunk,
        each chunk's norm, hidden layer, GELU and residual stay in cache, and fc2 writes straight
        into the output. On 2 CPU cores, crossformer_s at batch 16: stage 1 MLP 2.4x, stage 2 1.5x,
        stage 3 1.3x, stage 4 (768 wide) unchanged (benchmarks/)."""
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        mlp = self.mlp
        for start in range(0, flat.shape[0], self.chunk_tokens):
            chunk = flat[start:start + self.chunk_tokens]
            hidden = mlp.act(mlp.fc1(self.norm2(chunk)))
            torch.addmm(mlp.fc2.bias, hidden, mlp.fc2.weight.t(), out=out[start:start + self.chunk_tokens]).add_(chunk)
        return out.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attend(self.norm1(x)))
        x = self._mlp_residual(x)
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
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample_kernel_sizes:
            self.downsample = CrossEmbedLayer(
                in_dim, dim, downsample_kernel_sizes, stride=2, norm_first=True, norm_layer=norm_layer)
        else:
            if in_dim != dim:
                raise ValueError(f'a stage without down-sampling keeps its width: in_dim {in_dim} != dim {dim}')
            self.downsample = nn.Identity()
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
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
            )
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)
