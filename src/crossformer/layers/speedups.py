"""Every eager-only speed-up of the CrossFormer layers, with its tuned constants and its condition.

Each speed-up computes what the layer's definition computes (tests hold the two within 1e-5),
faster or with less memory. (In bf16 on a host without bf16 products, a packed product runs in
fp32 on the bf16 values and rounds its output once, as a native bf16 product would; tests hold
it as close to the fp32 model as the bf16 definition is.) A layer's ``forward`` is the
definition, with one line where its speed-up may take over; the layer inherits that speed-up
from a class here.

When they apply, stated once each below:

================================  ====================  =============================================
speed-up                          layer                 condition
================================  ====================  =============================================
token chunks                      GroupAttention,       :func:`_cpu_inference`: CPU inference (eval,
                                  block MLP residual    no grad, no autocast but emulated bf16)
query blocks of a huge group      GroupAttention        :meth:`AttentionSpeedups._huge`: no grad, any
                                                        device, attention over HUGE_GROUP_BYTES
lean MLP (GELU recomputed)        block MLP residual    :meth:`BlockSpeedups._lean_applies`: training
                                                        with autograd, on any device
space-to-depth convolutions       CrossEmbedLayer       :func:`_space_to_depth_pays`: CPU, no packed
                                                        conv, large kernels on few channels
packed oneDNN convolutions        CrossEmbedLayer       :func:`packed_conv_applies`: CPU inference in
                                                        fp32 (or emulated bf16), plain ``nn.Conv2d``
packed Linears (fc1 with GELU,    block MLP residual,   :func:`packed_linear_applies`: CPU inference,
fc2 with the residual add; qkv    GroupAttention        plain ``nn.Linear``, oneDNN present; in fp32
and proj)                                               where oneDNN beats MKL for the shape, in bf16
                                                        (as fp32 products) on hosts without bf16 ones
DPB bias cache                    DynamicPosBias        no gradient recorded
padding-mask cache                :func:`padding_mask`  eager
================================  ====================  =============================================

The two caches are bounded in bytes, shared by every model of the process, least recently used
first out, and safe under threads (:class:`ByteBoundedCache`): DPB biases and offset tables at most
``DPB_CACHE_BYTES`` (128 MiB), none above ``DPB_CACHE_ENTRY_BYTES`` (8 MiB, recomputed on every
call instead); padding masks at most ``MASK_CACHE_BYTES`` (16 MiB), none above 4 MiB. Packed
weights are one per packed layer and product dtype, each as large as the weight in fp32; they go
with the model, or with ``set_speedups(model, False)``.

And for all of them: never while a graph is captured (TorchScript, ``torch.jit.trace`` and so
ONNX, FX, ``torch.compile``), so a graph records the definition; never past a layer that is not
the plain torch module a speed-up was tuned for (a LoRA wrapper, a quantized Linear) or that has
hooks: a speed-up calls such a layer as it is, or steps aside. :func:`set_speedups` turns every
one of them off for a whole model, timm's fused attention (SDPA) included.
"""
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from timm.layers import use_fused_attn

from .grouping import build_padding_mask

__all__ = ['set_speedups', 'capturing', 'padding_mask', 'gelu_linear', 'space_to_depth_conv', 'ByteBoundedCache',
           'packed_linear', 'packed_linear_applies', 'packed_conv', 'packed_conv_applies', 'packed_weight',
           'AttentionSpeedups', 'BlockSpeedups', 'CrossEmbedSpeedups', 'PosBiasSpeedups']

