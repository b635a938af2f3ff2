"""Constructor arguments of other CrossFormer implementations, mapped to this library's.

vit-pytorch (``vit_pytorch.crossformer.CrossFormer``) and the Flax port
(``Crossformer-flax``) share one constructor. Their weights do not transfer (other module
structure: no qkv bias, no stem norm, a single-output position MLP), but their configurations
do, with two differences in meaning that this mapping resolves:

- their ``depth`` counts SDA+LDA *pairs*, so each stage has ``2 * depth`` blocks here;
- their ``global_window_size`` is the paper's LDA interval ``I`` (8/4/2/1 in the paper). Their
  code groups ``I x I`` tokens spaced ``side / I`` apart, the transpose of the paper's
  ``G x G`` tokens spaced ``I`` apart, which is what this library computes.
"""
from typing import Any, Dict, Sequence, Union

from timm.layers import to_ntuple

from .errors import ConfigError

__all__ = ['from_vit_pytorch_kwargs']

_per_stage = to_ntuple(4)  # one value for every stage, or one per stage


def from_vit_pytorch_kwargs(
        *,
        dim: Union[int, Sequence[int]] = (64, 128, 256, 512),
        depth: Union[int, Sequence[int]] = (2, 2, 8, 2),
        global_window_size: Union[int, Sequence[int]] = (8, 4, 2, 1),
        local_window_size: Union[int, Sequence[int]] = 7,
        cross_embed_kernel_sizes: Sequence = ((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides: Union[int, Sequence[int]] = (4, 2, 2, 2),
        num_classes: int = 1000,
        attn_dropout: float = 0.,
        ff_dropout: float = 0.,
        channels: int = 3,
        dim_head: int = 32,
) -> Dict[str, Any]:
    """Keyword arguments for :class:`crossformer.CrossFormer` from vit-pytorch's constructor arguments."""
    dims = _per_stage(dim)
    kernels = list(cross_embed_kernel_sizes)
    strides = _per_stage(cross_embed_strides)
    if any(tuple(k) != tuple(kernels[1]) for k in kernels[2:]) or any(s != 2 for s in strides[1:]):
        raise ConfigError('this library uses one kernel set and stride 2 for every down-sampling; '
                         f'got kernels {kernels[1:]} and strides {strides[1:]}')
    return dict(
        in_chans=channels,
        num_classes=num_classes,
        embed_dim=dims,
        depths=tuple(2 * d for d in _per_stage(depth)),
        num_heads=tuple(d // dim_head for d in dims),
        group_size=_per_stage(local_window_size),
        interval=_per_stage(global_window_size),
        stem_kernel_sizes=tuple(kernels[0]),
        stem_stride=strides[0],
        merge_kernel_sizes=tuple(kernels[1]),
        attn_drop_rate=attn_dropout,
        proj_drop_rate=ff_dropout,
    )
