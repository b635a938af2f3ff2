"""timm interface contract of every registered variant, and behaviour on any input size."""
import pytest
import timm
import torch

from crossformer import CrossFormer, InputError
from crossformer.compat import from_vit_pytorch_kwargs

VARIANTS = timm.list_models('crossformer*')
SMALL = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), group_size=(4, 4, 4, 4), interval=(4, 2, 1, 1),
             use_acl=True, num_classes=5)


def test_all_variants_registered():
    assert VARIANTS == ['crossformer_b', 'crossformer_l', 'crossformer_s', 'crossformer_t',
                        'crossformerpp_b', 'crossformerpp_h', 'crossformerpp_l', 'crossformerpp_s']
    assert timm.list_models(module='crossformer') == VARIANTS


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_contract(name):
    """Forward at 224 matches the default cfg; backward at 64 px reaches every parameter."""
    model = timm.create_model(name, drop_path_rate=0.)  # stochastic depth could skip a block's gradient
    cfg = model.pretrained_cfg
    assert cfg['license'] == 'mit' and cfg['paper_ids'].startswith('arXiv:')
    for conv in cfg['first_conv']:
        assert f'{conv}.weight' in model.state_dict()
    assert f"{cfg['classifier']}.weight" in model.state_dict()
    model.eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert features.shape == (1, model.num_features, *cfg['pool_size'])
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    assert model.forward_head(features).shape == (1, cfg['num_classes'])

    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.fixture
def small():
    return CrossFormer(**SMALL).eval()


def test_create_model_kwargs():
    model = timm.create_model('crossformer_t', num_classes=7, drop_path_rate=0.3, global_pool='max')
    assert model.get_classifier().out_features == 7
    last = model.layers[-1].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(0.3)
    assert model.layers[0].blocks[0].drop_path1.__class__.__name__ == 'Identity'
    assert model.head.global_pool.pool_type == 'max'
    with pytest.raises(TypeError):
        timm.create_model('crossformer_t', embed_dimm=32)  # a typo must raise


def test_reset_classifier_and_pooling(small):
    x = torch.randn(2, 3, 64, 96)
    small.reset_classifier(0)
    assert small(x).shape == (2, 128)
    small.reset_classifier(0, '')
    assert small(x).shape == (2, 128, 2, 3)
    small.reset_classifier(11, 'avg')
    assert small(x).shape == (2, 11)
    model = timm.create_model('crossformer_t', num_classes=0, global_pool='')
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_pre_logits_is_the_pooled_normed_map(small):
    x = torch.randn(2, 3, 64, 64)
    features = small.forward_features(x)
    torch.testing.assert_close(small.forward_head(features, pre_logits=True), features.mean((2, 3)))
    torch.testing.assert_close(small(x), small.head.fc(features.mean((2, 3))))


@pytest.mark.parametrize('size', [(1, 1), (4, 4), (31, 45), (100, 164), (40, 72), (224, 160)])
def test_any_input_size(small, size):
    H, W = size
    with torch.no_grad():
        maps = small.forward_intermediates(torch.randn(2, 3, H, W), intermediates_only=True)
        logits = small(torch.randn(2, 3, H, W))
    expected, h, w = [], -(-H // 4), -(-W // 4)
    for _ in range(4):
        expected.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    assert [tuple(m.shape[-2:]) for m in maps] == expected
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_forward_changes_no_state_and_is_batch_independent(small):
    x = torch.randn(3, 3, 96, 128)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with torch.no_grad():
        batched = small(x)
        small(torch.randn(1, 3, 20, 36))  # small map in between
        alone = small(x[1:2])
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    torch.testing.assert_close(alone, batched[1:2], atol=1e-5, rtol=1e-5)


def test_forward_intermediates_and_features_only(small):
    x = torch.randn(1, 3, 96, 64)
    final, maps = small.forward_intermediates(x)
    torch.testing.assert_close(final, small.forward_features(x))
    assert [tuple(m.shape) for m in small.forward_intermediates(x, indices=2, intermediates_only=True)] == \
        [tuple(maps[2].shape), tuple(maps[3].shape)]
    nhwc = small.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
    torch.testing.assert_close(nhwc[1], maps[1].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC'"):
        small.forward_intermediates(x, output_fmt='NCL')

    features = timm.create_model('crossformer_t', features_only=True, out_indices=(1, 2, 3))
    assert features.feature_info.channels() == [128, 256, 512]
    assert features.feature_info.reduction() == [8, 16, 32]
    outs = features(torch.randn(1, 3, 100, 164))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 13, 21), (1, 256, 7, 11), (1, 512, 4, 6)]


