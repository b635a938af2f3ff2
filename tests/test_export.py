"""ONNX export of small models, run in onnxruntime and compared with eager PyTorch.

The TorchScript-based exporter (``dynamo=False``, opset 17) traces the model. Under tracing,
``group_layout`` computes with the traced sizes (the whole-map branch, short side <= G, becomes
a ``torch.where``) and the padding mask is always built, so a graph exported at one size is
valid at every size and batch: maps that divide evenly, padded maps and whole-map groups. The
dynamo exporter (torch.export) is tested in tests/test_torch_export.py.
"""
import warnings

import numpy as np
import pytest
import torch

from crossformer import CrossFormer

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

OPSET = 17
SMALL_V1 = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), group_size=7, interval=(8, 4, 2, 1),
                num_classes=5, drop_path_rate=0.)
SMALL_PP = dict(SMALL_V1, group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), use_acl=True)
# (batch, height, width): whole-map groups in every stage (1 x 1, 40 x 72), padded maps (72 x 100),
# the export size, even division (224), every stage grouped (257 x 230), a thin image (100 x 20)
SIZES = [(1, 1, 1), (3, 40, 72), (2, 72, 100), (1, 96, 128), (2, 224, 224), (1, 257, 230), (2, 100, 20)]


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CrossFormer(**SMALL_V1).eval()


def _export_torchscript(model, path, size, dynamic_size):
    axes = {0: 'batch', 2: 'height', 3: 'width'} if dynamic_size else {0: 'batch'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarnings about the shape logic, deprecation notices
        torch.onnx.export(
            model, (torch.randn(2, 3, *size),), str(path), dynamo=False, opset_version=OPSET,
            input_names=['image'], output_names=['logits'],
            dynamic_axes={'image': axes, 'logits': {0: 'batch'}})
    onnx.checker.check_model(onnx.load(str(path)))
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def _compare(session, model, batch, height, width):
    x = torch.randn(batch, 3, height, width)
    (out,) = session.run(None, {'image': x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert out.shape == expected.shape == (batch, 5)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_onnx_dynamic_batch_matches_eager(model, tmp_path):
    session = _export_torchscript(model, tmp_path / 'model.onnx', (224, 224), dynamic_size=False)
    graph_input = session.get_inputs()[0]
    assert graph_input.shape[0] == 'batch' and graph_input.shape[1:] == [3, 224, 224]
    for batch in (1, 3):
        _compare(session, model, batch, 224, 224)


@pytest.mark.parametrize('config', [SMALL_V1, SMALL_PP], ids=['v1', 'pp'])
def test_onnx_dynamic_image_size_matches_eager(config, tmp_path):
    torch.manual_seed(0)
    model = CrossFormer(**config).eval()
    session = _export_torchscript(model, tmp_path / 'model.onnx', (96, 128), dynamic_size=True)
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    for batch, height, width in SIZES:
        _compare(session, model, batch, height, width)


def test_traced_model_follows_input_size(model):
    """``torch.jit.trace`` at one size gives a graph that matches eager at others (same mechanism)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarning from the input check (constant channel count)
        traced = torch.jit.trace(model, torch.randn(2, 3, 96, 128), check_trace=False)
    for batch, height, width in SIZES[:3]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
