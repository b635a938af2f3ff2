"""Numerical parity with the reference implementation (tests/reference): with every speed-up, with
every layer's definition, and with autograd on (the path training and GPUs take)."""
import pytest
import timm
import torch
from safetensors.torch import load_file

from crossformer import CrossFormer, load_checkpoint, set_speedups

from conftest import mini_kwargs

RUNS = [(case, run) for case, runs in {
    'v1_mini': ['cls_224x224', 'cls_288x288', 'dense_256x352', 'dense_224x160', 'dense_96x288', 'dense_64x960',
                'dense_32x640'],
    'pp_mini': ['cls_224x224', 'cls_288x288', 'dense_256x352', 'dense_224x160', 'dense_96x288', 'dense_64x960',
                'dense_32x640'],
}.items() for run in runs]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def models(cases, reference):
    out = {}
    for name, case in cases.items():
        model = CrossFormer(**mini_kwargs(case['reference_classifier_kwargs'])).eval()
        load_checkpoint(model, reference / case['weights'])
        out[name] = model
    return out


@pytest.fixture(scope='module')
def inputs(reference):
    return load_file(reference / 'inputs.safetensors')


@pytest.mark.parametrize('path', ['speedups', 'definition', 'autograd'])
@pytest.mark.parametrize('case,run', RUNS)
def test_matches_reference(case, run, path, models, cases, inputs, reference):
    spec = next(r for r in cases[case]['runs'] if r['run'] == run)
    expected = load_file(reference / cases[case]['expected'])
    model = set_speedups(models[case], path != 'definition')
    x = inputs[spec['input']]
    with torch.set_grad_enabled(path == 'autograd'):
        if spec['kind'] == 'cls':
            torch.testing.assert_close(model(x), expected[f'{run}.logits'], **TOL)
            return
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [tuple(s) for s in spec['feature_shapes']]
        for i, feat in enumerate(feats):
            torch.testing.assert_close(feat, expected[f'{run}.feat{i}'], **TOL)
        torch.testing.assert_close(model.forward_head(final), expected[f'{run}.logits'], **TOL)


def test_timm_pretrained_file_as_reference_training_script_writes_it(cases, reference, inputs, tmp_path):
    """``pretrained=True`` + ``file=``: a .pth with the training script's wrapper gives the reference logits."""
    for name, case in cases.items():
        path = tmp_path / f'{name}.pth'
        torch.save({'model': load_file(reference / case['weights']), 'optimizer': {}, 'lr_scheduler': {},
                    'max_accuracy': 0.0, 'epoch': 299}, path)
        kwargs = mini_kwargs(case['reference_classifier_kwargs'])
        variant = 'crossformerpp_s' if case['family'] == 'pp' else 'crossformer_s'
        model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        expected = load_file(reference / case['expected'])['cls_224x224.logits']
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(inputs['224x224']), expected, **TOL)
