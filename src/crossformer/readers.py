"""The narrowest safe readers of weight files, for checkpoints from untrusted sources.

:func:`read_torch_file` reads a ``torch.save`` zip archive with a small pickle machine of its own
(never :mod:`pickle` and never ``torch.load``): every opcode and every global it accepts is listed
here on purpose, and nothing it reads can call, import or mutate anything. What it returns is built
only from ``dict``, ``collections.OrderedDict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``,
``float``, ``bool``, ``None``, ``torch.dtype``, dense CPU tensors and :class:`InertConfig`.
:func:`read_safetensors_file` checks a safetensors header in full before reading the tensors.

Both readers bound what they allocate by the file's size (and by ``max_bytes`` when given) before
allocating it, read each tensor's bytes once, and turn every defect of the file into a
:class:`~crossformer.errors.CheckpointError` that names the file. They do not judge the contents:
key names, dtypes, shapes and finiteness are for the caller to check against its model.
"""

import json
import math
import os
import pickletools
import re
import stat
import struct
import sys
import zlib
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import CheckpointError, ConfigError, MissingFileError
from .files import PathLike

__all__ = ['InertConfig', 'read_torch_file', 'read_safetensors_file', 'read_safetensors_metadata']

# Bounds on what a file may make the readers do.
MAX_PICKLE_BYTES = 64 << 20        # data.pkl of a real checkpoint is a few MB at most
MAX_PICKLE_OPS = 2_000_000         # opcodes executed (each creates at most one small object)
MAX_MEMO = 1_000_000               # pickle memo entries
MAX_DEPTH = 100                    # nesting of the data returned
MAX_NODES = 4_000_000              # nodes of the data returned, counting shared ones each time
MAX_DIMS = 64                      # tensor dimensions
MAX_DIM_SIZE = 1 << 48             # one dimension's size or stride
MAX_RECORDS = 1_000_000            # zip records
MAX_DIRECTORY_BYTES = 64 << 20     # zip central directory
MAX_SAFETENSORS_HEADER = 100_000_000

_STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
    'BoolStorage': torch.bool,
}
# torch.save writes a dtype as GLOBAL 'torch <name>' when a dtype object is itself a value (a config
# entry, say); tensors never need one. The same ten dtypes as the storages are read.
_DTYPE_NAMES = {str(d).split('.', 1)[1]: d for d in _STORAGE_DTYPES.values()}
_SAFETENSORS_DTYPES = {
    'F32': torch.float32, 'F64': torch.float64, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}
_ACCEPTED_GLOBALS = ('collections.OrderedDict, torch._utils._rebuild_tensor_v2, '
                     'torch._utils._rebuild_parameter, torch.{Float,Double,Half,BFloat16,Long,Int,Short,'
                     'Char,Byte,Bool}Storage, the matching torch dtypes, yacs.config.CfgNode and '
                     'argparse.Namespace')
_WHAT_IS_READ = 'only tensors, containers and configs are read'

# Exceptions that malformed data can raise from the standard library or torch while reading; all of
# them become CheckpointError. Anything else is a bug in this module and keeps its traceback.
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, struct.error, UnicodeError, EOFError,
              RecursionError, MemoryError, OverflowError, RuntimeError, OSError, zlib.error)


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


# ---------------------------------------------------------------------------------------------------
# Pickle machine


class _Bad(Exception):
    """A defect of the file, described for the user; becomes CheckpointError(f'{path}: {message}')."""


class _Global:
    """An accepted pickle global, as a token: the real torch function or class never reaches the stack."""

    __slots__ = ('name', 'role', 'dtype')

    def __init__(self, name: str, role: str, dtype: Optional[torch.dtype] = None):
        self.name, self.role, self.dtype = name, role, dtype

    def __repr__(self) -> str:
        return self.name


_GLOBALS = {
    ('collections', 'OrderedDict'): _Global('collections.OrderedDict', 'ordered_dict'),
    ('torch._utils', '_rebuild_tensor_v2'): _Global('torch._utils._rebuild_tensor_v2', 'rebuild_tensor'),
    ('torch._utils', '_rebuild_parameter'): _Global('torch._utils._rebuild_parameter', 'rebuild_parameter'),
    ('yacs.config', 'CfgNode'): _Global('yacs.config.CfgNode', 'config'),
    ('argparse', 'Namespace'): _Global('argparse.Namespace', 'config'),
}
_GLOBALS.update({('torch', n): _Global(f'torch.{n}', 'storage', d) for n, d in _STORAGE_DTYPES.items()})

_GLOBAL_HINTS = {
    'torch._utils._rebuild_tensor': 'the legacy tensor format; re-save the file with a current PyTorch',
    'torch._utils._rebuild_parameter_with_state': 'a Parameter carrying extra Python attributes',
    'torch.UntypedStorage': 'an untyped storage, not written for tensors',
    '_codecs.encode': 'bytes pickled with protocol 2',
}


class _StorageSpec:
    """A storage named by a persistent id: its record, dtype and element count (nothing read yet)."""

    __slots__ = ('key', 'dtype', 'numel', 'nbytes')

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.nbytes = numel * dtype.itemsize


class _TensorSpec:
    """A validated strided view of a storage, materialised once the whole pickle has been checked."""

    __slots__ = ('storage', 'offset', 'size', 'stride')

    def __init__(self, storage: _StorageSpec, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes}
