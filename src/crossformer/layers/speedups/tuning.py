"""Which path each product takes on this host, chosen by timing the candidates where they run.

The first time a product meets a new key (its kind and shape, product dtype, a bucket of its
token count, the thread count), every candidate path runs on the real input, interleaved, and the
fastest is kept; a path other than torch's own (``'default'``) is kept only when it wins by
:data:`TUNING_MARGIN`. Prior art: ``torch.backends.cudnn.benchmark``, FFTW's wisdom.

Choices are held per process (safe under threads) and kept on disk per host in
``$XDG_CACHE_HOME/crossformer/tuning-<host>.json`` (``~/.cache`` without ``XDG_CACHE_HOME``), the
host being the CPU model and flags, torch, oneDNN and the CPU capability torch dispatches. The
environment steers it:

- ``CROSSFORMER_TUNING=off``: no timing; every product takes torch's own path (never slower than
  the definition, which it is).
- ``CROSSFORMER_TUNING_CACHE=/some/folder`` keeps the file there instead; ``=off`` keeps choices
  in the process only.

The file is untrusted input: it is read only up to :data:`MAX_FILE_BYTES`, and a file that is
not exactly what this module writes for this host is ignored with one warning (the process then
tunes afresh): never an error, never a slower model.
"""
import hashlib
import json
import os
import platform
import re
import tempfile
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ['choose', 'run_chosen', 'dtype_name', 'time_paths', 'tuning_enabled', 'tuned_choices', 'clear_tuning',
           'tuning_file', 'host_signature', 'token_bucket', 'PATHS', 'TUNING_MARGIN', 'TUNING_ROUNDS']

PATHS = ('default', 'onednn', 'fp32', 'space_to_depth', 'explicit', 'chunks')  # every path a choice may take
TUNING_MARGIN = 1.05  # a path other than torch's own must be this much faster
TUNING_ROUNDS = 3  # interleaved timed calls of each candidate, the first (with its one-time costs) included
HOPELESS_FIRST = 8.  # a path whose first call took this many times the default's is not timed again
HOPELESS = 1.5  # a path this many times slower than the best after a timed round is timed no more
MAX_FILE_BYTES = 1 << 20
MAX_CHOICES = 20000
FORMAT = 'crossformer-tuning-1'

Key = Tuple  # of str and int: kind, shape, dtype, bucket, threads


def tuning_enabled() -> bool:
    """False where ``CROSSFORMER_TUNING=off``: every product then takes torch's own path."""
    return os.environ.get('CROSSFORMER_TUNING', '').strip().lower() not in ('off', '0', 'false', 'no')


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: products on 129..256 rows share a choice."""
    return 1 << max(0, tokens - 1).bit_length()


@lru_cache(maxsize=None)
def _cpu_description() -> Tuple[str, str]:
    """The CPU's model name and its sorted flags, from ``/proc/cpuinfo`` where there is one."""
    fields: Dict[str, str] = {}
    try:
        with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
            for line in f:
                name, _, value = line.partition(':')
                fields.setdefault(name.strip(), value.strip())
                if 'model name' in fields and 'flags' in fields:
                    break
    except OSError:
        pass
    model = fields.get('model name') or platform.processor() or platform.machine()
    return model, ' '.join(sorted(fields.get('flags', '').split()))


@lru_cache(maxsize=None)
def _onednn_version() -> str:
    found = re.search(r'MKL-DNN v([0-9.]+)', torch.__config__.show())
    return found.group(1) if found else 'none'


def host_signature() -> Dict[str, str]:
    """What makes one host's choices another's: CPU model and flags, torch, oneDNN and the ISA it may use,
    and the CPU capability torch dispatches."""
    model, flags = _cpu_description()
    return {'cpu': model, 'flags': hashlib.sha256(flags.encode()).hexdigest()[:16], 'torch': torch.__version__,
            'onednn': _onednn_version(), 'onednn_isa': os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
            'capability': torch.backends.cpu.get_cpu_capability()}


