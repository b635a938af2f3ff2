"""Training snapshots: weights, optimizer state and where training stands, each written atomically.

A snapshot named ``last`` in ``DIR`` is three files (four with EMA):

- ``last.safetensors``: the model's weights, loadable on their own (:func:`crossformer.load_checkpoint`,
  ``crossformer validate``/``predict``). Its metadata (``'crossformer'``, a JSON string) says how
  to rebuild the model and read its outputs: model name and arguments, class names, input size,
  normalization, epoch and step.
- ``last.ema.safetensors``: the EMA weights, same format (only with ``ema: true``).
- ``last.optim.safetensors``: the optimizer's tensors (``state.{param}.{name}``).
- ``last.json``: epoch, step, the config, the optimizer's hyper-parameters, the metrics so far.

``crossformer train`` also makes ``DIR`` a Hub model folder (:mod:`crossformer.hub`): the weights of
the best epoch as ``model.safetensors``, with ``config.json`` and ``README.md``.

Each file is written to a temporary name and renamed, so a crash never leaves half a file.
The JSON is written last: it names the step, and :func:`load_snapshot` checks that the tensor
files hold that same step, so a crash between two renames is detected rather than mixed.
"""
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..files import PathLike, atomic_write
from ..readers import read_safetensors_file
from ..weights import read_metadata, read_run_info, save_run_weights, save_weights

__all__ = ['SnapshotError', 'save_snapshot', 'load_snapshot', 'snapshot_json_path']

FORMAT_VERSION = 1


class SnapshotError(CheckpointError):
    """A snapshot that is missing, incomplete or inconsistent."""


def _write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + '\n'))


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
    directory = Path(directory)
    step = int(state['step'])
    save_run_weights(directory / f'{name}.safetensors', model.state_dict(), {**info, 'step': step})
    if ema is not None:
        save_run_weights(directory / f'{name}.ema.safetensors', ema.state_dict(), {**info, 'step': step, 'ema': True})
    tensors, optim_meta = _optimizer_tensors(optimizer)
    save_weights(directory / f'{name}.optim.safetensors', tensors, {'step': str(step)})
    return _write_json(directory / f'{name}.json', dict(
        format_version=FORMAT_VERSION, **state, optimizer=optim_meta, ema=ema is not None))


def load_snapshot(path: PathLike) -> Dict[str, Any]:
    """Read a snapshot written by :func:`save_snapshot` (``path``: its directory or JSON file).

    Returns the JSON's content plus ``weights``, ``ema_weights`` (or None) and ``optimizer_state``
    (ready for ``optimizer.load_state_dict``).
    """
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
        meta = read_metadata(file)
        saved_step = meta.get('step') or (read_run_info(file) or {}).get('step')
        if str(saved_step) != str(state['step']):
            raise SnapshotError(f'{file} holds step {saved_step} but {json_path.name} says {state["step"]} '
                                f'(interrupted save?); resume from another snapshot')
    tensors = {key: read_safetensors_file(file)[0] for key, file in files.items()}
    out = dict(state, weights=tensors['weights'], ema_weights=tensors.get('ema_weights'))
    out['optimizer_state'] = _optimizer_state(tensors['optim'], state['optimizer'])
    out['json_path'] = str(json_path)
    return out