_REFUSED_OPS = {
    'INST': 'it builds arbitrary objects', 'OBJ': 'it builds arbitrary objects',
    'EXT1': 'it names globals through the copyreg extension registry',
    'EXT2': 'it names globals through the copyreg extension registry',
    'EXT4': 'it names globals through the copyreg extension registry',
    'PERSID': 'text persistent ids are not written by torch.save',
    'LONG4': 'integers over 255 bytes are not read',
    'EMPTY_SET': 'sets are not read', 'ADDITEMS': 'sets are not read', 'FROZENSET': 'sets are not read',
    'BYTEARRAY8': 'bytearrays are not read',
    'NEXT_BUFFER': 'out-of-band buffers are not read', 'READONLY_BUFFER': 'out-of-band buffers are not read',
    'BINSTRING': 'Python 2 byte strings are not read', 'SHORT_BINSTRING': 'Python 2 byte strings are not read',
}
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_CONTAINERS = frozenset({dict, OrderedDict, InertConfig, list})


def _describe(obj) -> str:
    """A short description of a pickled value for error messages (never a full repr)."""
    if isinstance(obj, _Global):
        return obj.name
    if type(obj) is _TensorSpec:
        return 'a tensor'
    if type(obj) is _StorageSpec:
        return 'a storage'
    if type(obj) is InertConfig:
        return f'a {obj.kind} config'
    if type(obj) in (str, bytes):
        text = repr(obj)
        return text if len(text) <= 40 else text[:37] + '...'
    if type(obj) in _SCALARS:
        return repr(obj)
    return f'a {type(obj).__name__}'


def _is_int(x, low: int = 0, high: int = MAX_DIM_SIZE) -> bool:
    return type(x) is int and low <= x <= high


def _check_key(key, depth: int = 0) -> None:
    """Dict keys are scalars or (shallow) tuples of them: hashing them runs nothing and cannot recurse deeply."""
    if type(key) in _SCALARS:
        return
    if type(key) is tuple and depth < 8:
        for k in key:
            _check_key(k, depth + 1)
        return
    raise _Bad(f'refused dict key {_describe(key)}: keys are strings, numbers or tuples of them')


# Opcodes whose argument is an unsigned length or memo index, and its little-endian width.
_UNSIGNED_ARG = {0x71: '<B', 0x68: '<B', 0x8c: '<B', 0x43: '<B',    # BINPUT BINGET SHORT_BINUNICODE SHORT_BINBYTES
                 0x72: '<I', 0x6a: '<I', 0x58: '<I', 0x42: '<I',    # LONG_BINPUT LONG_BINGET BINUNICODE BINBYTES
                 0x8d: '<Q', 0x8e: '<Q'}                            # BINUNICODE8 BINBYTES8


def _unsigned_arg(data: bytes, pos: int, op: int) -> Tuple[int, int]:
    """The unsigned argument of opcode ``op`` at ``pos``, and the position after it."""
    fmt = _UNSIGNED_ARG[op]
    value, = struct.unpack_from(fmt, data, pos)
    return value, pos + struct.calcsize(fmt)


