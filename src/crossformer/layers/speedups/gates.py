"""When a speed-up may run: the switch every speed-up layer carries, and the conditions they share."""
from functools import lru_cache
from typing import Optional

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ['Speedup', 'capturing', 'has_hooks', 'submodules', 'plain', 'plain_tensor', 'cpu_inference', 'bf16_emulated',
           'product_dtype']


@torch.jit.unused
def _capturing_in_python() -> bool:
    return (torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def capturing() -> bool:
    """True under TorchScript, ``torch.jit.trace`` (ONNX export), FX symbolic tracing, ``torch.compile``
    or ``torch.export``."""
    if torch.jit.is_scripting():
        return True
    return _capturing_in_python()


def submodules(module: nn.Module) -> list:
    """``module`` and every module inside it: ``list(module.modules())`` without its bookkeeping (it
    runs on every call, where ``modules()`` costs several times more)."""
    found, pending = [], [module]
    while pending:
        m = pending.pop()
        if m is not None:
            found.append(m)
            pending.extend(m._modules.values())
    return found


def has_hooks(module: nn.Module) -> bool:
    """``module`` or one inside it has forward hooks (or a global forward hook is set)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    pending = [module]
    while pending:
        m = pending.pop()
        if m is not None:
            if m._forward_hooks or m._forward_pre_hooks:
                return True
            pending.extend(m._modules.values())
    return False


def plain(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly a ``cls`` (not a subclass, wrapper or quantized stand-in), without hooks."""
    return type(module) is cls and not has_hooks(module)


def plain_tensor(t: torch.Tensor) -> bool:
    """A dense torch tensor or parameter, not a subclass (torchao's quantized weights are subclasses)."""
    return type(t) in (torch.Tensor, nn.Parameter)


class Speedup:
    """Base of the speed-up mixins: ``speedups`` is the switch :func:`~.switch.set_speedups` sets."""
    speedups: bool = True

    @torch.jit.unused
    def _eager(self) -> bool:
        return self.speedups and not capturing()


@lru_cache(maxsize=None)
def bf16_emulated() -> bool:
    """oneDNN has no bf16 products on this host (it has them from AVX-512 cores on, with AMX or with
    AVX-NE-CONVERT: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``): torch then emulates them,
    several times slower than fp32 products."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.jit.unused
def cpu_inference(layer: nn.Module, x: torch.Tensor) -> bool:
    """Where token chunks and the tuned inference products apply: CPU inference (eval, no grad; no
    autocast, or bf16 autocast), no hooks inside.

    Chunks keep a layer's wide intermediates in cache; a GPU wants whole tensors instead, and
    autograd would keep every chunk's intermediates anyway. Hooks see whole tensors.
    """
    return (layer._eager() and not layer.training and not torch.is_grad_enabled() and x.device.type == 'cpu'
            and (not torch.is_autocast_enabled('cpu') or torch.get_autocast_dtype('cpu') == torch.bfloat16)
            and not has_hooks(layer))


def product_dtype(layer: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype of ``layer``'s product on ``x`` in eager torch: autocast's, else ``x``'s (None where
    ``x`` and the weight differ, an error in eager torch)."""
    if torch.is_autocast_enabled('cpu'):
        return torch.get_autocast_dtype('cpu')
    same = layer.weight.dtype == x.dtype and (layer.bias is None or layer.bias.dtype == x.dtype)
    return x.dtype if same else None
