"""Turning what a file declares into tensors, once everything it declares has been checked.

:func:`tensor_from` makes a typed tensor of a buffer read from the file (both readers use it);
:func:`storage_views` reads each storage of a ``torch.save`` archive once and gives each tensor spec
its view; :func:`replace_specs` checks the data a pickle built (no cycle, bounded depth and size,
nothing but plain data) and puts a tensor in place of each spec.
"""

from typing import Callable, Dict

import torch

from .untrusted import SCALARS, FileDefect, read_into
from .values import CONTAINERS, WHAT_IS_READ, InertConfig, StorageSpec, TensorSpec, describe
from .zip_archive import Archive

MAX_DEPTH = 100                    # nesting of the data returned
MAX_NODES = 4_000_000              # nodes of the data returned, counting shared ones each time


def tensor_from(buf: bytearray, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` sharing ``buf``; a bool tensor may hold only bytes 0 and 1."""
    if not buf:
        return torch.empty(0, dtype=dtype)
    if dtype is torch.bool and bool((torch.frombuffer(buf, dtype=torch.uint8) > 1).any()):
        raise FileDefect(f'{what} is a bool tensor holding bytes other than 0 and 1')
    return torch.frombuffer(buf, dtype=dtype)


def storage_views(archive: Archive) -> Callable[[TensorSpec], torch.Tensor]:
    """``make_tensor(spec)``: the spec's view of its storage, each storage read from ``archive`` once
    and each spec made once (views of one storage share it, as saved)."""
    bases: Dict[str, torch.Tensor] = {}
    made: Dict[int, torch.Tensor] = {}

    def make_tensor(spec: TensorSpec) -> torch.Tensor:
        tensor = made.get(id(spec))
        if tensor is None:
            key = spec.storage.key
            base = bases.get(key)
            if base is None:
                base = bases[key] = _load_storage(archive, spec.storage)
            tensor = made[id(spec)] = base.as_strided(spec.size, spec.stride, spec.offset)
        return tensor

    return make_tensor


def _load_storage(archive: Archive, spec: StorageSpec) -> torch.Tensor:
    rec = archive.get(f'data/{spec.key}')
    buf = bytearray(rec.size)
    read_into(archive.f, rec.data_start, buf, f'storage {spec.key}')  # no CRC, as torch.load: it costs 2x
    return tensor_from(buf, spec.dtype, f'storage {spec.key}')


def replace_specs(root, make_tensor: Callable[[TensorSpec], torch.Tensor]):
    """Checks the data a pickle built and replaces tensor specs by tensors.

    Refuses cycles, nesting deeper than MAX_DEPTH, trees that expand (counting a shared container at
    each place it appears) to more than MAX_NODES nodes, and any leftover global or bare storage, so
    that a caller can walk the result recursively without surprises. Specs become ``make_tensor(spec)``.
    """
    done: Dict[int, tuple] = {}         # id -> (nodes below, height, finished object)
    on_path = set()
    total = [0]

    def visit(obj, depth: int):
        total[0] += 1
        t = type(obj)
        if t in SCALARS or t is torch.dtype:
            return obj, 0
        if t is TensorSpec:
            return make_tensor(obj), 0
        if t is not tuple and t not in CONTAINERS:
            raise FileDefect(f'{describe(obj)} appears in the data as a value; {WHAT_IS_READ}')
        oid = id(obj)
        if oid in done:
            nodes, height, new = done[oid]
            total[0] += nodes
            if depth + height > MAX_DEPTH:
                raise FileDefect(f'the data is nested more than {MAX_DEPTH} levels deep')
            if total[0] > MAX_NODES:
                raise FileDefect(f'the data expands to more than {MAX_NODES} values (shared containers)')
            return new, height
        if oid in on_path:
            raise FileDefect('the data contains a container inside itself (a cycle)')
        if depth >= MAX_DEPTH:
            raise FileDefect(f'the data is nested more than {MAX_DEPTH} levels deep')
        on_path.add(oid)
        before = total[0]
        height = 0
        if t is list:
            for i, v in enumerate(obj):
                obj[i], h = visit(v, depth + 1)
                height = max(height, h)
            new = obj
        elif t is tuple:
            items = []
            for v in obj:
                item, h = visit(v, depth + 1)
                items.append(item)
                height = max(height, h)
            new = tuple(items)
        else:
            for mapping in (obj, obj.attributes) if t is InertConfig else (obj,):
                for k, v in list(mapping.items()):
                    mapping[k], h = visit(v, depth + 1)
                    height = max(height, h)
            new = obj
        on_path.discard(oid)
        if total[0] > MAX_NODES:
            raise FileDefect(f'the data expands to more than {MAX_NODES} values (shared containers)')
        done[oid] = (total[0] - before, height + 1, new)
        return new, height + 1

    return visit(root, 0)[0]
