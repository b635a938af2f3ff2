"""``torch.export`` with dynamic batch, height and width, and the paths built on it.

A block chooses its layout with ``torch.cond`` when the sizes leave it open (one whole-map group when
the short side is at most G, else padded G x G groups), so one program serves every size: it is
compared with eager at a 1x1 image, strips, odd sizes and the export size. The dynamo ONNX
exporter runs in onnxruntime; AOTInductor compiles the same program. A two-stage model keeps the
export (about ten seconds on 2 cores) and the C++ compile short.
"""
import shutil

import numpy as np
import pytest
import torch
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from crossformer import CrossFormer
from crossformer.layers.speedups import gates

# stage 1: SDA and LDA (I=2) in 4 x 4 groups; stage 2: 3 x 3 groups
TINY = dict(embed_dim=16, depths=(2, 1), num_heads=(1, 2), group_size=(4, 3), interval=(2, 1), num_classes=5,
            drop_path_rate=0.)
SAMPLE = (2, 3, 40, 56)  # both stages in padded groups at the export size
DYNAMIC = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)
# (batch, height, width): whole-map groups everywhere (1 x 1, 2 x 3), the export size, a strip whose
# stage 1 is one 2 x 50 group, a padded odd size, a wide strip, a size that divides evenly
SIZES = [(1, 1, 1), (1, 2, 3), (2, 40, 56), (2, 8, 200), (1, 97, 131), (1, 64, 960), (3, 48, 48)]


def size_oblivious():
    """Sizes of 1 taken like any other (as the ONNX exporter does), so the program also runs at 1 pixel."""
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CrossFormer(**TINY).eval()


@pytest.fixture(scope='module')
def program(model):
    with size_oblivious():
        return torch.export.export(model, (torch.randn(*SAMPLE),), dynamic_shapes=DYNAMIC)


def _images(batch, height, width):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))


@pytest.mark.parametrize('size', SIZES, ids=lambda s: 'x'.join(map(str, s)))
def test_exported_program_matches_eager_at_any_size(model, program, size):
    x = _images(*size)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_exported_program_has_no_size_guards(program):
    """Every size from 1 up is in range: nothing was specialised to the export size."""
    ranges = [r for s, r in program.range_constraints.items() if str(s).startswith('s')]
    assert len(ranges) == 3
    assert all(r.lower <= 1 and r.upper == int_oo for r in ranges), ranges
    conds = [n for n in program.graph_module.graph.find_nodes(op='call_function', target=torch.ops.higher_order.cond)]
    assert len(conds) == 3  # one per block


def test_sizes_bounded_below_export_without_cond(model):
    """From 25 pixels up every map of TINY is in padded groups (7x7 then 4x4 at 25x25): the export
    knows it from the range and traces the grid layout alone, exact at other sizes in range."""
    low = model.grouped_min_size()
    assert low == 25
    dims = ({0: Dim('batch'), 2: Dim('height', min=low), 3: Dim('width', min=low)},)
    with size_oblivious():
        program = torch.export.export(model, (torch.randn(*SAMPLE),), dynamic_shapes=dims)
    assert not program.graph_module.graph.find_nodes(op='call_function', target=torch.ops.higher_order.cond)
    for size in [(1, 25, 25), (1, 97, 131), (3, 48, 48)]:
        x = _images(*size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_strict_export_keeps_the_cond(model):
    """Under strict export dynamo traces the blocks, and ``torch.cond`` with them: still one cond
    per block, exact at a whole-map size and a padded one."""
    with size_oblivious():
        program = torch.export.export(model, (torch.randn(*SAMPLE),), dynamic_shapes=DYNAMIC, strict=True)
    assert len(program.graph_module.graph.find_nodes(op='call_function', target=torch.ops.higher_order.cond)) == 3
    for size in [(1, 2, 3), (1, 97, 131)]:
        x = _images(*size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


class _MlpResidual(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.mlp_residual(x)


@pytest.mark.parametrize('strict', [False, True], ids=['non-strict', 'strict'])
def test_speedups_step_aside_under_export(model, strict, monkeypatch):
    """Every speed-up asks ``capturing()`` first; under export it must answer True, or the program
    would hold eager-only paths (packed weights, chunks) traced at the sample size. Checked on the
    stem and a block's MLP (the attention's run inside the branches of ``torch.cond``)."""
    seen = []
    original = gates._capturing_in_python
    monkeypatch.setattr(gates, '_capturing_in_python', lambda: seen.append(original()) or seen[-1])
    dims = {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}
    with size_oblivious(), torch.no_grad():  # inference, where most speed-ups would apply
        programs = [
            torch.export.export(model.patch_embed, (torch.randn(1, 3, 40, 56),),
                                dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},), strict=strict),
            torch.export.export(_MlpResidual(model.layers[0].blocks[0]), (torch.randn(1, 40, 56, 16),),
                                dynamic_shapes=(dims,), strict=strict)]
    for program in programs:  # no packed oneDNN products: the definitions were traced
        targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
        assert 'aten.conv2d.default' in targets or 'aten.linear.default' in targets
        assert not [t for t in targets if 'mkldnn' in t]
    if not strict:  # strict export drops the spy's side effects
        assert len(seen) >= 2 and all(seen)


def test_onnx_dynamo_export_runs_in_onnxruntime_at_any_size(model, tmp_path):
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    path = tmp_path / 'model.onnx'
    torch.onnx.export(model, (torch.randn(*SAMPLE),), str(path), dynamo=True, dynamic_shapes=DYNAMIC,
                      input_names=['image'], output_names=['logits'])
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in [(1, 97, 131), (2, 8, 200)]:
        x = _images(*size)
        (out,) = session.run(None, {'image': x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == expected.shape == (size[0], 5)
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_aoti_package_matches_eager(tmp_path):
    """AOTInductor compiles the program of one block (SDA+LDA layouts) to C++; the package runs a
    whole-map size and a padded one. The sample has several groups per side: compiled from a sample
    with a single group, inductor's kernels of the grid branch went wrong at other sizes."""
    if shutil.which('c++') is None and shutil.which('g++') is None:
        pytest.skip('AOTInductor needs a C++ compiler (none on PATH)')
    from crossformer.layers import CrossFormerBlock
    torch.manual_seed(0)
    block = CrossFormerBlock(16, 2, group_size=4, interval=2).eval()
    with size_oblivious():
        program = torch.export.export(block, (torch.randn(2, 10, 14, 16),),
                                      dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO},))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / 'block.pt2'))
    runner = torch._inductor.aoti_load_package(path)
    for size in [(1, 3, 40), (2, 13, 9)]:
        x = torch.randn(*size, 16, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            torch.testing.assert_close(runner(x), block(x), atol=1e-5, rtol=1e-5)
