"""The speed-ups compute what the definitions compute, apply where they should, and step aside elsewhere."""
import pytest
import timm
import torch
from torch import nn

from crossformer import set_speedups
from crossformer.layers import (
    MASK_VALUE, CrossEmbedLayer, CrossFormerBlock, DynamicPosBias, GroupAttention, space_to_depth_conv)
from crossformer.layers import speedups
from crossformer.layers.speedups import gates, mixins, products

CPU = torch.device('cpu')


def _pair(module, fn):
    """``fn()`` with the module's speed-ups on, then off."""
    set_speedups(module, True)
    fast = fn()
    set_speedups(module, False)
    plain = fn()
    set_speedups(module, True)
    return fast, plain


def test_switch_turns_every_speedup_and_fused_attention_off():
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
    switched = [m for m in model.modules() if isinstance(m, speedups.Speedup)]
    assert {type(m).__name__ for m in switched} == {'CrossEmbedLayer', 'DynamicPosBias', 'GroupAttention',
                                                    'CrossFormerBlock'}
    set_speedups(model, False)
    assert not any(m.speedups for m in switched)
    assert not any(m.fused_attn for m in model.modules() if isinstance(m, GroupAttention))
    set_speedups(model, True)
    assert all(m.speedups for m in switched)


def test_dpb_cache_is_used_without_grad_and_never_stale():
    dpb = DynamicPosBias(8, num_heads=2)
    with torch.no_grad():
        first = dpb(5, 5, torch.float32, CPU)
        assert dpb(5, 5, torch.float32, CPU) is first  # cached
        dpb.pos3[2].bias.add_(1.0)  # an optimizer step or load_state_dict bumps the version
        updated = dpb(5, 5, torch.float32, CPU)
    torch.testing.assert_close(updated, first + 1.0)
    assert dpb(5, 5, torch.float32, CPU).requires_grad  # with grad: recomputed, differentiable
    dpb.load_state_dict(DynamicPosBias(8, num_heads=2).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dpb(5, 5, torch.float32, CPU), dpb.bias(5, 5, torch.float32, CPU))
        assert not torch.allclose(dpb(5, 5, torch.float32, CPU), updated)
        dpb.to(torch.bfloat16)  # another dtype after a forward: no stale float32 bias
        assert dpb(5, 5, torch.bfloat16, CPU).dtype == torch.bfloat16


def test_dpb_cache_steps_aside_for_hooks_and_wrapped_layers():
    dpb = DynamicPosBias(8, num_heads=2)
    calls = []
    handle = dpb.pos_proj.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        dpb(5, 5, torch.float32, CPU)
        dpb(5, 5, torch.float32, CPU)
    assert len(calls) == 2  # not served from the cache
    handle.remove()
    assert not dpb.speedup_applies() or len(calls) == 2


def test_a_model_built_under_inference_mode_runs_with_the_dpb_cache_stepping_aside():
    """Inference tensors have no version counter to key a cache on: computed each call, never stale."""
    with torch.inference_mode():
        model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)).eval()
        x = torch.randn(1, 3, 64, 64)
        first = model(x)
        assert not any(m.speedup_applies() for m in model.modules() if isinstance(m, DynamicPosBias))
        for m in model.modules():
            if isinstance(m, DynamicPosBias):
                m.pos3[2].bias.add_(1.0)  # an in-place change an inference tensor cannot report
        changed = model(x)
        set_speedups(model, False)
        torch.testing.assert_close(changed, model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, changed)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize('chunk_tokens', [3, 2048])  # 4 chunks of the 10 tokens, the last one short; 1 chunk
