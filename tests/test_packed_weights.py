"""Packed oneDNN Linears and convolutions: the definition's numbers, never a stale pack, only plain
layers, memory bounded."""
import copy
import gc
import sys
import threading
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from crossformer import set_speedups
from crossformer.layers import CrossEmbedLayer, CrossFormerBlock, speedups

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='torch built without oneDNN')


def small_model() -> nn.Module:
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                              num_classes=10, drop_path_rate=0.)
    with torch.no_grad():  # Linears at PyTorch's own scale, so the MLPs weigh in the logits
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return model.eval()


def linear(in_features: int = 24, out_features: int = 40) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


def packs_of(model: nn.Module) -> list:
    return [m for m in model.modules() if m in speedups._packed_weights]


@pytest.mark.parametrize('tokens', [1, 37, 2500])
def test_packed_products_equal_the_definitions(tokens):
    layer = linear()
    x, residual = torch.randn(tokens, 24), torch.randn(tokens, 40)
    with torch.no_grad():
        assert speedups.packed_linear_applies(layer, x)
        torch.testing.assert_close(speedups.packed_linear(layer, x), F.linear(x, layer.weight, layer.bias),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(speedups.packed_linear(layer, x, gelu=True), F.gelu(layer(x)), atol=1e-5, rtol=0)
        torch.testing.assert_close(speedups.packed_linear(layer, x, residual=residual), residual + layer(x),
                                   atol=1e-5, rtol=0)
        shaped = x.view(1, tokens, 1, 24)  # any leading shape
        assert speedups.packed_linear(layer, shaped).shape == (1, tokens, 1, 40)


@pytest.mark.parametrize('size', [(64, 80), (160, 160)], ids=['padded', 'chunked'])  # 160: 3200 tokens, 4 chunks
def test_model_with_packed_mlps_equals_the_definition(size):
    model = small_model()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fast = model(x)
        assert len(packs_of(model)) >= 2 * 2  # fc1 and fc2 of stage 1 and 2 (widths 32, 64) at least
        set_speedups(model, False)
        plain = model(x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert plain.abs().max() > 1e-2


def test_a_pack_is_never_stale():
    layer = linear()
    x = torch.randn(5, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(speedups.packed_linear(layer, x), F.linear(x, layer.weight, layer.bias),
                                       atol=1e-5, rtol=1e-6)

    check()
    layer.load_state_dict(linear(24, 40).state_dict() | {'weight': torch.randn(40, 24)})  # copied in place
    check()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    layer(x).square().sum().backward()
    optimizer.step()  # in place
    check()
    layer.double().float()  # new storages; the float32 one may land at the old address
    check()
    layer.weight.data = torch.randn(40, 24)  # swapped storage, version counter unchanged
    check()
    with torch.no_grad():
        layer.weight[0, 0] = 3.  # an in-place write by hand
    check()


def test_only_plain_linears_without_hooks_are_packed():
    x = torch.randn(5, 24)
    hooked = linear()
    calls = []
    hooked.register_forward_hook(lambda *_: calls.append(1))

    class Scaled(nn.Linear):  # a subclass (LoRA-like wrappers, stand-ins) keeps its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    class Subclassed(torch.Tensor):  # as torchao's quantized weights, on a Linear that stays an nn.Linear
        pass

    wrapped = linear()
    wrapped.weight = nn.Parameter(wrapped.weight.detach().as_subclass(Subclassed))
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear()), {nn.Linear}, dtype=torch.qint8)[0]
    with torch.no_grad():
        assert speedups.packed_linear_applies(linear(), x)
        for layer in (hooked, Scaled(24, 40), wrapped, quantized):
            assert not speedups.packed_linear_applies(layer, x)
        with torch.inference_mode():
            frozen = linear()  # an inference tensor has no version counter to tell a change
        assert not speedups.packed_linear_applies(frozen, x)
    assert speedups.packed_linear_applies(linear(), x) is False  # autograd on
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # bf16 products: as below
        assert speedups.packed_linear_applies(linear(), x) == speedups._bf16_emulated()
    with torch.no_grad():  # bf16: only where the host has no bf16 products (then fp32 products pay)
        bf16 = speedups.packed_linear_applies(linear().to(torch.bfloat16), x.to(torch.bfloat16))
        assert bf16 == speedups._bf16_emulated()
        assert not speedups.packed_linear_applies(linear().to(torch.bfloat16), x)  # dtypes differ


def test_a_hooked_mlp_keeps_its_forward_and_is_not_packed():
    block = CrossFormerBlock(32, 2).eval()
    calls = []
    block.mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        block(torch.randn(1, 7, 7, 32))
    assert calls == [1]
    assert packs_of(block.mlp) == []  # the attention's own Linears may be packed


def test_packs_are_bounded_and_released_with_the_model():
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        packed_layers = len(packs_of(model))
        for scale in (0.5, 2.0):  # new weights each time: replaced, not added
            model.load_state_dict({k: v * scale for k, v in model.state_dict().items()})
            model(x)
    packed = packs_of(model)
    assert len(packed) == packed_layers
    assert all(len(speedups._packed_weights[m]) == 1 for m in packed)  # one fp32 pack each
    set_speedups(model, False)  # the switch drops them
    assert packs_of(model) == []
    set_speedups(model, True)
    with torch.no_grad():
        model(x)
    assert len(packs_of(model)) == packed_layers >= 4
    packed_tensors = [weakref.ref(p.weight) for m in packs_of(model) for p in speedups._packed_weights[m].values()]
    del model, packed
    gc.collect()
    assert all(ref() is None for ref in packed_tensors)  # the packed memory went with the model


@pytest.mark.parametrize('kernel, stride, size', [(32, 4, (37, 50)), (8, 4, (64, 64)), (4, 2, (9, 6)), (2, 2, (5, 7))])
def test_packed_convolutions_equal_the_definitions(kernel, stride, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, padding=(kernel - stride) // 2)
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        assert speedups.packed_conv_applies(conv, x)
        want = conv(x)
        torch.testing.assert_close(speedups.packed_conv(conv, x), want, atol=1e-5, rtol=0)
        channels_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as the merges between stages see it
        torch.testing.assert_close(speedups.packed_conv(conv, channels_last), want, atol=1e-5, rtol=0)
        conv.load_state_dict({'weight': -2 * conv.weight, 'bias': conv.bias})  # copied in place
        torch.testing.assert_close(speedups.packed_conv(conv, x), conv(x), atol=2e-5, rtol=0)
    assert want.abs().max() > 1e-1


def test_cross_embed_layers_pack_their_convolutions_at_inference_only():
    stem = CrossEmbedLayer(3, 32, (4, 8, 16, 32), stride=4).eval()
    merge = CrossEmbedLayer(32, 64, (2, 4), stride=2, norm_first=True).eval()
    image = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        fast = merge(stem(image))
        assert len(packs_of(stem)) == 4 and len(packs_of(merge)) == 2
        set_speedups(stem, False), set_speedups(merge, False)
        plain = merge(stem(image))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    set_speedups(stem, True)
    stem.train()
    stem(image).sum().backward()  # training: nothing packed, the stem's large kernels as space-to-depth
    assert packs_of(stem) == []
    hooked = nn.Conv2d(3, 4, 4, 4)
    hooked.register_forward_hook(lambda *_: None)
    with torch.no_grad():
        assert not speedups.packed_conv_applies(hooked, image)
        assert not speedups.packed_conv_applies(nn.Conv2d(3, 4, 3, padding='same'), image)
        assert not speedups.packed_conv_applies(nn.Conv2d(3, 4, 3, padding_mode='reflect'), image)
        assert not speedups.packed_conv_applies(nn.Conv2d(3, 4, 3).double(), image.double())


@pytest.mark.parametrize('autocast', [False, True], ids=['bf16-layer', 'bf16-autocast'])
def test_emulated_bf16_products_round_as_bf16_products_do(autocast, monkeypatch):
    monkeypatch.setattr(speedups, '_bf16_emulated', lambda: True)  # as on a host without bf16 products
    layer, conv = linear(), nn.Conv2d(3, 8, 8, 4, padding=2)
    x, residual, image = torch.randn(37, 24), torch.randn(37, 40), torch.randn(2, 3, 21, 18)
    if not autocast:
        layer, conv = layer.bfloat16(), conv.bfloat16()
        x, residual, image = x.bfloat16(), residual.bfloat16(), image.bfloat16()
    # the exact products of the bf16-rounded operands, rounded once to bf16
    w, b = layer.weight.bfloat16().double(), layer.bias.bfloat16().double()
    exact = (x.bfloat16().double() @ w.t() + b)
    exact_conv = F.conv2d(image.bfloat16().double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double(),
                          stride=4, padding=2)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        assert speedups.packed_linear_applies(layer, x) and speedups.packed_conv_applies(conv, image)
        product = speedups.packed_linear(layer, x)
        assert product.dtype == layer(x).dtype == torch.bfloat16
        torch.testing.assert_close(product, exact.bfloat16(), atol=0, rtol=2 ** -8)  # one rounding: half an ulp
        gelu = speedups.packed_linear(layer, x, gelu=True)
        torch.testing.assert_close(gelu, F.gelu(exact).bfloat16(), atol=1e-6, rtol=2 ** -8)
        added = speedups.packed_linear(layer, x, residual=residual)
        assert added.dtype == (residual + layer(x)).dtype  # fp32 under autocast, bf16 for a bf16 layer
        torch.testing.assert_close(added, (residual.double() + exact.bfloat16().double()).to(added.dtype),
                                   atol=1e-6, rtol=2 ** -8)
        out = speedups.packed_conv(conv, image)
        assert out.dtype == conv(image).dtype == torch.bfloat16
        torch.testing.assert_close(out, exact_conv.bfloat16(), atol=1e-6, rtol=2 ** -8)
        assert [p.weight.dtype for p in speedups._packed_weights[layer].values()] == [torch.float32]  # fp32 copies
    if not autocast:
        fp32 = layer.float()  # in place: the bf16 pack is stale, dropped as the fp32 one is made
        with torch.no_grad():
            speedups.packed_linear(fp32, x.float())
        assert list(speedups._packed_weights[fp32]) == [torch.float32]


@pytest.mark.parametrize('autocast', [False, True], ids=['bf16-model', 'bf16-autocast'])
def test_a_bf16_model_with_emulated_products_stays_as_close_to_fp32(autocast, monkeypatch):
    monkeypatch.setattr(speedups, '_bf16_emulated', lambda: True)
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        want = model.forward_features(x)
        run, x_run = (model, x) if autocast else (copy.deepcopy(model).bfloat16(), x.bfloat16())
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            fast = run.forward_features(x_run).float()
            assert torch.bfloat16 in speedups._packed_weights[run.layers[0].blocks[0].mlp.fc1]
            set_speedups(run, False)
            definition = run.forward_features(x_run).float()
    assert not torch.equal(fast, definition)  # rounded less often
    fast_error, definition_error = (fast - want).abs().mean(), (definition - want).abs().mean()
    assert fast_error < 1.1 * definition_error < 0.02 * want.abs().mean()


def test_the_avx2_rule_packs_wide_linears_on_few_tokens_only():
    wide, narrow, stage1 = nn.Linear(384, 1536), nn.Linear(96, 384), nn.Linear(64, 256)
    if speedups._avx512():
        assert all(speedups._onednn_linear_pays(layer, t) for layer in (wide, narrow, stage1) for t in (49, 4096))
    else:
        assert speedups._onednn_linear_pays(wide, 196) and not speedups._onednn_linear_pays(wide, 784)
        assert not speedups._onednn_linear_pays(narrow, 49) and not speedups._onednn_linear_pays(narrow, 4096)
        assert speedups._onednn_linear_pays(stage1, 4096)


def test_a_write_through_data_needs_the_switch_to_drop_packs_and_biases():
    model, x = small_model(), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        for p in model.parameters():
            p.data.mul_(1.5)  # .data bypasses the version counter, as it bypasses autograd
        stale = model(x)  # the documented limit: packs and DPB biases of the old weights
        want = copy.deepcopy(model)(x)  # new parameters, nothing cached for them
        set_speedups(model, False)
        set_speedups(model, True)
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    assert (stale - want).abs().max() > 1e-2 * want.abs().max()


def test_packs_are_safe_under_threads():
    layer, x = linear(8, 8), torch.randn(5, 8)
    errors = []

    def work(dtype):
        try:
            for i in range(1500):
                if i % 3 == 0:
                    with torch.no_grad():
                        layer.weight.add_(0.)  # a new version: every pack of the layer goes stale
                speedups.packed_weight(layer, dtype)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a busy server
    try:
        threads = [threading.Thread(target=work, args=(dtype,)) for dtype in (torch.float32, torch.bfloat16) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    with torch.no_grad():
        torch.testing.assert_close(speedups.packed_linear(layer, x), layer(x), atol=1e-5, rtol=0)
