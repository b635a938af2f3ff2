"""Checkpoint compatibility (key manifests of every released variant) and safe loading."""
import builtins
import pickle
import sys
import types

import pytest
import timm
import torch
from safetensors.torch import load_file

from crossformer import CheckpointError, CrossFormer, checkpoint_filter_fn, convert_checkpoint, load_checkpoint, \
    read_checkpoint

from conftest import mini_kwargs

VARIANTS = ['crossformer_t', 'crossformer_s', 'crossformer_b', 'crossformer_l',
            'crossformerpp_s', 'crossformerpp_b', 'crossformerpp_l', 'crossformerpp_h']


def meta_model(name: str, **kwargs) -> CrossFormer:
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize('name', VARIANTS)
def test_every_key_of_the_released_checkpoint_is_consumed(name, manifests):
    manifest = manifests[name]
    state_dict = {k: torch.empty(shape, dtype=getattr(torch, dtype), device='meta') for k, shape, dtype in manifest['keys']}
    assert len(state_dict) == manifest['measured']['state_dict_keys']
    model = meta_model(name)
    mapped = checkpoint_filter_fn(state_dict, model)
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert len(mapped) == manifest['measured']['keys_without_buffers']


@pytest.mark.parametrize('name', VARIANTS)
def test_dense_backbone_checkpoint_loads(name, manifests):
    """Detection checkpoints: classifier keys minus norm/head, under a ``backbone.`` prefix."""
    keys = [(k, s) for k, s, _ in manifests[name]['keys'] if not k.startswith(('norm.', 'head.'))]
    state_dict = {f'backbone.{k}': torch.empty(s, device='meta') for k, s in keys}
    mapped = checkpoint_filter_fn(state_dict, None)
    expected = meta_model(name, num_classes=0).state_dict()
    assert set(mapped) | {'norm.weight', 'norm.bias'} == set(expected)


@pytest.mark.parametrize('name', VARIANTS)
def test_parameter_counts_match_reference(name, manifests):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == manifests[name]['measured']['params']


@pytest.fixture
def mini(cases, reference):
    case = cases['v1_mini']
    return CrossFormer(**mini_kwargs(case['reference_classifier_kwargs'])), reference / case['weights']


class CfgNode(dict):
    """Pickles like yacs' CfgNode (a dict subclass with attributes)."""


def _save_with_fake_class(obj, path, cls, module):
    """torch.save ``obj`` while ``cls`` is importable as ``module.<name>``, then make it unimportable again."""
    cls.__module__ = module
    with pytest.MonkeyPatch.context() as mp:
        for i, part in enumerate(module.split('.')):
            mp.setitem(sys.modules, '.'.join(module.split('.')[:i + 1]), types.ModuleType(part))
        mp.setattr(sys.modules[module], cls.__name__, cls, raising=False)
        torch.save(obj, path)


def test_reference_training_file_with_pickled_config_loads(mini, tmp_path):
    model, weights = mini
    state_dict = load_file(weights)
    config = CfgNode(MODEL=CfgNode(TYPE='cross-scale', NAME='crossformer_mini'), TRAIN=CfgNode(EPOCHS=300))
    config.__dict__['__immutable__'] = True
    path = tmp_path / 'ckpt_epoch_299.pth'
    _save_with_fake_class({'model': state_dict, 'optimizer': {'state': {}}, 'lr_scheduler': {}, 'max_accuracy': 81.5,
                           'epoch': 299, 'config': config}, path, CfgNode, 'yacs.config')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what plain safe loading says
    loaded = read_checkpoint(path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    load_checkpoint(model, path)
    assert torch.equal(model.head.fc.weight, state_dict['head.weight'])


class Payload:
    marker = None

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_file_with_malicious_pickle_runs_nothing_and_is_refused(mini, tmp_path):
    model, weights = mini
    Payload.marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': load_file(weights), 'config': Payload()}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match='refused pickle global .*exec'):
        load_checkpoint(model, path)
    assert not Payload.marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_file_fails_clearly(mini, tmp_path):
    model, weights = mini
    path = tmp_path / 'truncated.pth'
    torch.save({'model': load_file(weights)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_checkpoint(model, path)


def test_checkpoint_of_another_variant_names_keys_and_leaves_model_unchanged(mini, cases, reference):
    model, _ = mini
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, reference / cases['pp_mini']['weights'])
    message = str(err.value)
    assert 'unexpected keys: layers.0.blocks.2.' in message  # pp_mini has 7 blocks in stage 1
    assert '(220 in all)' in message and 'missing keys' not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_keys_are_named(mini):
    model, weights = mini
    state_dict = load_file(weights)
    del state_dict['layers.1.blocks.0.attn.qkv.weight']
    with pytest.raises(CheckpointError, match=r'missing keys: layers\.1\.blocks\.0\.attn\.qkv\.weight'):
        load_checkpoint(model, state_dict)


def test_other_num_classes_drops_the_head(cases, reference):
    model = CrossFormer(**dict(mini_kwargs(cases['v1_mini']['reference_classifier_kwargs']), num_classes=3))
    head = model.head.fc.weight.clone()
    load_checkpoint(model, reference / cases['v1_mini']['weights'])
    assert torch.equal(model.head.fc.weight, head)
    assert torch.equal(model.patch_embed.norm.weight, load_file(reference / cases['v1_mini']['weights'])['patch_embed.norm.weight'])


def test_convert_to_safetensors_round_trip(mini, tmp_path):
    model, weights = mini
    dst = tmp_path / 'mini.safetensors'
    converted = convert_checkpoint(weights, dst)
    assert 'layers.1.downsample.projs.0.weight' in converted
    assert not any(k.endswith('relative_position_index') for k in converted)
    load_checkpoint(model, dst)
    x = torch.randn(1, 3, 64, 64)
    other = CrossFormer(embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), num_classes=10)
    load_checkpoint(other, weights)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), other.eval()(x), atol=0, rtol=0)


def test_pretrained_without_file_says_where_weights_are():
    with pytest.raises(ValueError, match=r'github\.com/cheerss/CrossFormer.*pretrained_cfg_overlay=dict\(file='):
        timm.create_model('crossformer_s', pretrained=True)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match='no checkpoint file'):
        read_checkpoint('does/not/exist.pth')
