"""Whether a graph is being captured, so eager-only fast paths and caches step aside."""
import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ['capturing']


@torch.jit.unused
def _capturing_in_python() -> bool:
    return torch.jit.is_tracing() or is_fx_symbolic_tracing() or torch.compiler.is_compiling()


def capturing() -> bool:
    """True under TorchScript, ``torch.jit.trace`` (ONNX export), FX symbolic tracing or ``torch.compile``."""
    if torch.jit.is_scripting():
        return True
    return _capturing_in_python()