def test_prune_intermediate_layers(small):
    x = torch.randn(1, 3, 64, 64)
    maps = small.forward_intermediates(x, intermediates_only=True)
    assert small.prune_intermediate_layers(indices=(0, 1)) == [0, 1]
    assert len(small.layers) == 2
    pruned = small.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for a, b in zip(pruned, maps[:2]):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = CrossFormer(**dict(SMALL, drop_path_rate=0.)).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_group_matcher_covers_every_parameter(small):
    from timm.models import group_parameters
    groups = group_parameters(small, small.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(small.parameters()))


def test_constructor_errors():
    with pytest.raises(ValueError, match='num_heads has 3 entries but depths has 4 stages'):
        CrossFormer(depths=(1, 1, 1, 1), num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match='group_size and interval must be >= 1'):
        CrossFormer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), group_size=0)


def test_vit_pytorch_documented_example():
    """vit-pytorch's README configuration, mapped, classifies a 224 x 224 image."""
    kwargs = from_vit_pytorch_kwargs(
        num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
        local_window_size=7)
    assert kwargs['depths'] == (4, 4, 16, 4) and kwargs['num_heads'] == (2, 4, 8, 16)
    assert kwargs['interval'] == (8, 4, 2, 1) and kwargs['group_size'] == (7, 7, 7, 7)
    model = CrossFormer(**kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match='one kernel set and stride 2'):
        from_vit_pytorch_kwargs(cross_embed_strides=(4, 2, 3, 2))


def test_torchscript_matches_eager(small):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(small)
    for size in [(64, 96), (40, 72)]:  # a padded size and a small-map size
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), small(x), atol=1e-5, rtol=1e-5)


def test_fx_feature_extractor_any_size(small):
    """torchvision's FX feature extraction traces once and serves other sizes (shape logic is wrapped)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    extractor = create_feature_extractor(small, {'layers.1': 'c3', 'head': 'logits'})
    for size in [(64, 96), (40, 72)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = extractor(x)
            maps = small.forward_intermediates(x, intermediates_only=True)
            torch.testing.assert_close(out['c3'].permute(0, 3, 1, 2), maps[1])  # stage outputs are NHWC
            torch.testing.assert_close(out['logits'], small(x))


def test_bad_inputs_raise_clear_errors(small):
    with pytest.raises(ValueError, match=r'shape \(B, 3, H, W\), got shape \[2, 1, 32, 32\]'):
        small(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r'got shape \[3, 32, 32\]'):
        small(torch.randn(3, 32, 32))
    with pytest.raises(InputError, match='floating-point image batch, got torch.uint8'):
        small.forward_intermediates(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match='got torch.bool'):
        small(torch.zeros(1, 3, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'at least 1 x 1 pixels .* got 0 x 10'):
        small(torch.randn(1, 3, 0, 10))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'explicit'])
def test_half_precision_is_finite_at_padded_sizes(dtype, fused):
    """68 px: stage 1 is 17 x 17, so LDA (G=4, I=4) pads to 32 and some groups hold only padding."""
    from conftest import set_fused
    model = CrossFormer(**dict(SMALL, drop_path_rate=0.))
    set_fused(model, fused)
    x = torch.randn(2, 3, 68, 68)
    with torch.autocast('cpu', dtype=dtype):
        y = model(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        reference = model.eval()(x)
        cast = model.to(dtype)(x.to(dtype))
    assert cast.dtype == dtype and torch.isfinite(cast).all()
    torch.testing.assert_close(cast.float(), reference, atol=0.05, rtol=0.05)
