"""Determinism in eval mode: bit-identical outputs across calls, across calls at other sizes in
between (the mask and position-bias caches must not leak state) and across save/load round trips
(``torch.save`` / ``torch.load(weights_only=True)``, ``.safetensors``)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from crossformer import CrossFormer, convert_checkpoint, load_checkpoint

from conftest import mini_kwargs, set_fused

FAMILIES = ['v1_mini', 'pp_mini']  # pp_mini: progressive group sizes 4/4/14/7, cooling layers
SIZE = (72, 100)  # padded in every stage: the cached masks are used
OTHER_SIZES = [(40, 56), (224, 224)]


def _build(case: dict, seed: int) -> CrossFormer:
    torch.manual_seed(seed)
    return CrossFormer(**mini_kwargs(case['reference_classifier_kwargs'])).eval()


def _outputs(model: CrossFormer, x: torch.Tensor) -> list:
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        return [model.forward_head(final), final, *maps]


def _assert_bit_identical(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and torch.equal(a, b), f'max abs diff {(a - b).abs().max().item()}'


@pytest.fixture
def images():
    return torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize('fused', [False, True], ids=['explicit', 'fused'])
@pytest.mark.parametrize('name', FAMILIES)
def test_repeated_calls_are_bit_identical(name, fused, cases, images):
    model = _build(cases[name], seed=0)
    set_fused(model, fused)
    first = _outputs(model, images)
    _assert_bit_identical(_outputs(model, images), first)
    for size in OTHER_SIZES:  # fill the caches with other shapes in between
        _outputs(model, torch.randn(1, 3, *size))
    _assert_bit_identical(_outputs(model, images), first)
    fresh = _build(cases[name], seed=0)  # cold caches
    set_fused(fresh, fused)
    _assert_bit_identical(_outputs(fresh, images), first)
    assert torch.isfinite(first[0]).all() and first[0].abs().sum() > 0


@pytest.mark.parametrize('name', FAMILIES)
def test_state_dict_round_trip_is_bit_identical(name, cases, images, tmp_path):
    model = _build(cases[name], seed=0)
    expected = _outputs(model, images)
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    other = _build(cases[name], seed=1)
    before = _outputs(other, images)  # warm its caches with its own weights
    assert not torch.equal(before[0], expected[0])
    other.load_state_dict(torch.load(tmp_path / 'weights.pth', weights_only=True))
    _assert_bit_identical(_outputs(other, images), expected)


@pytest.mark.parametrize('name', FAMILIES)
def test_safetensors_round_trip_is_bit_identical(name, cases, images, tmp_path):
    model = _build(cases[name], seed=0)
    expected = _outputs(model, images)
    torch.save({'model': model.state_dict()}, tmp_path / 'weights.pth')  # as the training script writes it
    convert_checkpoint(tmp_path / 'weights.pth', tmp_path / 'converted.safetensors')
    save_file(model.state_dict(), str(tmp_path / 'direct.safetensors'))
    for path in ('converted.safetensors', 'direct.safetensors'):
        other = _build(cases[name], seed=1)
        _outputs(other, images)  # warm caches
        load_checkpoint(other, tmp_path / path)
        _assert_bit_identical(_outputs(other, images), expected)
    other = _build(cases[name], seed=1)
    other.load_state_dict(load_file(str(tmp_path / 'direct.safetensors')))
    _assert_bit_identical(_outputs(other, images), expected)