class _PickleMachine:
    """Runs a torch.save data.pkl. ``storage_spec(pid)`` validates a persistent id against the archive."""

    def __init__(self, data: bytes, storage_spec: Callable[[tuple], _StorageSpec]):
        self.data = data
        self.storage_spec = storage_spec

    def refuse_op(self, op: int, at: int, why: str):
        name = _OPNAMES.get(op, f'0x{op:02x}')
        raise _Bad(f'refused pickle opcode {name} (byte {at} of data.pkl): {why}; {_WHAT_IS_READ}')

    def run(self):
        data, n = self.data, len(self.data)
        stack: list = []
        metastack: list = []
        memo: dict = {}
        pos = 0
        ops = 0
        while True:
            if pos >= n:
                raise _Bad('data.pkl ends without a STOP opcode (truncated)')
            at = pos
            op = data[pos]
            pos += 1
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise _Bad(f'data.pkl runs more than {MAX_PICKLE_OPS} opcodes')
            try:
                # --- memo
                if op == 0x71 or op == 0x72 or op == 0x94:              # BINPUT, LONG_BINPUT, MEMOIZE
                    if op == 0x94:
                        idx = len(memo)
                    else:
                        idx, pos = _unsigned_arg(data, pos, op)
                    if idx not in memo and len(memo) >= MAX_MEMO:
                        raise _Bad(f'data.pkl uses more than {MAX_MEMO} memo entries')
                    memo[idx] = stack[-1]
                elif op == 0x68 or op == 0x6a:                          # BINGET, LONG_BINGET
                    idx, pos = _unsigned_arg(data, pos, op)
                    if idx not in memo:
                        raise _Bad(f'pickle memo entry {idx} is read before it is written (byte {at})')
                    stack.append(memo[idx])
                # --- scalars
                elif op == 0x58 or op == 0x8c or op == 0x8d:            # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                    size, pos = _unsigned_arg(data, pos, op)
                    if pos + size > n:
                        raise _Bad(f'a string at byte {at} runs past the end of data.pkl')
                    try:
                        stack.append(data[pos:pos + size].decode('utf-8'))
                    except UnicodeDecodeError:
                        raise _Bad(f'the string at byte {at} of data.pkl is not valid UTF-8') from None
                    pos += size
                elif op == 0x43 or op == 0x42 or op == 0x8e:            # SHORT_BINBYTES, BINBYTES, BINBYTES8
                    size, pos = _unsigned_arg(data, pos, op)
                    if pos + size > n:
                        raise _Bad(f'a bytes value at byte {at} runs past the end of data.pkl')
                    stack.append(data[pos:pos + size])
                    pos += size
                elif op == 0x4b:                                        # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif op == 0x4d:                                        # BININT2
                    stack.append(struct.unpack_from('<H', data, pos)[0])
                    pos += 2
                elif op == 0x4a:                                        # BININT
                    stack.append(struct.unpack_from('<i', data, pos)[0])
                    pos += 4
                elif op == 0x8a:                                        # LONG1
                    size = data[pos]
                    pos += 1
                    if pos + size > n:
                        raise _Bad(f'an integer at byte {at} runs past the end of data.pkl')
                    stack.append(int.from_bytes(data[pos:pos + size], 'little', signed=True))
                    pos += size
                elif op == 0x47:                                        # BINFLOAT
                    stack.append(struct.unpack_from('>d', data, pos)[0])
                    pos += 8
                elif op == 0x4e:                                        # NONE
                    stack.append(None)
                elif op == 0x88:                                        # NEWTRUE
                    stack.append(True)
                elif op == 0x89:                                        # NEWFALSE
                    stack.append(False)
                # --- stack structure
                elif op == 0x28:                                        # MARK
                    metastack.append(stack)
                    stack = []
                elif op == 0x29:                                        # EMPTY_TUPLE
                    stack.append(())
                elif op == 0x74:                                        # TUPLE
                    if not metastack:
                        raise _Bad(f'TUPLE without a MARK (byte {at} of data.pkl)')
                    items, stack = stack, metastack.pop()
                    stack.append(tuple(items))
                elif op == 0x85:                                        # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x86:                                        # TUPLE2
                    if len(stack) < 2:
                        raise IndexError
                    stack[-2:] = [(stack[-2], stack[-1])]
                elif op == 0x87:                                        # TUPLE3
                    if len(stack) < 3:
                        raise IndexError
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == 0x30:                                        # POP
                    stack.pop()
                elif op == 0x31:                                        # POP_MARK
                    if not metastack:
                        raise _Bad(f'POP_MARK without a MARK (byte {at} of data.pkl)')
                    stack = metastack.pop()
                # --- containers
                elif op == 0x5d:                                        # EMPTY_LIST
                    stack.append([])
                elif op == 0x7d:                                        # EMPTY_DICT
                    stack.append({})
                elif op == 0x73:                                        # SETITEM
                    value = stack.pop()
                    key = stack.pop()
                    self.set_items(stack[-1], [key, value], 'SETITEM', at)
                elif op == 0x75:                                        # SETITEMS
                    if not metastack:
                        raise _Bad(f'SETITEMS without a MARK (byte {at} of data.pkl)')
                    items, stack = stack, metastack.pop()
                    self.set_items(stack[-1], items, 'SETITEMS', at)
                elif op == 0x61:                                        # APPEND
                    value = stack.pop()
                    self.list_target(stack[-1], 'APPEND', at).append(value)
                elif op == 0x65:                                        # APPENDS
                    if not metastack:
                        raise _Bad(f'APPENDS without a MARK (byte {at} of data.pkl)')
                    items, stack = stack, metastack.pop()
                    self.list_target(stack[-1], 'APPENDS', at).extend(items)
                # --- the few objects with behaviour, all checked
                elif op == 0x63:                                        # GLOBAL
                    module, pos = self.line(pos, at)
                    name, pos = self.line(pos, at)
                    stack.append(self.find_global(module, name))
                elif op == 0x93:                                        # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise _Bad(f'STACK_GLOBAL needs two strings (byte {at} of data.pkl)')
                    stack.append(self.find_global(module, name))
                elif op == 0x52:                                        # REDUCE
                    args = stack.pop()
                    stack[-1] = self.reduce(stack[-1], args, at)
                elif op == 0x81:                                        # NEWOBJ
                    args = stack.pop()
                    stack[-1] = self.new_config(stack[-1], args, {}, 'NEWOBJ', at)
                elif op == 0x92:                                        # NEWOBJ_EX
                    kwargs = stack.pop()
                    args = stack.pop()
                    stack[-1] = self.new_config(stack[-1], args, kwargs, 'NEWOBJ_EX', at)
                elif op == 0x62:                                        # BUILD
                    state = stack.pop()
                    self.build(stack[-1], state, at)
                elif op == 0x51:                                        # BINPERSID
                    stack[-1] = self.storage_spec(stack[-1])
                # --- framing
                elif op == 0x80:                                        # PROTO
                    if not 2 <= data[pos] <= 5:
                        raise _Bad(f'pickle protocol {data[pos]} is not read (torch.save writes 2 to 5)')
                    pos += 1
                elif op == 0x95:                                        # FRAME (advisory: data.pkl is in memory)
                    pos += 8
                    if pos > n:
                        raise IndexError
                elif op == 0x2e:                                        # STOP
                    if metastack or len(stack) != 1:
                        raise _Bad('data.pkl stops with an unbalanced stack')
                    if pos != n:
                        raise _Bad(f'{n - pos} bytes follow the STOP opcode of data.pkl')
                    return stack[0]
                else:
                    name = _OPNAMES.get(op)
                    why = _REFUSED_OPS.get(name) if name else None
                    if why is None:
                        why = ('an opcode torch.save does not write' if name else 'an unknown opcode')
                    self.refuse_op(op, at, why)
            except (IndexError, struct.error) as e:
                if isinstance(e, struct.error) or pos >= n:
                    raise _Bad(f'data.pkl is truncated inside the opcode at byte {at}') from None
                raise _Bad(f'pickle stack underflow at byte {at} of data.pkl '
                           f'({_OPNAMES.get(op, hex(op))})') from None

    def line(self, pos: int, at: int) -> Tuple[str, int]:
        end = self.data.find(b'\n', pos, pos + 257)
        if end < 0:
            raise _Bad(f'the GLOBAL at byte {at} of data.pkl has no name line')
        try:
            return self.data[pos:end].decode('ascii'), end + 1
        except UnicodeDecodeError:
            raise _Bad(f'the GLOBAL at byte {at} of data.pkl names a non-ASCII global') from None

    def find_global(self, module: str, name: str):
        token = _GLOBALS.get((module, name))
        if token is not None:
            return token
        if module == 'torch' and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        full = f'{module}.{name}'[:120]
        full = full if full.isprintable() else ascii(full)
        hint = _GLOBAL_HINTS.get(full)
        if hint is None and module.split('.')[0] == 'torch' and '.nn.' in f'.{module}.':
            hint = 'a pickled module or object; save model.state_dict() instead'
        hint = f' ({hint})' if hint else ''
        raise _Bad(f'refused pickle global {full}{hint}: only {_ACCEPTED_GLOBALS} are accepted')

    def reduce(self, func, args, at: int):
        role = func.role if isinstance(func, _Global) else None
        if type(args) is not tuple:
            raise _Bad(f'REDUCE at byte {at} of data.pkl has {_describe(args)} as arguments, not a tuple')
        if role == 'ordered_dict':
            if args:
                raise _Bad(f'collections.OrderedDict is called with arguments at byte {at} of data.pkl; '
                           'torch.save writes OrderedDict() then sets its items')
            return OrderedDict()
        if role == 'rebuild_tensor':
            return self.rebuild_tensor(args, at)
        if role == 'rebuild_parameter':
            if len(args) != 3 or type(args[0]) is not _TensorSpec or type(args[1]) is not bool \
                    or not self.empty_hooks(args[2]):
                raise _Bad(f'_rebuild_parameter at byte {at} of data.pkl needs (tensor, bool, '
                           'empty OrderedDict of hooks)')
            return args[0]                          # a parameter is read as a plain tensor
        raise _Bad(f'refused REDUCE onto {_describe(func)} (byte {at} of data.pkl): only '
                   'collections.OrderedDict and torch._utils._rebuild_tensor_v2/_rebuild_parameter are '
                   f'called; {_WHAT_IS_READ}')

    @staticmethod
    def empty_hooks(hooks) -> bool:
        return type(hooks) is OrderedDict and not hooks

    def rebuild_tensor(self, args: tuple, at: int) -> _TensorSpec:
        where = f'_rebuild_tensor_v2 at byte {at} of data.pkl'
        if len(args) not in (6, 7):
            raise _Bad(f'{where} has {len(args)} arguments, not 6 or 7')
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        if type(storage) is not _StorageSpec:
            raise _Bad(f'{where} is given {_describe(storage)} instead of a storage')
        if not _is_int(offset):
            raise _Bad(f'{where}: storage offset {_describe(offset)} is not a non-negative integer')
        for label, value in (('size', size), ('stride', stride)):
            if type(value) is not tuple or len(value) > MAX_DIMS or not all(_is_int(v) for v in value):
                raise _Bad(f'{where}: {label} must be a tuple of at most {MAX_DIMS} non-negative integers')
        if len(size) != len(stride):
            raise _Bad(f'{where}: size has {len(size)} dimensions but stride has {len(stride)}')
        if type(requires_grad) is not bool:
            raise _Bad(f'{where}: requires_grad is {_describe(requires_grad)}, not a bool')
        if not self.empty_hooks(hooks):
            raise _Bad(f'{where}: backward hooks must be an empty OrderedDict')
        if len(args) == 7 and not (type(args[6]) in (dict, OrderedDict) and not args[6]):
            raise _Bad(f'{where}: tensor metadata {_describe(args[6])} is not read (only an empty dict)')
        numel = math.prod(size)
        if numel:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel:
                raise _Bad(f'{where}: a view of size {size}, stride {stride} and offset {offset} reaches '
                           f'element {last} of a storage of {storage.numel} elements')
            if numel > storage.numel:
                raise _Bad(f'{where}: a view of {numel} elements over a storage of {storage.numel} '
                           '(overlapping or stride-0) would be larger than its storage')
        elif offset > storage.numel:
            raise _Bad(f'{where}: offset {offset} is past the end of a storage of {storage.numel} elements')
        return _TensorSpec(storage, offset, size, stride)

    def new_config(self, cls, args, kwargs, opname: str, at: int) -> InertConfig:
        if not (isinstance(cls, _Global) and cls.role == 'config'):
            raise _Bad(f'refused {opname} of {_describe(cls)} (byte {at} of data.pkl): only '
                       f'yacs.config.CfgNode and argparse.Namespace are read, as inert configs; {_WHAT_IS_READ}')
        if type(args) is not tuple or args or type(kwargs) is not dict or kwargs:
            raise _Bad(f'{opname} of {cls.name} at byte {at} of data.pkl passes constructor arguments')
        return InertConfig(cls.name)

    def build(self, inst, state, at: int) -> None:
        if type(inst) is InertConfig:
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise _Bad(f'BUILD state of {inst.kind} at byte {at} of data.pkl is {_describe(state)}, '
                           'not a dict of attribute names')
            inst.attributes.update(state)
            return
        if type(inst) is OrderedDict and type(state) is dict and set(state) <= {'_metadata'} \
                and type(state.get('_metadata', {})) in (dict, OrderedDict):
            return   # state_dict()'s version record: checked, then dropped; no attribute is ever set
        raise _Bad(f'refused BUILD onto {_describe(inst)} (byte {at} of data.pkl): it sets attributes; only '
                   f'configs (yacs CfgNode, argparse Namespace) take state; {_WHAT_IS_READ}')

    @staticmethod
    def set_items(target, items: list, opname: str, at: int) -> None:
        if type(target) not in (dict, OrderedDict, InertConfig):
            raise _Bad(f'refused {opname} onto {_describe(target)} (byte {at} of data.pkl): items are set '
                       'only on dicts, OrderedDicts and configs')
        if len(items) % 2:
            raise _Bad(f'{opname} at byte {at} of data.pkl has a key without a value')
        for i in range(0, len(items), 2):
            key = items[i]
            _check_key(key)
            if key in target:
                raise _Bad(f'key {_describe(key)} is set twice in one dict (byte {at} of data.pkl)')
            target[key] = items[i + 1]

    @staticmethod
    def list_target(target, opname: str, at: int) -> list:
        if type(target) is not list:
            raise _Bad(f'refused {opname} onto {_describe(target)} (byte {at} of data.pkl): '
                       'only lists are appended to')
        return target


