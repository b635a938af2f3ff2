"""The ``crossformer`` command: every subcommand on small inputs, and its errors."""
import re
import runpy
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crossformer import CrossFormer, load_checkpoint
from crossformer.cli import main
from crossformer.predict import class_names_for
from crossformer.viz import group_ids
from tiny_data import CLASSES, TINY_MODEL, reference_layout, tiny_config, write_image_folder

# Parameter counts measured on the reference implementation (shared/reference/official_keys.json).
REFERENCE_PARAMS = dict(
    crossformer_t=27776794, crossformer_s=30657394, crossformer_b=51971554, crossformer_l=91971184,
    crossformerpp_s=23325340, crossformerpp_b=51994594, crossformerpp_l=92001904, crossformerpp_h=95962944)
COMMANDS = ('train', 'validate', 'info', 'convert', 'predict', 'viz', 'tune')
LAST = 'snapshots/step-00000012'  # the tiny run's last snapshot: 2 epochs of 6 updates


def run(capsys, *argv):
    """``crossformer ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """``crossformer train --config tiny.yaml --data-dir DIR --output OUT`` (2 epochs, a few seconds)."""
    root = tmp_path_factory.mktemp('run')
    cfg = tiny_config(data_dir, root / 'unused').to_dict()
    for key in ('data_dir', 'output', 'dataset'):
        cfg.pop(key)
    (root / 'tiny.yaml').write_text(yaml.safe_dump(cfg))
    code = main(['train', '--config', str(root / 'tiny.yaml'), '--data-dir', str(data_dir),
                 '--output', str(root / 'out'), '--no-progress', 'epochs=2'])
    assert code == 0
    return root / 'out'


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, '--help'])
    assert exit_.value.code == 0
    assert f'usage: crossformer {command}' in capsys.readouterr().out


def test_python_m_crossformer(capsys, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['crossformer', '--version'])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module('crossformer', run_name='__main__')
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith('crossformer ')


def test_train_writes_checkpoints_metrics_and_plot(trained, capsys):
    for name in (f'{LAST}/weights.safetensors', 'model.safetensors', f'{LAST}/state.json', 'metrics.csv', 'metrics.png'):
        assert (trained / name).is_file(), name
    lines = (trained / 'metrics.csv').read_text().splitlines()
    assert lines[0].startswith('epoch,step,lr,train_loss,val_loss,val_top1,val_top5') and len(lines) == 3


def test_resume_a_finished_run_with_a_longer_schedule(trained, capsys, tmp_path):
    import shutil
    run_dir = shutil.copytree(trained, tmp_path / 'run')
    code, out, err = run(capsys, 'train', '--resume', run_dir, '--no-progress', 'epochs=3')
    assert code == 0, err
    assert 'done: epoch 3' in out
    assert len((run_dir / 'metrics.csv').read_text().splitlines()) == 4
    code, _, err = run(capsys, 'train', '--resume', run_dir, '--config', 'x.yaml')
    assert code == 2 and 'give overrides, not --config' in err


def test_validate_reports_the_same_accuracy_as_training(trained, data_dir, capsys):
    last = (trained / 'metrics.csv').read_text().splitlines()[-1].split(',')
    code, out, err = run(capsys, 'validate', '--checkpoint', trained / LAST / 'weights.safetensors', '--data-dir', data_dir,
                         '--workers', 0, '--no-progress')
    assert code == 0, err
    top1, top5, loss = map(float, re.search(r'top-1 ([\d.]+)%\s+top-5 ([\d.]+)%\s+loss ([\d.]+)', out).groups())
    assert top1 == pytest.approx(float(last[5]), abs=0.01) and top5 == pytest.approx(float(last[6]), abs=0.01)
    assert loss == pytest.approx(float(last[4]), abs=1e-4)
    assert '(12 images)' in out


def test_predict_names_the_trained_classes(trained, data_dir, capsys):
    image = data_dir / 'val' / 'vertical' / '0.png'
    code, out, err = run(capsys, 'predict', image, '--checkpoint', trained / 'model.safetensors', '--topk', 3)
    assert code == 0, err
    ranked = re.findall(r'^\s+(\d)\.\s+([\d.]+)%\s+(\w+)$', out, flags=re.M)
    assert [r[0] for r in ranked] == ['1', '2', '3']
    assert sorted(r[2] for r in ranked) == sorted(CLASSES)
    assert sum(float(r[1]) for r in ranked) == pytest.approx(100, abs=0.05)


def test_imagenet_label_names_come_from_timm():
    names = class_names_for(1000)
    assert len(names) == 1000 and names[0].startswith('tench') and names[999].startswith('toilet tissue')
    assert class_names_for(3) == ['0', '1', '2']


def test_info_params_equal_the_reference_counts(capsys):
    code, out, err = run(capsys, 'info')
    assert code == 0, err
    rows = {m.group(1): m for m in re.finditer(r'^(crossformer\w+)\s+([\d,]+)\s.*?([\d.]+)\s+([\d/]+)\s+([\d/]+)$',
                                               out, flags=re.M)}
    assert sorted(rows) == sorted(REFERENCE_PARAMS)
    for name, params in REFERENCE_PARAMS.items():
        assert int(rows[name].group(2).replace(',', '')) == params, name
        assert rows[name].group(4) == '4/8/16/32'
    assert rows['crossformer_s'].group(5) == '96/192/384/768'
    gmacs_t = float(re.search(r'^crossformer_t\s+\S+\s+\S+ \(\S+\)\s+([\d.]+)', out, flags=re.M).group(1))
    assert gmacs_t == pytest.approx(2.858, abs=0.01)  # the reference's FLOP counter gives 2.858 G at 224


def test_info_unknown_model_suggests_close_names(capsys):
    code, _, err = run(capsys, 'info', 'crossformer_xs')
    assert code == 2 and 'did you mean crossformer_s' in err


def test_convert_round_trips_a_reference_checkpoint(capsys, tmp_path):
    torch.manual_seed(0)
    model = CrossFormer(num_classes=3, **TINY_MODEL)
    src, dst = tmp_path / 'ref.pth', tmp_path / 'converted.safetensors'
    torch.save({'model': reference_layout(model.state_dict()), 'epoch': 299}, src)
    code, out, err = run(capsys, 'convert', src, dst)
    assert code == 0, err
    assert f'{len(model.state_dict())} tensors' in out
    converted = load_file(dst)
    assert set(converted) == set(model.state_dict())
    fresh = CrossFormer(num_classes=3, **TINY_MODEL)
    load_checkpoint(fresh, dst)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    code, _, err = run(capsys, 'convert', src, tmp_path / 'x.safetensors', '--model', 'crossformer_t')
    assert code == 2 and 'does not fit this model' in err
    code, _, err = run(capsys, 'convert', src, tmp_path / 'x.pth')
    assert code == 2 and 'must end in .safetensors' in err
    code, _, err = run(capsys, 'predict', src, '--checkpoint', dst)
    assert code == 2 and 'pass --model NAME' in err


def test_group_maps_follow_sda_and_lda():
    ids, G, I = group_ids(8, 8, group_size=4, interval=2)
    assert (G, I, tuple(ids.shape)) == ((4, 4), 2, (8, 8))
    lda0 = (ids == ids[0, 0]).nonzero().tolist()
    assert lda0 == [[y, x] for y in (0, 2, 4, 6) for x in (0, 2, 4, 6)]  # tokens 2 apart
    ids, _, _ = group_ids(8, 8, group_size=4, interval=1)
    assert (ids == ids[0, 0]).nonzero().tolist() == [[y, x] for y in range(4) for x in range(4)]  # a 4x4 window
    ids, G, I = group_ids(3, 10, group_size=4, interval=2)  # short side <= G: one group of all its tokens
    assert (G, I, tuple(ids.shape), int(ids.max())) == ((3, 10), 1, (3, 10), 0)


def test_viz_writes_group_and_dpb_pictures(trained, capsys, tmp_path):
    code, out, err = run(capsys, 'viz', '--map-size', 8, '--group-size', 4, '--interval', 2, '--output', tmp_path)
    assert code == 0, err
    assert (tmp_path / 'groups_8x8.png').read_bytes()[:4] == b'\x89PNG'
    code, out, err = run(capsys, 'viz', '--checkpoint', trained / LAST / 'weights.safetensors', '--output', tmp_path / 'm')
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / 'm').iterdir())
    assert names == sorted([f'groups_stage{i}.png' for i in range(4)] +
                           [f'dpb_stage0_block{j}.png' for j in range(2)] + [f'dpb_stage{i}_block0.png' for i in (1, 2, 3)])


def test_user_mistakes_are_one_line_errors(data_dir, capsys, tmp_path):
    cases = [
        (('train', '--data-dir', tmp_path / 'nope'), 'does not exist'),
        (('train', '--data-dir', data_dir, 'learning_rate=1'), "unknown config key 'learning_rate'"),
        (('train', '--config', tmp_path / 'none.yaml'), 'no config file'),
        (('train', '--resume', tmp_path), 'no training snapshot'),
        (('train', 'model=crossformer_x', 'epochs=1'), "unknown model 'crossformer_x'"),
        (('validate', '--checkpoint', tmp_path / 'none.safetensors'), 'no checkpoint file'),
        (('predict', tmp_path / 'none.png', '--checkpoint', tmp_path / 'c.safetensors'), 'no checkpoint file'),
        (('tune', 'crossformer_q'), "unknown model 'crossformer_q'"),
        (('tune', 'crossformer_t', '--sizes', '224x'), 'takes N or HxW'),
        (('tune', 'crossformer_t', '--dtype', 'float16'), 'float16 is not one of'),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count('\n') == 1, (argv, err)


def test_tune_times_the_products_and_keeps_them_for_this_host(capsys, tmp_path, monkeypatch):
    from crossformer.layers.speedups import clear_tuning, tuning_file
    monkeypatch.setenv('CROSSFORMER_TUNING_CACHE', str(tmp_path))
    clear_tuning()
    try:
        code, out, _ = run(capsys, 'tune', 'crossformer_t', '--sizes', '32', '40x24')
        assert code == 0 and tuning_file().is_file() and f'kept in {tuning_file()}' in out
        runs = re.findall(r'^\| float32 \| 1 \| (\d+x\d+) \| [\d.]+ \| [\d.]+ \| (\d+) \|$', out, re.M)
        assert [size for size, _ in runs] == ['32x32', '40x24'] and int(runs[0][1]) > 0
        assert re.search(r'^\| Linear 64->192, float32, <=\d+ tokens, \d threads \| (default|onednn) \| default [\d.]+, '
                         r'onednn [\d.]+ \|$', out, re.M)
    finally:
        clear_tuning()


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only the library's own errors become one line; anything else, ValueError included, is a bug."""
    import crossformer.cli as cli

    def broken(*args, **kwargs):
        raise ValueError('an internal mistake')

    monkeypatch.setattr(cli, 'measure', broken)
    with pytest.raises(ValueError, match='an internal mistake'):
        main(['info', 'crossformer_t'])
    monkeypatch.setattr(cli, 'measure', lambda *a, **k: (_ for _ in ()).throw(cli.ConfigError('a user mistake')))
    assert main(['info', 'crossformer_t']) == 2
    assert capsys.readouterr().err == 'crossformer info: error: a user mistake\n'
