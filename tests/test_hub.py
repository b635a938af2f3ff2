"""Hub model folders: a training run and a converted checkpoint load exactly in timm and transformers,
and this library reads them through its own checks. Offline: no test touches the network."""
import json

import pytest
import timm
import torch
from timm.data import resolve_data_config

from crossformer import CheckpointError
from crossformer.cli import main
from crossformer.hub import read_model_folder
from crossformer.predict import load_trained, predict
from crossformer.train import train

from tiny_data import TINY_MODEL, tiny_config, write_image_folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 2-epoch run on a tiny image folder: its output directory is the model folder."""
    data_dir = write_image_folder(tmp_path_factory.mktemp('data'))
    out = tmp_path_factory.mktemp('run')
    trainer = train(tiny_config(data_dir, out, epochs=2, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25],
                                crop_pct=0.9, interpolation='bilinear'), progress=False)
    best = timm.create_model('crossformer_t', num_classes=len(trainer.data.class_names), **TINY_MODEL)
    best.load_state_dict(load_trained(out).model.state_dict())
    return trainer, out, best.eval()


def test_run_directory_is_a_model_folder(run):
    trainer, out, _ = run
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'crossformer_t'
    assert config['num_classes'] == len(trainer.data.class_names) and 'num_classes' not in config['model_args']
    assert config['label_names'] == trainer.data.class_names
    assert set(config['model_args']) == set(TINY_MODEL)
    card = (out / 'README.md').read_text()
    assert card.startswith('---\nlicense: mit\nlibrary_name: timm\n') and 'arxiv:2108.00154' in card
    best = trainer.best
    assert f'{best["top1"]:.2f}%' in card and f'epoch {best["epoch"]}' in card


def test_timm_local_dir_is_bit_identical_with_the_run_transforms(run):
    _, out, best = run
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), best(x))
    cfg = resolve_data_config({}, model=model)
    assert tuple(cfg['input_size']) == (3, 16, 16) and cfg['interpolation'] == 'bilinear' and cfg['crop_pct'] == 0.9
    assert tuple(cfg['mean']) == pytest.approx((0.4, 0.5, 0.6)) and tuple(cfg['std']) == pytest.approx((0.2, 0.3, 0.25))


def test_transformers_reads_the_same_folder(run):
    transformers = pytest.importorskip('transformers')
    from PIL import Image
    trainer, out, best = run
    wrapper = transformers.TimmWrapperForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(wrapper(pixel_values=x).logits, best(x))
    classifier = transformers.pipeline('image-classification', model=str(out))
    answers = classifier(Image.new('RGB', (40, 36), (200, 30, 30)), top_k=len(trainer.data.class_names))
    assert sorted(a['label'] for a in answers) == sorted(trainer.data.class_names)


def test_crossformer_commands_read_the_folder_safely(run, capsys):
    trainer, out, best = run
    loaded = load_trained(out)
    assert loaded.class_names == trainer.data.class_names and loaded.img_size == 16 and loaded.crop_pct == 0.9
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), best(x))
    from PIL import Image
    assert len(predict(loaded, [Image.new('RGB', (16, 16))], topk=2)[0]) == 2


def test_convert_writes_a_folder_that_timm_loads_exactly(tmp_path, capsys):
    model = timm.create_model('crossformer_t', embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)).eval()
    src = tmp_path / 'ref.pth'
    torch.save({'model': model.state_dict(), 'epoch': 299}, src)
    assert main(['convert', str(src), str(tmp_path / 'folder')]) == 2  # a folder needs --model
    assert main(['convert', str(src), str(tmp_path / 'folder'), '--model', 'crossformer_t']) == 2  # wrong widths
    capsys.readouterr()
    # the folder describes the variant's own arguments; a reduced model converts through the Python API
    small = timm.create_model('crossformer_t').eval()
    torch.save({'model': small.state_dict()}, src)
    assert main(['convert', str(src), str(tmp_path / 'folder'), '--model', 'crossformer_t']) == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    card = (tmp_path / 'folder' / 'README.md').read_text()
    assert '81.5%' in card and 'paper, not measured here' in card
    assert json.loads((tmp_path / 'folder' / 'config.json').read_text())['label_names'][0].startswith('tench')


@pytest.mark.parametrize('change, message', [
    (dict(model_args={'pretrained': True}), 'refused model arguments'),
    (dict(model_args={'pretrained_cfg_overlay': {'hf_hub_id': 'evil/model'}}), 'refused model arguments'),
    (dict(model_args={'checkpoint_path': '/etc/passwd'}), 'refused model arguments'),
    (dict(model_args={'embed_dim': 10 ** 9}), 'embed_dim'),
    (dict(num_classes=7), 'label_names must be 7 strings'),
    (dict(label_names=['only one']), 'label_names'),
    (dict(pretrained_cfg={'input_size': [3, 16, 16], 'std': [0.0, 1.0, 1.0]}), 'std'),
])
def test_folder_metadata_is_data_not_arguments(run, tmp_path, change, message):
    _, out, _ = run
    folder = tmp_path / 'folder'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes((out / 'model.safetensors').read_bytes())
    config = json.loads((out / 'config.json').read_text())
    for key, value in change.items():
        config[key] = dict(config[key], **value) if isinstance(value, dict) and key == 'model_args' else value
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_trained(folder)


def test_a_folder_written_by_timm_with_num_classes_in_model_args_still_reads(run, tmp_path):
    _, out, _ = run
    config = json.loads((out / 'config.json').read_text())
    config['model_args']['num_classes'] = config['num_classes']
    (out / 'config.json').write_text(json.dumps(config))
    try:
        assert read_model_folder(out)['num_classes'] == config['num_classes']
    finally:
        del config['model_args']['num_classes']
        (out / 'config.json').write_text(json.dumps(config))
