"""The products of the Linears and CEL convolutions at CPU inference, each through the path tuned
for this host (:mod:`.tuning`).

Every path computes the layer's product (tests hold them within 1e-5 of the definition):

- ``'default'``: torch's own call, the definition;
- ``'onednn'``: oneDNN with the weight packed once into its blocked layout (torch re-lays a
  convolution's weight out on every call), a Linear's GELU or residual add fused as a post-op;
- ``'fp32'``: a bf16 product as an fp32 product of the bf16-rounded values, rounded once, as a
  native bf16 product accumulates in fp32 (where oneDNN has no bf16 products torch emulates them,
  several times slower);
- ``'space_to_depth'``: a large strided kernel on few channels as a stride-1 convolution.
"""
import threading
import weakref
from functools import lru_cache
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .gates import bf16_emulated, plain, plain_tensor, product_dtype
from .tuning import choose, dtype_name, time_paths, token_bucket

__all__ = ['linear_product', 'conv_product', 'packable', 'packed_weight', 'drop_packs', 'space_to_depth_conv',
           'space_to_depth_fits', 'linear_paths', 'conv_paths']

_PRODUCT_DTYPES = (torch.float32, torch.bfloat16)


@torch.jit.unused
def packable(layer: nn.Module, cls: type, x: torch.Tensor) -> bool:
    """Eager CPU inference (no grad) on a plain ``cls`` without hooks whose weight is a plain tensor
    (torchao quantizes a Linear in place, as a tensor subclass), with oneDNN present and enabled,
    its product in fp32 or bf16.

    Not for weights made under ``torch.inference_mode()``: they have no version counter, so a
    change to them could not be seen by a pack.
    """
    if not (type(layer) is cls and x.device.type == 'cpu' and not torch.is_grad_enabled() and plain(layer, cls)):
        return False
    weight, bias = layer.weight, layer.bias
    return (plain_tensor(weight) and (bias is None or plain_tensor(bias))
            and x.dtype in _PRODUCT_DTYPES and weight.dtype in _PRODUCT_DTYPES
            and product_dtype(layer, x) in _PRODUCT_DTYPES
            and weight.layout == torch.strided
            and not weight.is_inference()  # no version counter: a change could not be seen
            and _onednn_available() and torch._C._get_mkldnn_enabled())


@lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def _packed_paths(dtype: torch.dtype) -> Tuple[str, ...]:
    """The paths beside torch's own for a product in ``dtype`` on this host: a bf16 product may also
    run as an fp32 one of the bf16 values (the only one beside torch's where oneDNN has no bf16, and
    not offered where bf16 products were timed at over twice the speed of fp32 ones)."""
    if dtype == torch.float32:
        return ('onednn',)
    if bf16_emulated():
        return ('fp32',)
    return ('onednn',) if _bf16_products_outrun_fp32(torch.get_num_threads()) else ('onednn', 'fp32')


@lru_cache(maxsize=None)
def _bf16_products_outrun_fp32(threads: int) -> bool:
    """Whether this host's bf16 products run over twice as fast as fp32 products of the same values,
    timed once per process on one 256 x 256 x 256 product (about a millisecond): where they do, no
    layer's bf16 product is timed as an fp32 one (a first call of each path costs more than the product)."""
    generator = torch.Generator().manual_seed(0)  # the process's random stream stays the user's
    a, b = (torch.randn(256, 256, generator=generator).bfloat16() for _ in range(2))
    with torch.no_grad(), torch.autocast('cpu', enabled=False):
        seconds, _ = time_paths(('default', 'fp32'),
                                lambda p: a @ b if p == 'default' else (a.float() @ b.float()).bfloat16())
    return seconds['fp32'] > 2 * seconds['default']


# ---- Linear ------------------------------------------------------------------------------------

def linear_paths(layer: nn.Linear, x: torch.Tensor) -> Tuple[str, ...]:
    """The paths a Linear's product on ``x`` may take here: ``('default',)`` where it is not
    :func:`packable`."""
    if not packable(layer, nn.Linear, x):
        return ('default',)
    return ('default',) + _packed_paths(product_dtype(layer, x))