def _finish(root, materialize: Callable[[_TensorSpec], torch.Tensor]):
    """Checks the data a pickle built and replaces tensor specs by tensors.

    Refuses cycles, nesting deeper than MAX_DEPTH, trees that expand (counting a shared container at
    each place it appears) to more than MAX_NODES nodes, and any leftover global or bare storage, so
    that a caller can walk the result recursively without surprises.
    """
    done: Dict[int, tuple] = {}         # id -> (nodes below, height, finished object)
    on_path = set()
    total = [0]

    def visit(obj, depth: int):
        total[0] += 1
        t = type(obj)
        if t in _SCALARS or t is torch.dtype:
            return obj, 0
        if t is _TensorSpec:
            return materialize(obj), 0
        if t is not tuple and t not in _CONTAINERS:
            raise _Bad(f'{_describe(obj)} appears in the data as a value; {_WHAT_IS_READ}')
        oid = id(obj)
        if oid in done:
            nodes, height, new = done[oid]
            total[0] += nodes
            if depth + height > MAX_DEPTH:
                raise _Bad(f'the data is nested more than {MAX_DEPTH} levels deep')
            if total[0] > MAX_NODES:
                raise _Bad(f'the data expands to more than {MAX_NODES} values (shared containers)')
            return new, height
        if oid in on_path:
            raise _Bad('the data contains a container inside itself (a cycle)')
        if depth >= MAX_DEPTH:
            raise _Bad(f'the data is nested more than {MAX_DEPTH} levels deep')
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
            raise _Bad(f'the data expands to more than {MAX_NODES} values (shared containers)')
        done[oid] = (total[0] - before, height + 1, new)
        return new, height + 1

    return visit(root, 0)[0]


