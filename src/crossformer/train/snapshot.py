"""Training snapshots: weights, optimizer state and where training stands, each written atomically.

A snapshot named ``last`` in ``DIR`` is three files (four with EMA):

- ``last.safetensors``: the model's weights, loadable on their own (:func:`crossformer.load_checkpoint`,
  ``crossformer validate``/``predict``). Its metadata (``'crossformer'``, a JSON string) says how
  to rebuild the model and read its outputs: model name and arguments, class names, input size,
  normalization, epoch and step.
- ``last.ema.safetensors``: the EMA weights, same format (only with ``ema: true``).
- ``last.optim.safetensors``: the optimizer's tensors (``state.{param}.{name}``).
- ``last.json``: epoch, step, the config, the optimizer's hyper-parameters, the metrics so far.

``crossformer train`` also writes ``best.safetensors`` (weights only) when validation top-1 improves.

Each file is written to a temporary name and renamed, so a crash never leaves half a file.
The JSON is written last: it names the step, and :func:`load_snapshot` checks that the tensor
files hold that same step, so a crash between two renames is detected rather than mixed.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = ['SnapshotError', 'atomic_write', 'save_weights', 'read_weights_info', 'save_snapshot', 'load_snapshot',
           'snapshot_json_path']

PathLike = Union[str, os.PathLike]
META_KEY = 'crossformer'
FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete or inconsistent."""


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{path.suffix}')
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + '\n'))


def save_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
    """Save a state dict as ``.safetensors`` with ``info`` (JSON-able) in its metadata."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {META_KEY: json.dumps(dict(info)), 'format': 'pt'}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_weights_info(path: PathLike) -> Optional[Dict[str, Any]]:
    """The ``info`` saved by :func:`save_weights`, or None for other files (a converted checkpoint)."""
    path = Path(path)
    if path.suffix != '.safetensors' or not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, state in sd['state'].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f'state.{param}.{name}'] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, dict(param_groups=sd['param_groups'], scalars=scalars)


def _optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param, name = key.split('.', 2)
        state.setdefault(int(param), {})[name] = value
    for param, values in meta['scalars'].items():
        state.setdefault(int(param), {}).update(values)
    groups = [{k: tuple(v) if k == 'betas' else v for k, v in g.items()} for g in meta['param_groups']]
    return dict(state=state, param_groups=groups)


def snapshot_json_path(path: PathLike, name: str = 'last') -> Path:
    """``DIR`` or ``DIR/NAME.json`` or ``DIR/NAME.safetensors`` -> the snapshot's JSON file."""
    path = Path(path)
    if path.is_dir():
        path = path / f'{name}.json'
    elif path.suffix == '.safetensors':
        path = path.with_name(path.name.split('.')[0] + '.json')
    if not path.is_file():
        raise SnapshotError(f'no training snapshot at {path} (expected the {name}.json written by crossformer train)')
    return path


def save_snapshot(directory: PathLike, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  info: Mapping[str, Any], state: Mapping[str, Any],
                  ema: Optional[torch.nn.Module] = None) -> Path:
    """Write ``NAME.safetensors`` (+ ``.ema``, ``.optim``) then ``NAME.json``; returns the JSON path.

    ``info`` goes into the weights' metadata; ``state`` (JSON-able, with ``step``) into the JSON.
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    step = int(state['step'])
    save_weights(directory / f'{name}.safetensors', model.state_dict(), {**info, 'step': step})
    if ema is not None:
        save_weights(directory / f'{name}.ema.safetensors', ema.state_dict(), {**info, 'step': step, 'ema': True})
    tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / f'{name}.optim.safetensors',
                 lambda tmp: save_file(tensors, tmp, metadata={'step': str(step)}))
    return _write_json(directory / f'{name}.json', dict(
        format_version=FORMAT_VERSION, **state, optimizer=optim_meta, ema=ema is not None))


def load_snapshot(path: PathLike) -> Dict[str, Any]:
    """Read a snapshot written by :func:`save_snapshot` (``path``: its directory or JSON file).

    Returns the JSON's content plus ``weights``, ``ema_weights`` (or None) and ``optimizer_state``
    (ready for ``optimizer.load_state_dict``).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    json_path = snapshot_json_path(path)
    state = json.loads(json_path.read_text())
    if state.get('format_version') != FORMAT_VERSION:
        raise SnapshotError(f'{json_path}: unknown snapshot format {state.get("format_version")!r}')
    stem = json_path.with_suffix('')
    files = dict(weights=stem.with_name(stem.name + '.safetensors'),
                 optim=stem.with_name(stem.name + '.optim.safetensors'))
    if state['ema']:
        files['ema_weights'] = stem.with_name(stem.name + '.ema.safetensors')
    for key, file in files.items():
        if not file.is_file():
            raise SnapshotError(f'{json_path}: its {key} file {file.name} is missing')
        with safe_open(str(file), framework='pt') as f:
            meta = f.metadata() or {}
        saved_step = meta.get('step') or json.loads(meta.get(META_KEY, '{}')).get('step')
        if str(saved_step) != str(state['step']):
            raise SnapshotError(f'{file} holds step {saved_step} but {json_path.name} says {state["step"]} '
                                f'(interrupted save?); resume from another snapshot')
    out = dict(state, weights=load_file(str(files['weights'])), ema_weights=None)
    if 'ema_weights' in files:
        out['ema_weights'] = load_file(str(files['ema_weights']))
    out['optimizer_state'] = _optimizer_state(load_file(str(files['optim'])), state['optimizer'])
    out['json_path'] = str(json_path)
    return out
