"""Training snapshots: a folder per snapshot, written whole or not at all; ``--resume`` picks the newest complete one.

``crossformer train`` keeps its snapshots in ``RUN/snapshots/``, one folder per optimizer step::

    RUN/snapshots/step-00000088/
        weights.safetensors    the model's weights, loadable on their own (crossformer validate/predict);
                               metadata: model name and arguments, class names, input size, epoch, step
        ema.safetensors        the EMA weights, same format (only with ``ema: true``)
        optimizer.safetensors  the optimizer's tensors (``state.{param}.{name}``)
        state.json             epoch, step, config, optimizer hyper-parameters, metrics so far and,
                               for a snapshot taken inside an epoch, where in the epoch and the RNG states
        manifest.json          every other file's size and SHA-256, written last

A snapshot is written into ``.step-00000088.tmp/``; every file and the folder are ``fsync``-ed,
the folder is renamed to its final name and ``snapshots/`` is ``fsync``-ed
(:func:`~crossformer.files.atomic_directory`). Only then are older snapshots removed, keeping the
newest :data:`KEEP` (a removed one is first renamed to a dot name, so no half-removed folder keeps
a snapshot's name). Whatever instant a process dies at, ``snapshots/`` holds the previous complete
snapshot, and maybe the new one; names starting with a dot are leftovers and are ignored (and
removed by the next save).

:func:`find_snapshots` lists the candidates newest first, each complete or with the reason it is
not; :func:`load_snapshot` loads the newest one whose files match its manifest. A run written
before snapshot folders existed (``RUN/last.json``, ``last.safetensors``, ``last.optim.safetensors``)
still loads, when ``snapshots/`` holds no complete snapshot.

``crossformer train`` also makes ``RUN`` a Hub model folder (:mod:`crossformer.hub`): the weights of
the best epoch as ``model.safetensors``, with ``config.json`` and ``README.md``.
"""
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointError, WriteError
from ..files import PathLike, atomic_directory, atomic_write, remove_tree
from ..readers import read_safetensors_file
from ..weights import read_metadata, read_run_info, save_run_weights, save_weights

__all__ = ['SnapshotError', 'Candidate', 'save_snapshot', 'load_snapshot', 'find_snapshots', 'read_snapshot_state',
           'SNAPSHOTS_DIR', 'KEEP']

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: the legacy last.* files
SNAPSHOTS_DIR = 'snapshots'
KEEP = 2
WEIGHTS, EMA, OPTIMIZER, STATE, MANIFEST = ('weights.safetensors', 'ema.safetensors', 'optimizer.safetensors',
                                            'state.json', 'manifest.json')
_FILES = (WEIGHTS, EMA, OPTIMIZER, STATE)  # the only names a manifest may list
_NAME = re.compile(r'step-(\d{8,})')
MAX_JSON_BYTES = 64 << 20


class SnapshotError(CheckpointError):
    """A snapshot that is missing, incomplete or inconsistent."""


@dataclass
class Candidate:
    """A folder in ``snapshots/``: its step, and why it cannot be used (``None``: complete)."""
    path: Path
    step: int
    problem: Optional[str] = None


def snapshot_name(step: int) -> str:
    return f'step-{step:08d}'


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + '\n'))


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise SnapshotError(f'{path}: larger than {MAX_JSON_BYTES} bytes')
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f'{path}: not JSON ({e})') from None


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


# ---- writing -------------------------------------------------------------------------------------

def save_snapshot(run_dir: PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  info: Mapping[str, Any], state: Mapping[str, Any], ema: Optional[torch.nn.Module] = None,
                  keep: int = KEEP) -> Path:
    """Write ``RUN/snapshots/step-N/`` whole (see the module's docstring), then keep the newest ``keep``.

    ``info`` goes into the weights' metadata; ``state`` (JSON-able, with ``step``) into ``state.json``.
    Returns the snapshot's folder. A full disk or an unwritable folder raises
    :class:`~crossformer.files.WriteError`; the temporary folder is removed and the snapshots
    already there are untouched.
    """
    root = Path(run_dir) / SNAPSHOTS_DIR
    step = int(state['step'])
    final = root / snapshot_name(step)
    target = root / f'.{final.name}.new' if final.exists() else final  # the same step again: swapped in below
    try:
        if target != final:
            remove_tree(target)  # left by a killed swap
        with atomic_directory(target) as tmp:
            save_run_weights(tmp / WEIGHTS, model.state_dict(), {**info, 'step': step})
            if ema is not None:
                save_run_weights(tmp / EMA, ema.state_dict(), {**info, 'step': step, 'ema': True})
            tensors, optim_meta = _optimizer_tensors(optimizer)
            save_weights(tmp / OPTIMIZER, tensors, {'step': str(step)})
            _write_json(tmp / STATE, dict(format_version=FORMAT_VERSION, **state, optimizer=optim_meta,
                                          ema=ema is not None))
            files = {p.name: dict(bytes=p.stat().st_size, sha256=_sha256(p)) for p in sorted(tmp.iterdir())}
            _write_json(tmp / MANIFEST, dict(format_version=FORMAT_VERSION, step=step, files=files))
        if target != final:
            _remove_snapshot(final)  # the older snapshots stay complete meanwhile
            os.rename(target, final)
    except OSError as e:  # WriteError included
        kept = [c.path.name for c in find_snapshots(run_dir) if c.problem is None]
        reason = str(e) if isinstance(e, WriteError) else f'cannot write {final}: {e.strerror or e}'
        raise WriteError(f'{reason}; snapshot {final.name} not saved, '
                         f'{"kept " + ", ".join(kept) if kept else "no earlier snapshot"}') from e
    try:
        _prune(root, keep)
    except OSError as e:
        _logger.warning(f'{root}: could not remove older snapshots ({e})')
    return final