# ---------------------------------------------------------------------------------------------------
# Zip archive


class _Record:
    __slots__ = ('name', 'crc', 'size', 'header_offset', 'data_start')

    def __init__(self, name: str, crc: int, size: int, header_offset: int):
        self.name, self.crc, self.size, self.header_offset = name, crc, size, header_offset
        self.data_start = -1


_EOCD = struct.Struct('<4sHHHHIIH')
_ZIP64_LOCATOR = struct.Struct('<4sIQI')
_ZIP64_EOCD = struct.Struct('<4sQHHIIQQQQ')
_CENTRAL = struct.Struct('<4sHHHHHHIIIHHHHHII')
_LOCAL = struct.Struct('<4sHHHHHIIIHH')
_BAD_NAME_CHARS = re.compile(r'[\x00-\x1f\\]')
_STORAGE_KEY = re.compile(r'[A-Za-z0-9_.-]{1,64}')


def _read_exact(f, offset: int, size: int, what: str) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _Bad(f'the file ends inside {what} (truncated)')
    return data


def _read_into(f, offset: int, buf: bytearray, what: str) -> None:
    f.seek(offset)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        k = f.readinto(view[got:])
        if not k:
            raise _Bad(f'the file ends inside {what} (truncated)')
        got += k


class _Archive:
    """The records of a torch.save zip, from its central directory, every one checked."""

    def __init__(self, f, file_size: int):
        self.f = f
        self.file_size = file_size
        self.records: Dict[str, _Record] = {}
        self.prefix = ''
        self._parse()

    def _directory_bounds(self) -> Tuple[int, int, int, int]:
        size = self.file_size
        if size < _EOCD.size:
            raise _Bad('the zip archive is truncated (no end-of-directory record)')
        tail_at = size - _EOCD.size
        sig, disk, cd_disk, _, n32, cd_size32, cd_offset32, comment = _EOCD.unpack(
            _read_exact(self.f, tail_at, _EOCD.size, 'the end-of-directory record'))
        if sig != b'PK\x05\x06':
            raise _Bad('no zip end-of-directory record at the end of the file (truncated, or a comment or '
                       'data appended)')
        if comment or disk not in (0, 0xFFFF) or cd_disk not in (0, 0xFFFF):
            raise _Bad('the zip archive has a comment or spans several disks; torch.save writes neither')
        end = tail_at
        if size >= _EOCD.size + _ZIP64_LOCATOR.size:
            at = tail_at - _ZIP64_LOCATOR.size
            locator = _ZIP64_LOCATOR.unpack(_read_exact(self.f, at, _ZIP64_LOCATOR.size, 'the zip64 locator'))
            if locator[0] == b'PK\x06\x07':
                eocd64_at = locator[2]
                if eocd64_at + _ZIP64_EOCD.size > at:
                    raise _Bad('the zip64 end-of-directory record lies outside the file')
                (sig, _, _, _, _, _, _, n, cd_size, cd_offset) = _ZIP64_EOCD.unpack(
                    _read_exact(self.f, eocd64_at, _ZIP64_EOCD.size, 'the zip64 end-of-directory record'))
                if sig != b'PK\x06\x06':
                    raise _Bad('the zip64 locator points at no zip64 end-of-directory record')
                return n, cd_size, cd_offset, eocd64_at
        if n32 == 0xFFFF or cd_size32 == 0xFFFFFFFF or cd_offset32 == 0xFFFFFFFF:
            raise _Bad('the zip archive needs a zip64 record that is missing')
        return n32, cd_size32, cd_offset32, end

    def _parse(self) -> None:
        count, cd_size, cd_offset, cd_limit = self._directory_bounds()
        if count > MAX_RECORDS or cd_size > MAX_DIRECTORY_BYTES:
            raise _Bad(f'the zip archive lists {count} records in {cd_size} bytes, more than read')
        if cd_offset + cd_size > cd_limit:
            raise _Bad('the zip central directory lies outside the file')
        directory = _read_exact(self.f, cd_offset, cd_size, 'the zip central directory')
        pos = 0
        prefixes = set()
        for _ in range(count):
            if pos + _CENTRAL.size > cd_size:
                raise _Bad('the zip central directory is shorter than its record count')
            (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _,
             header_offset) = _CENTRAL.unpack_from(directory, pos)
            if sig != b'PK\x01\x02':
                raise _Bad('the zip central directory is corrupt (bad record signature)')
            pos += _CENTRAL.size
            raw_name = directory[pos:pos + name_len]
            extra = directory[pos + name_len:pos + name_len + extra_len]
            pos += name_len + extra_len + comment_len
            if pos > cd_size:
                raise _Bad('the zip central directory is corrupt (a record runs past its end)')
            try:
                name = raw_name.decode('utf-8')
            except UnicodeDecodeError:
                raise _Bad('a zip record name is not valid UTF-8') from None
            usize, csize, header_offset = self._zip64_extra(extra, usize, csize, header_offset, name)
            if flags & 0x41:
                raise _Bad(f'zip record {name[:80]!r} is encrypted')
            if method != 0 or csize != usize:
                raise _Bad(f'zip record {name[:80]!r} is compressed (method {method}); torch.save stores '
                           'records uncompressed and compressed records are refused (decompression bombs)')
            parts = name.split('/')
            if (len(parts) < 2 or _BAD_NAME_CHARS.search(name) or name.startswith('/')
                    or any(p in ('', '.', '..') for p in parts)):
                raise _Bad(f'zip record name {name[:80]!r} is not a plain path inside one top-level folder')
            if name in self.records:
                raise _Bad(f'zip record {name[:80]!r} appears twice')
            prefixes.add(parts[0])
            if len(prefixes) > 1:
                raise _Bad('the zip archive has more than one top-level folder; torch.save writes one')
            self.records[name] = _Record(name, crc, usize, header_offset)
        if pos != cd_size:
            raise _Bad('the zip central directory has bytes beyond its records')
        if not prefixes:
            raise _Bad('the zip archive is empty')
        self.prefix = prefixes.pop()
        self._locate(cd_offset)

    @staticmethod
    def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int, name: str) -> Tuple[int, int, int]:
        i = 0
        while i + 4 <= len(extra):
            tag, size = struct.unpack_from('<HH', extra, i)
            body = extra[i + 4:i + 4 + size]
            i += 4 + size
            if tag != 1:
                continue
            j = 0
            out = []
            for v in (usize, csize, offset):
                if v == 0xFFFFFFFF:
                    if j + 8 > len(body):
                        raise _Bad(f'zip record {name[:80]!r} has a short zip64 field')
                    v, = struct.unpack_from('<Q', body, j)
                    j += 8
                out.append(v)
            return out[0], out[1], out[2]
        if 0xFFFFFFFF in (usize, csize, offset):
            raise _Bad(f'zip record {name[:80]!r} lacks its zip64 sizes')
        return usize, csize, offset

    def _locate(self, cd_offset: int) -> None:
        """Reads every local header, checks it against the directory; records may not overlap."""
        spans = []
        for rec in self.records.values():
            head = _read_exact(self.f, rec.header_offset, _LOCAL.size, f'the zip header of {rec.name[:80]!r}')
            sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack(head)
            if sig != b'PK\x03\x04' or method != 0 or flags & 0x41:
                raise _Bad(f'the local zip header of {rec.name[:80]!r} does not match the directory')
            name = _read_exact(self.f, rec.header_offset + _LOCAL.size, name_len, 'a zip record name')
            if name != rec.name.encode('utf-8'):
                raise _Bad(f'the local zip header of {rec.name[:80]!r} names another record')
            rec.data_start = rec.header_offset + _LOCAL.size + name_len + extra_len
            if rec.data_start + rec.size > cd_offset:
                raise _Bad(f'zip record {rec.name[:80]!r} runs into the central directory or past the file')
            spans.append((rec.header_offset, rec.data_start + rec.size, rec.name))
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
            if start < end:
                raise _Bad(f'zip records {name[:80]!r} and {other[:80]!r} overlap')

    def get(self, name: str) -> Optional[_Record]:
        return self.records.get(f'{self.prefix}/{name}')

    def check_crc(self, rec: _Record, data) -> None:
        if rec.crc and zlib.crc32(data) != rec.crc:   # a zero CRC: written with torch's CRC option off
            raise _Bad(f'zip record {rec.name[:80]!r} fails its CRC check (corrupt file)')

    def read_small(self, rec: _Record, limit: int) -> bytes:
        if rec.size > limit:
            raise _Bad(f'zip record {rec.name[:80]!r} holds {rec.size} bytes, more than the {limit} read')
        data = _read_exact(self.f, rec.data_start, rec.size, f'zip record {rec.name[:80]!r}')
        self.check_crc(rec, data)
        return data


