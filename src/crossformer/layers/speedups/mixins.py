"""The speed-ups of each CrossFormer layer, one mixin per layer class: the layer's ``forward`` is
the definition, with one line where its mixin may take over."""
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .caches import dpb_cache
from .gates import Speedup, cpu_inference, has_hooks, plain, submodules
from .products import conv_paths, conv_product, linear_product, space_to_depth_conv, space_to_depth_fits
from .tuning import dtype_name, run_chosen, token_bucket

__all__ = ['AttentionSpeedups', 'BlockSpeedups', 'CrossEmbedSpeedups', 'PosBiasSpeedups', 'gelu_linear',
           'ATTENTION_CHUNK_TOKENS', 'HUGE_GROUP_BYTES', 'QUERY_BLOCK_BYTES', 'MLP_CHUNK_TOKENS', 'WHOLE_MAX_BYTES',
           'LEAN_MLP_CHUNK_TOKENS']

# Set on 2 CPU cores (benchmarks/benchmark.py): enough tokens that the matmuls stay efficient,
# few enough that a chunk's wide intermediates stay in cache.
ATTENTION_CHUNK_TOKENS = 1536  # tokens of whole groups per chunk of GroupAttention
# A group whose attention weights (heads x N x N) would exceed HUGE_GROUP_BYTES is computed
# QUERY_BLOCK_BYTES of weights at a time (a strip's whole-map group: 16 x 8192 pixels make 8192 tokens).
HUGE_GROUP_BYTES = 64 * 2 ** 20
QUERY_BLOCK_BYTES = 4 * 2 ** 20
MLP_CHUNK_TOKENS = 1024  # tokens per chunk of a block's inference MLP residual
# Whether a layer's tokens go at once or in chunks is timed (as a product's path), where taking them
# at once needs at most WHOLE_MAX_BYTES for the MLP's hidden layer, or the attention's q, k and v.
WHOLE_MAX_BYTES = 256 * 2 ** 20
LEAN_MLP_CHUNK_TOKENS = 2048  # tokens per chunk of the lean MLP, CPU fp32 training


# ---- GroupAttention: a few groups at a time, huge groups in blocks of queries ---------------------

