"""The examples run end to end (shortened), so the README's commands keep working."""
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


def _run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_quickstart_prints_the_feature_pyramid(tmp_path):
    out = _run(str(EXAMPLES / 'quickstart.py'), cwd=tmp_path)
    assert '30.66' in out  # crossformer_s parameters, in millions
    strides = [int(s) for s in re.findall(r'stride (\d+)', out)]
    assert strides == [4, 8, 16, 32], out


def _train_shapes_example(script: str, tmp_path: Path) -> str:
    """Run a shapes example for 3 steps; check its loss line and its picture; return what it printed."""
    picture = tmp_path / 'predictions.png'
    out = _run(str(EXAMPLES / script), '--steps', '3', '--eval-images', '4', '--out', str(picture), cwd=tmp_path)
    loss = re.search(r'trained 3 steps of 8 images .* start ([\d.]+) -> end ([\d.]+)', out)
    assert loss and all(float(v) > 0 for v in loss.groups()), out
    assert picture.stat().st_size > 10_000
    return out


def test_detect_shapes_trains_evaluates_and_draws(tmp_path):
    out = _train_shapes_example('detect_shapes.py', tmp_path)
    metrics = re.search(r'mAP@0.5 ([\d.]+), recall@0.5 ([\d.]+)', out)
    assert metrics and all(0 <= float(v) <= 1 for v in metrics.groups()), out


def test_segment_shapes_trains_evaluates_and_draws(tmp_path):
    out = _train_shapes_example('segment_shapes.py', tmp_path)
    ious = re.search(r'mIoU ([\d.]+) \(background ([\d.]+), circle ([\d.]+), square ([\d.]+), triangle ([\d.]+)\)', out)
    assert ious and all(0 <= float(v) <= 1 for v in ious.groups()), out
    assert abs(float(ious[1]) - sum(float(v) for v in ious.groups()[1:]) / 4) < 2e-3, out