def _remove_snapshot(path: Path) -> None:
    """Rename to a dot name first, so a half-removed folder never keeps a snapshot's name."""
    trash = path.with_name(f'.{path.name}.trash')
    remove_tree(trash)
    os.rename(path, trash)
    remove_tree(trash)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete snapshots; remove older ones and the leftovers of killed saves.

    Incomplete folders under a snapshot's name (not written by this code) are left for the user."""
    for c in [c for c in find_snapshots(root.parent) if c.problem is None][keep:]:
        _remove_snapshot(c.path)
    for entry in root.iterdir():
        if entry.name.startswith('.'):
            remove_tree(entry)


# ---- reading -------------------------------------------------------------------------------------

def _check_complete(path: Path, step: int) -> Optional[str]:
    """Why ``path`` is not a complete snapshot of ``step`` (sizes only), or None."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f'no {MANIFEST} (an interrupted save)'
    try:
        manifest = _read_json(manifest_path)
    except SnapshotError as e:
        return str(e).split(': ', 1)[-1]
    files = manifest.get('files') if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get('step') != step or manifest.get('format_version') != FORMAT_VERSION:
        return f'{MANIFEST} does not describe a format-{FORMAT_VERSION} snapshot of step {step}'
    for name in (WEIGHTS, OPTIMIZER, STATE):
        if name not in files:
            return f'{MANIFEST} does not list {name}'
    for name, entry in files.items():
        if name not in _FILES or not isinstance(entry, dict):
            return f'{MANIFEST} lists an unknown file {name!r}'
        file = path / name
        if not file.is_file():
            return f'{name} is missing'
        if file.stat().st_size != entry.get('bytes'):
            return f'{name} has {file.stat().st_size} bytes, {MANIFEST} says {entry.get("bytes")}'
    return None


def find_snapshots(run_dir: PathLike) -> List[Candidate]:
    """The folders of ``RUN/snapshots/`` named like a snapshot, newest first, each checked by size."""
    root = Path(run_dir) / SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            step = int(match.group(1))
            found.append(Candidate(entry, step, _check_complete(entry, step)))
    return sorted(found, key=lambda c: -c.step)


def _describe_folder(run_dir: Path) -> str:
    root = run_dir / SNAPSHOTS_DIR
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if names:
        return f'{SNAPSHOTS_DIR}/ holds {", ".join(names)}'
    return f'no {SNAPSHOTS_DIR}/ folder' if not root.is_dir() else f'{SNAPSHOTS_DIR}/ is empty'


def _legacy_json(path: Path) -> Optional[Path]:
    """The ``last.json`` of a run written before snapshot folders, for ``path`` (run folder or one of its files)."""
    if path.is_dir():
        return path / 'last.json' if (path / 'last.json').is_file() else None
    if path.suffix in ('.json', '.safetensors') and not _NAME.fullmatch(path.parent.name):
        json_path = path.with_name(path.name.split('.')[0] + '.json')
        return json_path if json_path.is_file() else None
    return None


def _resolve(path: PathLike) -> Tuple[List[Candidate], Optional[Path], Path]:
    """``(candidates newest first, legacy last.json or None, run folder)`` for a ``--resume`` argument.

    ``path``: a run folder, one snapshot folder (or a file in it), or a legacy ``last.json``.
    """
    path = Path(path)
    folder = path.parent if path.is_file() and _NAME.fullmatch(path.parent.name) else path
    match = _NAME.fullmatch(folder.name)
    if match and folder.parent.name == SNAPSHOTS_DIR and folder.is_dir():  # one snapshot, by name
        step = int(match.group(1))
        return [Candidate(folder, step, _check_complete(folder, step))], None, folder.parent.parent
    if path.is_dir():
        candidates = find_snapshots(path)
        if any(c.problem is None for c in candidates):
            return candidates, None, path
        legacy = _legacy_json(path)
        if legacy is not None:
            return candidates, legacy, path
        skipped = '; '.join(f'{c.path.name}: {c.problem}' for c in candidates)
        raise SnapshotError(f'no {"complete " if candidates else ""}training snapshot in {path}: '
                            f'{_describe_folder(path)}' + (f' ({skipped})' if skipped else '')
                            + f' (crossformer train writes {SNAPSHOTS_DIR}/step-N/)')
    legacy = _legacy_json(path)
    if legacy is not None:
        return [], legacy, legacy.parent
    raise SnapshotError(f'no training snapshot at {path} (give the run folder written by crossformer train, '
                        f'or one of its {SNAPSHOTS_DIR}/step-N folders)')


def read_snapshot_state(path: PathLike) -> Tuple[Dict[str, Any], Path]:
    """``(state.json of the snapshot --resume would take, run folder)``; files checked by size only."""
    candidates, legacy, run_dir = _resolve(path)
    for c in candidates:
        if c.problem is None:
            return _read_state(c.path / STATE), run_dir
    if legacy is not None:
        return _read_state(legacy, FORMAT_VERSION - 1), run_dir
    raise _none_usable(run_dir, [(c.path.name, c.problem) for c in candidates])


def _none_usable(run_dir: Path, skipped: List[Tuple[str, Optional[str]]]) -> SnapshotError:
    return SnapshotError(f'no usable training snapshot in {run_dir}: ' + '; '.join(f'{name}: {why}' for name, why in skipped))


def _read_state(json_path: Path, version: int = FORMAT_VERSION) -> Dict[str, Any]:
    state = _read_json(json_path)
    if not isinstance(state, dict) or state.get('format_version') != version:
        found = state.get('format_version') if isinstance(state, dict) else None
        raise SnapshotError(f'{json_path}: unknown snapshot format {found!r}')
    for key in ('epoch', 'step'):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            raise SnapshotError(f'{json_path}: {key} must be an integer >= 0, got {state.get(key)!r}')
    if not isinstance(state.get('config'), dict) or not isinstance(state.get('optimizer'), dict):
        raise SnapshotError(f'{json_path}: expected "config" and "optimizer" objects')
    return state


def _load_folder(c: Candidate) -> Dict[str, Any]:
    """Load one snapshot folder after checking every file against its manifest's SHA-256."""
    manifest = _read_json(c.path / MANIFEST)
    for name, entry in manifest['files'].items():
        if _sha256(c.path / name) != entry.get('sha256'):
            raise SnapshotError(f'{c.path / name}: its SHA-256 differs from {MANIFEST} (a damaged file)')
    state = _read_state(c.path / STATE)
    if state['step'] != c.step:
        raise SnapshotError(f'{c.path / STATE} says step {state["step"]}, the folder {c.step}')
    files = dict(weights=c.path / WEIGHTS, optim=c.path / OPTIMIZER)
    if state.get('ema'):
        if EMA not in manifest['files']:
            raise SnapshotError(f'{c.path}: {STATE} says EMA but {MANIFEST} does not list {EMA}')
        files['ema_weights'] = c.path / EMA
    return _load_tensors(state, files, c.path / STATE)


