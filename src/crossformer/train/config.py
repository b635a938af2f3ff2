"""Training configuration: one flat dataclass, read from YAML and ``key=value`` overrides.

The defaults of :class:`TrainConfig` are the paper's ImageNet-1k recipe (Swin-style: AdamW,
cosine with warm-up, RandAugment, Mixup/CutMix, random erasing). ``configs/`` holds a file per
variant that states it explicitly. Two recipes ship beside this module: ``digits.yaml``
(:data:`DIGITS_RECIPE`), the small default of ``crossformer train`` without ``--config``, and
``finetune.yaml`` (:data:`FINETUNE_RECIPE`), its default with ``--data-dir``: a published variant
fine-tuned from its ImageNet weights on a folder of images.

Rules, so that a typo never passes silently:
- an unknown key (in a file or an override) is a :class:`ConfigError` naming close matches;
- values are converted to the field's type (``lr=1e-3`` is a float even though YAML 1.1 reads
  it as text) and a value that does not fit is an error;
- a file may name another with ``base: other.yaml`` (relative to itself); its own keys win;
- ``model_kwargs.KEY=VALUE`` sets one constructor argument of the model;
- a name means that model: ``model=NAME`` builds NAME as published, without the file's
  ``model_kwargs`` (those given with it, ``model_kwargs.KEY=VALUE``, still apply).
"""
import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..errors import ConfigError
from ..files import did_you_mean

