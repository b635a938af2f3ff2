"""Rebuilding a trained model from its weights file, and top-k predictions.

A weights file written by ``crossformer train`` says in its metadata which model it holds (name,
arguments, classes, input size, normalization). That metadata is untrusted data, never keyword
arguments: the model must be a CrossFormer variant, its arguments come from an allow-list with
ranges (:data:`crossformer.models.crossformer.FILE_MODEL_ARGS`), the data settings are checked,
and the model the metadata describes is first built on the meta device (no memory) and compared
with the file's tensors before anything real is allocated. Any other checkpoint (a converted
reference file) needs the model name and is taken to be an ImageNet-1k classifier when it has
1000 outputs.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform
from torch import nn

from .errors import CheckpointError, ConfigError, InputError, MissingFileError
from .files import PathLike, existing_file
from .hub import read_model_folder
from .models import check_variant, create_model, default_normalization
from .models.crossformer import check_file_model_args
from .weights import load_checkpoint, read_checkpoint, read_run_info

__all__ = ['Loaded', 'load_trained', 'class_names_for', 'predict', 'check_data_settings']

INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
MAX_CLASSES = 100_000
MAX_IMG_SIZE = 8192


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
    info: Dict[str, Any] = field(default_factory=dict)  # the checkpoint's checked metadata ({} if none)

    @property
    def data(self) -> Dict[str, Any]:
        """The eval transform's settings, and the dataset the model was trained on."""
        return dict(img_size=self.img_size, interpolation=self.interpolation, crop_pct=self.crop_pct,
                    mean=self.mean, std=self.std, dataset=self.info.get('dataset'))


