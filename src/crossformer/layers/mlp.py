"""The block's MLP, lean on activation memory while training."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp

from .capture import capturing

__all__ = ['LeanMlp', 'gelu_linear']


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` keeping only ``h`` for backward, where ``gelu(h)`` is recomputed.

    Autograd would keep both ``h`` and ``gelu(h)``; for the MLP's 4x wide hidden layer that is
    the largest tensor a block saves. Recomputing the GELU is cheap next to the matmuls.
    With ``chunk > 0`` (fp32 on CPU) forward and backward go ``chunk`` tokens at a time, so the
    GELU's input and output stay in cache and nothing 4x wide is allocated but ``h`` and its
    gradient. Under autocast (``chunk == 0``) the matmuls run in the dtype autocast gave the
    output, as autograd would.
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
        g = F.gelu(flat).to(dtype)
        grad_h = torch.ops.aten.gelu_backward(grad_out @ weight.to(dtype), flat).view_as(h)
        grad_weight = (grad_out.t() @ g).to(weight.dtype)
        return grad_h, grad_weight, grad_bias, None


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that saves half the activations for backward.

    ``chunk > 0`` computes it ``chunk`` tokens at a time (not under autocast: ``out=`` products).
    """
    return _GeluLinear.apply(h, weight, bias, chunk)


class LeanMlp(Mlp):
    """timm's :class:`~timm.layers.Mlp` (same parameters and names), ``(..., C) -> (..., C)``.

    While training with GELU and no hidden dropout, the GELU output is recomputed in backward
    instead of kept (:func:`gelu_linear`): ``4C`` fewer floats saved per token, the largest
    tensor a block keeps. ``fast_paths = False`` gives the plain computation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lean = (isinstance(self.act, nn.GELU) and self.act.approximate == 'none'
                     and isinstance(self.norm, nn.Identity))
        self.fast_paths = True
        self.chunk_tokens = 2048  # on CPU (see gelu_linear): stage-1 MLP of crossformer_s trains 1.3x faster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_paths and self.lean and self.training and self.drop1.p == 0. and torch.is_grad_enabled()
                and not capturing()):
            return self.drop2(self._lean(x))
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    @torch.jit.unused
    def _lean(self, x: torch.Tensor) -> torch.Tensor:
        chunk = 0 if x.device.type != 'cpu' or torch.is_autocast_enabled(x.device.type) else self.chunk_tokens
        return gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias, chunk)
