"""Every eager-only speed-up of the CrossFormer layers, and how each is chosen on the running host.

Each speed-up computes what the layer's definition computes (tests hold the two within 1e-5),
faster or with less memory. (In bf16 on a host without bf16 products, the ``'fp32'`` product path
runs fp32 products of the bf16 values and rounds each output once, as a native bf16 product would;
tests hold it as close to the fp32 model as the bf16 definition is.) A layer's ``forward`` is the
definition, with one line where its speed-up may take over; the layer inherits that speed-up from
a mixin in :mod:`.mixins`.

==============================  ===================  ==============================================
speed-up                        layer                condition
==============================  ===================  ==============================================
token chunks                    GroupAttention,      **measured**: CPU inference (eval, no grad, no
                                block MLP residual   autocast or bf16 autocast): every token at once
                                                     or in chunks, whichever was timed faster here
query blocks of a huge group    GroupAttention       no grad, any device, attention weights over
                                                     ``HUGE_GROUP_BYTES``
attention kernel: SDPA or       GroupAttention       **measured**: CPU inference where the layer
matmul-softmax-matmul                                uses SDPA; the kernel timed faster here for
                                                     the heads, group size and group count
lean MLP (GELU recomputed)      block MLP residual   training with autograd, any device
Linear products: torch's,       qkv, proj, fc1 with  **measured**: CPU inference on a plain
oneDNN with a packed weight     GELU, fc2 with the   ``nn.Linear`` (:func:`~.products.packable`);
and fused post-op, or fp32      residual add         the path timed fastest on this host for its
products of bf16 values                              shape, dtype and token bucket (:mod:`.tuning`)
CEL convolutions: torch's,      CrossEmbedLayer      **measured**: CPU inference on a plain
packed oneDNN, space-to-depth                        ``nn.Conv2d``, as for Linears
space-to-depth convolutions     CrossEmbedLayer      training on CPU: large kernels on few channels
DPB bias cache                  DynamicPosBias       no gradient recorded
padding-mask cache              ``padding_mask``     eager
==============================  ===================  ==============================================

A measured path is timed on the real input the first time its key is met, against torch's own
call, and kept only when it wins by a clear margin; ``CROSSFORMER_TUNING=off`` keeps torch's own
everywhere (:mod:`.tuning`; ``crossformer tune`` tunes a host ahead of a deployment).

The caches are bounded in bytes (:mod:`.caches`, :func:`set_cache_limits`); packed weights are one
per packed layer, dtype and path, each about the weight's size; they go with the model, or with
``set_speedups(model, False)``.

And for all of them: never while a graph is captured (TorchScript, ``torch.jit.trace`` and so
ONNX, FX, ``torch.compile``, ``torch.export``), so a graph records the definition; never past a
layer that is not the plain torch module a speed-up was made for (a LoRA wrapper, a quantized
Linear) or that has hooks: a speed-up calls such a layer as it is, or steps aside.
:func:`set_speedups` turns every one of them off for a whole model, timm's fused attention (SDPA)
included.

Modules, from the bottom: :mod:`.gates` (when a speed-up may run), :mod:`.caches`, :mod:`.tuning`
(choosing a path by timing it), :mod:`.products` (the paths of Linears and convolutions),
:mod:`.mixins` (the speed-up of each layer), :mod:`.switch` (:func:`set_speedups`).
"""
from .caches import ByteBoundedCache, dpb_cache, mask_cache, padding_mask, set_cache_limits
from .gates import Speedup, capturing
from .mixins import AttentionSpeedups, BlockSpeedups, CrossEmbedSpeedups, PosBiasSpeedups, gelu_linear
from .products import conv_product, linear_product, packed_weight, space_to_depth_conv
from .switch import set_speedups
from .tuning import clear_tuning, tuned_choices, tuning_enabled, tuning_file

__all__ = ['set_speedups', 'set_cache_limits', 'capturing', 'padding_mask', 'gelu_linear', 'space_to_depth_conv',
           'ByteBoundedCache', 'dpb_cache', 'mask_cache', 'linear_product', 'conv_product', 'packed_weight',
           'tuned_choices', 'clear_tuning', 'tuning_enabled', 'tuning_file', 'Speedup',
           'AttentionSpeedups', 'BlockSpeedups', 'CrossEmbedSpeedups', 'PosBiasSpeedups']
