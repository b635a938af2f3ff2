"""Fine-tuning: the folder recipe, a name meaning its model, --pretrained files, layer-wise lr decay, 384 px."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from crossformer import CrossFormer
from crossformer.cli import main
from crossformer.hub import write_model_folder
from crossformer.errors import ConfigError
from crossformer.train import FINETUNE_RECIPE, TrainConfig, Trainer, load_config
from crossformer.train.config import DIGITS_RECIPE
from crossformer.train.engine import stage_param_groups
from crossformer.train.pretrained import describe_model, identify_variant, load_pretrained
from crossformer.weights import save_weights
from tiny_data import TINY_MODEL, reference_layout, tiny_config, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
T_PARAMS, S_PARAMS = 27776794, 30657394  # the reference implementation's counts (test_cli.py)


def paper_file(path: Path, state_dict) -> Path:
    """A .pth laid out as the reference's training script saves it (weights under "model", plus its state)."""
    torch.save({'model': reference_layout(state_dict), 'optimizer': {'state': {}}, 'epoch': 299,
                'max_accuracy': 81.5}, path)
    return path


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def tiny_1000():
    """A tiny CrossFormer with an ImageNet-sized head: "pretrained" random weights."""
    torch.manual_seed(1)
    return CrossFormer(num_classes=1000, **TINY_MODEL).state_dict()


@pytest.fixture(scope='module')
def crossformer_t_file(tmp_path_factory):
    """The published CrossFormer-T from random weights, in the paper's layout (111 MB)."""
    torch.manual_seed(2)
    with torch.device('meta'):
        shapes = timm.create_model('crossformer_t').state_dict()
    state = {k: torch.randn(v.shape) * 0.02 if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
             for k, v in shapes.items()}
    return paper_file(tmp_path_factory.mktemp('t') / 'crossformer-t.pth', state), state


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the recipe ------------------------------------------------------------------------------

def test_a_folder_without_config_gets_the_finetuning_recipe(data_dir, capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, resume=None, progress=True):
        seen['cfg'] = cfg
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr('crossformer.cli.train', fake_train)
    (tmp_path / 'w.pth').touch()
    assert run(capsys, 'train', '--data-dir', data_dir, '--pretrained', tmp_path / 'w.pth')[0] == 130
    cfg = seen['cfg']
    assert cfg == load_config(FINETUNE_RECIPE, dict(data_dir=str(data_dir), dataset='folder',
                                                    initial_checkpoint=str(tmp_path / 'w.pth')))
    assert (cfg.model, cfg.model_kwargs, cfg.img_size, cfg.dataset) == ('crossformer_s', {}, 224, 'folder')
    assert (cfg.layer_decay, cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.drop_path_rate) == (0.75, 0, 0, 0.1, 0.1)
    assert (cfg.lr, cfg.lr_base_size, cfg.head_init_scale, cfg.epochs, cfg.warmup_epochs) == (1e-3, 512, 1e-3, 30, 3)
    # configs/finetune.yaml names the packaged file; without --data-dir the digits stay the default
    assert load_config(ROOT / 'configs' / 'finetune.yaml') == load_config(FINETUNE_RECIPE)
    assert run(capsys, 'train', '--no-progress')[0] == 130
    assert seen['cfg'] == load_config(DIGITS_RECIPE) and seen['cfg'].dataset == 'digits'


def test_a_model_name_builds_the_published_variant(caplog):
    with caplog.at_level(logging.INFO):
        cfg = load_config(None, {'model': 'crossformer_s'})  # over the digits recipe's reduced crossformer_t
    assert cfg.model_kwargs == {} and cfg.img_size == 32  # the rest of the recipe stays
    assert 'the model_kwargs of digits.yaml (embed_dim=32' in caplog.text
    with torch.device('meta'):
        model = timm.create_model(cfg.model, **cfg.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) == S_PARAMS
    # the same name as the file's also means the published model; model_kwargs given with it apply
    assert load_config(None, {'model': 'crossformer_t'}).model_kwargs == {}
    assert load_config(None, {'model': 'crossformer_s', 'model_kwargs.embed_dim': 48}).model_kwargs == {'embed_dim': 48}
    assert load_config(None).model_kwargs['embed_dim'] == 32


# ---- --pretrained ------------------------------------------------------------------------------

def _trainer(data_dir, out, caplog, **changes):
    with caplog.at_level(logging.INFO):
        return Trainer(tiny_config(data_dir, out, **changes), progress=False)


