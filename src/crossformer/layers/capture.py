"""Whether a graph is being captured, so eager-only fast paths and caches step aside."""
import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ['capturing', 'eager_cpu_inference']


@torch.jit.unused
def _capturing_in_python() -> bool:
    return torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling()


def capturing() -> bool:
    """True under TorchScript, ``torch.jit.trace`` (ONNX export), FX symbolic tracing or ``torch.compile``."""
    if torch.jit.is_scripting():
        return True
    return _capturing_in_python()


@torch.jit.unused
def eager_cpu_inference(x: torch.Tensor) -> bool:
    """True where the token-chunked inference paths apply: eager, no gradient, ``x`` on the CPU, no autocast.

    Chunks keep a layer's intermediate tensors in cache; a GPU wants whole tensors instead, and
    under autocast the ``out=`` products the chunks write with would not be autocast.
    """
    return (not torch.is_grad_enabled() and not capturing() and x.device.type == 'cpu'
            and not torch.is_autocast_enabled('cpu'))
