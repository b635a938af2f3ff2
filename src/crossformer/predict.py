"""Rebuilding a model from a checkpoint, and using it: validation and top-k predictions.

A weights file written by ``crossformer train`` says in its metadata which model it is (name,
arguments, classes, input size, normalization); any other checkpoint (a converted reference file,
a state dict) needs the model name and is taken to be an ImageNet-1k classifier when it has 1000
outputs.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .snapshot import read_weights_info

__all__ = ['Loaded', 'load_trained', 'class_names_for', 'validate', 'predict']


@dataclass
class Loaded:
    """A model loaded from a checkpoint, with what is needed to feed it and read its outputs."""
    model: nn.Module
    class_names: List[str]
    img_size: int
    interpolation: str
    crop_pct: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    info: Dict[str, Any] = field(default_factory=dict)  # the checkpoint's metadata ({} if none)


def class_names_for(num_classes: int, info: Optional[Dict[str, Any]] = None) -> List[str]:
    """The checkpoint's class names, else ImageNet-1k's descriptions for 1000 classes, else indices."""
    if info and info.get('class_names'):
        return list(info['class_names'])
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        names = ImageNetInfo()
        return [names.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _num_classes(checkpoint: Path) -> int:
    from .checkpoint import read_checkpoint
    from .models.crossformer import checkpoint_filter_fn
    state_dict = checkpoint_filter_fn(read_checkpoint(checkpoint), None)
    head = state_dict.get('head.fc.weight')
    return int(head.shape[0]) if head is not None else 0


def load_trained(checkpoint, model: Optional[str] = None, img_size: Optional[int] = None,
                 device: str = 'cpu') -> Loaded:
    """Build the model a checkpoint holds and load it (strictly), in eval mode on ``device``.

    ``model`` is required unless the file was written by ``crossformer train``; when both are
    given and differ, ``model`` wins and the saved model arguments are not used.
    """
    from timm.models import get_pretrained_cfg
    from .checkpoint import load_checkpoint
    from .train import create_model, data_defaults

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint file at {checkpoint}')
    info = read_weights_info(checkpoint) or {}
    name = model or info.get('model')
    if not name:
        raise ConfigError(f'{checkpoint} does not say which model it holds (it was not written by crossformer train): '
                          f'pass --model NAME, e.g. --model crossformer_s')
    if name == info.get('model'):
        net = create_model(name, info['num_classes'], info.get('model_kwargs'))
    else:
        net = create_model(name, _num_classes(checkpoint))
    load_checkpoint(net, checkpoint)
    pretrained = get_pretrained_cfg(name, allow_unregistered=True)
    defaults = data_defaults(name)
    size = img_size or info.get('img_size') or (pretrained.input_size[-1] if pretrained else 224)
    return Loaded(
        model=net.to(device).eval(),
        class_names=class_names_for(net.num_classes, info),
        img_size=int(size),
        interpolation=info.get('interpolation') or getattr(pretrained, 'interpolation', 'bicubic'),
        crop_pct=float(info.get('crop_pct') or getattr(pretrained, 'crop_pct', 0.875)),
        mean=tuple(info.get('mean') or defaults['mean']),
        std=tuple(info.get('std') or defaults['std']),
        info=info,
    )


def _data_config(loaded: Loaded, **changes) -> TrainConfig:
    return TrainConfig(model=loaded.info.get('model', 'crossformer_s'), img_size=loaded.img_size,
                       interpolation=loaded.interpolation, crop_pct=loaded.crop_pct, mean=loaded.mean,
                       std=loaded.std, mixup=0.0, cutmix=0.0, **changes)


def validate(loaded: Loaded, data_dir: Optional[str] = None, batch_size: int = 128, workers: int = 4,
             device: str = 'cpu', progress: bool = True) -> Dict[str, float]:
    """Loss and top-1/top-5 accuracy (%) on the validation split of ``data_dir``.

    Without ``data_dir`` the dataset the checkpoint was trained on is used when it is embedded
    (digits); otherwise ``data_dir`` is required.
    """
    from .data import build_datasets, build_transform, val_loader
    from .train import Runtime, evaluate
    if data_dir:
        cfg = _data_config(loaded, dataset='folder', data_dir=str(data_dir), batch_size=batch_size, workers=workers)
    elif loaded.info.get('dataset') == 'digits':
        cfg = _data_config(loaded, dataset='digits', batch_size=batch_size, workers=0)
    else:
        raise ConfigError('pass --data-dir DIR (an ImageFolder tree with a val/ folder): this checkpoint was not '
                          'trained on the embedded digits')
    transform = build_transform(cfg, dict(mean=loaded.mean, std=loaded.std), training=False)
    names = loaded.class_names if loaded.info.get('class_names') else None
    data = build_datasets(cfg, None, transform, train=False, class_names=names)
    if len(data.class_names) > loaded.model.num_classes:
        raise ConfigError(f'{data_dir} has {len(data.class_names)} classes but the model has {loaded.model.num_classes} outputs')
    runtime = Runtime(torch.device(device))
    return evaluate(loaded.model, val_loader(data.val, cfg), runtime, progress=progress)


@torch.no_grad()
def predict(loaded: Loaded, images: Sequence, topk: int = 5, device: str = 'cpu') -> List[List[Tuple[str, float]]]:
    """Top-k ``(class name, probability)`` for each image (a path or a PIL image)."""
    from PIL import Image
    from .data import build_transform
    transform = build_transform(_data_config(loaded), dict(mean=loaded.mean, std=loaded.std), training=False)
    results = []
    for image in images:
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f'no image file at {path}')
            try:
                image = Image.open(path)
                image.load()
            except OSError as e:
                raise ConfigError(f'{path}: not a readable image ({e})') from None
        x = transform(image.convert('RGB')).unsqueeze(0).to(device)
        probs = loaded.model(x).float().softmax(dim=-1)[0]
        values, indices = probs.topk(min(topk, probs.numel()))
        results.append([(loaded.class_names[i], v) for v, i in zip(values.tolist(), indices.tolist())])
    return results