# ---------------------------------------------------------------------------------------------------
# Public readers


def _open(path: PathLike, max_bytes: Optional[int]):
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
    return name, f


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ''
    return f'{type(e).__name__}: {text[:160]}' if text else type(e).__name__


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
    name, f = _open(path, max_bytes)
    with f:
        try:
            return _read_torch(f, max_bytes)
        except _Bad as e:
            raise CheckpointError(f'{name}: {e}') from None
        except _MALFORMED as e:
            raise CheckpointError(f'{name}: malformed torch.save file ({_short(e)})') from e


def _read_torch(f, max_bytes: Optional[int]):
    file_size = os.fstat(f.fileno()).st_size
    if file_size == 0:
        raise _Bad('the file is empty')
    head = _read_exact(f, 0, min(file_size, 512), 'the first bytes')
    if not head.startswith(b'PK\x03\x04'):
        if head[:1] == b'\x80' or (len(head) >= 262 and head[257:262] == b'ustar'):
            raise _Bad('this is the legacy (non-zip) torch.save format, which is not read; re-save it with '
                       'torch.save in a current PyTorch, or convert it to safetensors')
        raise _Bad('not a torch.save file (it is not a zip archive)')
    archive = _Archive(f, file_size)
    pkl = archive.get('data.pkl')
    if pkl is None:
        raise _Bad(f'the archive has no {archive.prefix}/data.pkl record; not a torch.save file')
    order = archive.get('byteorder')
    if order is not None and archive.read_small(order, 16) != b'little':
        raise _Bad('the file was saved on a big-endian machine; only little-endian files are read')
    if sys.byteorder != 'little':
        raise _Bad('this reader runs on little-endian machines only')
    data = archive.read_small(pkl, MAX_PICKLE_BYTES)

    storages: Dict[str, _StorageSpec] = {}

    def storage_spec(pid) -> _StorageSpec:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _Global)
                and pid[1].role == 'storage' and type(pid[2]) is str and type(pid[3]) is str
                and _is_int(pid[4], 0, 1 << 62)):
            raise _Bad(f'refused persistent id {_describe(pid)}: torch.save writes '
                       "('storage', torch.<Type>Storage, key, location, numel)")
        _, cls, key, _, numel = pid
        if not _STORAGE_KEY.fullmatch(key):
            raise _Bad(f'storage key {_describe(key)} is not a plain record name')
        spec = storages.get(key)
        if spec is not None:
            if spec.dtype != cls.dtype or spec.numel != numel:
                raise _Bad(f'storage {key} is declared twice with different types or sizes')
            return spec
        rec = archive.get(f'data/{key}')
        if rec is None:
            raise _Bad(f'storage {key} has no record {archive.prefix}/data/{key} in the archive')
        spec = _StorageSpec(key, cls.dtype, numel)
        if spec.nbytes != rec.size:
            raise _Bad(f'storage {key} declares {numel} x {cls.name} ({spec.nbytes} bytes) but its record '
                       f'holds {rec.size} bytes')
        storages[key] = spec
        return spec

    root = _PickleMachine(data, storage_spec).run()
    del data
    total = sum(s.nbytes for s in storages.values())
    if total > file_size:
        raise _Bad(f'the storages declare {total} bytes, more than the file holds ({file_size})')
    if max_bytes is not None and total > max_bytes:
        raise _Bad(f'the storages hold {total} bytes, more than max_bytes={max_bytes}')

    bases: Dict[str, torch.Tensor] = {}
    made: Dict[int, torch.Tensor] = {}

    def materialize(spec: _TensorSpec) -> torch.Tensor:
        tensor = made.get(id(spec))
        if tensor is None:
            key = spec.storage.key
            base = bases.get(key)
            if base is None:
                base = bases[key] = _load_storage(archive, archive.get(f'data/{key}'), spec.storage)
            tensor = made[id(spec)] = base.as_strided(spec.size, spec.stride, spec.offset)
        return tensor

    return _finish(root, materialize)