@torch.jit.unused
def linear_product(layer: nn.Linear, x: torch.Tensor, gelu: bool = False,
                   residual: Optional[torch.Tensor] = None, path: Optional[str] = None) -> torch.Tensor:
    """``layer(x)``, then exact GELU (``gelu=True``) or ``residual +``, through this host's tuned path
    (or ``path``, one of :func:`linear_paths`).

    ``x`` is ``(..., in_features)``, ``residual`` ``(..., out_features)``; the result has the dtype
    the definition gives.
    """
    paths = linear_paths(layer, x)
    if path is None:
        if len(paths) == 1:
            return _linear(layer, x, gelu, residual, 'default')
        dtype = product_dtype(layer, x)
        key = ('linear', layer.in_features, layer.out_features, int(layer.bias is not None),
               'gelu' if gelu else 'add' if residual is not None else 'none', dtype_name(dtype),
               token_bucket(x.numel() // max(1, x.shape[-1])), torch.get_num_threads())
        path, out = choose(key, paths, lambda p: _linear(layer, x, gelu, residual, p))
        if out is not None:  # timed just now: the packs of paths never taken go
            _keep_chosen_packs(layer, dtype, path)
            return out
    elif path not in paths:
        raise ConfigError(f'path {path!r} is not one of {paths} for this product')
    return _linear(layer, x, gelu, residual, path)


def _linear(layer: nn.Linear, x: torch.Tensor, gelu: bool, residual: Optional[torch.Tensor], path: str) -> torch.Tensor:
    if path == 'default':
        out = layer(x)
        out = F.gelu(out) if gelu else out
        return out if residual is None else residual + out
    dtype = product_dtype(layer, x)
    weight = packed_weight(layer, dtype, path, x)
    flat = x.reshape(-1, x.shape[-1])
    if path == 'fp32':  # MKL in fp32 on bf16 values, rounded once
        bias = None if layer.bias is None else layer.bias.to(dtype).float()
        with torch.autocast('cpu', enabled=False):  # autocast would round the operands and emulate
            out = F.linear(flat.to(dtype).float(), weight, bias)
        out = F.gelu(out).to(dtype) if gelu else out.to(dtype)
        if residual is not None:
            out = residual.reshape(-1, layer.out_features) + out
        return out.view(*x.shape[:-1], layer.out_features)
    flat = flat.to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    if residual is not None and residual.dtype == dtype:
        out = torch.ops.mkldnn._linear_pointwise.binary(flat, residual.reshape(-1, layer.out_features), weight, bias,
                                                        'add')
    else:
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, 'gelu' if gelu else 'none', [],
                                                 'none' if gelu else '')
        if residual is not None:  # autocast: the fp32 residual plus the bf16 product, as eager adds them
            out = residual.reshape(-1, layer.out_features) + out
    return out.view(*x.shape[:-1], layer.out_features)


# ---- convolutions ------------------------------------------------------------------------------

def space_to_depth_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a square kernel that is a multiple of the stride, as a stride-1 convolution.

    Regroups ``s x s`` pixel cells into channels (and the kernel alike), so the kernel shrinks
    to ``k / s``: the same sums, in another order. CPU backends handle a large strided kernel on
    few input channels badly, in forward and in the weight gradient.
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


# Space-to-depth can pay where a strided kernel is large and its input narrow (the stem); the
# merges between stages (kernels 2 and 4 at stride 2 on 96+ channels) are not offered it.
SPACE_TO_DEPTH_MAX_CHANNELS = 64  # input channels after regrouping, C * stride**2


def space_to_depth_fits(conv: nn.Module) -> bool:
    """A plain square-kernel conv whose kernel is at least twice its stride, on few input channels."""
    if not plain(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != 'zeros':
        return False
    (k, k_w), (s, s_w), (p, p_w) = conv.kernel_size, conv.stride, conv.padding
    return (k == k_w and s == s_w and p == p_w and k >= 2 * s and k % s == 0
            and conv.in_channels * s * s <= SPACE_TO_DEPTH_MAX_CHANNELS)


def conv_paths(conv: nn.Conv2d, x: torch.Tensor) -> Tuple[str, ...]:
    """The paths a CEL convolution on ``(B, C, H, W)`` ``x`` may take here."""
    if not (packable(conv, nn.Conv2d, x) and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)
            and x.dim() == 4):
        return ('default',)
    dtype = product_dtype(conv, x)
    extra = ('space_to_depth',) if space_to_depth_fits(conv) and x.dtype == dtype else ()
    return ('default',) + _packed_paths(dtype) + extra


@torch.jit.unused
def conv_product(conv: nn.Conv2d, x: torch.Tensor, path: Optional[str] = None) -> torch.Tensor:
    """``conv(x)`` for ``(B, C, H, W)`` ``x`` through this host's tuned path (or ``path``, one of
    :func:`conv_paths`), in the dtype the definition gives; a packed path's output is
    channels-last in memory."""
    paths = conv_paths(conv, x)
    if path is None:
        if len(paths) == 1:
            return conv(x)
        B, C, H, W = x.shape
        dtype = product_dtype(conv, x)
        key = ('conv', C, conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding, conv.groups,
               int(conv.bias is not None), dtype_name(dtype), token_bucket(B * H * W), torch.get_num_threads())
        path, out = choose(key, paths, lambda p: _conv(conv, x, p))
        if out is not None:
            _keep_chosen_packs(conv, dtype, path)
            return out
    elif path not in paths:
        raise ConfigError(f'path {path!r} is not one of {paths} for this convolution')
    return _conv(conv, x, path)


def _conv(conv: nn.Conv2d, x: torch.Tensor, path: str) -> torch.Tensor:
    if path == 'default':
        return conv(x)
    if path == 'space_to_depth':
        return space_to_depth_conv(x, conv)
    dtype = product_dtype(conv, x)
    compute = torch.float32 if path == 'fp32' else dtype
    bias = None if conv.bias is None else conv.bias.to(dtype).to(compute)
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype).to(compute), packed_weight(conv, dtype, path, x), bias, conv.padding, conv.stride, conv.dilation,
        conv.groups, 'none', [], '').to(dtype)


