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
    Under autocast the matmuls run in the dtype autocast gave the output, as autograd would.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_out = grad_out.flatten(0, -2)
        dtype = grad_out.dtype
        g = F.gelu(h).flatten(0, -2).to(dtype)
        grad_h = torch.ops.aten.gelu_backward(grad_out @ weight.to(dtype), h.flatten(0, -2)).view_as(h)
        grad_weight = (grad_out.t() @ g).to(weight.dtype)
        grad_bias = grad_out.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_h, grad_weight, grad_bias


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that saves half the activations for backward."""
    return _GeluLinear.apply(h, weight, bias)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_paths and self.lean and self.training and self.drop1.p == 0. and torch.is_grad_enabled()
                and not capturing()):
            return self.drop2(self._lean(x))
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    @torch.jit.unused
    def _lean(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias)
