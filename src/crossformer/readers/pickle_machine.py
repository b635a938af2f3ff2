"""A pickle machine of its own for the ``data.pkl`` of a ``torch.save`` archive: no code runs.

Every opcode it runs is one of the handlers below, registered by name in groups (memo, scalars,
stack structure, containers, the few objects with behaviour, framing); any other opcode is refused
by name. Globals are looked up in :data:`GLOBALS` and become inert tokens
(:class:`~.values.Global`); the only calls are the checked ``REDUCE``/``NEWOBJ``/``BUILD`` onto
those tokens, which build an ``OrderedDict``, a validated tensor view
(:class:`~.values.TensorSpec`) or an :class:`~.values.InertConfig`, and nothing is ever set on an
allowed function. Persistent ids (storages) are resolved by a callback that checks them against
the archive.
"""

import math
import pickletools
import struct
from collections import OrderedDict
from typing import Callable, Dict

import torch

from .untrusted import MAX_DIMS, SCALARS, FileDefect, is_int
from .values import WHAT_IS_READ, Global, InertConfig, StorageSpec, TensorSpec, describe

MAX_PICKLE_OPS = 2_000_000         # opcodes executed (each creates at most one small object)
MAX_MEMO = 1_000_000               # pickle memo entries

STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
    'BoolStorage': torch.bool,
}
# torch.save writes a dtype as GLOBAL 'torch <name>' when a dtype object is itself a value (a config
# entry, say); tensors never need one. The same ten dtypes as the storages are read.
_DTYPE_NAMES = {str(d).split('.', 1)[1]: d for d in STORAGE_DTYPES.values()}

GLOBALS = {
    ('collections', 'OrderedDict'): Global('collections.OrderedDict', 'ordered_dict'),
    ('torch._utils', '_rebuild_tensor_v2'): Global('torch._utils._rebuild_tensor_v2', 'rebuild_tensor'),
    ('torch._utils', '_rebuild_parameter'): Global('torch._utils._rebuild_parameter', 'rebuild_parameter'),
    ('yacs.config', 'CfgNode'): Global('yacs.config.CfgNode', 'config'),
    ('argparse', 'Namespace'): Global('argparse.Namespace', 'config'),
}
GLOBALS.update({('torch', n): Global(f'torch.{n}', 'storage', d) for n, d in STORAGE_DTYPES.items()})

_ACCEPTED_GLOBALS = ('collections.OrderedDict, torch._utils._rebuild_tensor_v2, '
                     'torch._utils._rebuild_parameter, torch.{Float,Double,Half,BFloat16,Long,Int,Short,'
                     'Char,Byte,Bool}Storage, the matching torch dtypes, yacs.config.CfgNode and '
                     'argparse.Namespace')
_GLOBAL_HINTS = {
    'torch._utils._rebuild_tensor': 'the legacy tensor format; re-save the file with a current PyTorch',
    'torch._utils._rebuild_parameter_with_state': 'a Parameter carrying extra Python attributes',
    'torch.UntypedStorage': 'an untyped storage, not written for tensors',
    '_codecs.encode': 'bytes pickled with protocol 2',
}

_OPCODES = {op.name: ord(op.code) for op in pickletools.opcodes}
_OPNAMES = {code: name for name, code in _OPCODES.items()}
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
_STOP = _OPCODES['STOP']
_UNSET = object()
_MEMOIZE = _OPCODES['MEMOIZE']
_TUPLE_SIZES = {_OPCODES['TUPLE1']: 1, _OPCODES['TUPLE2']: 2, _OPCODES['TUPLE3']: 3}
_CONSTANTS = {_OPCODES['NONE']: None, _OPCODES['NEWTRUE']: True, _OPCODES['NEWFALSE']: False}
# The unsigned little-endian length or memo index that follows an opcode.
_UNSIGNED_ARG = {_OPCODES[name]: struct.Struct(fmt) for names, fmt in (
    (('BINPUT', 'BINGET', 'SHORT_BINUNICODE', 'SHORT_BINBYTES'), '<B'),
    (('LONG_BINPUT', 'LONG_BINGET', 'BINUNICODE', 'BINBYTES'), '<I'),
    (('BINUNICODE8', 'BINBYTES8'), '<Q'),
) for name in names}