def tuning_file() -> Optional[Path]:
    """Where this host's choices are kept, or None (``CROSSFORMER_TUNING_CACHE=off``)."""
    folder = os.environ.get('CROSSFORMER_TUNING_CACHE', '').strip()
    if folder.lower() in ('off', '0', 'false', 'no'):
        return None
    if not folder:
        folder = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
                              'crossformer')
    digest = hashlib.sha256(json.dumps(host_signature(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f'tuning-{digest}.json'


def _valid_key(key) -> bool:
    return (isinstance(key, list) and 2 <= len(key) <= 24 and isinstance(key[0], str)
            and all((isinstance(k, str) and 0 < len(k) <= 32 and k.replace('_', '').isalnum())
                    or (type(k) is int and 0 <= k < 2 ** 40) for k in key))


def _read_choices(path: Path) -> Dict[Key, str]:
    """The choices in ``path``; {} with one warning for a file that is not this module's for this host."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        warnings.warn(f'crossformer: ignoring the tuning file {path}: {e.strerror}', stacklevel=4)
        return {}
    with os.fdopen(fd, 'rb') as f:
        data = f.read(MAX_FILE_BYTES + 1)
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f'over {MAX_FILE_BYTES} bytes')
        doc = json.loads(data.decode('utf-8'))
        if not (isinstance(doc, dict) and set(doc) == {'format', 'host', 'choices'} and doc['format'] == FORMAT):
            raise ValueError('not a crossformer tuning file')
        if doc['host'] != host_signature():
            raise ValueError('written for another host')
        choices = doc['choices']
        if not (isinstance(choices, list) and len(choices) <= MAX_CHOICES):
            raise ValueError('no list of choices')
        table = {}
        for entry in choices:
            if not (isinstance(entry, list) and len(entry) == 2 and _valid_key(entry[0]) and entry[1] in PATHS):
                raise ValueError(f'a malformed choice: {str(entry)[:80]}')
            table[tuple(entry[0])] = entry[1]
        return table
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        warnings.warn(f'crossformer: ignoring the tuning file {path}: {e}', stacklevel=4)
        return {}


def _write_choices(path: Path, table: Dict[Key, str]) -> None:
    """Replace ``path`` with ``table`` in one rename; a failure only leaves the choices unsaved."""
    doc = {'format': FORMAT, 'host': host_signature(), 'choices': [[list(k), v] for k, v in table.items()]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.tuning-', suffix='.tmp')
        try:
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _warn_once(f'crossformer: cannot keep tuning choices in {path}: {e.strerror}')


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


class _Choices:
    """The process's choices, loaded from the host's file on first use; safe under threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._table: Dict[Key, str] = {}
        self._timings: Dict[Key, Dict[str, float]] = {}
        self._loaded_from: Optional[Path] = None
        self._loaded = False

    def get(self, key: Key) -> Optional[str]:
        if not self._loaded:
            self._load()
        return self._table.get(key)

    def _load(self) -> None:
        with self._lock:
            if not self._loaded:
                path = tuning_file()
                if path is not None:
                    self._table.update(_read_choices(path))
                self._loaded_from, self._loaded = path, True

    def put(self, key: Key, path: str, timings: Dict[str, float]) -> None:
        with self._lock:
            self._table[key] = path
            self._timings[key] = timings
            if len(self._table) > MAX_CHOICES:  # a stream of odd sizes: oldest first out
                for old in list(self._table)[:len(self._table) - MAX_CHOICES]:
                    del self._table[old]
                    self._timings.pop(old, None)
            table = dict(self._table)
        if self._loaded_from is not None:
            _write_choices(self._loaded_from, table)

    def items(self) -> List[Tuple[Key, str, Dict[str, float]]]:
        with self._lock:
            return [(k, v, dict(self._timings.get(k, {}))) for k, v in self._table.items()]

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._timings.clear()
            self._loaded = False


_choices = _Choices()


def time_paths(paths: Sequence[str], run: Callable[[str], torch.Tensor],
               rounds: int = TUNING_ROUNDS) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
    """The fewest seconds ``run(path)`` took for each path over up to ``rounds`` interleaved calls,
    and each path's last output.

    The minimum, not the median: a product computes the same each time, so whatever else the host
    runs can only add to its time, and a busy neighbour inflates a few calls, rarely all of them.
    The first call also pays what a path does once (packing a weight, oneDNN generating a kernel for
    the shape); it is a round like the others, and the minimum leaves its one-time cost out.

    A path clearly behind stops early: after its first call when that took over
    :data:`HOPELESS_FIRST` times the default's, after a later round when its best is over
    :data:`HOPELESS` times the best so far. Timing ends when one path is left.
    """
    outputs: Dict[str, torch.Tensor] = {}
    timed: Dict[str, List[float]] = {path: [] for path in paths}
    alive = list(paths)
    for round_ in range(rounds):
        if round_ and len(alive) == 1:  # every path has its first call timed
            break
        for path in alive:
            start = time.perf_counter()
            outputs[path] = run(path)
            timed[path].append(time.perf_counter() - start)
        if round_ == 0:  # first calls: only a path hopeless even with its one-time costs counted goes
            alive = [p for p in alive if p == 'default' or timed[p][0] < HOPELESS_FIRST * timed['default'][0]]
        else:
            best = min(min(timed[p]) for p in alive)
            alive = [p for p in alive if min(timed[p]) < HOPELESS * best]
    return {p: min(timed[p]) for p in paths}, outputs


def choose(key: Key, paths: Sequence[str], run: Callable[[str], torch.Tensor],
           rounds: int = TUNING_ROUNDS) -> Tuple[str, Optional[torch.Tensor]]:
    """The path for ``key`` among ``paths`` (``'default'`` first), and, when they were timed just now
    (``run(path)`` computes the product through ``path``), the chosen path's output; else None,
    and the caller runs the path.
    """
    if len(paths) == 1 or not tuning_enabled():
        return 'default', None
    path = _choices.get(key)
    if path is not None and path in paths:
        return path, None
    seconds, outputs = time_paths(paths, run, rounds)
    fastest = min(seconds, key=seconds.get)
    path = fastest if seconds[fastest] * TUNING_MARGIN < seconds['default'] else 'default'
    outputs = {p: out for p, out in outputs.items() if p == path}
    _choices.put(key, path, seconds)
    return path, outputs[path]


def run_chosen(key: Key, paths: Sequence[str], run: Callable[[str], torch.Tensor],
               rounds: int = TUNING_ROUNDS) -> torch.Tensor:
    """``run(path)`` for the path :func:`choose` takes for ``key`` (its output from the timing, when
    it was timed just now)."""
    path, out = choose(key, paths, run, rounds)
    return out if out is not None else run(path)


def dtype_name(dtype: torch.dtype) -> str:
    """``'float32'`` for ``torch.float32``: a dtype as a key holds it."""
    return str(dtype).rpartition('.')[2]


def tuned_choices() -> List[Tuple[Key, str, Dict[str, float]]]:
    """Every choice of this process: ``(key, path, fewest seconds per candidate)`` (no timings for
    choices read from the host's file)."""
    return _choices.items()


def clear_tuning() -> None:
    """Forget this process's choices; the next product of each key reads the host's file again,
    or is timed again."""
    _choices.clear()
