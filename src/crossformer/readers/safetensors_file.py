"""``read_safetensors_file`` and ``read_safetensors_metadata``: a safetensors header checked in full
before any tensor is read."""

import json
import math
import os
import struct
from typing import BinaryIO, Dict, Optional, Tuple

import torch

from ..files import PathLike
from .tensors import tensor_from
from .untrusted import MAX_DIMS, FileDefect, describe, is_int, read_exact, read_guarded, read_into

MAX_SAFETENSORS_HEADER = 100_000_000
_SAFETENSORS_DTYPES = {
    'F32': torch.float32, 'F64': torch.float64, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}


def read_safetensors_file(path: PathLike, *, max_bytes: Optional[int] = None
                          ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads a safetensors file after checking its header in full: ``(tensors, metadata)``.

    The header must be a UTF-8 JSON object (no duplicate keys) whose entries each give a dtype among
    F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL, a shape of non-negative ints and ``data_offsets``
    ``[begin, end]`` with ``end - begin`` equal to the shape's byte size; the entries must tile the data
    section exactly (no overlap, gap or out-of-bounds range), and ``__metadata__``, if present, must map
    str to str. ``max_bytes`` bounds the data section. Tensors are dense CPU tensors in header order, each
    with its own memory; metadata is ``{}`` when absent.

    Raises MissingFileError if ``path`` does not exist and CheckpointError for any defect of the file.
    """
    return read_guarded(path, max_bytes, 'safetensors', lambda f: _read_safetensors(f, max_bytes))


def read_safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata of a safetensors file, its header checked in full as :func:`read_safetensors_file`
    does, without reading any tensor."""
    return read_guarded(path, None, 'safetensors', lambda f: _read_safetensors(f, None, with_tensors=False))[1]


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FileDefect(f'the header names {describe(k)} twice')
        out[k] = v
    return out


def _no_constant(text):
    raise FileDefect(f'the header holds the non-JSON number {text}')


def _read_safetensors(f: BinaryIO, max_bytes: Optional[int], with_tensors: bool = True):
    file_size = os.fstat(f.fileno()).st_size
    if file_size == 0:
        raise FileDefect('the file is empty')
    if file_size < 8:
        raise FileDefect(f'the file holds {file_size} bytes, too few for a safetensors header')
    header_len, = struct.unpack('<Q', read_exact(f, 0, 8, 'the header length'))
    if header_len > MAX_SAFETENSORS_HEADER or header_len > file_size - 8:
        raise FileDefect(f'the header length {header_len} is beyond the file ({file_size} bytes) or over the '
                   f'{MAX_SAFETENSORS_HEADER}-byte limit; not a safetensors file or truncated')
    raw = read_exact(f, 8, header_len, 'the header')
    try:
        header = json.loads(raw.decode('utf-8'), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise FileDefect('the header is not UTF-8; not a safetensors file') from None
    except json.JSONDecodeError as e:
        raise FileDefect(f'the header is not JSON ({e.msg} at character {e.pos}); not a safetensors file') from None
    if type(header) is not dict:
        raise FileDefect('the header is not a JSON object')
    metadata = header.pop('__metadata__', None)
    if metadata is None:
        metadata = {}
    elif type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise FileDefect('__metadata__ must map strings to strings')

    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = []
    for key, info in header.items():
        where = f'tensor {describe(key)}'
        if type(info) is not dict or set(info) != {'dtype', 'shape', 'data_offsets'}:
            raise FileDefect(f'{where}: the entry must have exactly dtype, shape and data_offsets')
        dtype = _SAFETENSORS_DTYPES.get(info['dtype']) if type(info['dtype']) is str else None
        if dtype is None:
            raise FileDefect(f"{where}: dtype {describe(info['dtype'])} is not read (only "
                       f"{', '.join(_SAFETENSORS_DTYPES)})")
        shape, offsets = info['shape'], info['data_offsets']
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(is_int(s) for s in shape):
            raise FileDefect(f'{where}: shape must be a list of at most {MAX_DIMS} non-negative integers')
        if type(offsets) is not list or len(offsets) != 2 or not all(is_int(o, 0, 1 << 62) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise FileDefect(f'{where}: data_offsets must be [begin, end] with 0 <= begin <= end')
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise FileDefect(f'{where}: data_offsets span {end - begin} bytes but shape {shape} of '
                       f"{info['dtype']} needs {nbytes}")
        if end > data_len:
            raise FileDefect(f'{where}: data_offsets [{begin}, {end}] run past the data ({data_len} bytes)')
        entries.append((begin, end, key, dtype, shape))
    covered = 0
    for begin, end, key, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < covered:
            raise FileDefect(f'tensor {describe(key)} overlaps another tensor')
        if begin > covered:
            raise FileDefect(f'a gap of {begin - covered} unaccounted bytes lies before tensor {describe(key)}')
        covered = end
    if covered != data_len:
        raise FileDefect(f'{data_len - covered} bytes after the last tensor are not accounted for')
    if max_bytes is not None and data_len > max_bytes:
        raise FileDefect(f'the tensors hold {data_len} bytes, more than max_bytes={max_bytes}')

    tensors: Dict[str, torch.Tensor] = {}
    for begin, end, key, dtype, shape in entries if with_tensors else ():
        buf = bytearray(end - begin)
        read_into(f, data_start + begin, buf, f'tensor {describe(key)}')
        tensors[key] = tensor_from(buf, dtype, f'tensor {describe(key)}').reshape(shape)
    return tensors, metadata
