"""The inert values a ``torch.save`` pickle is read as, besides plain Python data.

The pickle machine puts these on its stack instead of anything that could run: a :class:`Global`
token for each accepted global (the real torch function or class never reaches the stack), a
:class:`StorageSpec` for each storage and a :class:`TensorSpec` for each tensor view (nothing read
yet), and an :class:`InertConfig` for each pickled config object.
"""

from collections import OrderedDict
from typing import Optional

import torch

from .untrusted import describe as describe_plain_value
WHAT_IS_READ = 'only tensors, containers and configs are read'   # the end of every refusal


class InertConfig(dict):
    """A pickled config object, read as data: its dict items plus its attributes, nothing run.

    A ``yacs.config.CfgNode`` (a dict subclass) keeps its items as this dict's items; an
    ``argparse.Namespace`` has no items and its values in :attr:`attributes`. :attr:`kind` is the
    dotted name of the class the file named. Nested configs are ``InertConfig`` too.
    """

    __slots__ = ('kind', 'attributes')

    def __init__(self, kind: str, items=(), attributes: Optional[dict] = None):
        super().__init__(items)
        self.kind = kind
        self.attributes = dict(attributes or {})

    def __repr__(self) -> str:
        return f'InertConfig({self.kind!r}, {dict.__repr__(self)}, attributes={self.attributes!r})'

    def __eq__(self, other):
        if isinstance(other, InertConfig):
            return (self.kind, self.attributes) == (other.kind, other.attributes) and dict.__eq__(self, other)
        return NotImplemented

    __hash__ = None


CONTAINERS = frozenset({dict, OrderedDict, InertConfig, list})   # what the data may nest (and tuples)


class Global:
    """An accepted pickle global, as a token; ``role`` says what the machine may do with it."""

    __slots__ = ('name', 'role', 'dtype')

    def __init__(self, name: str, role: str, dtype: Optional[torch.dtype] = None):
        self.name, self.role, self.dtype = name, role, dtype

    def __repr__(self) -> str:
        return self.name


class StorageSpec:
    """A storage named by a persistent id: its record, dtype and element count (nothing read yet)."""

    __slots__ = ('key', 'dtype', 'numel', 'nbytes')

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.nbytes = numel * dtype.itemsize


class TensorSpec:
    """A validated strided view of a storage, materialised once the whole pickle has been checked."""

    __slots__ = ('storage', 'offset', 'size', 'stride')

    def __init__(self, storage: StorageSpec, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def describe(obj) -> str:
    """A short description of a pickled value for error messages (never a full repr)."""
    if isinstance(obj, Global):
        return obj.name
    if type(obj) is TensorSpec:
        return 'a tensor'
    if type(obj) is StorageSpec:
        return 'a storage'
    if type(obj) is InertConfig:
        return f'a {obj.kind} config'
    return describe_plain_value(obj)
