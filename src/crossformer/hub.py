"""Hugging Face Hub model folders: the layout timm and transformers load, written and read here.

A folder holds three files:

- ``config.json``: ``architecture``, ``num_classes`` and ``label_names`` at the top level,
  ``model_args`` (allow-listed constructor arguments only, never ``num_classes``) and
  ``pretrained_cfg`` (input size, interpolation, crop, mean, std);
- ``model.safetensors``: the weights in this library's layout;
- ``README.md``: a model card with the Hub's metadata block.

``timm.create_model('local-dir:DIR', pretrained=True)`` and
``transformers.TimmWrapperForImageClassification.from_pretrained(DIR)`` read it (after
``import crossformer``); ``timm.models.push_to_hub`` style uploads are the user's call
(``huggingface_hub.upload_folder``). Keeping ``num_classes`` out of ``model_args`` is what lets
both load it: transformers passes ``num_classes`` itself. This library's own commands read a
folder through :func:`read_model_folder`: every field checked, weights through the safe loader.

:func:`write_model_folder` replaces the three files together: it writes them into
``.model-folder.pending.tmp/``, ``fsync``-s them and renames that folder to ``.model-folder.pending/``
(the commit point), then moves each file into place (:func:`finish_model_folder`). A process killed
before the commit point leaves the old folder as it was; one killed after it leaves the pending
folder, whose files the next write (or ``crossformer train --resume``) moves into place, and which
:func:`read_model_folder` refuses to read around.
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .errors import CheckpointError, WriteError
from .files import PathLike, atomic_directory, atomic_write, fsync_path
from .models.crossformer import PAPER_RESULTS, check_file_model_args
from .weights import save_weights

__all__ = ['CONFIG_FILE', 'WEIGHTS_FILE', 'CARD_FILE', 'write_model_folder', 'read_model_folder', 'model_card',
           'is_model_folder', 'finish_model_folder']

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = 'config.json', 'model.safetensors', 'README.md'
PENDING_DIR = '.model-folder.pending'
MAX_CONFIG_BYTES = 1 << 20
_PAPERS = {'crossformer': ('2108.00154', 'CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention'),
           'crossformerpp': ('2303.06908', 'CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention')}


def is_model_folder(path: PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _paper(architecture: str):
    return _PAPERS['crossformerpp' if architecture.startswith('crossformerpp') else 'crossformer']


def model_card(architecture: str, *, dataset: str, num_classes: int, metrics: Optional[Mapping[str, Any]] = None,
               notes: Sequence[str] = ()) -> str:
    """A short model card: the Hub's metadata block (license, library, tags, arXiv ids), the
    variant, the data and the measured ``metrics``; for a converted paper checkpoint pass the
    paper's figures as ``metrics``. Nothing is written that was not given."""
    arxiv, title = _paper(architecture)
    lines = ['---', 'license: mit', 'library_name: timm', 'pipeline_tag: image-classification', 'tags:',
             '- image-classification', '- timm', '- crossformer', f'- arxiv:{arxiv}', '---',
             f'# {architecture} ({dataset})', '',
             f'A {architecture} image classifier with {num_classes} classes, trained on {dataset}, saved by '
             f'the `crossformer` library. Paper: [{title}](https://arxiv.org/abs/{arxiv}).', '']
    if metrics:
        lines += ['## Metrics', ''] + [f'- {k}: {v}' for k, v in metrics.items()] + ['']
    lines += [*(f'{n}' for n in notes), '## Usage', '', '```python', 'import timm', 'import crossformer  # registers the models',
              '', "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', pretrained=True).eval()",
              'config = timm.data.resolve_data_config({}, model=model)',
              'transform = timm.data.create_transform(**config)', '```', '']
    return '\n'.join(lines)


