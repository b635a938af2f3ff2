"""Starting weights for fine-tuning: ``crossformer train --pretrained FILE`` (``initial_checkpoint``).

FILE is the paper's ``.pth`` (laid out as its training script writes it), a ``.safetensors``
file, or a model folder written by this library (a ``crossformer train`` run, ``crossformer
convert SRC DIR``). Loading is :func:`crossformer.load_checkpoint`'s (safe, strict, all at once,
memory bounded by the model's size); on top of it, what a user starting a fine-tuning run needs:

- the head follows the data: a head for another number of classes, or for classes of other
  names (a model folder or a run's weights file names its classes), is replaced by a new one, and
  the returned note says so;
- a file of another variant or size fails with one line naming both, before the memory bound
  speaks: "this file holds crossformer_t (27.8M parameters); the model being trained is ...".
  The file's variant is found by comparing its tensor shapes with each registered variant
  built on the meta device.
"""
import functools
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from ..errors import CheckpointError, MissingFileError
from ..hub import read_model_folder
from ..models import checkpoint_filter_fn, variant_names
from ..models.crossformer import PAPER_RESULTS
from ..weights import load_checkpoint, max_bytes_for_values, max_checkpoint_bytes, read_checkpoint, read_run_info

__all__ = ['load_pretrained', 'describe_model', 'published_note', 'identify_variant']

StateDict = Dict[str, torch.Tensor]
_HEAD = 'head.'


def describe_model(name: str, model_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """``'crossformer_s'``, or ``'crossformer_t with embed_dim=32, depths=[2, 1, 2, 1]'``."""
    if not model_kwargs:
        return name
    return f'{name} with ' + ', '.join(f'{k}={v}' for k, v in model_kwargs.items())


def published_note(name: str, model_kwargs: Optional[Mapping[str, Any]]) -> str:
    """For the banner: how a model with ``model_kwargs`` stands to the published variant ``name``."""
    paper = PAPER_RESULTS.get(name)
    if not model_kwargs or paper is None:
        return ''
    return f' (model_kwargs change it: the published {name} has {paper["params_m"]}M params)'


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape in this library's layout, without the head (it follows the data, not the variant)."""
    return {k: tuple(v.shape) for k, v in _without_head(state_dict).items()}


@functools.lru_cache(maxsize=None)
def _variant_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    """The published variant's key -> shape, head aside (built on the meta device: shapes only)."""
    return _shapes(timm.create_model(name, device='meta').state_dict())


def identify_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered variant whose tensors (head aside) have exactly the shapes of ``state_dict``, or None.

    Variants are tried nearest parameter count first (the papers' counts), so a match is usually the first built.
    """
    shapes, params = _shapes(state_dict), _params(state_dict)
    nearest = sorted(variant_names(), key=lambda n: abs(PAPER_RESULTS.get(n, {}).get('params_m', 0) * 1e6 - params))
    for name in nearest:
        if _variant_shapes(name) == shapes:
            return name
    return None


def _params(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in checkpoint_filter_fn(dict(state_dict)).values() if v.is_floating_point())


def _head_classes(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    head = checkpoint_filter_fn(dict(state_dict)).get('head.fc.weight')
    return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def _largest_variant_bytes() -> int:
    """The largest variant's memory bound (the papers' counts): what reading a file to name its variant may take."""
    return max_bytes_for_values(int(max(r['params_m'] for r in PAPER_RESULTS.values()) * 1e6))


def _mismatch(source: str, weights: Path, state_dict: Optional[StateDict], model: nn.Module,
              description: str, folder: Optional[Dict[str, Any]]) -> Optional[str]:
    """The one-line error for a file of another variant or size than ``model``, or None if it is not that."""
    if state_dict is None:  # the read failed (the model's memory bound, say): read within the largest variant's
        try:
            state_dict = read_checkpoint(weights, max_bytes=_largest_variant_bytes())
        except CheckpointError:
            return None
    if _shapes(state_dict) == _shapes(model.state_dict()):
        return None  # the same model: the error is about something else
    held = identify_variant(state_dict)
    if held is not None:
        what, hint = held, f'add model={held} to train it, or '
    elif folder is not None:
        what = describe_model(folder['architecture'], folder['model_args'])
        hint = f'add model={folder["architecture"]} and model_kwargs.KEY=VALUE for these to train it, or '
    else:
        what, hint = 'a model of no published CrossFormer variant', ''
    mine = sum(p.numel() for p in model.parameters())
    return (f'{source}: this file holds {what} ({_params(state_dict) / 1e6:.1f}M parameters); the model being '
            f'trained is {description} ({mine / 1e6:.1f}M): {hint}pass a file of {description}')


def load_pretrained(model: nn.Module, path, description: str, class_names: Optional[Sequence[str]] = None) -> str:
    """Load the weights in ``path`` into ``model`` (head replaced if it does not fit); returns a log line.

    Args:
        path: the paper's ``.pth``, a ``.safetensors`` file or a model folder.
        description: the model being trained, for messages (:func:`describe_model`).
        class_names: the classes being trained; a file that names other classes gets a new head.
    Raises:
        CheckpointError: one line; for a file of another variant or size it names both.
    """
    source = Path(path)
    if not source.exists():
        raise MissingFileError(f'no pretrained weights at {source} (a .pth or .safetensors file, or a model folder)')
    folder = read_model_folder(source) if source.is_dir() else None
    weights = Path(folder['weights']) if folder is not None else source
    state_dict = None
    try:
        state_dict = read_checkpoint(weights, max_bytes=max_checkpoint_bytes(model))
        file_names = _class_names(folder, weights)
        other_classes = file_names is not None and class_names is not None and list(file_names) != list(class_names)
        # without the file's head the model keeps its own, new one (checkpoint_filter_fn)
        load_checkpoint(model, _without_head(state_dict) if other_classes else state_dict)
    except CheckpointError as error:
        message = _mismatch(str(source), weights, state_dict, model, description, folder)
        if message is not None:
            raise CheckpointError(message) from None
        if state_dict is not None:  # load_checkpoint names a state dict: name the file
            raise CheckpointError(f'{source}: {error}') from None
        raise
    file_classes, classes = _head_classes(state_dict), getattr(model, 'num_classes', None)
    if other_classes:
        head = (f'its head for other classes ({_listed(file_names)}) replaced by a new one for {_listed(class_names)}')
    elif file_classes == classes:
        head = f'its head for {classes} classes loaded'
    elif file_classes is None:
        head = f'it has no head: a new head for {classes} classes'
    else:
        head = f'its head for {file_classes} classes replaced by a new one for {classes}'
    return f'pretrained weights: {source}; {head}'


def _without_head(state_dict: StateDict) -> StateDict:
    return {k: v for k, v in checkpoint_filter_fn(dict(state_dict)).items() if not k.startswith(_HEAD)}


def _class_names(folder: Optional[Dict[str, Any]], weights: Path) -> Optional[List[str]]:
    """The class names a model folder or a ``crossformer train`` weights file gives, else None."""
    names = folder.get('label_names') if folder is not None else None
    if names is None and weights.suffix == '.safetensors':
        names = (read_run_info(weights) or {}).get('class_names')
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names


def _listed(names: Sequence[str], most: int = 5) -> str:
    return ', '.join(names[:most]) + (f' ... ({len(names)})' if len(names) > most else '')
