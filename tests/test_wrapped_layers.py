"""Speed-ups respect modules that wrap, replace or hook the model's layers.

A speed-up that reads ``layer.weight`` and does the maths itself silently drops whatever a
wrapper adds (a PEFT LoRA adapter), breaks on a stand-in whose ``weight`` is not a tensor
(a dynamically quantized Linear) and skips the layer's hooks. These tests use the public API
only (``timm.create_model``, model methods, and ``crossformer.set_speedups`` where it exists)
on a small model, at a padded size and at one large enough that stage 1 (2 x 56 x 56 = 6272
tokens) goes past the CPU inference chunk sizes.
"""
import contextlib
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import crossformer

SMALL = (2, 3, 64, 80)    # stage 1: 16 x 20 tokens per image, padded to the 7 x 7 group grid
LARGE = (2, 3, 224, 224)  # stage 1: 2 x 56 x 56 = 6272 tokens: the CPU inference paths work in chunks
SIZES = pytest.mark.parametrize('shape', [SMALL, LARGE], ids=['64x80', '224'])
# 'plain' runs the same check with every speed-up off: the control that shows the test itself is right.
SPEEDUPS = pytest.mark.parametrize('speedups', [True, False], ids=['speedups', 'plain'])
LORA_TARGETS = pytest.mark.parametrize('targets', [('qkv', 'proj', 'fc1', 'fc2'), ('fc2',)], ids=['all', 'fc2'])
NUM_BLOCKS = 5


def set_speedups(model: nn.Module, enabled: bool) -> nn.Module:
    """``crossformer.set_speedups`` where the library has it; without it speed-ups are on by default."""
    switch = getattr(crossformer, 'set_speedups', None)
    if switch is not None:
        switch(model, enabled)
    elif not enabled:
        pytest.skip('crossformer.set_speedups is not available: speed-ups cannot be turned off')
    return model


def make_model(speedups: bool = True) -> nn.Module:
    """A small crossformer_t in eval mode: 5 blocks, widths 32-256, 10 classes, no stochastic depth.

    The default init (std .02) leaves every block's residual branch small next to the stem, so
    the logits would hardly depend on the Linear layers under test. Each Linear is re-drawn at
    the scale of PyTorch's own init: zeroing the blocks' output layers then changes the logits
    completely (``test_logits_depend_on_the_linear_layers``).
    """
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                              num_classes=10, drop_path_rate=0.)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                nn.init.normal_(m.bias, std=0.02)
    return set_speedups(model, speedups).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image cosine similarity of two batches."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_logits_depend_on_the_linear_layers():
    """Guard for the cosine checks below: with the blocks' output Linears zeroed the logits are far off."""
    model = make_model()
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ablated.named_modules():
            if name.endswith(('attn.proj', 'mlp.fc2')):
                m.weight.zero_()
                m.bias.zero_()
        x = torch.randn(SMALL)
        assert cosine(model(x), ablated(x)).max() < 0.9


# ---- PEFT LoRA ---------------------------------------------------------------------------------

@pytest.fixture
def peft():
    return pytest.importorskip('peft')


def lora_model(peft, targets, speedups: bool = True) -> nn.Module:
    """The small model with rank-4 LoRA adapters on ``targets``, every adapter non-zero."""
    config = peft.LoraConfig(target_modules=list(targets), r=4, init_lora_weights=False)
    model = peft.get_peft_model(make_model(speedups), config)
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == NUM_BLOCKS * len(targets)  # 'proj' matches attn.proj only, not pos_proj or projs.*
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """The adapters merged into the weights: a plain CrossFormer, with speed-ups off where that can be said."""
    merged = copy.deepcopy(model).merge_and_unload()
    assert isinstance(merged, crossformer.CrossFormer)
    switch = getattr(crossformer, 'set_speedups', None)
    return switch(merged, False) if switch is not None else merged


@LORA_TARGETS
@SIZES
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
@SPEEDUPS
def test_lora_eval_matches_merged(peft, targets, shape, grad, speedups):
    model = lora_model(peft, targets, speedups)
    merged = merged_copy(model)
    x = torch.randn(shape)
    with contextlib.nullcontext() if grad else torch.no_grad():
        out = model(x)
        expected = merged(x)
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
    assert (base - expected).abs().max() > 1e-2, 'the adapters do not change the logits: the test proves nothing'
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f'LoRA model != merged model (adapters dropped?)\n{m}')


@LORA_TARGETS
@SIZES
@SPEEDUPS
def test_lora_training_step_reaches_every_adapter(peft, targets, shape, speedups):
    model = lora_model(peft, targets, speedups).train()
    x = torch.randn(shape)
    labels = torch.arange(shape[0]) % 10
    F.cross_entropy(model(x), labels).backward()  # raises if no adapter is part of the graph
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all('lora_' in n for n in adapters)
    assert len(adapters) == 2 * NUM_BLOCKS * len(targets)
    no_grad = [n for n, p in adapters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'{len(no_grad)} of {len(adapters)} LoRA parameters got no gradient: {no_grad}'
    if speedups and getattr(crossformer, 'set_speedups', None) is not None:
        # the gradients the definition gives, with every speed-up off
        reference = copy.deepcopy(model)
        reference.zero_grad()
        crossformer.set_speedups(reference, False)
        F.cross_entropy(reference(x), labels).backward()
        for n, p in reference.named_parameters():
            if p.requires_grad:
                # reduction order differs between the paths: tolerance relative to the gradient's scale
                atol = 1e-4 * p.grad.abs().max().item()
                torch.testing.assert_close(adapters[n].grad, p.grad, rtol=1e-4, atol=atol, msg=lambda m: f'{n}: {m}')


# ---- dynamic int8 quantization -------------------------------------------------------------------

@SIZES
@SPEEDUPS
@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore::UserWarning')
def test_dynamic_int8_quantization(shape, speedups):
    quantization = pytest.importorskip('torch.ao.quantization')
    model = make_model(speedups)
    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantized = quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # a copy
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == num_linear
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        out = quantized(x)  # must not raise
    assert out.shape == expected.shape and out.dtype == torch.float32
    similarity = cosine(out, expected)
    assert similarity.min() >= 0.99, f'int8 logits too far from fp32: cosine {similarity.tolist()}'


# ---- forward hooks -------------------------------------------------------------------------------

def hooked_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@SIZES
@SPEEDUPS
def test_forward_hooks_fire_on_every_layer(shape, speedups):
    model = make_model(speedups)
    layers = hooked_layers(model)
    calls = dict.fromkeys(layers, 0)
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, output, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        model(torch.randn(shape))
    silent = [n for n, count in calls.items() if not count]
    assert not silent, f'{len(silent)} of {len(layers)} hooked layers never ran their forward: {silent}'


@SPEEDUPS
def test_forward_hook_outputs_are_used(speedups):
    """A hook that returns a new output replaces the layer's output: halving every Linear and Conv2d
    output through hooks equals halving their weights and biases."""
    model = make_model(speedups)
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for layer in hooked_layers(halved).values():
            layer.weight.mul_(0.5)
            layer.bias.mul_(0.5)
    for layer in hooked_layers(model).values():
        layer.register_forward_hook(lambda module, args, output: output * 0.5)
    x = torch.randn(LARGE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), halved(x), rtol=1e-5, atol=1e-5)