def test_pretrained_paper_layout_loads_and_replaces_the_head(data_dir, tiny_1000, tmp_path, caplog):
    path = paper_file(tmp_path / 'ckpt_epoch_299.pth', tiny_1000)
    model = _trainer(data_dir, tmp_path / 'out', caplog, initial_checkpoint=str(path)).model
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in tiny_1000.items() if not k.startswith('head.'))
    assert own['head.fc.weight'].shape == (3, 128)  # three classes in the folder: a new head
    assert f'pretrained weights: {path}; its head for 1000 classes replaced by a new one for 3' in caplog.text


def test_pretrained_safetensors_keeps_a_head_that_fits(data_dir, tmp_path, caplog):
    torch.manual_seed(3)
    state = CrossFormer(num_classes=3, **TINY_MODEL).state_dict()
    path = save_weights(tmp_path / 'w.safetensors', state)
    model = _trainer(data_dir, tmp_path / 'out', caplog, initial_checkpoint=str(path)).model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert 'its head for 3 classes loaded' in caplog.text


def test_a_resumed_run_does_not_need_its_initial_checkpoint(data_dir, tiny_1000, tmp_path, caplog):
    """The snapshot holds the weights: --resume never reads initial_checkpoint again (it may have moved)."""
    path = paper_file(tmp_path / 'moved.pth', tiny_1000)
    trainer = _trainer(data_dir, tmp_path / 'out', caplog, initial_checkpoint=str(path), epochs=1)
    trainer.fit()
    path.unlink()
    cfg = tiny_config(data_dir, tmp_path / 'out', initial_checkpoint=str(path), epochs=2)
    resumed = Trainer(cfg, resume=tmp_path / 'out', progress=False)
    assert resumed.epoch == 1
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in trainer.model.state_dict().items())


def test_a_new_run_into_an_earlier_runs_folder_before_its_first_validation(data_dir, tmp_path, caplog):
    """The card of an earlier run's folder is not rewritten by an epoch that has no validation figures."""
    _trainer(data_dir, tmp_path / 'out', caplog, epochs=1).fit()
    trainer = _trainer(data_dir, tmp_path / 'out', caplog, epochs=3, val_every=2)
    trainer.fit()
    assert [('val_top1' in row) for row in trainer.history] == [False, True, True]


def test_pretrained_model_folder(data_dir, tiny_1000, tmp_path, caplog):
    folder = write_model_folder(tmp_path / 'folder', tiny_1000, architecture='crossformer_t', model_args=TINY_MODEL,
                                num_classes=1000, data=dict(img_size=16, interpolation='bicubic', crop_pct=1.0,
                                                            mean=[0.5] * 3, std=[0.5] * 3))
    model = _trainer(data_dir, tmp_path / 'out', caplog, initial_checkpoint=str(folder)).model
    assert torch.equal(model.state_dict()['patch_embed.norm.weight'], tiny_1000['patch_embed.norm.weight'])
    assert 'replaced by a new one for 3' in caplog.text


def test_another_variant_is_one_line_naming_both_exit_2(data_dir, crossformer_t_file, tmp_path, capsys):
    path, state = crossformer_t_file
    assert identify_variant(reference_layout(state)) == 'crossformer_t'
    # a reduced model: the file is beyond its memory bound, and the variant is named first
    recipe = tmp_path / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(dict(model='crossformer_t', model_kwargs=TINY_MODEL, img_size=16, batch_size=4)))
    code, _, err = run(capsys, 'train', '--config', recipe, '--data-dir', data_dir, '--pretrained', path,
                       '--output', tmp_path / 'out', '--no-progress')
    tiny = describe_model('crossformer_t', load_config(recipe).model_kwargs)
    tiny_params = sum(p.numel() for p in CrossFormer(num_classes=3, **TINY_MODEL).parameters())
    assert code == 2 and err.count('\n') == 1, err
    assert err == (f'crossformer train: error: {path}: this file holds crossformer_t (27.8M parameters); the model '
                   f'being trained is {tiny} ({tiny_params / 1e6:.1f}M): add model=crossformer_t to train it, '
                   f'or pass a file of {tiny}\n')
    # the folder recipe's CrossFormer-S: shapes differ within the bound
    code, _, err = run(capsys, 'train', '--data-dir', data_dir, '--pretrained', path, '--output', tmp_path / 'out2',
                       '--no-progress', 'img_size=16', 'batch_size=4', 'workers=0', 'amp=false')
    assert code == 2 and err.count('\n') == 1, err
    s_params = S_PARAMS - 768 * 997 - 997  # three classes instead of 1000
    assert (f'this file holds crossformer_t (27.8M parameters); the model being trained is crossformer_s '
            f'({s_params / 1e6:.1f}M): add model=crossformer_t to train it') in err


