"""What every reader shares: opening an untrusted file, exact reads, and one error for its defects.

A reader raises :class:`FileDefect` for anything wrong with the file; :func:`read_guarded` opens the
file and turns that, and the exceptions malformed bytes can raise from the standard library or torch
(:data:`MALFORMED`), into one :class:`~crossformer.errors.CheckpointError` that names the file.
"""

import os
import stat
import struct
import zlib
from typing import BinaryIO, Callable, Optional, TypeVar

from ..errors import CheckpointError, ConfigError, MissingFileError
from ..files import PathLike

MAX_DIMS = 64                      # tensor dimensions
MAX_DIM_SIZE = 1 << 48             # one dimension's size or stride

# Exceptions that malformed data can raise from the standard library or torch while reading; all of
# them become CheckpointError. Anything else is a bug in a reader and keeps its traceback.
MALFORMED = (KeyError, IndexError, TypeError, ValueError, struct.error, UnicodeError, EOFError,
             RecursionError, MemoryError, OverflowError, RuntimeError, OSError, zlib.error)

SCALARS = frozenset({str, int, float, bool, type(None), bytes})

T = TypeVar('T')


class FileDefect(Exception):
    """A defect of the file, described for the user; becomes ``CheckpointError(f'{path}: {message}')``."""


def read_guarded(path: PathLike, max_bytes: Optional[int], kind: str, read: Callable[[BinaryIO], T]) -> T:
    """``read(f)`` on the opened file ``path``, every defect of the file one CheckpointError naming it.

    ``kind`` names the format in the message of a malformed file (``'torch.save'``, ``'safetensors'``).
    Raises ConfigError for a bad ``max_bytes``, MissingFileError if ``path`` does not exist.
    """
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise ConfigError(f'max_bytes must be None or a non-negative int, not {max_bytes!r}')
    name = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(name).st_mode):
            raise CheckpointError(f'{name}: is a directory or special file, not a weights file')
        f = open(name, 'rb', buffering=0)
    except FileNotFoundError:
        raise MissingFileError(f'{name}: no such file') from None
    except OSError as e:
        raise CheckpointError(f'{name}: cannot be opened ({e.strerror or e})') from None
    with f:
        try:
            return read(f)
        except FileDefect as e:
            raise CheckpointError(f'{name}: {e}') from None
        except MALFORMED as e:
            raise CheckpointError(f'{name}: malformed {kind} file ({_short(e)})') from e


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ''
    return f'{type(e).__name__}: {text[:160]}' if text else type(e).__name__


def read_exact(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    """``size`` bytes at ``offset``; a short read is a truncated file."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise FileDefect(f'the file ends inside {what} (truncated)')
    return data


def read_into(f: BinaryIO, offset: int, buf: bytearray, what: str) -> None:
    """Fills ``buf`` from ``offset`` without an intermediate copy; a short read is a truncated file."""
    f.seek(offset)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        k = f.readinto(view[got:])
        if not k:
            raise FileDefect(f'the file ends inside {what} (truncated)')
        got += k


def is_int(x, low: int = 0, high: int = MAX_DIM_SIZE) -> bool:
    """``x`` is an ``int`` (not a bool) in ``[low, high]``."""
    return type(x) is int and low <= x <= high


def describe(obj) -> str:
    """A short description of a value read from a file, for error messages (never a full repr)."""
    if type(obj) in (str, bytes):
        text = repr(obj)
        return text if len(text) <= 40 else text[:37] + '...'
    if type(obj) in SCALARS:
        return repr(obj)
    return f'a {type(obj).__name__}'