def _load_tensors(state: Dict[str, Any], files: Dict[str, Path], json_path: Path) -> Dict[str, Any]:
    tensors = {key: read_safetensors_file(file)[0] for key, file in files.items()}
    out = dict(state, weights=tensors['weights'], ema_weights=tensors.get('ema_weights'))
    try:
        out['optimizer_state'] = _optimizer_state(tensors['optim'], state['optimizer'])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SnapshotError(f'{json_path}: the optimizer state does not match its tensors ({e!r})') from None
    out['json_path'] = str(json_path)
    return out


def _load_legacy(json_path: Path) -> Dict[str, Any]:
    """A snapshot of the earlier layout: ``NAME.json`` + ``NAME.safetensors`` (+ ``.ema``, ``.optim``)."""
    state = _read_state(json_path, FORMAT_VERSION - 1)
    stem = json_path.with_suffix('')
    files = dict(weights=stem.with_name(stem.name + '.safetensors'),
                 optim=stem.with_name(stem.name + '.optim.safetensors'))
    if state.get('ema'):
        files['ema_weights'] = stem.with_name(stem.name + '.ema.safetensors')
    for key, file in files.items():
        if not file.is_file():
            raise SnapshotError(f'{json_path}: its {key} file {file.name} is missing')
        meta = read_metadata(file)
        saved_step = meta.get('step') or (read_run_info(file) or {}).get('step')
        if str(saved_step) != str(state['step']):
            raise SnapshotError(f'{file} holds step {saved_step} but {json_path.name} says {state["step"]} '
                                f'(interrupted save?); resume from another snapshot')
    return _load_tensors(state, files, json_path)


def load_snapshot(path: PathLike) -> Dict[str, Any]:
    """Load the snapshot ``--resume path`` means: the newest complete one of a run folder, or the one named.

    Returns the content of ``state.json`` plus ``weights``, ``ema_weights`` (or None),
    ``optimizer_state`` (ready for ``optimizer.load_state_dict``), ``json_path`` and ``skipped``:
    ``(name, reason)`` of every newer snapshot passed over.
    """
    candidates, legacy, run_dir = _resolve(path)
    skipped: List[Tuple[str, Optional[str]]] = []
    for c in candidates:
        if c.problem is None:
            try:
                return dict(_load_folder(c), skipped=skipped)
            except CheckpointError as e:
                skipped.append((c.path.name, str(e)))
        else:
            skipped.append((c.path.name, c.problem))
    if legacy is not None:
        return dict(_load_legacy(legacy), skipped=skipped)
    raise _none_usable(run_dir, skipped)