def write_model_folder(directory: PathLike, state_dict: Mapping[str, torch.Tensor], *, architecture: str,
                       model_args: Mapping[str, Any], num_classes: int, data: Mapping[str, Any],
                       label_names: Optional[Sequence[str]] = None, card: Optional[str] = None,
                       metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` (with ``card``) into ``directory``,
    all replaced together (see the module's docstring); a failure leaves the folder as it was.

    ``data``: ``img_size``, ``interpolation``, ``crop_pct``, ``mean``, ``std`` of the eval transform.
    ``model_args`` must pass :func:`~crossformer.models.crossformer.check_file_model_args`.
    """
    directory = Path(directory)
    args = check_file_model_args(dict(model_args), 'model_args')
    in_chans = args.get('in_chans', 3)
    pretrained_cfg = dict(
        input_size=[in_chans, int(data['img_size']), int(data['img_size'])],
        interpolation=data['interpolation'], crop_pct=float(data['crop_pct']), crop_mode='center',
        mean=[float(v) for v in data['mean']], std=[float(v) for v in data['std']],
        num_classes=num_classes, first_conv='patch_embed.projs.0', classifier='head.fc',
        fixed_input_size=False, license='mit', paper_ids=f'arXiv:{_paper(architecture)[0]}',
    )
    config: Dict[str, Any] = dict(architecture=architecture, num_classes=num_classes,
                                  model_args={k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
                                  pretrained_cfg=pretrained_cfg)
    if label_names is not None:
        config['label_names'] = list(label_names)
    finish_model_folder(directory)  # an earlier update that a kill interrupted goes first
    with atomic_directory(directory / PENDING_DIR) as staging:
        save_weights(staging / WEIGHTS_FILE, state_dict, metadata)
        atomic_write(staging / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + '\n'))
        if card is not None:
            atomic_write(staging / CARD_FILE, lambda tmp: Path(tmp).write_text(card))
    finish_model_folder(directory)
    return directory


def _pending(directory: Path) -> Optional[Path]:
    pending = directory / PENDING_DIR
    return pending if pending.is_dir() and not pending.is_symlink() else None


def finish_model_folder(directory: PathLike) -> None:
    """Move the files of a committed update (``.model-folder.pending/``) into place, if there is one."""
    directory = Path(directory)
    pending = _pending(directory)
    if pending is None:
        return
    try:
        for name in (CONFIG_FILE, CARD_FILE, WEIGHTS_FILE):
            if (pending / name).is_file():
                os.replace(pending / name, directory / name)
        fsync_path(directory, directory=True)
        os.rmdir(pending)
        fsync_path(directory, directory=True)
    except OSError as e:
        raise WriteError(f'cannot finish the update of {directory} from {pending.name}/: {e.strerror or e}') from e


def _finite_numbers(values: Any, n: int, source: str, key: str, positive: bool = False) -> List[float]:
    if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in values):
        raise CheckpointError(f'{source}: {key} must be {n} finite numbers{" > 0" if positive else ""}, got {values!r}')
    return [float(v) for v in values]


def read_model_folder(directory: PathLike) -> Dict[str, Any]:
    """The checked content of a model folder's ``config.json``.

    Returns ``architecture``, ``model_args`` (allow-listed), ``num_classes``, ``label_names`` (or
    None), ``data`` (``img_size``, ``interpolation``, ``crop_pct``, ``mean``, ``std``) and
    ``weights`` (the path of ``model.safetensors``). Anything else a file may say
    (``pretrained``, hub ids, files) is refused, not followed.
    """
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    source = str(config_path)
    pending = _pending(directory)
    if pending is not None and any(pending.iterdir()):
        raise CheckpointError(f'{directory}: an update of this folder was interrupted ({PENDING_DIR}/ is there); '
                              f'crossformer train --resume {directory} (or crossformer.hub.finish_model_folder) '
                              f'completes it')
    for path in (config_path, weights):
        if not path.is_file():
            raise CheckpointError(f'{directory}: not a model folder, {path.name} is missing')
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f'{source}: larger than {MAX_CONFIG_BYTES} bytes')
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{source}: not JSON ({e})') from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise CheckpointError(f'{source}: expected an object with an "architecture" name')
    args = dict(config.get('model_args') or {})
    if 'num_classes' in args:  # written by timm's own save_for_hf: it describes the head, like the top level
        if config.get('num_classes', args['num_classes']) != args['num_classes']:
            raise CheckpointError(f'{source}: num_classes differs between the top level and model_args')
        config.setdefault('num_classes', args.pop('num_classes'))
        args.pop('num_classes', None)
    model_args = check_file_model_args(args, source)
    num_classes = config.get('num_classes')
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 <= num_classes <= 100_000:
        raise CheckpointError(f'{source}: num_classes must be an integer in [0, 100000], got {num_classes!r}')
    cfg = config.get('pretrained_cfg') or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f'{source}: pretrained_cfg must be an object')
    in_chans = model_args.get('in_chans', 3)
    size = cfg.get('input_size', [in_chans, 224, 224])
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and 1 <= s <= 8192 for s in size)
            and size[0] == in_chans and size[1] == size[2]):
        raise CheckpointError(f'{source}: input_size must be [{in_chans}, N, N] with 1 <= N <= 8192, got {size!r}')
    crop = cfg.get('crop_pct', 0.875)
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.05 <= crop <= 1.0:
        raise CheckpointError(f'{source}: crop_pct must be in [0.05, 1], got {crop!r}')
    interpolation = cfg.get('interpolation', 'bicubic')
    if interpolation not in ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming'):
        raise CheckpointError(f'{source}: unknown interpolation {interpolation!r}')
    data = dict(img_size=size[1], interpolation=interpolation, crop_pct=float(crop),
                mean=_finite_numbers(cfg.get('mean', [0.485, 0.456, 0.406]), in_chans, source, 'mean'),
                std=_finite_numbers(cfg.get('std', [0.229, 0.224, 0.225]), in_chans, source, 'std', positive=True))
    names = config.get('label_names', cfg.get('label_names'))
    if names is not None:
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f'{source}: label_names must be {num_classes} strings')
    return dict(architecture=config['architecture'], model_args=model_args, num_classes=num_classes,
                label_names=names, data=data, weights=weights)


def paper_metrics(architecture: str) -> Dict[str, str]:
    """The paper's ImageNet-1k figures of a variant, labelled as the paper's, for a converted checkpoint's card."""
    paper = PAPER_RESULTS.get(architecture)
    if paper is None:
        return {}
    return {'ImageNet-1k top-1 at 224 (paper, not measured here)': f'{paper["top1"]}%',
            'params (paper)': f'{paper["params_m"]}M', 'GFLOPs (paper)': f'{paper["gflops"]}'}