def _tensor_from(buf: bytearray, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not buf:
        return torch.empty(0, dtype=dtype)
    if dtype is torch.bool and bool((torch.frombuffer(buf, dtype=torch.uint8) > 1).any()):
        raise _Bad(f'{what} is a bool tensor holding bytes other than 0 and 1')
    return torch.frombuffer(buf, dtype=dtype)


def _load_storage(archive: _Archive, rec: _Record, spec: _StorageSpec) -> torch.Tensor:
    buf = bytearray(rec.size)
    _read_into(archive.f, rec.data_start, buf, f'storage {spec.key}')  # no CRC, as torch.load: it costs 2x
    return _tensor_from(buf, spec.dtype, f'storage {spec.key}')


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
    name, f = _open(path, max_bytes)
    with f:
        try:
            return _read_safetensors(f, max_bytes)
        except _Bad as e:
            raise CheckpointError(f'{name}: {e}') from None
        except _MALFORMED as e:
            raise CheckpointError(f'{name}: malformed safetensors file ({_short(e)})') from e


def read_safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata of a safetensors file, its header checked in full as :func:`read_safetensors_file`
    does, without reading any tensor."""
    name, f = _open(path, None)
    with f:
        try:
            return _read_safetensors(f, None, with_tensors=False)[1]
        except _Bad as e:
            raise CheckpointError(f'{name}: {e}') from None
        except _MALFORMED as e:
            raise CheckpointError(f'{name}: malformed safetensors file ({_short(e)})') from e


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Bad(f'the header names {_describe(k)} twice')
        out[k] = v
    return out


def _no_constant(text):
    raise _Bad(f'the header holds the non-JSON number {text}')


def _read_safetensors(f, max_bytes: Optional[int], with_tensors: bool = True):
    file_size = os.fstat(f.fileno()).st_size
    if file_size == 0:
        raise _Bad('the file is empty')
    if file_size < 8:
        raise _Bad(f'the file holds {file_size} bytes, too few for a safetensors header')
    header_len, = struct.unpack('<Q', _read_exact(f, 0, 8, 'the header length'))
    if header_len > MAX_SAFETENSORS_HEADER or header_len > file_size - 8:
        raise _Bad(f'the header length {header_len} is beyond the file ({file_size} bytes) or over the '
                   f'{MAX_SAFETENSORS_HEADER}-byte limit; not a safetensors file or truncated')
    raw = _read_exact(f, 8, header_len, 'the header')
    try:
        header = json.loads(raw.decode('utf-8'), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise _Bad('the header is not UTF-8; not a safetensors file') from None
    except json.JSONDecodeError as e:
        raise _Bad(f'the header is not JSON ({e.msg} at character {e.pos}); not a safetensors file') from None
    if type(header) is not dict:
        raise _Bad('the header is not a JSON object')
    metadata = header.pop('__metadata__', None)
    if metadata is None:
        metadata = {}
    elif type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise _Bad('__metadata__ must map strings to strings')

    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = []
    for key, info in header.items():
        where = f'tensor {_describe(key)}'
        if type(info) is not dict or set(info) != {'dtype', 'shape', 'data_offsets'}:
            raise _Bad(f'{where}: the entry must have exactly dtype, shape and data_offsets')
        dtype = _SAFETENSORS_DTYPES.get(info['dtype']) if type(info['dtype']) is str else None
        if dtype is None:
            raise _Bad(f"{where}: dtype {_describe(info['dtype'])} is not read (only "
                       f"{', '.join(_SAFETENSORS_DTYPES)})")
        shape, offsets = info['shape'], info['data_offsets']
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(_is_int(s) for s in shape):
            raise _Bad(f'{where}: shape must be a list of at most {MAX_DIMS} non-negative integers')
        if type(offsets) is not list or len(offsets) != 2 or not all(_is_int(o, 0, 1 << 62) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise _Bad(f'{where}: data_offsets must be [begin, end] with 0 <= begin <= end')
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _Bad(f'{where}: data_offsets span {end - begin} bytes but shape {shape} of '
                       f"{info['dtype']} needs {nbytes}")
        if end > data_len:
            raise _Bad(f'{where}: data_offsets [{begin}, {end}] run past the data ({data_len} bytes)')
        entries.append((begin, end, key, dtype, shape))
    covered = 0
    for begin, end, key, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < covered:
            raise _Bad(f'tensor {_describe(key)} overlaps another tensor')
        if begin > covered:
            raise _Bad(f'a gap of {begin - covered} unaccounted bytes lies before tensor {_describe(key)}')
        covered = end
    if covered != data_len:
        raise _Bad(f'{data_len - covered} bytes after the last tensor are not accounted for')
    if max_bytes is not None and data_len > max_bytes:
        raise _Bad(f'the tensors hold {data_len} bytes, more than max_bytes={max_bytes}')

    tensors: Dict[str, torch.Tensor] = {}
    for begin, end, key, dtype, shape in entries if with_tensors else ():
        buf = bytearray(end - begin)
        _read_into(f, data_start + begin, buf, f'tensor {_describe(key)}')
        tensors[key] = _tensor_from(buf, dtype, f'tensor {_describe(key)}').reshape(shape)
    return tensors, metadata
