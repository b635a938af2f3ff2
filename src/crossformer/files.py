"""Small helpers every room uses: path types, atomic and durable writes, name suggestions.

A write here is *atomic*: readers see the old content or the new one, never a mix, because the
new content goes to a temporary name that is renamed over the old one. It is also *durable*:
the new file is ``fsync``-ed before the rename and its directory after, so a power loss after
the call returns keeps the new content. A failed write (a full disk, a read-only folder) raises
:class:`WriteError`, removes its temporary files and leaves the old content as it was.
"""
import difflib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, Set, Union

from safetensors import SafetensorError

from .errors import MissingFileError, WriteError

__all__ = ['PathLike', 'atomic_write', 'atomic_directory', 'fsync_path', 'remove_tree',
           'existing_file', 'did_you_mean']

PathLike = Union[str, os.PathLike]
_BUILDING: Set[Path] = set()  # folders being filled inside atomic_directory


def _write_error(path: Path, e: BaseException) -> WriteError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return WriteError(f'cannot write {path}: {reason}')


def _is_io_error(e: BaseException) -> bool:
    """An ``OSError``, or safetensors' wrapping of one (its writer reports I/O errors as SafetensorError)."""
    return isinstance(e, OSError) or (isinstance(e, SafetensorError) and 'I/O error' in str(e))


def fsync_path(path: PathLike, directory: bool = False) -> None:
    """Flush a file's content, or a directory's entries, to the disk (directories: not on Windows)."""
    if directory and os.name == 'nt':
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: PathLike) -> None:
    """Remove a file or folder if it exists (errors ignored: leftovers are retried later)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def _io_errors_as_write_error(path: Path) -> Iterator[None]:
    """An I/O error (full disk, no permission) in the block becomes :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not _is_io_error(e):
            raise
        raise _write_error(path, e) from e


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, ``fsync`` it, rename it to ``path``, ``fsync`` the folder.

    Never half a file, and the new one survives a power loss once this returns. A failure raises
    :class:`WriteError`: the temporary file is removed and ``path`` keeps its old content.
    Inside a folder that :func:`atomic_directory` is filling, the file is written in place: that
    folder's rename makes it atomic, its ``fsync`` durable.
    """
    path = Path(path)
    in_place = path.parent in _BUILDING
    tmp = path if in_place else path.with_name(f'.{path.name}.tmp{path.suffix}')
    try:
        with _io_errors_as_write_error(path):
            if not in_place:
                path.parent.mkdir(parents=True, exist_ok=True)
            write(str(tmp))
            if not in_place:
                fsync_path(tmp)
                os.replace(tmp, path)
                fsync_path(path.parent, directory=True)
    finally:
        if not in_place:
            remove_tree(tmp)
    return path


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Fill a fresh temporary folder, then make it ``path`` in one rename: all its files or none.

    Inside the ``with`` block write the files into the yielded folder. On a clean exit every file
    and the folder are ``fsync``-ed, the folder is renamed to ``path`` (which must not exist) and
    the parent is ``fsync``-ed. On an error the temporary folder is removed and nothing is renamed;
    an I/O error becomes :class:`WriteError`.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        with _io_errors_as_write_error(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(tmp)  # left by a killed process
            tmp.mkdir()
            _BUILDING.add(tmp)
            yield tmp
            for file in sorted(tmp.iterdir()):
                fsync_path(file)
            fsync_path(tmp, directory=True)
            os.rename(tmp, path)
            fsync_path(path.parent, directory=True)
    finally:
        _BUILDING.discard(tmp)
        remove_tree(tmp)


def existing_file(path: PathLike, what: str = 'file') -> Path:
    """``path`` as a Path if it is a file, else :class:`~crossformer.errors.MissingFileError`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'no {what} at {path}')
    return path


def did_you_mean(name: str, known: Sequence[str], cutoff: float = 0.6) -> str:
    """``'; did you mean a, b?'`` with the close matches of ``name`` among ``known``, else ``''``."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=cutoff)
    return f'; did you mean {", ".join(close)}?' if close else ''
