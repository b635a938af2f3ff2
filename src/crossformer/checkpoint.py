"""Reading checkpoint files safely and loading them into a model.

Pickled ``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, no code. Files written by the reference training script also hold a pickled
yacs ``CfgNode`` (its config), which ``weights_only`` refuses; that one class, and a few other
plain-data config classes, are read into :class:`InertConfig` stand-ins instead of being
imported. Any other pickled object (a function, an arbitrary class) makes the file refused,
before anything in it runs.
"""
import os
import pickle
import types
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
from torch import _weights_only_unpickler, nn

__all__ = ['CheckpointError', 'InertConfig', 'read_checkpoint', 'load_checkpoint', 'convert_checkpoint']

PathLike = Union[str, os.PathLike]

# Pickled classes that hold only configuration and may be read as inert stand-ins.
CONFIG_CLASSES = ('yacs.config.CfgNode', 'argparse.Namespace')


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class InertConfig(dict):
    """Stands in for a pickled config object: keeps its items and attributes, runs nothing."""

    def __setstate__(self, state):
        self.attributes = state


class _ConfigUnpickler(pickle.Unpickler):
    """``weights_only`` rules plus :data:`CONFIG_CLASSES` read as :class:`InertConfig`.

    torch's own ``weights_only`` unpickler cannot fill a dict subclass such as yacs' ``CfgNode``,
    so this one resolves globals itself: torch's allow-list (tensors, storages, plain
    containers) and the config classes; anything else is refused before it is called.
    """

    def find_class(self, module: str, name: str):
        full_name = f'{module}.{name}'
        if full_name in CONFIG_CLASSES:
            return InertConfig
        allowed = _weights_only_unpickler._get_allowed_globals()
        if full_name in allowed:
            return allowed[full_name]
        raise pickle.UnpicklingError(f'refused to load the pickled global {full_name}')


_config_pickle_module = types.SimpleNamespace(
    Unpickler=_ConfigUnpickler, load=lambda f, **kw: _ConfigUnpickler(f, **kw).load(), __name__=__name__)


def _torch_load(path: PathLike) -> object:
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read statically, nothing runs
    refused = sorted(set(unsafe) - set(CONFIG_CLASSES))
    if refused:
        raise CheckpointError(
            f'{path}: refused, the file holds pickled objects that could run code when loaded: {refused}. '
            f'Only tensors, plain containers and config objects ({", ".join(CONFIG_CLASSES)}) are read.')
    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_config_pickle_module)


def read_checkpoint(path: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``.pth`` file, unwrapped from ``model`` / ``state_dict``.

    Keys are returned as stored; :func:`crossformer.checkpoint_filter_fn` maps them to this
    library's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint file at {path}')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = _torch_load(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from e
    for key in ('model', 'state_dict'):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{path}: expected a state dict of tensors (possibly under "model"), got {type(obj).__name__}')
    return dict(obj)


def _short(keys) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')


def load_checkpoint(model: nn.Module, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]]) -> None:
    """Load a checkpoint (a file or a state dict, reference or this layout) into ``model``, strictly.

    The classifier is dropped when the model's differs in shape (another ``num_classes``) and the
    stem adapted to another ``in_chans``, as timm does. Every other key must match in name and
    shape; otherwise :class:`CheckpointError` names the missing, unexpected and mismatched keys
    and the model is left unchanged.
    """
    from timm.models import adapt_input_conv
    from .models.crossformer import checkpoint_filter_fn

    state_dict = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    state_dict = checkpoint_filter_fn(state_dict, model)
    expected = model.state_dict()
    for k in [k for k in state_dict if k.startswith('head.') and k in expected]:
        if state_dict[k].shape != expected[k].shape:
            del state_dict[k]
    optional = {k for k in expected if k.startswith('head.') and k not in state_dict}
    if not any(k.startswith('head.') for k in expected):  # num_classes=0
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    for k, v in list(state_dict.items()):
        if k.startswith('patch_embed.projs.') and k.endswith('.weight') and k in expected \
                and v.ndim == 4 and v.shape[1] != expected[k].shape[1]:
            state_dict[k] = adapt_input_conv(expected[k].shape[1], v)
    missing = set(expected) - set(state_dict) - optional
    unexpected = set(state_dict) - set(expected)
    mismatched = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}'
                  for k in set(state_dict) & set(expected) if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        name = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'state dict'
        parts = [f'{label}: {_short(keys)}' for label, keys in
                 (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if keys]
        raise CheckpointError(f'{name} does not fit this model; ' + '; '.join(parts))
    model.load_state_dict(state_dict, strict=not optional)


def convert_checkpoint(src: PathLike, dst: PathLike, model_name: str = '') -> Dict[str, torch.Tensor]:
    """Convert a reference checkpoint to this library's layout and save it as ``.safetensors``.

    With ``model_name`` (e.g. ``'crossformer_s'``) the result is first loaded strictly into that
    variant, so a file that does not fit fails here rather than later.
    """
    from safetensors.torch import save_file
    from .models.crossformer import checkpoint_filter_fn

    state_dict = checkpoint_filter_fn(read_checkpoint(src), None)
    if model_name:
        import timm
        head = state_dict.get('head.fc.weight')
        model = timm.create_model(model_name, num_classes=head.shape[0] if head is not None else 0)
        load_checkpoint(model, state_dict)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + '.tmp')
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, dst)
    return state_dict