__all__ = ['ConfigError', 'TrainConfig', 'DIGITS_RECIPE', 'FINETUNE_RECIPE', 'default_recipe', 'load_config',
           'config_from_dict', 'parse_overrides', 'apply_overrides']

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything ``crossformer train`` needs. Learning rates are per ``lr_base_size`` images."""

    # model: any timm name; ``model_kwargs`` go to its constructor (user values win)
    model: str = 'crossformer_s'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    drop_path_rate: Optional[float] = None  # None: the variant's own (0.1/0.2/0.3/0.5 for T/S/B/L)
    drop_rate: float = 0.0
    head_init_scale: Optional[float] = None  # the new classifier's initial weights x this (ConvNeXt, BEiT: 0.001)
    # weights to start from (fine-tuning; `crossformer train --pretrained FILE`): the paper's .pth, a
    # .safetensors file or a model folder; a head for other classes is replaced by a new one
    initial_checkpoint: Optional[str] = None

    # data: 'digits' is embedded (scikit-learn's 8x8 digits); 'folder' reads data_dir/{train,val}/CLASS/*
    dataset: str = 'folder'
    data_dir: Optional[str] = None
    img_size: int = 224
    batch_size: int = 128  # per process; the global batch is batch_size * world size
    val_batch_size: Optional[int] = None  # None: 2 * batch_size
    workers: int = 8
    interpolation: str = 'bicubic'
    crop_pct: float = 0.875
    mean: Optional[Tuple[float, ...]] = None  # None: the model's pretrained config (ImageNet statistics)
    std: Optional[Tuple[float, ...]] = None

    # augmentation (timm.data.create_transform, timm.data.Mixup)
    no_aug: bool = False  # training transform = eval resize and crop, nothing random
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'
    reprob: float = 0.25
    remode: str = 'pixel'
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1

    # optimizer (timm.optim.create_optimizer_v2; norms and biases get no weight decay)
    opt: str = 'adamw'
    lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_base_size: Optional[int] = 512  # the three lrs are scaled by global_batch / lr_base_size; None: as given
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = 5.0
    clip_mode: str = 'norm'
    # layer-wise lr decay (BEiT): lr x layer_decay**k for the k-th group below the head, one group per
    # stage (stem, stage 1 .. stage n, then final norm and head at the full lr); None: off
    layer_decay: Optional[float] = None

    # schedule (timm.scheduler.create_scheduler_v2, stepped every update)
    epochs: int = 300
    warmup_epochs: int = 20
    sched: str = 'cosine'

    # engine
    amp: bool = False  # autocast: bfloat16 on CPU, float16 (with a grad scaler) on CUDA
    grad_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    device: Optional[str] = None  # None: cuda if available, else cpu
    threads: Optional[int] = None  # torch CPU threads per process; None: torch's default
    seed: int = 0
    output: str = 'outputs/train'
    val_every: int = 1  # validate (and write metrics) every N epochs and after the last

    def __post_init__(self):
        for name, hint in _hints().items():
            setattr(self, name, _coerce(name, getattr(self, name), hint))
        self.validate()

    def validate(self) -> None:
        """Check values that types cannot; raises :class:`ConfigError`."""
        choices = dict(dataset=('digits', 'folder'), mixup_mode=('batch', 'pair', 'elem'),
                       clip_mode=('norm', 'value', 'agc'), remode=('const', 'rand', 'pixel'),
                       sched=('cosine', 'tanh', 'poly', 'step', 'multistep'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f'{name}={getattr(self, name)!r} is not one of {", ".join(allowed)}')
        positive = ('img_size', 'batch_size', 'epochs', 'val_every', 'lr', 'recount')
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f'{name} must be > 0, got {getattr(self, name)}')
        if self.head_init_scale is not None and not self.head_init_scale > 0:
            raise ConfigError(f'head_init_scale must be > 0 (or null: the model\'s own initialization), '
                              f'got {self.head_init_scale}')
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f'layer_decay must be in (0, 1] (or null: off), got {self.layer_decay}')
        if self.workers < 0 or self.warmup_epochs < 0:
            raise ConfigError('workers and warmup_epochs must be >= 0')
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f'Mixup/CutMix need an even batch_size, got {self.batch_size}')

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes) -> 'TrainConfig':
        return apply_overrides(self, changes)


# The embedded defaults of ``crossformer train`` without --config, shipped inside the package:
# without --data-dir the digits, with it the fine-tuning recipe (configs/finetune.yaml names the same file).
DIGITS_RECIPE = Path(__file__).with_name('digits.yaml')
FINETUNE_RECIPE = Path(__file__).with_name('finetune.yaml')


def default_recipe(data_dir: Optional[str] = None) -> Path:
    """The recipe used without ``--config``: :data:`FINETUNE_RECIPE` for a folder, else :data:`DIGITS_RECIPE`."""
    return FINETUNE_RECIPE if data_dir else DIGITS_RECIPE


def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the type ``hint``; :class:`ConfigError` if it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ('none', 'null', '~')):
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)))
    bad = ConfigError(f'{name}: {value!r} is not a valid {getattr(hint, "__name__", hint)}')
    if hint is bool:
        if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no', '1', '0'):
            return value.lower() in ('true', 'yes', '1')
        if not isinstance(value, bool):
            raise bad
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise bad from None
        if hint is int and isinstance(value, float) and value != converted:
            raise bad
        return converted
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace('(', '').replace(')', '').split(',') if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'{name}: expected {len(args)} values, got {len(value)}: {value!r}')
            return tuple(_coerce(name, v, a) for v, a in zip(value, args))
        items = [v if item is Any else _coerce(name, v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    return value


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``['epochs=5', 'model_kwargs.embed_dim=48']`` -> ``{'epochs': 5, 'model_kwargs.embed_dim': 48}``.

    Values are read as YAML (``[1, 2]``, ``null``, ``true``); the field's type decides the rest.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ConfigError(f'override {item!r} is not KEY=VALUE (for example epochs=10 or lr=1e-3)')
        out[key.strip()] = _yaml_value(value.strip())
    return out


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], source: str = 'overrides') -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied (``model_kwargs.KEY`` sets one model argument)."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    values = dataclasses.asdict(cfg)
    for key, value in overrides.items():
        top, _, sub = key.partition('.')
        if top not in known:
            raise ConfigError(f'unknown config key {key!r} in {source}{did_you_mean(top, known)} '
                              f'Known keys: {", ".join(known)}')
        if sub:
            if top != 'model_kwargs':
                raise ConfigError(f'{key!r} in {source}: only model_kwargs takes dotted keys')
            values['model_kwargs'] = dict(values['model_kwargs'], **{sub: value})
        elif top == 'model_kwargs' and value is not None:
            values['model_kwargs'] = dict(value) if isinstance(value, Mapping) else value
        else:
            values[top] = value
    return TrainConfig(**values)


def _read_yaml(path: Path, seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f'{path}: "base" loops back to itself')
    if not path.is_file():
        raise ConfigError(f'no config file at {path}')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({e})') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of config keys, got {type(data).__name__}')
    base = data.pop('base', None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path,))
    merged.update(data)
    return merged


def _for_named_model(values: Dict[str, Any], overrides: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """``values`` of a file without its ``model_kwargs`` when ``overrides`` name a model: a name means
    that model as published (plus the ``model_kwargs`` the overrides give with it)."""
    name = overrides.get('model')
    if name is None:
        return values
    dropped = values.get('model_kwargs')
    if dropped:
        _logger.info(f'model={name}: building {name} as published; the model_kwargs of {source} '
                     f'({", ".join(f"{k}={v}" for k, v in dropped.items())}) are not used '
                     f'(add model_kwargs.KEY=VALUE to change {name})')
    return {k: v for k, v in values.items() if k != 'model_kwargs'}


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """The config in ``path`` with ``overrides`` applied on top.

    ``path`` None: the embedded recipe, :func:`default_recipe` of the overrides' ``data_dir``.
    ``model=NAME`` in ``overrides`` builds NAME as published, without the file's ``model_kwargs``.
    """
    overrides = dict(overrides or {})
    path = Path(path) if path is not None else default_recipe(overrides.get('data_dir'))
    values = _for_named_model(_read_yaml(path), overrides, path.name)
    cfg = apply_overrides(TrainConfig(), values, source=str(path))
    return apply_overrides(cfg, overrides)


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A config saved with :meth:`TrainConfig.to_dict` (keys checked, values converted)."""
    return apply_overrides(TrainConfig(), values, source='saved config')

