"""Small helpers every room uses: path types, atomic writes, name suggestions."""
import difflib
import os
from pathlib import Path
from typing import Callable, Sequence, Union

from .errors import MissingFileError

__all__ = ['PathLike', 'atomic_write', 'existing_file', 'did_you_mean']

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``: never half a file."""
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
