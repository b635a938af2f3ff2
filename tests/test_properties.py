"""Property-based checks over image sizes and batch sizes, for a v1-like and a ++-like model.

Hypothesis draws heights and widths from 1 to 300 and batches of 1 to 3 images. With
``derandomize=True`` the examples are the same on every run.
"""
import pytest
import torch

from crossformer import CrossFormer

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import given, settings, strategies as st  # noqa: E402

COMMON = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), num_classes=5, drop_path_rate=0.)
CONFIGS = {
    'v1': dict(COMMON, group_size=7, interval=(8, 4, 2, 1)),
    'pp': dict(COMMON, group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True),
}


def _build(name: str) -> CrossFormer:
    torch.manual_seed(1234)
    return CrossFormer(**CONFIGS[name]).eval()


MODELS = {name: _build(name) for name in CONFIGS}  # built once for the module (eval mode, read-only use)

sizes = st.integers(min_value=1, max_value=300)
families = st.sampled_from(sorted(CONFIGS))
batches = st.integers(min_value=1, max_value=3)
seeds = st.integers(min_value=0, max_value=2 ** 31 - 1)


def _images(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _expected_maps(height: int, width: int) -> list:
    return [(-(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2))) for i in range(4)]


@settings(max_examples=16, deadline=None, derandomize=True)
@given(family=families, batch=batches, height=sizes, width=sizes, seed=seeds)
def test_stage_shapes_and_finite_outputs(family, batch, height, width, seed):
    model = MODELS[family]
    x = _images(seed, batch, height, width)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        logits = model.forward_head(final)
    assert [tuple(m.shape[-2:]) for m in maps] == _expected_maps(height, width)
    assert [tuple(m.shape[:2]) for m in maps] == [(batch, c) for c in (16, 32, 64, 128)]
    assert tuple(final.shape) == (batch, 128, *_expected_maps(height, width)[-1])
    assert logits.shape == (batch, 5)
    for t in (logits, final, *maps):
        assert torch.isfinite(t).all()


@settings(max_examples=8, deadline=None, derandomize=True)
@given(family=families, batch=st.integers(min_value=2, max_value=3), height=sizes, width=sizes, seed=seeds,
       data=st.data())
def test_output_independent_of_batch(family, batch, height, width, seed, data):
    """An image's logits and stage maps are the same alone, in a batch, and beside other images."""
    model = MODELS[family]
    index = data.draw(st.integers(min_value=0, max_value=batch - 1), label='index')
    x = _images(seed, batch, height, width)
    others = _images(seed + 1, batch, height, width)
    others[index] = x[index]  # same image at the same position, different neighbours
    with torch.no_grad():
        in_batch = model.forward_intermediates(x)
        alone = model.forward_intermediates(x[index:index + 1])
        beside_others = model.forward_intermediates(others)
        logits_batch = model.forward_head(in_batch[0])
        logits_alone = model.forward_head(alone[0])
        logits_others = model.forward_head(beside_others[0])
    torch.testing.assert_close(logits_alone, logits_batch[index:index + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_others[index], logits_batch[index], atol=1e-4, rtol=1e-4)
    for a, b, c in zip(alone[1], in_batch[1], beside_others[1]):
        torch.testing.assert_close(a, b[index:index + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c[index], b[index], atol=1e-4, rtol=1e-4)
    # the neighbours really differ (so the check above is not vacuous)
    other = (index + 1) % batch
    assert not torch.allclose(beside_others[1][0][other], in_batch[1][0][other], atol=1e-4)
