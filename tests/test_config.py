"""Training configs: the recipes in configs/, overrides, and errors for bad keys and values."""
from pathlib import Path

import pytest
import timm
import torch

import crossformer  # noqa: F401  (registers the models)
from crossformer.errors import ConfigError
from crossformer.train.config import DIGITS_RECIPE, TrainConfig, config_from_dict, load_config, parse_overrides

DIGITS = load_config()

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
VARIANTS = ('crossformer_t', 'crossformer_s', 'crossformer_b', 'crossformer_l',
            'crossformerpp_s', 'crossformerpp_b', 'crossformerpp_l', 'crossformerpp_h')
# drop path per variant, as the reference configs set it
DROP_PATH = dict(crossformer_t=0.1, crossformer_s=0.2, crossformer_b=0.3, crossformer_l=0.5,
                 crossformerpp_s=0.2, crossformerpp_b=0.3, crossformerpp_l=0.5, crossformerpp_h=0.5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_files_hold_the_papers_imagenet_recipe(variant):
    cfg = load_config(CONFIGS / f'{variant}.yaml')
    assert cfg.model == variant and cfg.drop_path_rate == DROP_PATH[variant]
    assert (cfg.epochs, cfg.warmup_epochs, cfg.sched) == (300, 20, 'cosine')
    assert (cfg.opt, cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.lr_base_size) == ('adamw', 5e-4, 5e-7, 5e-6, 512)
    assert (cfg.weight_decay, cfg.betas, cfg.opt_eps, cfg.clip_grad) == (0.05, (0.9, 0.999), 1e-8, 5.0)
    assert (cfg.smoothing, cfg.mixup, cfg.cutmix, cfg.reprob, cfg.color_jitter) == (0.1, 0.8, 1.0, 0.25, 0.4)
    assert (cfg.auto_augment, cfg.interpolation, cfg.crop_pct) == ('rand-m9-mstd0.5-inc1', 'bicubic', 0.875)
    assert (cfg.img_size, cfg.batch_size, cfg.dataset) == (224, 128, 'folder')
    # 8 processes x 128 = 1024 images: lr 1e-3, as the paper trains
    assert cfg.lr * 8 * cfg.batch_size / cfg.lr_base_size == pytest.approx(1e-3)
    # the registry's default drop path is the same number (built on the meta device: shapes only)
    with torch.device('meta'):
        model = timm.create_model(variant)
    assert model.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(DROP_PATH[variant])


def test_every_variant_has_a_config_file():
    assert sorted(p.stem for p in CONFIGS.glob('crossformer*.yaml')) == sorted(timm.list_models('crossformer*'))


def test_digits_file_is_the_embedded_default():
    assert load_config(DIGITS_RECIPE) == DIGITS == load_config(None)
    assert DIGITS.dataset == 'digits' and DIGITS.model_kwargs['embed_dim'] >= 16


def test_overrides_win_and_take_the_fields_types():
    cfg = load_config(CONFIGS / 'crossformer_s.yaml', parse_overrides(
        ['lr=1e-3', 'epochs=5', 'betas=[0.8, 0.99]', 'model_kwargs.embed_dim=48', 'auto_augment=null', 'ema=true']))
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 reads "1e-3" as text
    assert (cfg.epochs, cfg.betas, cfg.model_kwargs, cfg.auto_augment, cfg.ema) == (5, (0.8, 0.99), {'embed_dim': 48}, None, True)
    assert cfg.drop_path_rate == 0.2  # the rest of the file stays


def test_unknown_key_is_an_error_with_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'weight_decy' in overrides; did you mean weight_decay"):
        load_config(None, {'weight_decy': 0.1})
    bad = tmp_path / 'bad.yaml'
    bad.write_text('base: ' + str(CONFIGS / 'imagenet.yaml') + '\nepoch: 10\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch' in .*bad.yaml; did you mean epochs"):
        load_config(bad)


@pytest.mark.parametrize('override, message', [
    ('epochs=ten', "epochs: 'ten' is not a valid int"),
    ('epochs=2.5', 'epochs: 2.5 is not a valid int'),
    ('lr=-1', 'lr must be > 0'),
    ('dataset=imagenet', "dataset='imagenet' is not one of digits, folder"),
    ('scale=[0.5]', 'scale: expected 2 values'),
    ('batch_size=7', 'Mixup/CutMix need an even batch_size'),
    ('epochs', 'is not KEY=VALUE'),
    ('lr.x=1', 'only model_kwargs takes dotted keys'),
])
def test_bad_values_are_errors(override, message):
    base = load_config(CONFIGS / 'imagenet.yaml')
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace('.', r'\.')):
        base.replace(**parse_overrides([override]))


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match='no config file'):
        load_config(tmp_path / 'missing.yaml')
    (tmp_path / 'list.yaml').write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='expected a mapping'):
        load_config(tmp_path / 'list.yaml')
    (tmp_path / 'loop.yaml').write_text('base: loop.yaml\n')
    with pytest.raises(ConfigError, match='loops back'):
        load_config(tmp_path / 'loop.yaml')


def test_saved_config_round_trips():
    cfg = DIGITS.replace(epochs=3, mean=[0.5, 0.5, 0.5])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().to_dict()['betas'] == [0.9, 0.999]
