"""Cross-scale embedding layer (CEL): the stem and the down-sampling between stages."""
from typing import List, Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

from .capture import capturing

__all__ = ['CrossEmbedLayer', 'split_dims', 'space_to_depth_conv']


def split_dims(out_dim: int, num_kernels: int) -> list[int]:
    """Output channels per kernel: halve for each larger kernel, the last takes the remainder.

    ``split_dims(96, 4) == [48, 24, 12, 12]`` and ``split_dims(192, 2) == [96, 96]``: the
    smallest kernel, the cheapest one, gets the largest share (paper, Sec. 3.1).
    """
    dims = [out_dim // 2 ** (i + 1) for i in range(num_kernels - 1)]
    dims.append(out_dim - sum(dims))
    if min(dims) < 1:
        raise ValueError(f'cannot split {out_dim} channels over {num_kernels} kernels; use at least {2 ** (num_kernels - 1)}')
    return dims


def space_to_depth_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a square kernel that is a multiple of the stride, as a stride-1 convolution.

    Regroups ``s x s`` pixel cells into channels (and the kernel alike), so the kernel shrinks
    to ``k / s``: the same sums, in another order. CPU backends handle a large strided kernel on
    few input channels badly; for the stem's kernels 8/16/32 at stride 4, on 2 cores, this is
    3.2x faster at batch 16 x 224 x 224 (243 -> 76 ms) and 5.8x on one 1024 x 1024 image
    (531 -> 91 ms; 100x on one core), and the weight gradient is faster too (``benchmarks/``).
    """
    B, C, H, W = x.shape
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    Hp, Wp = (H + 2 * p + s - 1) // s * s, (W + 2 * p + s - 1) // s * s
    x = F.pad(x, (p, Wp - W - p, p, Hp - H - p))
    x = x.view(B, C, Hp // s, s, Wp // s, s).permute(0, 1, 3, 5, 2, 4).reshape(B, C * s * s, Hp // s, Wp // s)
    O = conv.out_channels
    w = conv.weight.view(O, C, k // s, s, k // s, s).permute(0, 1, 3, 5, 2, 4).reshape(O, C * s * s, k // s, k // s)
    return F.conv2d(x, w, conv.bias)[:, :, :out_h, :out_w]


# Space-to-depth pays off on CPU where the strided kernel is large and the input narrow (the stem);
# the merges between stages (kernels 2 and 4 at stride 2 on 96+ channels) are faster as they are.
SPACE_TO_DEPTH_MAX_CHANNELS = 64  # input channels after regrouping, C * stride**2


class CrossEmbedLayer(nn.Module):
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
    ):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        bad = [k for k in kernel_sizes if k < stride or (k - stride) % 2]
        if bad:
            raise ValueError(f'kernel sizes {bad} do not fit stride {stride}: each must be >= stride and differ from it by an even number')
        self.stride = stride
        self.norm_first = norm_first
        self.projs = nn.ModuleList([
            nn.Conv2d(in_dim, dim, kernel_size=k, stride=stride, padding=(k - stride) // 2)
            for k, dim in zip(kernel_sizes, split_dims(out_dim, len(kernel_sizes)))
        ])
        self.norm = norm_layer(in_dim if norm_first else out_dim)
        self.fast_paths = True
        self.space_to_depth = [k >= 2 * stride and k % stride == 0 and in_dim * stride ** 2 <= SPACE_TO_DEPTH_MAX_CHANNELS
                               for k in kernel_sizes]

    @torch.jit.unused
    def _fast_convs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The convolutions, the large stem kernels through :func:`space_to_depth_conv`."""
        return [space_to_depth_conv(x, proj) if s2d else proj(x) for proj, s2d in zip(self.projs, self.space_to_depth)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x).permute(0, 3, 1, 2)  # B, C, H, W
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % self.stride, 0, (-H) % self.stride))
        if self.fast_paths and any(self.space_to_depth) and not capturing() and x.device.type == 'cpu':
            x = torch.cat(self._fast_convs(x), dim=1)
        else:
            x = torch.cat([proj(x) for proj in self.projs], dim=1)
        x = x.permute(0, 2, 3, 1)  # B, H', W', C_out
        if not self.norm_first:
            x = self.norm(x)
        return x