# opcode -> handler(machine, op, at); filled by @_handles below. Every opcode not in it is refused.
_DISPATCH: Dict[int, Callable[['PickleMachine', int, int], None]] = {}


def _handles(*names: str):
    """Registers the decorated method as the handler of the opcodes ``names``."""
    def register(handler):
        for name in names:
            _DISPATCH[_OPCODES[name]] = handler
        return handler
    return register


def _check_key(key, depth: int = 0) -> None:
    """Dict keys are scalars or (shallow) tuples of them: hashing them runs nothing and cannot recurse deeply."""
    if type(key) in SCALARS:
        return
    if type(key) is tuple and depth < 8:
        for k in key:
            _check_key(k, depth + 1)
        return
    raise FileDefect(f'refused dict key {describe(key)}: keys are strings, numbers or tuples of them')


class PickleMachine:
    """Runs a torch.save data.pkl. ``storage_spec(pid)`` validates a persistent id against the archive.

    The state of a run: ``data`` and the read position ``pos``, the ``stack``, the ``metastack`` of
    stacks saved by MARK, and the ``memo``. A handler reads its argument at ``pos`` and moves it past.
    """

    def __init__(self, data: bytes, storage_spec: Callable[[tuple], StorageSpec]):
        self.data = data
        self.storage_spec = storage_spec
        self.pos = 0
        self.stack: list = []
        self.metastack: list = []
        self.memo: dict = {}

    def run(self):
        """The value the pickle builds, made of plain data and the inert values of :mod:`.values`."""
        data, n, dispatch = self.data, len(self.data), _DISPATCH
        ops = 0
        while True:
            at = self.pos
            if at >= n:
                raise FileDefect('data.pkl ends without a STOP opcode (truncated)')
            op = data[at]
            self.pos = at + 1
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise FileDefect(f'data.pkl runs more than {MAX_PICKLE_OPS} opcodes')
            if op == _STOP:
                return self.stop()
            handler = dispatch.get(op)
            if handler is None:
                self.refuse_op(op, at)
            try:
                handler(self, op, at)
            except (IndexError, struct.error) as e:
                if isinstance(e, struct.error) or self.pos >= n:
                    raise FileDefect(f'data.pkl is truncated inside the opcode at byte {at}') from None
                raise FileDefect(f'pickle stack underflow at byte {at} of data.pkl '
                                 f'({_OPNAMES.get(op, hex(op))})') from None

    def stop(self):
        if self.metastack or len(self.stack) != 1:
            raise FileDefect('data.pkl stops with an unbalanced stack')
        if self.pos != len(self.data):
            raise FileDefect(f'{len(self.data) - self.pos} bytes follow the STOP opcode of data.pkl')
        return self.stack[0]

    def refuse_op(self, op: int, at: int):
        name = _OPNAMES.get(op)
        why = _REFUSED_OPS.get(name) if name else None
        if why is None:
            why = 'an opcode torch.save does not write' if name else 'an unknown opcode'
        raise FileDefect(f'refused pickle opcode {name or f"0x{op:02x}"} (byte {at} of data.pkl): {why}; '
                         f'{WHAT_IS_READ}')

    def unsigned_arg(self, op: int) -> int:
        """The unsigned argument of opcode ``op`` at ``pos``; ``pos`` moves past it."""
        fmt = _UNSIGNED_ARG[op]
        value, = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def take(self, size: int, at: int, what: str) -> bytes:
        """The ``size`` bytes at ``pos`` (the body of a string, bytes or integer); ``pos`` moves past them."""
        pos = self.pos
        if pos + size > len(self.data):
            raise FileDefect(f'{what} at byte {at} runs past the end of data.pkl')
        self.pos = pos + size
        return self.data[pos:pos + size]

    def pop_mark(self, op: int, at: int) -> list:
        """The items pushed since the last MARK; the stack saved by that MARK is the stack again."""
        if not self.metastack:
            raise FileDefect(f'{_OPNAMES[op]} without a MARK (byte {at} of data.pkl)')
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # --- memo

    # (put and get read their argument inline, as unsigned_arg does: they are a third of all opcodes)

    @_handles('BINPUT', 'LONG_BINPUT', 'MEMOIZE')
    def put(self, op: int, at: int) -> None:
        memo = self.memo
        if op == _MEMOIZE:
            idx = len(memo)
        else:
            fmt = _UNSIGNED_ARG[op]
            idx, = fmt.unpack_from(self.data, self.pos)
            self.pos += fmt.size
        if idx not in memo and len(memo) >= MAX_MEMO:
            raise FileDefect(f'data.pkl uses more than {MAX_MEMO} memo entries')
        memo[idx] = self.stack[-1]

    @_handles('BINGET', 'LONG_BINGET')
    def get(self, op: int, at: int) -> None:
        fmt = _UNSIGNED_ARG[op]
        idx, = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        value = self.memo.get(idx, _UNSET)
        if value is _UNSET:
            raise FileDefect(f'pickle memo entry {idx} is read before it is written (byte {at})')
        self.stack.append(value)

    # --- scalars

    @_handles('BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8')
    def string(self, op: int, at: int) -> None:
        raw = self.take(self.unsigned_arg(op), at, 'a string')
        try:
            self.stack.append(raw.decode('utf-8'))
        except UnicodeDecodeError:
            raise FileDefect(f'the string at byte {at} of data.pkl is not valid UTF-8') from None

    @_handles('SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8')
    def bytes_value(self, op: int, at: int) -> None:
        self.stack.append(self.take(self.unsigned_arg(op), at, 'a bytes value'))

    @_handles('BININT1')
    def binint1(self, op: int, at: int) -> None:
        self.stack.append(self.data[self.pos])
        self.pos += 1

    @_handles('BININT2')
    def binint2(self, op: int, at: int) -> None:
        self.stack.append(struct.unpack_from('<H', self.data, self.pos)[0])
        self.pos += 2

    @_handles('BININT')
    def binint(self, op: int, at: int) -> None:
        self.stack.append(struct.unpack_from('<i', self.data, self.pos)[0])
        self.pos += 4

    @_handles('LONG1')
    def long1(self, op: int, at: int) -> None:
        size = self.data[self.pos]
        self.pos += 1
        self.stack.append(int.from_bytes(self.take(size, at, 'an integer'), 'little', signed=True))

    @_handles('BINFLOAT')
    def binfloat(self, op: int, at: int) -> None:
        self.stack.append(struct.unpack_from('>d', self.data, self.pos)[0])
        self.pos += 8

    @_handles('NONE', 'NEWTRUE', 'NEWFALSE')
    def constant(self, op: int, at: int) -> None:
        self.stack.append(_CONSTANTS[op])

    # --- stack structure

    @_handles('MARK')
    def mark(self, op: int, at: int) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    @_handles('POP_MARK')
    def discard_to_mark(self, op: int, at: int) -> None:
        self.pop_mark(op, at)

    @_handles('POP')
    def pop(self, op: int, at: int) -> None:
        self.stack.pop()

    @_handles('EMPTY_TUPLE')
    def empty_tuple(self, op: int, at: int) -> None:
        self.stack.append(())

    @_handles('TUPLE')
    def tuple_to_mark(self, op: int, at: int) -> None:
        items = self.pop_mark(op, at)
        self.stack.append(tuple(items))

    @_handles('TUPLE1', 'TUPLE2', 'TUPLE3')
    def short_tuple(self, op: int, at: int) -> None:
        stack = self.stack
        k = _TUPLE_SIZES[op]
        if len(stack) < k:
            raise IndexError
        stack[-k:] = [tuple(stack[-k:])]

    # --- containers

    @_handles('EMPTY_LIST')
    def empty_list(self, op: int, at: int) -> None:
        self.stack.append([])

    @_handles('EMPTY_DICT')
    def empty_dict(self, op: int, at: int) -> None:
        self.stack.append({})

    @_handles('SETITEM')
    def setitem(self, op: int, at: int) -> None:
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        self.set_items(stack[-1], [key, value], op, at)

    @_handles('SETITEMS')
    def setitems(self, op: int, at: int) -> None:
        items = self.pop_mark(op, at)
        self.set_items(self.stack[-1], items, op, at)

    @_handles('APPEND')
    def append(self, op: int, at: int) -> None:
        value = self.stack.pop()
        self.list_target(self.stack[-1], op, at).append(value)

    @_handles('APPENDS')
    def appends(self, op: int, at: int) -> None:
        items = self.pop_mark(op, at)
        self.list_target(self.stack[-1], op, at).extend(items)

    @staticmethod
    def set_items(target, items: list, op: int, at: int) -> None:
        if type(target) not in (dict, OrderedDict, InertConfig):
            raise FileDefect(f'refused {_OPNAMES[op]} onto {describe(target)} (byte {at} of data.pkl): items '
                             'are set only on dicts, OrderedDicts and configs')
        if len(items) % 2:
            raise FileDefect(f'{_OPNAMES[op]} at byte {at} of data.pkl has a key without a value')
        for i in range(0, len(items), 2):
            key = items[i]
            _check_key(key)
            if key in target:
                raise FileDefect(f'key {describe(key)} is set twice in one dict (byte {at} of data.pkl)')
            target[key] = items[i + 1]

    @staticmethod
    def list_target(target, op: int, at: int) -> list:
        if type(target) is not list:
            raise FileDefect(f'refused {_OPNAMES[op]} onto {describe(target)} (byte {at} of data.pkl): '
                             'only lists are appended to')
        return target

    # --- the few objects with behaviour, all checked

    @_handles('GLOBAL')
    def global_(self, op: int, at: int) -> None:
        module = self.line(at)
        name = self.line(at)
        self.stack.append(self.find_global(module, name))

    @_handles('STACK_GLOBAL')
    def stack_global(self, op: int, at: int) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if type(module) is not str or type(name) is not str:
            raise FileDefect(f'STACK_GLOBAL needs two strings (byte {at} of data.pkl)')
        self.stack.append(self.find_global(module, name))

    @_handles('REDUCE')
    def reduce(self, op: int, at: int) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args, at)

    @_handles('NEWOBJ')
    def newobj(self, op: int, at: int) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.new_config(self.stack[-1], args, {}, op, at)

    @_handles('NEWOBJ_EX')
    def newobj_ex(self, op: int, at: int) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self.new_config(self.stack[-1], args, kwargs, op, at)

    @_handles('BUILD')
    def build(self, op: int, at: int) -> None:
        state = self.stack.pop()
        self.set_state(self.stack[-1], state, at)

    @_handles('BINPERSID')
    def binpersid(self, op: int, at: int) -> None:
        self.stack[-1] = self.storage_spec(self.stack[-1])

    def line(self, at: int) -> str:
        """A GLOBAL's module or name line at ``pos``; ``pos`` moves past its newline."""
        end = self.data.find(b'\n', self.pos, self.pos + 257)
        if end < 0:
            raise FileDefect(f'the GLOBAL at byte {at} of data.pkl has no name line')
        try:
            text = self.data[self.pos:end].decode('ascii')
        except UnicodeDecodeError:
            raise FileDefect(f'the GLOBAL at byte {at} of data.pkl names a non-ASCII global') from None
        self.pos = end + 1
        return text

    @staticmethod
    def find_global(module: str, name: str):
        token = GLOBALS.get((module, name))
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
        raise FileDefect(f'refused pickle global {full}{hint}: only {_ACCEPTED_GLOBALS} are accepted')

    def call(self, func, args, at: int):
        """What REDUCE makes of ``func(*args)``: an empty OrderedDict or a tensor spec, nothing else."""
        role = func.role if isinstance(func, Global) else None
        if type(args) is not tuple:
            raise FileDefect(f'REDUCE at byte {at} of data.pkl has {describe(args)} as arguments, not a tuple')
        if role == 'ordered_dict':
            if args:
                raise FileDefect(f'collections.OrderedDict is called with arguments at byte {at} of data.pkl; '
                                 'torch.save writes OrderedDict() then sets its items')
            return OrderedDict()
        if role == 'rebuild_tensor':
            return self.rebuild_tensor(args, at)
        if role == 'rebuild_parameter':
            if len(args) != 3 or type(args[0]) is not TensorSpec or type(args[1]) is not bool \
                    or not _empty_hooks(args[2]):
                raise FileDefect(f'_rebuild_parameter at byte {at} of data.pkl needs (tensor, bool, '
                                 'empty OrderedDict of hooks)')
            return args[0]                          # a parameter is read as a plain tensor
        raise FileDefect(f'refused REDUCE onto {describe(func)} (byte {at} of data.pkl): only '
                         'collections.OrderedDict and torch._utils._rebuild_tensor_v2/_rebuild_parameter are '
                         f'called; {WHAT_IS_READ}')

    @staticmethod
    def rebuild_tensor(args: tuple, at: int) -> TensorSpec:
        """``_rebuild_tensor_v2``'s arguments checked: a view that stays inside its storage."""
        where = f'_rebuild_tensor_v2 at byte {at} of data.pkl'
        if len(args) not in (6, 7):
            raise FileDefect(f'{where} has {len(args)} arguments, not 6 or 7')
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        if type(storage) is not StorageSpec:
            raise FileDefect(f'{where} is given {describe(storage)} instead of a storage')
        if not is_int(offset):
            raise FileDefect(f'{where}: storage offset {describe(offset)} is not a non-negative integer')
        for label, value in (('size', size), ('stride', stride)):
            if type(value) is not tuple or len(value) > MAX_DIMS or not all(is_int(v) for v in value):
                raise FileDefect(f'{where}: {label} must be a tuple of at most {MAX_DIMS} non-negative integers')
        if len(size) != len(stride):
            raise FileDefect(f'{where}: size has {len(size)} dimensions but stride has {len(stride)}')
        if type(requires_grad) is not bool:
            raise FileDefect(f'{where}: requires_grad is {describe(requires_grad)}, not a bool')
        if not _empty_hooks(hooks):
            raise FileDefect(f'{where}: backward hooks must be an empty OrderedDict')
        if len(args) == 7 and not (type(args[6]) in (dict, OrderedDict) and not args[6]):
            raise FileDefect(f'{where}: tensor metadata {describe(args[6])} is not read (only an empty dict)')
        numel = math.prod(size)
        if numel:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel:
                raise FileDefect(f'{where}: a view of size {size}, stride {stride} and offset {offset} reaches '
                                 f'element {last} of a storage of {storage.numel} elements')
            if numel > storage.numel:
                raise FileDefect(f'{where}: a view of {numel} elements over a storage of {storage.numel} '
                                 '(overlapping or stride-0) would be larger than its storage')
        elif offset > storage.numel:
            raise FileDefect(f'{where}: offset {offset} is past the end of a storage of {storage.numel} elements')
        return TensorSpec(storage, offset, size, stride)

    @staticmethod
    def new_config(cls, args, kwargs, op: int, at: int) -> InertConfig:
        opname = _OPNAMES[op]
        if not (isinstance(cls, Global) and cls.role == 'config'):
            raise FileDefect(f'refused {opname} of {describe(cls)} (byte {at} of data.pkl): only '
                             'yacs.config.CfgNode and argparse.Namespace are read, as inert configs; '
                             f'{WHAT_IS_READ}')
        if type(args) is not tuple or args or type(kwargs) is not dict or kwargs:
            raise FileDefect(f'{opname} of {cls.name} at byte {at} of data.pkl passes constructor arguments')
        return InertConfig(cls.name)

    @staticmethod
    def set_state(inst, state, at: int) -> None:
        """What BUILD may do: give a config its attributes, or drop a state_dict's ``_metadata``."""
        if type(inst) is InertConfig:
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise FileDefect(f'BUILD state of {inst.kind} at byte {at} of data.pkl is {describe(state)}, '
                                 'not a dict of attribute names')
            inst.attributes.update(state)
            return
        if type(inst) is OrderedDict and type(state) is dict and set(state) <= {'_metadata'} \
                and type(state.get('_metadata', {})) in (dict, OrderedDict):
            return   # state_dict()'s version record: checked, then dropped; no attribute is ever set
        raise FileDefect(f'refused BUILD onto {describe(inst)} (byte {at} of data.pkl): it sets attributes; '
                         f'only configs (yacs CfgNode, argparse Namespace) take state; {WHAT_IS_READ}')

    # --- framing (STOP ends the loop in run)

    @_handles('PROTO')
    def proto(self, op: int, at: int) -> None:
        version = self.data[self.pos]
        if not 2 <= version <= 5:
            raise FileDefect(f'pickle protocol {version} is not read (torch.save writes 2 to 5)')
        self.pos += 1

    @_handles('FRAME')
    def frame(self, op: int, at: int) -> None:      # advisory: data.pkl is in memory
        self.pos += 8
        if self.pos > len(self.data):
            raise IndexError


def _empty_hooks(hooks) -> bool:
    return type(hooks) is OrderedDict and not hooks


ACCEPTED_OPCODES = frozenset(_OPNAMES[op] for op in _DISPATCH) | {'STOP'}