def test_a_file_that_is_not_a_checkpoint_keeps_its_own_error(data_dir, tmp_path, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a zip')
    code, _, err = run(capsys, 'train', '--data-dir', data_dir, '--pretrained', bad, '--no-progress', 'batch_size=4')
    assert code == 2 and err.count('\n') == 1 and 'not a torch.save file' in err, err
    code, _, err = run(capsys, 'train', '--data-dir', data_dir, '--pretrained', tmp_path / 'nope.pth', '--no-progress')
    assert code == 2 and f'--pretrained {tmp_path / "nope.pth"}: no such file or model folder' in err, err


# ---- resolution and layer decay -----------------------------------------------------------------

def test_finetuning_at_384_from_224_weights_loads_as_is(tiny_1000, tmp_path):
    """The DPB computes the position bias from offsets: no table sized by the training resolution to resize."""
    path = paper_file(tmp_path / 'trained_at_224.pth', tiny_1000)
    model = CrossFormer(num_classes=3, **TINY_MODEL)
    load_pretrained(model, path, 'tiny')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_1000.items() if not k.startswith('head.'))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    x, y = torch.randn(2, 3, 384, 384), torch.tensor([2, 0])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    dpb = model.layers[2].blocks[0].attn.pos.pos_proj.weight  # (stage 1's one-channel DPB has a constant LayerNorm)
    assert torch.isfinite(loss) and dpb.grad is not None and dpb.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3) and model.forward_features(x).shape == (2, 128, 12, 12)


def test_layer_decay_groups_are_the_stages():
    with torch.device('meta'):
        model = timm.create_model('crossformer_t', num_classes=5)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = stage_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_scale = {}
    for g in groups:
        by_scale.setdefault(g['lr_scale'], set()).update(names[id(p)] for p in g['params'])
        assert g['weight_decay'] == (0.0 if all(p.ndim <= 1 for p in g['params']) else 0.05)
    prefixes = {scale: {('.'.join(n.split('.')[:2]) if n.startswith('layers') else n.split('.')[0]) for n in members}
                for scale, members in by_scale.items()}
    assert prefixes == {1.0: {'norm', 'head'}, 0.5: {'layers.3'}, 0.25: {'layers.2'}, 0.125: {'layers.1'},
                        0.0625: {'layers.0'}, 0.03125: {'patch_embed'}}
    assert sum(len(m) for m in by_scale.values()) == len(names)
    assert groups[0]['lr_scale'] == 1.0
    for bad in (dict(layer_decay=0), dict(layer_decay=1.5), dict(head_init_scale=0)):
        with pytest.raises(ConfigError, match=f'{next(iter(bad))} must be'):
            TrainConfig(**bad)


def test_layer_decay_scales_each_stage_lr_from_the_first_update(data_dir, tmp_path, caplog):
    trainer = _trainer(data_dir, tmp_path, caplog, layer_decay=0.5, warmup_epochs=0, lr_base_size=None, lr=1e-3)
    lrs = sorted({round(g['lr'], 12) for g in trainer.optimizer.param_groups}, reverse=True)
    assert lrs == [round(1e-3 * 0.5 ** k, 12) for k in range(6)]
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(1e-3)  # what the logs and metrics show
    with caplog.at_level(logging.INFO):
        trainer.fit(stop_after=1)
    # the banner says the widths are not the published variant's
    banner = next(r.message for r in caplog.records if 'params' in r.message)
    params = sum(p.numel() for p in trainer.model.parameters())
    assert banner.startswith(f'{describe_model("crossformer_t", TINY_MODEL)}: {params / 1e6:.2f}M params (model_kwargs '
                             'change it: the published crossformer_t has 27.8M params), 3 classes'), banner


# ---- the example -----------------------------------------------------------------------------------

def test_finetune_digits_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / 'src'), os.environ.get('PYTHONPATH')])))
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'finetune_digits.py'), '--quick',
                             '--output', str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.findall(r'^(pretrained|random) weights: val top-1 ([\d.]+)% after \d+ epochs, ([\d.]+) s$',
                       result.stdout, flags=re.M)
    assert [f[0] for f in found] == ['pretrained', 'random'], result.stdout
    assert all(0 <= float(acc) <= 100 and float(s) > 0 for _, acc, s in found)