# Tuned on 2 CPU cores (benchmarks/benchmark.py): enough tokens that the matmuls stay efficient,
# few enough that a chunk's wide intermediates stay in cache.
ATTENTION_CHUNK_TOKENS = 1536  # tokens of whole groups per chunk of GroupAttention
# A group whose attention weights (heads x N x N) would exceed HUGE_GROUP_BYTES is computed
# QUERY_BLOCK_BYTES of weights at a time (a strip's whole-map group: 16 x 8192 pixels make 8192 tokens).
HUGE_GROUP_BYTES = 64 * 2 ** 20
QUERY_BLOCK_BYTES = 4 * 2 ** 20
MLP_CHUNK_TOKENS = 1024  # tokens per chunk of a block's inference MLP residual
LEAN_MLP_CHUNK_TOKENS = 2048  # tokens per chunk of the lean MLP, CPU fp32 training
# Where oneDNN's packed product beats torch's default (MKL) fp32 product (benchmarks/): with
# AVX-512 every Linear (MKL dispatches AVX2 kernels on AMD processors); with AVX2 a Linear with a
# side at most PACKED_LINEAR_MAX_SIDE_AVX2 wide (stage 1 of crossformer_t), or one at least
# PACKED_LINEAR_MIN_SIDE_AVX2 wide on at most PACKED_LINEAR_MAX_TOKENS_AVX2 tokens (stages 3 and 4
# of one image), where MKL was slower (``benchmark.py --sections products``).
PACKED_LINEAR_MAX_SIDE_AVX2 = 64
PACKED_LINEAR_MIN_SIDE_AVX2 = 384
PACKED_LINEAR_MAX_TOKENS_AVX2 = 256
# Space-to-depth pays off where a strided kernel is large and its input narrow (the stem); the
# merges between stages (kernels 2 and 4 at stride 2 on 96+ channels) are faster as they are.
SPACE_TO_DEPTH_MAX_CHANNELS = 64  # input channels after regrouping, C * stride**2