def test_lean_mlp_same_gradients_without_keeping_the_gelu_output(chunk_tokens, monkeypatch):
    monkeypatch.setattr(mixins, 'LEAN_MLP_CHUNK_TOKENS', chunk_tokens)
    block = CrossFormerBlock(16, 2, group_size=3).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = {}
    for lean in (True, False):
        set_speedups(block, lean)
        saved = _saved_bytes(lambda: block.mlp_residual(x).square().sum().backward())
        results[lean] = saved, [x.grad.clone()] + [p.grad.clone() for p in block.mlp.parameters()]
        x.grad = None
        block.zero_grad()
    assert results[False][0] - results[True][0] == 2 * 5 * 64 * 4  # the GELU output, fp32
    for lean_grad, plain_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(lean_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_lean_mlp_under_autocast_gives_grads_in_parameter_dtype():
    block = CrossFormerBlock(16, 2, group_size=3).train()
    x = torch.randn(3, 16, requires_grad=True)
    assert block.speedup_applies(x)
    grads = {}
    for lean in (True, False):
        set_speedups(block, lean)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = block.mlp_residual(x)
        out.float().sum().backward()
        grads[lean] = [x.grad.clone()] + [p.grad.clone() for p in block.mlp.parameters()]
        x.grad = None
        block.zero_grad()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[True])
    for lean_grad, plain_grad in zip(grads[True], grads[False]):
        torch.testing.assert_close(lean_grad, plain_grad, atol=2e-2, rtol=2e-2)  # bf16 products


def take_chunks(monkeypatch):
    """Layers take their tokens in chunks, whatever timing would say (the other choices: the default)."""
    monkeypatch.setattr(mixins, 'run_chosen',
                        lambda key, paths, run, rounds=0: run('chunks' if 'chunks' in paths else 'default'))


def test_chunked_mlp_inference_matches_plain(monkeypatch):
    take_chunks(monkeypatch)
    monkeypatch.setattr(mixins, 'MLP_CHUNK_TOKENS', 7)
    block = CrossFormerBlock(16, 2, group_size=3, interval=2).eval()
    x = torch.randn(2, 9, 5, 16)  # 90 tokens: 13 chunks, the last one short
    with torch.no_grad():
        assert block.speedup_applies(x)
        chunked, plain = _pair(block, lambda: block(x))
    assert chunked.shape == (2, 9, 5, 16)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('emulated', [False, True], ids=['native-bf16', 'emulated-bf16'])
def test_chunks_and_tuned_products_under_bf16_autocast(emulated, monkeypatch):
    if not emulated and gates.bf16_emulated():
        pytest.skip('this host has no bf16 products')
    take_chunks(monkeypatch)
    monkeypatch.setattr(mixins, 'MLP_CHUNK_TOKENS', 7)
    monkeypatch.setattr(gates, 'bf16_emulated', lambda: emulated)  # either kind of host
    monkeypatch.setattr(products, 'bf16_emulated', lambda: emulated)
    block = CrossFormerBlock(16, 2, group_size=3).eval()
    x = torch.randn(1, 9, 5, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert block.speedup_applies(x)
        fast, plain = _pair(block, lambda: block(x))
    assert fast.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fast, plain, atol=3e-2, rtol=3e-2)  # bf16 products on any path: bf16's precision
    monkeypatch.setattr(mixins, 'ATTENTION_CHUNK_TOKENS', 18)  # 2 groups of 9 tokens a chunk
    attention = GroupAttention(16, 2).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for groups in (1, 5):  # one chunk; three chunks
            assert attention(torch.randn(groups, 9, 16), 3, 3).dtype == torch.bfloat16  # as autocast's proj gives


@pytest.mark.parametrize('tuning', ['off', 'measure'])
def test_a_layer_takes_its_tokens_at_once_or_in_chunks_as_timed(tuning, monkeypatch):
    """Without tuning, every token at once, as the definition does; with it, whichever was faster."""
    monkeypatch.setenv('CROSSFORMER_TUNING', tuning)
    speedups.clear_tuning()  # nothing timed before
    monkeypatch.setattr(mixins, 'MLP_CHUNK_TOKENS', 7)
    monkeypatch.setattr(mixins, 'ATTENTION_CHUNK_TOKENS', 18)  # 2 groups of 9 tokens a chunk
    block = CrossFormerBlock(16, 2, group_size=3).eval()
    steps = []
    for cls, method in ((mixins.BlockSpeedups, '_mlp_rows'), (mixins.AttentionSpeedups, '_chunked_forward')):
        original = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *a, original=original, method=method: steps.append(method)
                            or original(self, *a))
    x = torch.randn(1, 9, 5, 16)
    with torch.no_grad():
        fast, plain = _pair(block, lambda: block(x))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    if tuning == 'off':
        assert steps == ['_mlp_rows']  # once, with every token: no attention chunks either
    else:  # both ways timed (four calls each at most), then the faster taken
        assert 2 <= steps.count('_mlp_rows') <= 9 and 1 <= steps.count('_chunked_forward') <= 4


