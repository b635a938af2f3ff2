"""``read_torch_file``: a ``torch.save`` archive read as zip records, a pickle run by our own
machine, and tensors made only after the whole pickle has been checked."""

import os
import re
import sys
from typing import BinaryIO, Dict, Optional

from ..files import PathLike
from .pickle_machine import PickleMachine
from .tensors import replace_specs, storage_views
from .untrusted import FileDefect, is_int, read_exact, read_guarded
from .values import Global, StorageSpec, describe
from .zip_archive import Archive

MAX_PICKLE_BYTES = 64 << 20        # data.pkl of a real checkpoint is a few MB at most
_STORAGE_KEY = re.compile(r'[A-Za-z0-9_.-]{1,64}')


def read_torch_file(path: PathLike, *, max_bytes: Optional[int] = None) -> object:
    """Reads a ``torch.save`` zip archive without unpickling: tensors, containers and configs only.

    Returns what was saved, with each tensor a dense CPU tensor (``requires_grad=False``; a
    ``Parameter`` is read as a plain tensor; views of one storage share it, as saved), each
    ``OrderedDict`` an ``OrderedDict`` (a ``state_dict()``'s ``_metadata`` versions are dropped) and each
    yacs ``CfgNode`` or ``argparse.Namespace`` an :class:`InertConfig`. Storage locations are ignored.
    ``max_bytes`` bounds the total size of the storages; the file's size always does.

    Raises MissingFileError if ``path`` does not exist and CheckpointError for anything else: the legacy
    non-zip format, a compressed, corrupt or truncated archive, or a pickle using an opcode, global or
    call outside the few accepted (the message names it).
    """
    return read_guarded(path, max_bytes, 'torch.save', lambda f: _read_torch(f, max_bytes))


def _read_torch(f: BinaryIO, max_bytes: Optional[int]):
    file_size = os.fstat(f.fileno()).st_size
    if file_size == 0:
        raise FileDefect('the file is empty')
    head = read_exact(f, 0, min(file_size, 512), 'the first bytes')
    if not head.startswith(b'PK\x03\x04'):
        if head[:1] == b'\x80' or (len(head) >= 262 and head[257:262] == b'ustar'):
            raise FileDefect('this is the legacy (non-zip) torch.save format, which is not read; re-save it '
                             'with torch.save in a current PyTorch, or convert it to safetensors')
        raise FileDefect('not a torch.save file (it is not a zip archive)')
    archive = Archive(f, file_size)
    pkl = archive.get('data.pkl')
    if pkl is None:
        raise FileDefect(f'the archive has no {archive.prefix}/data.pkl record; not a torch.save file')
    order = archive.get('byteorder')
    if order is not None and archive.read_small(order, 16) != b'little':
        raise FileDefect('the file was saved on a big-endian machine; only little-endian files are read')
    if sys.byteorder != 'little':
        raise FileDefect('this reader runs on little-endian machines only')
    data = archive.read_small(pkl, MAX_PICKLE_BYTES)

    storages: Dict[str, StorageSpec] = {}

    def storage_spec(pid) -> StorageSpec:
        """The storage a persistent id names, checked against its record in the archive."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], Global)
                and pid[1].role == 'storage' and type(pid[2]) is str and type(pid[3]) is str
                and is_int(pid[4], 0, 1 << 62)):
            raise FileDefect(f'refused persistent id {describe(pid)}: torch.save writes '
                             "('storage', torch.<Type>Storage, key, location, numel)")
        _, cls, key, _, numel = pid
        if not _STORAGE_KEY.fullmatch(key):
            raise FileDefect(f'storage key {describe(key)} is not a plain record name')
        spec = storages.get(key)
        if spec is not None:
            if spec.dtype != cls.dtype or spec.numel != numel:
                raise FileDefect(f'storage {key} is declared twice with different types or sizes')
            return spec
        rec = archive.get(f'data/{key}')
        if rec is None:
            raise FileDefect(f'storage {key} has no record {archive.prefix}/data/{key} in the archive')
        spec = StorageSpec(key, cls.dtype, numel)
        if spec.nbytes != rec.size:
            raise FileDefect(f'storage {key} declares {numel} x {cls.name} ({spec.nbytes} bytes) but its '
                             f'record holds {rec.size} bytes')
        storages[key] = spec
        return spec

    root = PickleMachine(data, storage_spec).run()
    del data
    total = sum(s.nbytes for s in storages.values())
    if total > file_size:
        raise FileDefect(f'the storages declare {total} bytes, more than the file holds ({file_size})')
    if max_bytes is not None and total > max_bytes:
        raise FileDefect(f'the storages hold {total} bytes, more than max_bytes={max_bytes}')
    return replace_specs(root, storage_views(archive))
