"""Cross-scale embedding layer (CEL): the stem and the down-sampling between stages."""
from typing import Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .speedups import CrossEmbedSpeedups

__all__ = ['CrossEmbedLayer', 'split_dims']


def split_dims(out_dim: int, num_kernels: int) -> list[int]:
    """Output channels per kernel: halve for each larger kernel, the last takes the remainder.

    ``split_dims(96, 4) == [48, 24, 12, 12]`` and ``split_dims(192, 2) == [96, 96]``: the
    smallest kernel, the cheapest one, gets the largest share (paper, Sec. 3.1).
    """
    dims = [out_dim // 2 ** (i + 1) for i in range(num_kernels - 1)]
    dims.append(out_dim - sum(dims))
    if min(dims) < 1:
        raise ConfigError(f'cannot split {out_dim} channels over {num_kernels} kernels; use at least {2 ** (num_kernels - 1)}')
    return dims


class CrossEmbedLayer(CrossEmbedSpeedups, nn.Module):
    """Convolutions of several kernel sizes and one stride, concatenated along channels.

    Every convolution uses padding ``(k - stride) // 2`` so all of them sample the same grid.
    The input is zero-padded on the right and bottom to a multiple of ``stride``, so an
    ``H x W`` map becomes ``ceil(H / stride) x ceil(W / stride)``.

    Two placements, as in the paper:
    - stem (``norm_first=False``): ``(B, C_in, H, W)`` image -> convs -> LayerNorm -> ``(B, H', W', C_out)``
    - between stages (``norm_first=True``): ``(B, H, W, C_in)`` tokens -> LayerNorm -> convs -> ``(B, H', W', C_out)``
    """

    def __init__(
            self,
            in_dim: int,
            out_dim: int,
            kernel_sizes: Sequence[int],
            stride: int,
            norm_first: bool = False,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        kernel_sizes = sorted(kernel_sizes)
        bad = [k for k in kernel_sizes if k < stride or (k - stride) % 2]
        if bad:
            raise ConfigError(f'kernel sizes {bad} do not fit stride {stride}: each must be >= stride and differ from it by an even number')
        self.stride = stride
        self.norm_first = norm_first
        self.projs = nn.ModuleList([
            nn.Conv2d(in_dim, dim, kernel_size=k, stride=stride, padding=(k - stride) // 2, **dd)
            for k, dim in zip(kernel_sizes, split_dims(out_dim, len(kernel_sizes)))
        ])
        self.norm = norm_layer(in_dim if norm_first else out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x).permute(0, 3, 1, 2)  # B, C, H, W
        H, W = x.shape[-2:]
        s = self.stride  # pad to a multiple of the stride; a floor division, which symbolic shapes keep simple
        x = F.pad(x, (0, (W + s - 1) // s * s - W, 0, (H + s - 1) // s * s - H))
        if not torch.jit.is_scripting() and self.speedup_applies(x):
            x = self.speedup(x)  # the same convolutions: packed weights, or large kernels as space-to-depth
        else:
            x = torch.cat([proj(x) for proj in self.projs], dim=1)
        x = x.permute(0, 2, 3, 1)  # B, H', W', C_out
        if not self.norm_first:
            x = self.norm(x)
        return x