def test_chunks_step_aside_with_grad_and_when_hooked(monkeypatch):
    monkeypatch.setattr(mixins, 'MLP_CHUNK_TOKENS', 7)
    block = CrossFormerBlock(16, 2, group_size=3).eval()
    x = torch.randn(1, 9, 5, 16)
    with torch.no_grad():
        assert block.speedup_applies(x)
        handle = block.mlp.fc2.register_forward_hook(lambda *_: None)
        assert not block.speedup_applies(x)
        handle.remove()
    assert not block.speedup_applies(x)  # autograd on


@pytest.mark.parametrize('kernel, stride, size', [(32, 4, (37, 50)), (16, 4, (64, 64)), (4, 2, (9, 6)), (2, 2, (5, 7))])
def test_space_to_depth_conv_matches_the_strided_conv(kernel, stride, size):
    conv = nn.Conv2d(3, 5, kernel, stride, padding=(kernel - stride) // 2)
    x = torch.randn(2, 3, *size, requires_grad=True)
    grad = torch.randn_like(conv(x))
    expected = torch.autograd.grad((conv(x) * grad).sum(), [x, conv.weight, conv.bias])
    out = space_to_depth_conv(x, conv)
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad((out * grad).sum(), [x, conv.weight, conv.bias]), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_stem_takes_space_to_depth_for_large_kernels_only():
    stem = CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).eval()
    assert [products.space_to_depth_fits(p) for p in stem.projs] == [False, True, True, True]
    merge = CrossEmbedLayer(96, 192, (2, 4), stride=2, norm_first=True)
    assert not any(products.space_to_depth_fits(p) for p in merge.projs)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        fast, plain = _pair(stem, lambda: stem(x))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    stem.projs[2].register_forward_hook(lambda *_: None)  # a hooked conv is called as it is
    assert [products.space_to_depth_fits(p) for p in stem.projs] == [False, True, False, True]


def test_stem_trains_through_space_to_depth_with_the_same_gradients():
    stem = CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).train()
    x = torch.randn(2, 3, 45, 38)
    grads = {}
    for fast in (True, False):
        set_speedups(stem, fast)
        stem(x).square().sum().backward()
        grads[fast] = [p.grad.clone() for p in stem.parameters()]
        stem.zero_grad()
    for fast_grad, plain_grad in zip(grads[True], grads[False]):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('fused', [True, False])
def test_chunked_attention_inference_matches_plain(fused, monkeypatch):
    take_chunks(monkeypatch)
    monkeypatch.setattr(mixins, 'ATTENTION_CHUNK_TOKENS', 27)  # 3 groups of 9 tokens: chunks end short in each image
    attn = GroupAttention(32, 2).eval()
    groups = 7
    x = torch.randn(2 * groups, 9, 32)  # 2 images, 7 groups each
    mask = torch.zeros(groups, 1, 1, 9)
    mask[-2:, ..., 5:] = MASK_VALUE  # the last groups of every image are partly padding
    with torch.no_grad():
        for m in (None, mask):
            assert attn.speedup_applies(x, m)
            attn.fused_attn = fused
            chunked = attn(x, 3, 3, m)
            set_speedups(attn, False)
            attn.fused_attn = fused
            plain = attn(x, 3, 3, m)
            set_speedups(attn, True)
            torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(attn(x, 3, 3, mask), attn(x, 3, 3, None))  # the mask matters here


def test_model_speedups_on_and_off_agree_in_eval_and_training():
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(2, 1, 2, 1), num_heads=(1, 2, 4, 8),
                              num_classes=10, drop_path_rate=0.).eval()
    x = torch.randn(2, 3, 224, 173)  # stage 1: 2 x 56 x 44 tokens, several chunks; padding in every stage
    with torch.no_grad():
        fast, plain = _pair(model, lambda: model(x))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    model.train()
    grads = {}
    for on in (True, False):
        set_speedups(model, on)
        model.zero_grad()
        model(x[:, :, :64, :80]).square().sum().backward()
        grads[on] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