def set_speedups(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn every speed-up of ``model``'s CrossFormer layers on or off; returns ``model``.

    Off, every layer runs its definition, with explicit attention, and the model's packed weights
    and cached DPB biases are dropped; on, fused attention follows timm's ``use_fused_attn()``
    (``TIMM_FUSED_ATTN``).
    """
    for module in model.modules():
        if isinstance(module, _Speedup):
            module.speedups = enabled
        if not enabled:
            _packed_weights.pop(module, None)
            if isinstance(module, PosBiasSpeedups):
                dpb_cache.discard(lambda key, module=module: key[0]() is module)
        if isinstance(module, AttentionSpeedups):
            module.fused_attn = enabled and use_fused_attn()
    return model


@torch.jit.unused
def _capturing_in_python() -> bool:
    return torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling()


def capturing() -> bool:
    """True under TorchScript, ``torch.jit.trace`` (ONNX export), FX symbolic tracing or ``torch.compile``."""
    if torch.jit.is_scripting():
        return True
    return _capturing_in_python()


def _has_hooks(module: nn.Module) -> bool:
    """``module`` or one inside it has forward hooks (or a global forward hook is set)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    pending = [module]  # a plain walk: it runs on every call, where ``modules()`` costs several times more
    while pending:
        m = pending.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        pending.extend(child for child in m._modules.values() if child is not None)
    return False


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly a ``cls`` (not a subclass, wrapper or quantized stand-in), without hooks."""
    return type(module) is cls and not _has_hooks(module)


class _Speedup:
    """Base of the speed-up mixins: ``speedups`` is the switch :func:`set_speedups` sets."""
    speedups: bool = True

    @torch.jit.unused
    def _eager(self) -> bool:
        return self.speedups and not capturing()


@torch.jit.unused
def _cpu_inference(layer: nn.Module, x: torch.Tensor) -> bool:
    """Where token chunks and the packed inference paths pay off: CPU inference (eval, no grad; no
    autocast, but for bf16 autocast on a host without bf16 products, where packed fp32 products
    pay), no hooks inside.

    Chunks keep a layer's wide intermediates in cache; a GPU wants whole tensors instead, and
    autograd would keep every chunk's intermediates anyway. Hooks see whole tensors.
    """
    return (layer._eager() and not layer.training and not torch.is_grad_enabled() and x.device.type == 'cpu'
            and (not torch.is_autocast_enabled('cpu') or _emulated_autocast()) and not _has_hooks(layer))


# ---- GroupAttention: a few groups at a time, huge groups in blocks of queries ---------------------

class AttentionSpeedups(_Speedup):
    """For :class:`~crossformer.layers.GroupAttention`: a few groups at a time, or a huge group a
    block of queries at a time.

    - CPU inference: each chunk's q, k, v and attention weights stay in cache. A chunk never spans
      two images, so it takes a slice of the padding mask. Each chunk runs the layer's ``forward``
      with qkv and proj as :func:`packed_linear` where that pays.
    - A huge group (its ``heads x N x N`` attention over :data:`HUGE_GROUP_BYTES`) while no gradient
      is recorded, on any device: queries go :data:`QUERY_BLOCK_BYTES` of attention weights at a
      time, each block's bias rows gathered from the group's ``(2Gh-1)(2Gw-1)`` offset table, so
      peak memory grows with ``N``, not ``N**2`` (time stays quadratic, as in the definition).
      Under autograd the group is computed whole, as its backward needs every weight anyway.
    """
    fused_attn: bool

    @staticmethod
    def _groups_per_chunk(x: torch.Tensor, mask: Optional[torch.Tensor]) -> int:
        groups = x.shape[0] if mask is None else mask.shape[0]  # groups per image (all, without a mask)
        return max(1, min(ATTENTION_CHUNK_TOKENS // x.shape[1], groups))

    @torch.jit.unused
    def _huge(self, x: torch.Tensor) -> bool:
        return (self._eager() and not torch.is_grad_enabled()
                and self.num_heads * x.shape[1] ** 2 * x.element_size() > HUGE_GROUP_BYTES and not _has_hooks(self))

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
        return self._huge(x) or _cpu_inference(self, x)

    @torch.jit.unused
    def speedup(self, x: torch.Tensor, group_h: int, group_w: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self._huge(x):
            return self._query_blocks(x, group_h, group_w, mask)
        groups = x.shape[0] if mask is None else mask.shape[0]
        step = self._groups_per_chunk(x, mask)
        if x.shape[0] <= step:
            return self._inference_forward(x, group_h, group_w, mask)
        out: Optional[torch.Tensor] = None
        for start in range(0, x.shape[0], groups):
            for g in range(0, groups, step):
                n = min(step, groups - g)
                rows = slice(start + g, start + g + n)
                chunk = self._inference_forward(x[rows], group_h, group_w, None if mask is None else mask[g:g + n])
                if out is None:  # in the chunks' dtype: bf16 under autocast
                    out = x.new_empty(x.shape, dtype=chunk.dtype)
                out[rows] = chunk
        return out

    @torch.jit.unused
    def _inference_forward(self, x: torch.Tensor, group_h: int, group_w: int,
                           mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's ``forward`` at CPU inference (eval: no dropout), qkv and proj as
        :func:`packed_linear` where that pays. Keep it in step with ``GroupAttention.forward``."""
        B_, N, C = x.shape
        qkv = packed_linear(self.qkv, x) if packed_linear_applies(self.qkv, x) else self.qkv(x)
        q, k, v = qkv.view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.pos(group_h, group_w, q.dtype, q.device)  # heads, N, N
        x = self.attention(q, k, v, bias, mask, 0.).transpose(1, 2).reshape(B_, N, C)
        return packed_linear(self.proj, x) if packed_linear_applies(self.proj, x) else self.proj(x)

    @torch.jit.unused
    def _query_blocks(self, x: torch.Tensor, group_h: int, group_w: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B_, N, C = x.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        pos = self.pos
        table = (pos.speedup_table if pos.speedup_applies() else pos.offset_table)(group_h, group_w, x.dtype, x.device)
        step = max(1, QUERY_BLOCK_BYTES // (heads * N * x.element_size()))
        dropout_p = self.attn_drop.p if self.training else 0.
        out = torch.empty_like(x)
        for r in range(B_):
            q, k, v = self.qkv(x[r]).view(N, 3, heads, head_dim).permute(1, 2, 0, 3)[:, None].unbind(0)  # 1, heads, N, hd
            key_mask = None if mask is None else mask[r % mask.shape[0]][None]  # 1, 1, 1, N
            attended = torch.empty_like(q)
            for start in range(0, N, step):
                stop = min(start + step, N)
                bias = pos.bias_rows(table, group_h, group_w, start, stop)  # heads, queries, N
                attended[:, :, start:stop] = self.attention(q[:, :, start:stop], k, v, bias, key_mask, dropout_p)
            out[r] = self.proj_drop(self.proj(attended[0].transpose(0, 1).reshape(N, C)))
        return out


# ---- the block's MLP residual: token chunks at inference, lean backward in training ----------

class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` keeping only ``h`` for backward, where ``gelu(h)`` is recomputed.

    Autograd would keep both ``h`` and ``gelu(h)``; for the MLP's 4x wide hidden layer that is
    the largest tensor a block saves. With ``chunk > 0`` (fp32 on CPU) forward and backward go
    ``chunk`` tokens at a time, so the GELU's input and output stay in cache. Under autocast
    (``chunk == 0``) the matmuls run in the dtype autocast gave the output, as autograd would.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], chunk: int) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        ctx.chunk = chunk
        if not chunk:
            return F.linear(F.gelu(h), weight, bias)
        flat = h.flatten(0, -2)
        out = flat.new_empty(flat.shape[0], weight.shape[0])
        for start in range(0, flat.shape[0], chunk):
            gelu = F.gelu(flat[start:start + chunk])
            if bias is None:
                torch.mm(gelu, weight.t(), out=out[start:start + chunk])
            else:
                torch.addmm(bias, gelu, weight.t(), out=out[start:start + chunk])
        return out.view(*h.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_out = grad_out.flatten(0, -2)
        flat = h.flatten(0, -2)
        grad_bias = grad_out.sum(0).to(weight.dtype) if ctx.has_bias else None
        if ctx.chunk and grad_out.dtype == weight.dtype:
            grad_h = torch.empty_like(flat)
            grad_weight = torch.zeros_like(weight)
            for start in range(0, flat.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                grad_h[rows] = torch.ops.aten.gelu_backward(grad_out[rows] @ weight, flat[rows])
                grad_weight.addmm_(grad_out[rows].t(), F.gelu(flat[rows]))
            return grad_h.view_as(h), grad_weight, grad_bias, None
        dtype = grad_out.dtype
        grad_h = torch.ops.aten.gelu_backward(grad_out @ weight.to(dtype), flat).view_as(h)
        grad_weight = (grad_out.t() @ F.gelu(flat).to(dtype)).to(weight.dtype)
        return grad_h, grad_weight, grad_bias, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that keeps half the activations for backward.

    ``chunk > 0`` computes it ``chunk`` tokens at a time (not under autocast).
    """
    return _GeluLinear.apply(h, weight, bias, chunk)


class BlockSpeedups(_Speedup):
    """For :class:`~crossformer.layers.CrossFormerBlock`'s ``mlp_residual``, ``x + MLP(norm2(x))``.

    - CPU inference: chunk by chunk of tokens, so each chunk's norm, 4x wide hidden layer, GELU and
      residual stay in cache; each chunk runs the block's own ``mlp_residual``. Where timm's plain
      ``Mlp`` can be packed (:meth:`_packed_applies`), a chunk is instead two :func:`packed_linear`
      products: fc1 with its GELU, fc2 with the residual add, at any number of tokens.
    - Training with autograd, where the MLP is timm's plain ``Mlp`` with exact GELU: the GELU
      output is recomputed in backward instead of kept (:func:`gelu_linear`), ``4C`` fewer floats
      kept per token, the largest tensor a block keeps. On CPU in fp32, in chunks too.
    """

    @torch.jit.unused
    def _lean_applies(self) -> bool:
        mlp = self.mlp
        return (self._eager() and self.training and torch.is_grad_enabled()
                and type(mlp.act) is nn.GELU and mlp.act.approximate == 'none' and mlp.drop1.p == 0.
                and isinstance(mlp.norm, nn.Identity) and _plain(mlp.fc2, nn.Linear) and not _has_hooks(mlp))

    @torch.jit.unused
    def _packed_applies(self, x: torch.Tensor) -> bool:
        mlp = self.mlp
        return (type(mlp.act) is nn.GELU and mlp.act.approximate == 'none' and isinstance(mlp.norm, nn.Identity)
                and not _has_hooks(mlp) and packed_linear_applies(mlp.fc1, x) and packed_linear_applies(mlp.fc2, x))

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor) -> bool:
        if _cpu_inference(self, x):
            return x.numel() > MLP_CHUNK_TOKENS * x.shape[-1] or self._packed_applies(x)
        return self._lean_applies()

    @torch.jit.unused
    def speedup(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mlp = self.mlp
            cpu_fp32 = x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            hidden = gelu_linear(mlp.fc1(self.norm2(x)), mlp.fc2.weight, mlp.fc2.bias,
                                 LEAN_MLP_CHUNK_TOKENS if cpu_fp32 else 0)
            return x + self.drop_path2(mlp.drop2(hidden))
        flat = x.reshape(-1, x.shape[-1])
        if self._packed_applies(x):  # eval: dropout and drop path are identities
            mlp = self.mlp
            chunks = [packed_linear(mlp.fc2, packed_linear(mlp.fc1, self.norm2(flat[start:start + MLP_CHUNK_TOKENS]),
                                                           gelu=True), residual=flat[start:start + MLP_CHUNK_TOKENS])
                      for start in range(0, flat.shape[0], MLP_CHUNK_TOKENS)]
            return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).view(x.shape)
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
            rows = slice(start, start + MLP_CHUNK_TOKENS)
            out[rows] = self.mlp_residual(flat[rows])
        return out.view(x.shape)


# ---- plain Linears and convolutions through oneDNN with a packed weight (CPU inference) -------

class _Pack(NamedTuple):
    """A layer's weight as its packed product wants it, and what it was packed from."""
    storage: 'weakref.ref[torch.UntypedStorage]'  # the weight's storage at packing time
    layout: tuple  # the weight's offset, shape, strides, dtype and version counter then
    weight: torch.Tensor  # the same values (rounded to the product's dtype), in fp32


# A pack per layer and product dtype (fp32; bf16 where emulated), each as large as the weight in
# fp32; they go with the layer (weak keys) or with ``set_speedups(model, False)``, and each is
# replaced whenever the weight changes.
_packed_weights: 'weakref.WeakKeyDictionary[nn.Module, Dict[torch.dtype, _Pack]]' = weakref.WeakKeyDictionary()
_packs_lock = threading.Lock()  # threads may run one model, in fp32 and under autocast at once


def _weight_layout(weight: torch.Tensor) -> tuple:
    return weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight._version


@torch.jit.unused
def packed_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``layer.weight`` (an ``nn.Linear`` or ``nn.Conv2d``) as its packed product in ``dtype`` wants it,
    cached until the weight changes: in fp32, in oneDNN's blocked layout (a bf16 Linear: plain, for MKL).

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
        pack = packs.get(dtype)
        if pack is None or pack.storage() is not storage or pack.layout != _weight_layout(weight):
            fresh = {d: p for d, p in packs.items() if p.storage() is storage and p.layout == _weight_layout(weight)}
            fp32 = weight.detach().to(dtype).float()  # a bf16 product on a host without them: in fp32
            if isinstance(layer, nn.Conv2d):
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    fp32, layer.padding, layer.stride, layer.dilation, layer.groups, None)
            else:
                packed = fp32 if dtype == torch.bfloat16 else torch.ops.mkldnn._reorder_linear_weight(fp32, None)
            pack = fresh[dtype] = _Pack(weakref.ref(storage), _weight_layout(weight), packed)
            _packed_weights[layer] = fresh  # packs of an earlier weight (``.to()``, ``load_state_dict``) go
    return pack.weight


def _plain_tensor(t: torch.Tensor) -> bool:
    """A dense torch tensor or parameter, not a subclass (torchao's quantized weights are subclasses)."""
    return type(t) in (torch.Tensor, nn.Parameter)


@lru_cache(maxsize=None)
def _avx512() -> bool:
    """torch's CPU kernels use AVX-512 (``ATEN_CPU_CAPABILITY=avx2`` limits them)."""
    return torch.backends.cpu.get_cpu_capability().startswith(('AVX512', 'AMX'))


@lru_cache(maxsize=None)
def _bf16_emulated() -> bool:
    """oneDNN has no bf16 products on this host (it has them from AVX-512 cores on, with AMX or with
    AVX-NE-CONVERT: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``): torch then emulates them,
    several times slower than fp32 products."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _emulated_autocast() -> bool:
    """bf16 autocast on the CPU of a host without bf16 products."""
    return torch.get_autocast_dtype('cpu') == torch.bfloat16 and _bf16_emulated()


def _product_dtype(layer: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype of ``layer``'s product on ``x`` in eager torch: autocast's, else ``x``'s (None where
    ``x`` and the weight differ, an error in eager torch)."""
    if torch.is_autocast_enabled('cpu'):
        return torch.get_autocast_dtype('cpu')
    same = layer.weight.dtype == x.dtype and (layer.bias is None or layer.bias.dtype == x.dtype)
    return x.dtype if same else None


@torch.jit.unused
def _packable(layer: nn.Module, cls: type, x: torch.Tensor) -> bool:
    """Eager CPU inference (no grad) on a plain ``cls`` without hooks whose weight is a plain tensor
    (torchao quantizes a Linear in place, as a tensor subclass), with torch's oneDNN backend present
    and enabled; the product in fp32 (no autocast), or in bf16 (a bf16 layer, or bf16 autocast) on a
    host without bf16 products: the product then runs in fp32 on the bf16-rounded values and
    rounds its output once, as a native bf16 product accumulates in fp32.

    Not for weights made under ``torch.inference_mode()``: they have no version counter, so a
    change to them could not be seen.
    """
    if not (x.device.type == 'cpu' and not torch.is_grad_enabled() and _plain(layer, cls)
            and _plain_tensor(layer.weight) and (layer.bias is None or _plain_tensor(layer.bias))):
        return False
    dtype = _product_dtype(layer, x)
    return ((dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_emulated()))
            and x.dtype in (torch.float32, torch.bfloat16) and layer.weight.dtype in (torch.float32, torch.bfloat16)
            and layer.weight.layout == torch.strided
            and not layer.weight.is_inference()  # no version counter: a change could not be seen
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _onednn_linear_pays(layer: nn.Linear, tokens: int) -> bool:
    """oneDNN's packed fp32 product beats torch's default (MKL) for this Linear on ``tokens`` rows."""
    side = min(layer.in_features, layer.out_features)
    return _avx512() or side <= PACKED_LINEAR_MAX_SIDE_AVX2 or (
        side >= PACKED_LINEAR_MIN_SIDE_AVX2 and tokens <= PACKED_LINEAR_MAX_TOKENS_AVX2)


@torch.jit.unused
def packed_linear_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Where a packed product pays (:func:`_packable`): a bf16 Linear on a host without bf16 products
    (an fp32 product on an fp32 copy), or an fp32 one where oneDNN beats MKL for ``x``'s tokens
    (:func:`_onednn_linear_pays`)."""
    return _packable(layer, nn.Linear, x) and (
        _product_dtype(layer, x) == torch.bfloat16 or _onednn_linear_pays(layer, x.numel() // max(1, x.shape[-1])))


@torch.jit.unused
def packed_linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer(x)``, then exact GELU (``gelu=True``) or ``+ residual``, as one product with a packed weight.

    ``x`` is ``(..., in_features)``, ``residual`` ``(..., out_features)``; the result has the dtype
    the definition gives. In fp32 through oneDNN, the GELU and the add are post-ops, applied to each
    output block while it is in cache. Only where :func:`packed_linear_applies`.
    """
    dtype = _product_dtype(layer, x)
    flat = x.reshape(-1, x.shape[-1]).to(dtype).float()
    weight = packed_weight(layer, dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype).float()
    if dtype == torch.bfloat16:  # MKL in fp32 on bf16 values, rounded once
        with torch.autocast('cpu', enabled=False):  # autocast would round the operands and emulate
            out = F.linear(flat, weight, bias)
        out = F.gelu(out).to(dtype) if gelu else out.to(dtype)
        if residual is not None:
            out = residual.reshape(-1, layer.out_features) + out
    elif residual is not None:
        out = torch.ops.mkldnn._linear_pointwise.binary(
            flat, residual.reshape(-1, layer.out_features), weight, layer.bias, 'add')
    elif gelu:
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, layer.bias, 'gelu', [], 'none')
    else:
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, layer.bias, 'none', [], '')
    return out.view(*x.shape[:-1], layer.out_features)


@torch.jit.unused
def packed_conv_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Where a packed oneDNN convolution pays: any plain ``nn.Conv2d`` with zero padding given as
    numbers, where :func:`_packable` (torch would re-layout its weight on every call)."""
    return (_packable(conv, nn.Conv2d, x) and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)
            and x.dim() == 4)


@torch.jit.unused
def packed_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for ``(B, C, H, W)`` ``x`` with the weight packed once, in the dtype the definition
    gives; the output is channels-last in memory. Only where :func:`packed_conv_applies`."""
    dtype = _product_dtype(conv, x)
    bias = None if conv.bias is None else conv.bias.to(dtype).float()
    return torch.ops.mkldnn._convolution_pointwise(x.to(dtype).float(), packed_weight(conv, dtype), bias, conv.padding,
                                                   conv.stride, conv.dilation, conv.groups, 'none', [], '').to(dtype)


# ---- CrossEmbedLayer: large strided kernels as space-to-depth convolutions --------------------

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


def _space_to_depth_pays(conv: nn.Module) -> bool:
    """A plain square-kernel conv whose kernel is at least twice its stride, on few input channels."""
    if not _plain(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != 'zeros':
        return False
    (k, k_w), (s, s_w), (p, p_w) = conv.kernel_size, conv.stride, conv.padding
    return (k == k_w and s == s_w and p == p_w and k >= 2 * s and k % s == 0
            and conv.in_channels * s * s <= SPACE_TO_DEPTH_MAX_CHANNELS)


class CrossEmbedSpeedups(_Speedup):
    """For :class:`~crossformer.layers.CrossEmbedLayer`, on CPU: at inference each convolution with its
    weight packed once (:func:`packed_conv`); else the stem's large kernels (8/16/32 at stride 4) as
    :func:`space_to_depth_conv`. Any other convolution is called as it is."""

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor) -> bool:
        return self._eager() and x.device.type == 'cpu' and any(
            packed_conv_applies(p, x) or _space_to_depth_pays(p) for p in self.projs)

    @torch.jit.unused
    def speedup(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([packed_conv(p, x) if packed_conv_applies(p, x)
                          else space_to_depth_conv(x, p) if _space_to_depth_pays(p) else p(x)
                          for p in self.projs], dim=1)


# ---- caches ------------------------------------------------------------------------------------

class ByteBoundedCache:
    """A least-recently-used map of tensors, bounded in bytes, safe to share between threads.

    Holds at most ``max_bytes`` of tensors; a value over ``max_entry_bytes`` is never stored. Values
    are computed outside the lock (two threads may compute the same one; both get equal tensors),
    and must be treated as read-only.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int):
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: 'OrderedDict[tuple, torch.Tensor]' = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple, value: torch.Tensor, drop=None) -> torch.Tensor:
        """Store ``value`` under ``key`` (if small enough) and return it; first remove the entries for
        which ``drop(key)`` is true, then the least recently used ones until it fits."""
        size = value.untyped_storage().nbytes()
        with self._lock:
            if drop is not None:
                self._discard(drop)
            if size > min(self.max_entry_bytes, self.max_bytes) or key in self._entries:
                return value
            while self._entries and self._bytes + size > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].untyped_storage().nbytes()
            self._entries[key] = value
            self._bytes += size
        return value

    def discard(self, drop) -> None:
        """Remove the entries for which ``drop(key)`` is true."""
        with self._lock:
            self._discard(drop)

    def _discard(self, drop) -> None:  # with the lock held
        for key in [k for k in self._entries if drop(k)]:
            self._bytes -= self._entries.pop(key).untyped_storage().nbytes()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


# The DPB biases (heads x N x N per group shape and block) and offset tables of every model in the
# process, together; a bias of a large group is recomputed on every call instead.
DPB_CACHE_BYTES = 128 * 2 ** 20
DPB_CACHE_ENTRY_BYTES = 8 * 2 ** 20
# The padding masks of every shape, together (a mask is groups x Gh*Gw floats).
MASK_CACHE_BYTES = 16 * 2 ** 20
MASK_CACHE_ENTRY_BYTES = 4 * 2 ** 20

dpb_cache = ByteBoundedCache(DPB_CACHE_BYTES, DPB_CACHE_ENTRY_BYTES)
mask_cache = ByteBoundedCache(MASK_CACHE_BYTES, MASK_CACHE_ENTRY_BYTES)
_DPB_PLAIN_TYPES = (nn.Linear, nn.LayerNorm, nn.ReLU, nn.Sequential)


class PosBiasSpeedups(_Speedup):
    """For :class:`~crossformer.layers.DynamicPosBias`: the bias and the offset table cached per
    group shape while no gradient is recorded, in :data:`dpb_cache`.

    The key holds the module (weakly: a dead module's entries are dropped, never served to a new
    one), the dtype, the device and each parameter's storage and version counter, so an optimizer
    step, ``load_state_dict`` or ``.to()`` is never served a stale bias.
    """

    @torch.jit.unused
    def speedup_applies(self) -> bool:
        return (self._eager() and not torch.is_grad_enabled() and not _has_hooks(self)
                and all(type(m) in _DPB_PLAIN_TYPES for m in list(self.modules())[1:])
                and not any(p.is_inference() for p in self.parameters()))  # no version counter to key on

    @torch.jit.unused
    def _cached(self, kind: str, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device, compute):
        owner = weakref.ref(self)
        state = (dtype, device, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        key = (owner, kind, group_h, group_w) + state
        value = dpb_cache.get(key)
        if value is None:
            value = dpb_cache.put(key, compute(group_h, group_w, dtype, device),
                                  drop=lambda k: k[0]() is None or (k[0] == owner and k[4:] != state))
        return value

    @torch.jit.unused
    def speedup(self, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._cached('bias', group_h, group_w, dtype, device, self.bias)

    @torch.jit.unused
    def speedup_table(self, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """:meth:`~crossformer.layers.DynamicPosBias.offset_table`, cached like the bias."""
        return self._cached('table', group_h, group_w, dtype, device, self.offset_table)


@torch.jit.unused
def _cached_padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int,
                         padded_w: int, device: torch.device) -> Optional[torch.Tensor]:
    if height == padded_h and width == padded_w:
        return None
    key = (height, width, group_h, group_w, interval, padded_h, padded_w, device)
    mask = mask_cache.get(key)
    if mask is None:
        mask = mask_cache.put(key, build_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w,
                                                      device))
    return mask


def padding_mask(height: int, width: int, group_h: int, group_w: int, interval: int, padded_h: int, padded_w: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    """:func:`~crossformer.layers.grouping.build_padding_mask`, cached per shape and device in eager
    mode (in :data:`mask_cache`); treat the result as read-only."""
    if not torch.jit.is_scripting():  # TorchScript compiles none of this block
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return _cached_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w, device)
    return build_padding_mask(height, width, group_h, group_w, interval, padded_h, padded_w, device)