# ---- packed weights ----------------------------------------------------------------------------

class _Pack(NamedTuple):
    """A layer's weight as a path wants it, and what it was packed from."""
    storage: 'weakref.ref[torch.UntypedStorage]'  # the weight's storage at packing time
    layout: tuple  # the weight's offset, shape, strides, dtype and version counter then
    weight: torch.Tensor


# A pack per layer, product dtype and path; they go with the layer (weak keys) or with
# ``set_speedups(model, False)``, and each is replaced whenever the weight changes.
_packed_weights: 'weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Pack]]' = weakref.WeakKeyDictionary()
_packs_lock = threading.Lock()  # threads may run one model, in fp32 and under autocast at once


def _weight_layout(weight: torch.Tensor) -> tuple:
    return weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight._version


# The (dtype, path) pairs that timing chose for a layer, at any input size: their packs stay.
_chosen_paths: 'weakref.WeakKeyDictionary[nn.Module, set]' = weakref.WeakKeyDictionary()


def drop_packs(module: nn.Module) -> None:
    """Forget ``module``'s packed weights."""
    with _packs_lock:
        _packed_weights.pop(module, None)
        _chosen_paths.pop(module, None)


def _keep_chosen_packs(layer: nn.Module, dtype: torch.dtype, path: str) -> None:
    """After timing chose ``path`` for a product in ``dtype``: forget ``layer``'s packs that no
    choice of it takes (a path chosen at another input size keeps its pack, so that sizes in turn
    do not pack a weight again and again)."""
    with _packs_lock:
        chosen = _chosen_paths.setdefault(layer, set())
        chosen.add((dtype, path))
        packs = _packed_weights.get(layer)
        if packs:
            for key in [k for k in packs if k not in chosen]:
                del packs[key]


@torch.jit.unused
def packed_weight(layer: nn.Module, dtype: torch.dtype = torch.float32, path: str = 'onednn',
                  example: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer.weight`` (an ``nn.Linear`` or ``nn.Conv2d``) as ``path`` wants it for a product in
    ``dtype``, cached until the weight changes: ``'onednn'``, in ``dtype`` in oneDNN's blocked
    layout; ``'fp32'``, the bf16-rounded values in fp32 (a Linear's plain, for MKL). oneDNN picks
    the layout for the shape of ``example``, an input (without one, some convolutions get a layout
    that runs them an order of magnitude slower); the pack then serves inputs of any shape.

    The cache checks the weight's storage itself (a weak reference, so ``.to()`` or a swapped
    ``.data`` never matches an old pack, even at a reused address) and its version counter
    (an optimizer step, ``load_state_dict`` or any in-place write to the parameter bumps it). A
    write through ``.data`` bypasses the version counter, as it bypasses autograd: after one, call
    ``set_speedups(model, False)`` to drop the packs (and ``True`` again).
    """
    weight = layer.weight
    storage = weight.untyped_storage()
    with _packs_lock:
        packs = _packed_weights.setdefault(layer, {})
        pack = packs.get((dtype, path))
        if pack is None or pack.storage() is not storage or pack.layout != _weight_layout(weight):
            fresh = {k: p for k, p in packs.items() if p.storage() is storage and p.layout == _weight_layout(weight)}
            values = weight.detach().to(dtype)
            values = values.float() if path == 'fp32' else values
            if isinstance(layer, nn.Conv2d):
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    values, layer.padding, layer.stride, layer.dilation, layer.groups,
                    None if example is None else list(example.shape))
            else:
                tokens = None if example is None else example.numel() // max(1, example.shape[-1])
                packed = values if path == 'fp32' else torch.ops.mkldnn._reorder_linear_weight(values, tokens)
            pack = fresh[dtype, path] = _Pack(weakref.ref(storage), _weight_layout(weight), packed)
            _packed_weights[layer] = fresh  # packs of an earlier weight (``.to()``, ``load_state_dict``) go
    return pack.weight
