"""Weight files: read, validate, load into a model, save. Knows nothing of CrossFormer.

A model that knows the layouts of its checkpoints offers ``model.filter_checkpoint(state_dict)``
(CrossFormer maps the reference implementation's layout with it); :func:`load_checkpoint` calls
it, or the ``filter_fn`` it is given.

What loading promises, for a file from anywhere:
- no code runs: ``.safetensors`` holds only tensors; ``.pth`` is read by
  :func:`crossformer.readers.read_torch_file`, whose every pickle opcode and global is allowed
  on purpose (tensors, plain containers, configs read as inert dicts);
- memory is bounded before anything is allocated: the tensors declared by a file may not
  exceed the file's size, nor, when loading into a model, :data:`MAX_BYTES_PER_MODEL_BYTE`
  times the model's fp32 size (a training checkpoint also holds the optimizer's state);
- every tensor is checked before the model is touched: CPU, dense, strided, not quantized, a
  float where the model has a float (cast to the model's dtype), the model's shape, one per
  name, finite (NaN or inf is an error);
- the model is changed all at once or not at all;
- every problem is one :class:`~crossformer.errors.CheckpointError` naming the file.
"""
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .files import PathLike, atomic_write, existing_file
from .readers import read_safetensors_file, read_safetensors_metadata, read_torch_file

__all__ = ['read_checkpoint', 'read_metadata', 'load_checkpoint', 'save_weights', 'validate_tensors',
           'save_run_weights', 'read_run_info', 'RUN_INFO_KEY', 'MAX_BYTES_PER_MODEL_BYTE', 'max_checkpoint_bytes',
           'max_bytes_for_values']

StateDict = Dict[str, torch.Tensor]
FilterFn = Callable[[StateDict], StateDict]

# A training checkpoint holds the weights and the optimizer's (AdamW: two more copies), maybe in fp64.
MAX_BYTES_PER_MODEL_BYTE = 4
_WRAPPERS = ('model', 'state_dict')  # where training scripts put the weights inside a checkpoint
RUN_INFO_KEY = 'crossformer'  # metadata key of a weights file written by crossformer train: JSON


def _unwrap(obj: object, name: str) -> StateDict:
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{name}: expected a state dict (possibly under "model"), got {type(obj).__name__}')
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f'{name}: state dict keys must be strings, got {bad_keys[:3]!r}')
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'{name}: expected tensors only, but {not_tensors[:3]} are not')
    return dict(obj)


def validate_tensors(state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Each tensor is on the CPU, dense, strided, not quantized, real (float, int or bool), finite."""
    for k, v in state_dict.items():
        if v.device.type != 'cpu' or v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f'{name}: {k} is not a dense CPU tensor ({v.layout}, {v.device}, {v.dtype})')
        if v.is_complex():
            raise CheckpointError(f'{name}: {k} is complex ({v.dtype}); weights are real')
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f'{name}: {k} holds NaN or infinite values')


def read_checkpoint(path: PathLike, max_bytes: Optional[int] = None) -> StateDict:
    """The state dict in a ``.safetensors`` or ``.pth`` file, unwrapped from ``model`` / ``state_dict``.

    Keys are returned as stored; tensors are checked (:func:`validate_tensors`). ``max_bytes``
    bounds the bytes of tensors the file may declare (besides the file's own size).
    """
    path = existing_file(path, 'checkpoint file')
    if path.suffix == '.safetensors':
        obj, _ = read_safetensors_file(path, max_bytes=max_bytes)
    else:
        obj = read_torch_file(path, max_bytes=max_bytes)
    state_dict = _unwrap(obj, str(path))
    validate_tensors(state_dict, str(path))
    return state_dict


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a ``.safetensors`` file (its header, checked); ``{}`` for other files."""
    path = existing_file(path, 'checkpoint file')
    return read_safetensors_metadata(path) if path.suffix == '.safetensors' else {}


def save_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Save ``state_dict`` as ``.safetensors`` (CPU, contiguous copies) with string ``metadata``, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = dict(metadata or {}, format='pt')
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_run_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
    """Save a state dict as ``.safetensors`` with ``info`` (JSON-able) under :data:`RUN_INFO_KEY`."""
    return save_weights(path, state_dict, {RUN_INFO_KEY: json.dumps(dict(info))})


def read_run_info(path: PathLike) -> Optional[Dict[str, Any]]:
    """The ``info`` saved by :func:`save_run_weights`, or None for other files (a converted checkpoint).

    Untrusted data: callers check every value before use (see :mod:`crossformer.predict`).
    """
    text = read_metadata(path).get(RUN_INFO_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f'{path}: its {RUN_INFO_KEY!r} metadata is not JSON ({e})') from None
    if not isinstance(info, dict):
        raise CheckpointError(f'{path}: its {RUN_INFO_KEY!r} metadata is not a JSON object')
    return info


def _short(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')


def max_checkpoint_bytes(model: nn.Module) -> int:
    """The most tensor bytes a file loaded into ``model`` may declare (:func:`max_bytes_for_values`)."""
    return max_bytes_for_values(sum(t.numel() for t in model.state_dict().values()))


def max_bytes_for_values(values: int) -> int:
    """The most tensor bytes a file for a model of ``values`` numbers may declare: :data:`MAX_BYTES_PER_MODEL_BYTE`
    times its fp32 size, plus 64 MiB for small models' optimizer state and metadata."""
    return MAX_BYTES_PER_MODEL_BYTE * 4 * values + 2 ** 26


def load_checkpoint(
        model: nn.Module,
        checkpoint: Union[PathLike, Mapping[str, torch.Tensor]],
        filter_fn: Optional[FilterFn] = None,
        only: Optional[Sequence[str]] = None,
) -> None:
    """Load a checkpoint (a file or a state dict) into ``model``, strictly, all at once or not at all.

    Args:
        checkpoint: a ``.safetensors`` or ``.pth`` file, or a state dict.
        filter_fn: maps the file's keys to the model's; default ``model.filter_checkpoint`` if
            the model has one, else none.
        only: key prefixes to load (e.g. ``('patch_embed.', 'layers.')``); the file's other keys
            are ignored. Every key of the model under them must be in the file.
    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys, or the tensor that
            is not a finite dense CPU tensor of the model's kind; the model is left unchanged.
    """
    is_file = isinstance(checkpoint, (str, Path)) or hasattr(checkpoint, '__fspath__')
    name = str(checkpoint) if is_file else 'state dict'
    if is_file:
        state_dict = read_checkpoint(checkpoint, max_bytes=max_checkpoint_bytes(model))
    else:
        state_dict = _unwrap(checkpoint, name)
        validate_tensors(state_dict, name)
    filter_fn = filter_fn or getattr(model, 'filter_checkpoint', None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict)
    expected = model.state_dict()
    if only is not None:
        prefixes = tuple(only)
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    missing = [k for k in expected if k not in state_dict and (only is None or k.startswith(tuple(only)))]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}'
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f'{label}: {_short(keys)}' for label, keys in
                 (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if keys]
        raise CheckpointError(f'{name} does not fit this model; ' + '; '.join(parts))
    prepared = {}
    for k, v in state_dict.items():
        target = expected[k]
        if target.is_floating_point() != v.is_floating_point() or (not v.is_floating_point() and v.dtype != target.dtype):
            raise CheckpointError(f'{name}: {k} is {v.dtype} but the model holds {target.dtype}')
        prepared[k] = v.to(device=target.device, dtype=target.dtype)
    model.load_state_dict(prepared, strict=only is None)