def balanced_step(total: int, most: int) -> int:
    """The chunk size that splits ``total`` items into as few chunks of at most ``most`` as can be,
    as even as can be (64 groups, at most 31 a chunk: 22 + 22 + 20, not 31 + 31 + 2): like chunks
    share one tuned product path, and none is left tiny."""
    chunks = -(-total // most)
    return max(1, -(-total // chunks))


class AttentionSpeedups(Speedup):
    """For :class:`~crossformer.layers.GroupAttention`: a few groups at a time, or a huge group a
    block of queries at a time.

    - CPU inference: each chunk's q, k, v and attention weights stay in cache. A chunk never spans
      two images, so it takes a slice of the padding mask. Each chunk runs the layer's ``forward``
      with qkv and proj through their tuned paths (:func:`~.products.linear_product`).
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
        return balanced_step(groups, max(1, ATTENTION_CHUNK_TOKENS // x.shape[1]))

    @torch.jit.unused
    def _huge(self, x: torch.Tensor) -> bool:
        return (self._eager() and not torch.is_grad_enabled()
                and self.num_heads * x.shape[1] ** 2 * x.element_size() > HUGE_GROUP_BYTES and not has_hooks(self))

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
        return self._huge(x) or cpu_inference(self, x)

    @torch.jit.unused
    def speedup(self, x: torch.Tensor, group_h: int, group_w: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self._huge(x):
            return self._query_blocks(x, group_h, group_w, mask)
        step = self._groups_per_chunk(x, mask)
        if x.shape[0] <= step:
            return self._inference_forward(x, group_h, group_w, mask)
        if 3 * x.numel() * x.element_size() > WHOLE_MAX_BYTES:  # q, k and v of every group at once: too large
            return self._chunked_forward(x, group_h, group_w, mask, step)
        B_, N, C = x.shape
        key = ('attention_chunks', self.num_heads, N, C, token_bucket(B_ * N), int(mask is not None),
               dtype_name(x.dtype), torch.get_num_threads())
        return run_chosen(key, ('default', 'chunks'),  # all groups at once, or a few at a time
                          lambda p: (self._inference_forward(x, group_h, group_w, mask) if p == 'default'
                                     else self._chunked_forward(x, group_h, group_w, mask, step)))

    @torch.jit.unused
    def _chunked_forward(self, x: torch.Tensor, group_h: int, group_w: int, mask: Optional[torch.Tensor],
                         step: int) -> torch.Tensor:
        """:meth:`_inference_forward` ``step`` groups at a time, never across two images."""
        groups = x.shape[0] if mask is None else mask.shape[0]
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
        """The layer's ``forward`` at CPU inference (eval: no dropout), qkv and proj through their
        tuned paths (:func:`~.products.linear_product`), the attention fused or explicit, whichever
        was timed faster here. Keep it in step with ``GroupAttention.forward``."""
        B_, N, C = x.shape
        qkv = linear_product(self.qkv, x)
        q, k, v = qkv.view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.pos(group_h, group_w, q.dtype, q.device)  # heads, N, N
        x = self._tuned_attention(q, k, v, bias, mask).transpose(1, 2).reshape(B_, N, C)
        return linear_product(self.proj, x)

    @torch.jit.unused
    def _tuned_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention of ``(B_, heads, N, head_dim)`` q, k, v: SDPA (``'default'``, where the layer
        uses it) or matmul-softmax-matmul (``'explicit'``), as timed on this host."""
        if not self.fused_attn:
            return self.attention(q, k, v, bias, mask, 0.)
        B_, heads, N, head_dim = q.shape
        key = ('attention', heads, N, head_dim, token_bucket(B_), int(mask is not None), dtype_name(q.dtype),
               torch.get_num_threads())
        return run_chosen(key, ('default', 'explicit'),
                          lambda p: self.attention(q, k, v, bias, mask, 0., fused=p == 'default'))

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


class BlockSpeedups(Speedup):
    """For :class:`~crossformer.layers.CrossFormerBlock`'s ``mlp_residual``, ``x + MLP(norm2(x))``.

    - CPU inference: chunk by chunk of tokens, so each chunk's norm, 4x wide hidden layer, GELU and
      residual stay in cache. Where the MLP is timm's plain ``Mlp`` (:meth:`_plain_mlp`), a chunk is
      two tuned products (:func:`~.products.linear_product`): fc1 with its GELU, fc2 with the
      residual add; else each chunk runs the block's own ``mlp_residual``.
    - Training with autograd, where the MLP is timm's plain ``Mlp`` with exact GELU: the GELU
      output is recomputed in backward instead of kept (:func:`gelu_linear`), ``4C`` fewer floats
      kept per token, the largest tensor a block keeps. On CPU in fp32, in chunks too.
    """

    @torch.jit.unused
    def _lean_applies(self) -> bool:
        mlp = self.mlp
        return (self._eager() and self.training and torch.is_grad_enabled()
                and type(mlp.act) is nn.GELU and mlp.act.approximate == 'none' and mlp.drop1.p == 0.
                and isinstance(mlp.norm, nn.Identity) and plain(mlp.fc2, nn.Linear) and not has_hooks(mlp))

    @torch.jit.unused
    def _plain_mlp(self) -> bool:
        mlp = self.mlp
        return (type(mlp.act) is nn.GELU and mlp.act.approximate == 'none' and isinstance(mlp.norm, nn.Identity)
                and not has_hooks(mlp))

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor) -> bool:
        if cpu_inference(self, x):  # a plain MLP: its products take their tuned paths
            return x.numel() > MLP_CHUNK_TOKENS * x.shape[-1] or self._plain_mlp()
        return self._lean_applies()

    @torch.jit.unused
    def _mlp_rows(self, flat: torch.Tensor, step: int) -> torch.Tensor:
        """``mlp_residual`` of ``(T, C)`` tokens of a plain MLP at inference, ``step`` tokens at a time,
        fc1 with its GELU and fc2 with the residual add through their tuned paths."""
        mlp = self.mlp
        chunks = [linear_product(mlp.fc2, linear_product(mlp.fc1, self.norm2(rows), gelu=True), residual=rows)
                  for rows in flat.split(step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    @torch.jit.unused
    def speedup(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mlp = self.mlp
            cpu_fp32 = x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            hidden = gelu_linear(mlp.fc1(self.norm2(x)), mlp.fc2.weight, mlp.fc2.bias,
                                 LEAN_MLP_CHUNK_TOKENS if cpu_fp32 else 0)
            return x + self.drop_path2(mlp.drop2(hidden))
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        if self._plain_mlp():  # eval: dropout and drop path are identities
            step = balanced_step(tokens, MLP_CHUNK_TOKENS)
            hidden_bytes = tokens * self.mlp.fc1.out_features * x.element_size()
            if step == tokens or hidden_bytes > WHOLE_MAX_BYTES:  # one chunk; or too large to take whole
                return self._mlp_rows(flat, step).view(x.shape)
            key = ('mlp_chunks', x.shape[-1], self.mlp.fc1.out_features, dtype_name(x.dtype), token_bucket(tokens),
                   torch.get_num_threads())
            return run_chosen(key, ('default', 'chunks'),  # all tokens at once, or a chunk at a time
                              lambda p: self._mlp_rows(flat, tokens if p == 'default' else step)).view(x.shape)
        out = torch.empty_like(flat)
        step = balanced_step(flat.shape[0], MLP_CHUNK_TOKENS)
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = self.mlp_residual(flat[rows])
        return out.view(x.shape)


class CrossEmbedSpeedups(Speedup):
    """For :class:`~crossformer.layers.CrossEmbedLayer`, on CPU: at inference each convolution through
    its tuned path (:func:`~.products.conv_product`: torch's, a packed weight, or space-to-depth);
    in training the stem's large kernels (8/16/32 at stride 4) as :func:`space_to_depth_conv`.
    Any other convolution is called as it is."""

    @torch.jit.unused
    def speedup_applies(self, x: torch.Tensor) -> bool:
        return self._eager() and x.device.type == 'cpu' and any(
            len(conv_paths(p, x)) > 1 or space_to_depth_fits(p) for p in self.projs)

    @torch.jit.unused
    def speedup(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv_product(p, x) if len(conv_paths(p, x)) > 1
                          else space_to_depth_conv(x, p) if space_to_depth_fits(p) else p(x)
                          for p in self.projs], dim=1)


_DPB_PLAIN_TYPES = (nn.Linear, nn.LayerNorm, nn.ReLU, nn.Sequential)


class PosBiasSpeedups(Speedup):
    """For :class:`~crossformer.layers.DynamicPosBias`: the bias and the offset table cached per
    group shape while no gradient is recorded, in :data:`dpb_cache`.

    The key holds the module (weakly: a dead module's entries are dropped, never served to a new
    one), the dtype, the device and each parameter's storage and version counter, so an optimizer
    step, ``load_state_dict`` or ``.to()`` is never served a stale bias.
    """

    @torch.jit.unused
    def speedup_applies(self) -> bool:
        if not (self._eager() and not torch.is_grad_enabled() and not has_hooks(self)):
            return False
        modules = submodules(self)
        return (all(type(m) in _DPB_PLAIN_TYPES for m in modules[1:])
                and not any(p.is_inference() for m in modules for p in m._parameters.values() if p is not None))
        # (an inference tensor has no version counter to key on)

    @torch.jit.unused
    def _cached(self, kind: str, group_h: int, group_w: int, dtype: torch.dtype, device: torch.device, compute):
        owner = weakref.ref(self)
        state = (dtype, device, tuple((p.data_ptr(), p._version) for m in submodules(self)
                                      for p in m._parameters.values() if p is not None))
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