def class_names_for(num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """``names``, else ImageNet-1k's descriptions for 1000 classes, else the indices."""
    if names:
        return list(names)
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _number(value: Any, source: str, key: str, low: float, high: float, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high or (kind is int and value != int(value)):
        raise CheckpointError(f'{source}: {key}={value!r} is not a {kind.__name__} in [{low}, {high}]')
    return kind(value)


def check_data_settings(info: Dict[str, Any], source: str, in_chans: int = 3) -> Dict[str, Any]:
    """The data settings of a file's metadata, checked: ``img_size``, ``crop_pct``, ``interpolation``,
    ``mean``/``std`` (``in_chans`` values each, std > 0), ``class_names`` (strings); absent ones left out."""
    out: Dict[str, Any] = {}
    if info.get('img_size') is not None:
        out['img_size'] = _number(info['img_size'], source, 'img_size', 1, MAX_IMG_SIZE, int)
    if info.get('crop_pct') is not None:
        out['crop_pct'] = _number(info['crop_pct'], source, 'crop_pct', 0.05, 1.0)
    if info.get('interpolation') is not None:
        if info['interpolation'] not in INTERPOLATIONS:
            raise CheckpointError(f'{source}: interpolation={info["interpolation"]!r} is not one of {INTERPOLATIONS}')
        out['interpolation'] = info['interpolation']
    for key, low in (('mean', -10.0), ('std', 1e-6)):
        if info.get(key) is not None:
            values = info[key]
            if not isinstance(values, (list, tuple)) or len(values) != in_chans:
                raise CheckpointError(f'{source}: {key} must be {in_chans} numbers, got {values!r}')
            out[key] = tuple(_number(v, source, key, low, 10.0) for v in values)
    names = info.get('class_names')
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and len(n) <= 1000 for n in names):
            raise CheckpointError(f'{source}: class_names must be a list of strings')
        out['class_names'] = names
    if info.get('dataset') is not None:
        if info['dataset'] not in ('digits', 'folder'):
            raise CheckpointError(f'{source}: dataset={info["dataset"]!r} is not digits or folder')
        out['dataset'] = info['dataset']
    return out


def _checked_shapes(net: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """The model described by the metadata has the file's tensors, by name and shape."""
    own = net.state_dict()
    filtered = net.filter_checkpoint(state_dict) if hasattr(net, 'filter_checkpoint') else state_dict
    wrong = sorted(k for k in set(own) | set(filtered)
                   if k not in own or k not in filtered or own[k].shape != filtered[k].shape)
    if wrong:
        raise CheckpointError(f'{source}: its metadata describes a model that does not fit its tensors '
                              f'({", ".join(wrong[:5])}{" ..." if len(wrong) > 5 else ""})')


def _described(path: Path, model: Optional[str]) -> Dict[str, Any]:
    """What a run file or model folder says of its model, checked; ``model`` overrides its name."""
    source = str(path)
    if path.is_dir():
        folder = read_model_folder(path)
        dataset = (read_run_info(folder['weights']) or {}).get('dataset')  # set by crossformer train
        described = dict(name=folder['architecture'], model_args=folder['model_args'],
                         num_classes=folder['num_classes'], weights=folder['weights'],
                         data=dict(folder['data'], class_names=folder['label_names'], dataset=dataset))
    else:
        raw = read_run_info(existing_file(path, 'checkpoint file')) or {}
        described = dict(name=raw.get('model'), model_args=raw.get('model_kwargs') or {},
                         num_classes=raw.get('num_classes'), weights=path, data=raw)
    if model and model != described['name']:
        described.update(name=model, model_args={}, num_classes=None)
    name = described['name']
    if not name:
        raise ConfigError(f'{path} does not say which model it holds (it was not written by crossformer train): '
                          f'pass --model NAME, e.g. --model crossformer_s')
    if not isinstance(name, str):
        raise CheckpointError(f'{source}: model must be a name, got {name!r}')
    check_variant(name)
    described['model_args'] = check_file_model_args(described['model_args'], source)
    described['data'] = check_data_settings(described['data'], source, in_chans=described['model_args'].get('in_chans', 3))
    return described


def load_trained(checkpoint: PathLike, model: Optional[str] = None, img_size: Optional[int] = None,
                 device: str = 'cpu') -> Loaded:
    """Build the model a checkpoint holds and load it (strictly), in eval mode on ``device``.

    ``checkpoint`` is a weights file or a model folder (``config.json`` + ``model.safetensors``).
    ``model`` is required unless the file was written by this library; when both are given and
    differ, ``model`` wins and the file's model arguments are not used.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise MissingFileError(f'no checkpoint file or model folder at {path}')
    described = _described(path, model)
    name, model_args, data, source = described['name'], described['model_args'], described['data'], str(path)
    state_dict = read_checkpoint(described['weights'])
    head = state_dict.get('head.fc.weight', state_dict.get('head.weight'))
    num_classes = int(head.shape[0]) if head is not None else 0
    if described['num_classes'] is not None and described['num_classes'] != num_classes:
        raise CheckpointError(f'{source}: it says {described["num_classes"]!r} classes, its head has {num_classes}')
    names = data.get('class_names')
    if names is not None and len(names) != num_classes:
        raise CheckpointError(f'{source}: {len(names)} class names for a head of {num_classes} outputs')
    _checked_shapes(create_model(name, num_classes, model_args, device='meta'), state_dict, source)
    net = create_model(name, num_classes, model_args)
    load_checkpoint(net, state_dict)
    norm = default_normalization(name)
    size = img_size or data.get('img_size') or net.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    return Loaded(
        model=net.to(device).eval(),
        class_names=class_names_for(num_classes, names),
        img_size=int(size),
        interpolation=data.get('interpolation') or net.pretrained_cfg.get('interpolation', 'bicubic'),
        crop_pct=float(data.get('crop_pct') or net.pretrained_cfg.get('crop_pct', 0.875)),
        mean=data.get('mean') or norm['mean'],
        std=data.get('std') or norm['std'],
        info=dict(data, model=name),
    )


def _open_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    path = existing_file(image, 'image file')
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f'{path}: not a readable image ({e})') from None
    return image


@torch.no_grad()
def predict(loaded: Loaded, images: Sequence, topk: int = 5, device: str = 'cpu') -> List[List[Tuple[str, float]]]:
    """Top-k ``(class name, probability)`` for each image (a path or a PIL image)."""
    transform = create_transform(input_size=loaded.img_size, interpolation=loaded.interpolation,
                                 crop_pct=loaded.crop_pct, mean=loaded.mean, std=loaded.std)
    results = []
    for image in images:
        x = transform(_open_image(image).convert('RGB')).unsqueeze(0).to(device)
        probs = loaded.model(x).float().softmax(dim=-1)[0]
        values, indices = probs.topk(min(topk, probs.numel()))
        results.append([(loaded.class_names[i], v) for v, i in zip(values.tolist(), indices.tolist())])
    return results
