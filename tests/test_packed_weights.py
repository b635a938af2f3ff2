"""The product paths of Linears and convolutions (torch's, packed oneDNN, fp32 products of bf16
values, space-to-depth): the definition's numbers on every path, never a stale pack, only plain
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
from crossformer.layers.speedups import gates, products, tuning

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
    return [m for m in model.modules() if m in products._packed_weights]


@pytest.fixture
def force_path(monkeypatch):
    """``force_path(p)``: every tuned product takes path ``p`` where it is offered, else torch's."""
    def force(path: str):
        monkeypatch.setattr(products, 'choose', lambda key, paths, run, rounds=0: (path if path in paths else 'default', None))
    return force


def emulate_bf16(monkeypatch):
    """As on a host without bf16 products."""
    monkeypatch.setattr(gates, 'bf16_emulated', lambda: True)
    monkeypatch.setattr(products, 'bf16_emulated', lambda: True)


@pytest.mark.parametrize('tokens', [1, 37, 2500])
def test_every_linear_path_equals_the_definition(tokens):
    layer = linear()
    x, residual = torch.randn(tokens, 24), torch.randn(tokens, 40)
    with torch.no_grad():
        assert products.linear_paths(layer, x) == ('default', 'onednn')
        for path in ('default', 'onednn', None):  # None: the tuned one
            torch.testing.assert_close(products.linear_product(layer, x, path=path),
                                       F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
            torch.testing.assert_close(products.linear_product(layer, x, gelu=True, path=path), F.gelu(layer(x)),
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(products.linear_product(layer, x, residual=residual, path=path),
                                       residual + layer(x), atol=1e-5, rtol=0)
            shaped = x.view(1, tokens, 1, 24)  # any leading shape
            assert products.linear_product(layer, shaped, path=path).shape == (1, tokens, 1, 40)
        with pytest.raises(ValueError, match='fp32'):
            products.linear_product(layer, x, path='fp32')  # not offered for an fp32 product


@pytest.mark.parametrize('size', [(64, 80), (160, 160)], ids=['padded', 'chunked'])  # 160: 3200 tokens, 4 chunks
@pytest.mark.parametrize('path', ['default', 'onednn'])
def test_model_on_each_path_equals_the_definition(size, path, force_path):
    force_path(path)
    model = small_model()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fast = model(x)
        assert len(packs_of(model)) >= (2 * 2 if path == 'onednn' else 0)  # fc1, fc2 of stages 1 and 2 at least
        set_speedups(model, False)
        plain = model(x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert plain.abs().max() > 1e-2


def test_a_pack_is_never_stale():
    layer = linear()
    x = torch.randn(5, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(products.linear_product(layer, x, path='onednn'),
                                       F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-6)

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
        assert products.linear_paths(linear(), x) == ('default', 'onednn')
        for layer in (hooked, Scaled(24, 40), wrapped, quantized):
            assert products.linear_paths(layer, x) == ('default',)
        with torch.inference_mode():
            frozen = linear()  # an inference tensor has no version counter to tell a change
        assert products.linear_paths(frozen, x) == ('default',)
    assert products.linear_paths(linear(), x) == ('default',)  # autograd on
    # a bf16 product: also as an fp32 product of the bf16 values; through oneDNN where it has bf16 products
    bf16_paths = ('default', 'fp32') if gates.bf16_emulated() else ('default', 'onednn') + (
        () if products._bf16_products_outrun_fp32(torch.get_num_threads()) else ('fp32',))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert products.linear_paths(linear(), x) == bf16_paths
    with torch.no_grad():
        assert products.linear_paths(linear().to(torch.bfloat16), x.to(torch.bfloat16)) == bf16_paths
        assert products.linear_paths(linear().to(torch.bfloat16), x) == ('default',)  # dtypes differ
        assert products.linear_paths(linear().double(), x.double()) == ('default',)


@pytest.mark.parametrize('slower', ['onednn', 'default'])
def test_only_the_chosen_path_keeps_its_pack(slower, monkeypatch):
    monkeypatch.setattr(tuning, 'time_paths', lambda paths, run, rounds=3: (
        {p: 2.0 if p == slower else 1.0 for p in paths}, {p: run(p) for p in paths}))
    tuning.clear_tuning()
    layer, conv = linear(), nn.Conv2d(6, 5, 4, 2, padding=1)
    x, image = torch.randn(37, 24), torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(products.linear_product(layer, x), layer(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(products.conv_product(conv, image), conv(image), atol=1e-5, rtol=0)
    kept = [] if slower == 'onednn' else [(torch.float32, 'onednn')]  # every path was packed while timed
    assert [list(products._packed_weights.get(m, {})) for m in (layer, conv)] == [kept, kept]
    tuning.clear_tuning()


def test_a_pack_chosen_at_one_size_survives_timing_at_another(monkeypatch):
    """A server's sizes in turn: where 37 tokens chose the pack and 300 tokens torch's own product,
    timing at 300 keeps the pack 37 tokens use, so it is not packed again at each change of size."""
    def timing(paths, run, rounds=3):  # the pack wins on few tokens, torch's product on many
        outputs = {p: run(p) for p in paths}
        fastest = 'onednn' if len(next(iter(outputs.values()))) < 100 else 'default'
        return {p: 1.0 if p == fastest else 2.0 for p in paths}, outputs

    monkeypatch.setattr(tuning, 'time_paths', timing)
    tuning.clear_tuning()
    layer = linear()
    small, large = torch.randn(37, 24), torch.randn(300, 24)
    packs = []
    with torch.no_grad():
        for x in (small, large, small, large):
            torch.testing.assert_close(products.linear_product(layer, x), layer(x), atol=1e-5, rtol=0)
            packs.append(id(products._packed_weights[layer][torch.float32, 'onednn'].weight))
    assert len(set(packs)) == 1
    tuning.clear_tuning()


def test_a_hooked_mlp_keeps_its_forward_and_is_not_packed():
    block = CrossFormerBlock(32, 2).eval()
    calls = []
    block.mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        block(torch.randn(1, 7, 7, 32))
    assert calls == [1]
    assert packs_of(block.mlp) == []  # the attention's own Linears may be packed


def test_packs_are_bounded_and_released_with_the_model(force_path):
    force_path('onednn')
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
    assert all(len(products._packed_weights[m]) == 1 for m in packed)  # one fp32 pack each
    set_speedups(model, False)  # the switch drops them
    assert packs_of(model) == []
    set_speedups(model, True)
    with torch.no_grad():
        model(x)
    assert len(packs_of(model)) == packed_layers >= 4
    packed_tensors = [weakref.ref(p.weight) for m in packs_of(model) for p in products._packed_weights[m].values()]
    del model, packed
    gc.collect()
    assert all(ref() is None for ref in packed_tensors)  # the packed memory went with the model


@pytest.mark.parametrize('kernel, stride, size', [(32, 4, (37, 50)), (8, 4, (64, 64)), (4, 2, (9, 6)), (2, 2, (5, 7))])
def test_every_convolution_path_equals_the_definition(kernel, stride, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, padding=(kernel - stride) // 2)
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        paths = products.conv_paths(conv, x)
        assert paths == ('default', 'onednn') + (('space_to_depth',) if kernel >= 2 * stride and 6 * stride ** 2 <= 64 else ())
        want = conv(x)
        channels_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as the merges between stages see it
        for path in paths + (None,):
            torch.testing.assert_close(products.conv_product(conv, x, path), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(products.conv_product(conv, channels_last, path), want, atol=1e-5, rtol=0)
        conv.load_state_dict({'weight': -2 * conv.weight, 'bias': conv.bias})  # copied in place
        torch.testing.assert_close(products.conv_product(conv, x, 'onednn'), conv(x), atol=2e-5, rtol=0)
    assert want.abs().max() > 1e-1


def test_cross_embed_layers_pack_their_convolutions_at_inference_only(force_path):
    force_path('onednn')
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
        assert products.conv_paths(hooked, image) == ('default',)
        assert products.conv_paths(nn.Conv2d(3, 4, 3, padding='same'), image) == ('default',)
        assert products.conv_paths(nn.Conv2d(3, 4, 3, padding_mode='reflect'), image) == ('default',)
        assert products.conv_paths(nn.Conv2d(3, 4, 3).double(), image.double()) == ('default',)


@pytest.mark.parametrize('autocast', [False, True], ids=['bf16-layer', 'bf16-autocast'])
def test_emulated_bf16_products_round_as_bf16_products_do(autocast, monkeypatch):
    emulate_bf16(monkeypatch)
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
        assert products.linear_paths(layer, x) == ('default', 'fp32')
        assert products.conv_paths(conv, image)[:2] == ('default', 'fp32')
        product = products.linear_product(layer, x, path='fp32')
        assert product.dtype == layer(x).dtype == torch.bfloat16
        torch.testing.assert_close(product, exact.bfloat16(), atol=0, rtol=2 ** -8)  # one rounding: half an ulp
        gelu = products.linear_product(layer, x, gelu=True, path='fp32')
        torch.testing.assert_close(gelu, F.gelu(exact).bfloat16(), atol=1e-6, rtol=2 ** -8)
        added = products.linear_product(layer, x, residual=residual, path='fp32')
        assert added.dtype == (residual + layer(x)).dtype  # fp32 under autocast, bf16 for a bf16 layer
        torch.testing.assert_close(added, (residual.double() + exact.bfloat16().double()).to(added.dtype),
                                   atol=1e-6, rtol=2 ** -8)
        out = products.conv_product(conv, image, 'fp32')
        assert out.dtype == conv(image).dtype == torch.bfloat16
        torch.testing.assert_close(out, exact_conv.bfloat16(), atol=1e-6, rtol=2 ** -8)
        assert [p.weight.dtype for p in products._packed_weights[layer].values()] == [torch.float32]  # fp32 copies
    if not autocast:
        fp32 = layer.float()  # in place: the bf16 pack is stale, dropped as the fp32 one is made
        with torch.no_grad():
            products.linear_product(fp32, x.float(), path='onednn')
        assert list(products._packed_weights[fp32]) == [(torch.float32, 'onednn')]


@pytest.mark.parametrize('autocast', [False, True], ids=['bf16-model', 'bf16-autocast'])
def test_a_bf16_model_with_emulated_products_stays_as_close_to_fp32(autocast, monkeypatch, force_path):
    emulate_bf16(monkeypatch)
    force_path('fp32')
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        want = model.forward_features(x)
        run, x_run = (model, x) if autocast else (copy.deepcopy(model).bfloat16(), x.bfloat16())
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            fast = run.forward_features(x_run).float()
            assert (torch.bfloat16, 'fp32') in products._packed_weights[run.layers[0].blocks[0].mlp.fc1]
            set_speedups(run, False)
            definition = run.forward_features(x_run).float()
    assert not torch.equal(fast, definition)  # rounded less often
    fast_error, definition_error = (fast - want).abs().mean(), (definition - want).abs().mean()
    assert fast_error < 1.1 * definition_error < 0.02 * want.abs().mean()


def test_a_write_through_data_needs_the_switch_to_drop_packs_and_biases(force_path):
    force_path('onednn')
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

    def work(dtype, path):
        try:
            for i in range(1500):
                if i % 3 == 0:
                    with torch.no_grad():
                        layer.weight.add_(0.)  # a new version: every pack of the layer goes stale
                products.packed_weight(layer, dtype, path)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a busy server
    try:
        threads = [threading.Thread(target=work, args=args) for args in ((torch.float32, 'onednn'), (torch.bfloat16, 'fp32')) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    with torch.no_grad():
        torch.testing.assert_close(products.linear_product(layer, x, path='onednn'), layer(x), atol=1e-5, rtol=0)
