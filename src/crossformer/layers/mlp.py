"""The block's MLP, lean on activation memory while training and chunked over tokens at inference."""
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
    """timm's :class:`~timm.layers.Mlp` (same parameters and names), ``(..., C) -> (..., C)``, with two fast paths.

    - Training with GELU and no hidden dropout: the GELU output is recomputed in backward
      instead of kept (:func:`gelu_linear`), saving ``4C`` floats per token.
    - No gradient: tokens go through in chunks of ``chunk_tokens`` when the input width is at
      most ``chunk_max_dim``, so the wide hidden layer stays in cache. The narrow early stages
      are memory-bound there; wider layers are compute-bound and gain nothing.
    """

    def __init__(self, *args, chunk_tokens: int = 512, chunk_max_dim: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        self.lean = (isinstance(self.act, nn.GELU) and self.act.approximate == 'none'
                     and isinstance(self.norm, nn.Identity))
        self.chunk_tokens = chunk_tokens
        self.chunk_max_dim = chunk_max_dim
        self.fast_paths = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_paths or capturing():
            return self._plain(x)
        if torch.is_grad_enabled():
            if self.lean and self.training and self.drop1.p == 0.:
                return self.drop2(self._lean(x))
            return self._plain(x)
        if x.shape[-1] <= self.chunk_max_dim and x.numel() > 2 * self.chunk_tokens * x.shape[-1]:
            return self._chunked(x)
        return self._plain(x)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    @torch.jit.unused
    def _lean(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias)

    @torch.jit.unused
    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.fc2.out_features)
        for start in range(0, flat.shape[0], self.chunk_tokens):
            out[start:start + self.chunk_tokens] = self._plain(flat[start:start + self.chunk_tokens])
        return out.view(*x.shape[:-1], -1)
