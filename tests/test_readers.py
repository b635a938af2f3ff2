"""crossformer.readers: the safe readers of torch.save and safetensors files.

Round trips of what real checkpoints hold, each refusal with its message, and a byte-mutation fuzz
whose only allowed outcomes are a clean read or CheckpointError.
"""

import argparse
import collections
import io
import json
import os
import pickletools
import struct
import sys
import types
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import crossformer  # noqa: F401
from crossformer.errors import CheckpointError, MissingFileError
from crossformer.readers import InertConfig, read_safetensors_file, read_torch_file
from crossformer.readers.pickle_machine import ACCEPTED_OPCODES


from pickles import (FOUR_FLOATS, PROTO, SNAPSHOT, g, i, in_dict, pid, snapshot, tensor, u,
                     write_archive)


def refused(path, *fragments, reader=read_torch_file):
    with pytest.raises(CheckpointError) as info:
        reader(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message
    assert 'Unsupported operand' not in message
    assert snapshot() == SNAPSHOT
    return message


def same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert a.device.type == 'cpu' and not a.requires_grad and a.layout == torch.strided
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------------------------------
# round trips


def state_dict():
    sd = collections.OrderedDict()
    sd['f32'] = torch.randn(3, 4)
    sd['f16'] = torch.randn(5).half()
    sd['bf16'] = torch.randn(2, 2).bfloat16()
    sd['i64'] = torch.arange(6).reshape(2, 3)
    sd['bool'] = torch.tensor([True, False, True])
    sd['scalar'] = torch.tensor(7.5)
    sd['empty'] = torch.zeros(0, 3)
    return sd


def test_state_dict_round_trip(tmp_path):
    sd = state_dict()
    torch.save(sd, tmp_path / 'sd.pth')
    got = read_torch_file(tmp_path / 'sd.pth')
    same(got, sd)
    assert type(got) is collections.OrderedDict


def test_training_checkpoint_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    ckpt = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 3, 'max_accuracy': 0.5,
            'names': ['a', 'b'], 'pair': (1, 2.5), 'keys': {1: 'one', (2, 'x'): None}, 'dtype': torch.float16}
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    got = read_torch_file(tmp_path / 'ckpt.pth')
    same(got, ckpt)          # also state_dict()'s OrderedDict with its _metadata BUILD, dropped
    assert not hasattr(got['model'], '_metadata')


def test_protocol_5_and_parameters(tmp_path):
    obj = {'p': torch.nn.Parameter(torch.ones(2, 2)), 'v': torch.arange(5.)}
    torch.save(obj, tmp_path / 'p.pth', pickle_protocol=5)
    got = read_torch_file(tmp_path / 'p.pth')
    assert type(got['p']) is torch.Tensor and not got['p'].requires_grad
    same(got['v'], obj['v'])
    assert torch.equal(got['p'], torch.ones(2, 2))


def test_shared_storage_and_strided_view(tmp_path):
    base = torch.arange(24.)
    view = base.reshape(4, 6)[:, ::2].t()
    torch.save({'a': base[:12], 'b': base[12:], 'view': view}, tmp_path / 's.pth')
    got = read_torch_file(tmp_path / 's.pth')
    assert torch.equal(got['a'], base[:12]) and torch.equal(got['b'], base[12:])
    assert got['a'].untyped_storage().data_ptr() == got['b'].untyped_storage().data_ptr()
    assert torch.equal(got['view'], view) and got['view'].stride() == view.stride()
    assert got['view'].untyped_storage().data_ptr() == got['a'].untyped_storage().data_ptr()


def test_yacs_cfgnode_as_inert_config(tmp_path):
    yacs, config = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    config.CfgNode, yacs.config = CfgNode, config
    cfg = CfgNode(MODEL=CfgNode(NAME='crossformer_s', DROP=0.2), TRAIN=CfgNode(EPOCHS=300))
    cfg.__dict__['__immutable__'] = True
    sys.modules['yacs'], sys.modules['yacs.config'] = yacs, config
    try:
        torch.save({'model': {'w': torch.ones(1)}, 'config': cfg}, tmp_path / 'cfg.pth')
    finally:
        del sys.modules['yacs'], sys.modules['yacs.config']
    got = read_torch_file(tmp_path / 'cfg.pth')['config']
    assert type(got) is InertConfig and got.kind == 'yacs.config.CfgNode'
    assert got.attributes == {'__immutable__': True}
    assert type(got['MODEL']) is InertConfig and dict(got['MODEL']) == {'NAME': 'crossformer_s', 'DROP': 0.2}
    assert dict(got['TRAIN']) == {'EPOCHS': 300}
    assert 'yacs' not in sys.modules


def test_namespace_as_inert_config(tmp_path):
    torch.save({'args': argparse.Namespace(lr=0.1, name='x', sizes=[1, 2])}, tmp_path / 'ns.pth')
    got = read_torch_file(tmp_path / 'ns.pth')['args']
    assert type(got) is InertConfig and got.kind == 'argparse.Namespace'
    assert dict(got) == {} and got.attributes == {'lr': 0.1, 'name': 'x', 'sizes': [1, 2]}


def test_max_bytes(tmp_path):
    torch.save({'w': torch.zeros(100)}, tmp_path / 'w.pth')
    assert read_torch_file(tmp_path / 'w.pth', max_bytes=400)['w'].shape == (100,)
    with pytest.raises(CheckpointError, match='400 bytes, more than max_bytes=399'):
        read_torch_file(tmp_path / 'w.pth', max_bytes=399)


def test_handmade_archive_and_int_keys(tmp_path):
    pkl = PROTO + b'}(' + i(1) + tensor('0', 4, 1, (3,), (1,)) + b'J\x02\x00\x00\x00' + u('x') + b'\x86'\
        + u('two') + b'u.'
    got = read_torch_file(write_archive(tmp_path / 'h.pth', pkl, {'0': FOUR_FLOATS}))
    assert list(got) == [1, (2, 'x')]
    assert torch.equal(got[1], torch.tensor([2., 3., 4.]))


# --------------------------------------------------------------------------------------------------
# refusals: the pickle


def test_build_onto_an_allowed_function_is_refused(tmp_path):
    state = b'}' + u('__defaults__') + b'(' + i(1) + b'ts'
    refused(write_archive(tmp_path / 'a.pth', in_dict(g('torch._utils', '_rebuild_tensor_v2') + state + b'b')),
            'refused BUILD onto torch._utils._rebuild_tensor_v2', 'sets attributes')
    slots = b'N}' + u('__kwdefaults__') + b'}s\x86'
    refused(write_archive(tmp_path / 'b.pth', in_dict(g('collections', 'OrderedDict') + slots + b'b')),
            'refused BUILD onto collections.OrderedDict')
    refused(write_archive(tmp_path / 'c.pth', in_dict(g('torch', 'FloatStorage') + u('x') + i(1) + b's')),
            'refused SETITEM onto torch.FloatStorage')
    refused(write_archive(tmp_path / 'd.pth', in_dict(g('torch._utils', '_rebuild_parameter') + i(1) + b'a')),
            'refused APPEND onto torch._utils._rebuild_parameter')
    od_state = g('collections', 'OrderedDict') + b')R}' + u('__class__') + i(1) + b'sb'
    refused(write_archive(tmp_path / 'e.pth', in_dict(od_state)), 'refused BUILD onto a OrderedDict')


@pytest.mark.parametrize('module,name,fragment', [
    ('os', 'system', 'os.system'), ('builtins', 'eval', 'builtins.eval'),
    ('builtins', 'bytearray', 'builtins.bytearray'), ('torch', 'Tensor', 'torch.Tensor'),
    ('torch._utils', '_rebuild_tensor', 'legacy tensor format'),
    ('torch.nn.modules.linear', 'Linear', 'save model.state_dict() instead'),
    ('torch', 'complex64', 'torch.complex64'), ('torch', 'UntypedStorage', 'untyped storage'),
])
def test_foreign_globals_are_refused(tmp_path, module, name, fragment):
    path = write_archive(tmp_path / 'g.pth', in_dict(g(module, name) + u('echo hi') + b'\x85R'))
    refused(path, 'refused pickle global', fragment, 'only collections.OrderedDict')
    stack_global = in_dict(u(module) + u(name) + b'\x93')
    refused(write_archive(tmp_path / 's.pth', stack_global), 'refused pickle global', fragment)


@pytest.mark.parametrize('body,fragment', [
    (b'(' + g('collections', 'OrderedDict') + b'o', 'refused pickle opcode OBJ'),
    (b'(ios\nsystem\n', 'refused pickle opcode INST'),
    (b'\x82\x01', 'refused pickle opcode EXT1'), (b'\x83\x01\x00', 'refused pickle opcode EXT2'),
    (b'\x84\x01\x00\x00\x00', 'refused pickle opcode EXT4'),
    (b'P0\n', 'refused pickle opcode PERSID'), (b'\x8f', 'refused pickle opcode EMPTY_SET'),
    (b'I1\n', 'refused pickle opcode INT'), (b'\xff', 'an unknown opcode'),
    (g('argparse', 'Namespace') + b')R', 'refused REDUCE onto argparse.Namespace'),
    (g('collections', 'OrderedDict') + b')\x81', 'refused NEWOBJ of collections.OrderedDict'),
    (g('argparse', 'Namespace') + b'(' + i(1) + b't\x81', 'passes constructor arguments'),
    (b']q\x00h\x00a', 'a cycle'),
    (b'}' + u('k') + i(1) + b's' + u('k') + i(2) + b's', "key 'k' is set twice"),
    (b'}' + b']' + i(1) + b's', 'refused dict key a list'),
    (g('collections', 'OrderedDict') + b'(' + i(1) + b'tR', 'called with arguments'),
    (g('torch._utils', '_rebuild_tensor_v2'), 'torch._utils._rebuild_tensor_v2 appears in the data'),
    (b']' * 150 + b'a' * 149, 'nested more than 100 levels'),
])
def test_refused_pickles(tmp_path, body, fragment):
    refused(write_archive(tmp_path / 'p.pth', in_dict(body), {'0': FOUR_FLOATS}), fragment)


ACCEPTED = {
    'PROTO', 'FRAME', 'STOP',                                                          # framing
    'BINPUT', 'LONG_BINPUT', 'MEMOIZE', 'BINGET', 'LONG_BINGET',                       # memo
    'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8',
    'BININT1', 'BININT2', 'BININT', 'LONG1', 'BINFLOAT', 'NONE', 'NEWTRUE', 'NEWFALSE',  # scalars
    'MARK', 'EMPTY_TUPLE', 'TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3', 'POP', 'POP_MARK',   # stack structure
    'EMPTY_LIST', 'EMPTY_DICT', 'SETITEM', 'SETITEMS', 'APPEND', 'APPENDS',            # containers
    'GLOBAL', 'STACK_GLOBAL', 'REDUCE', 'NEWOBJ', 'NEWOBJ_EX', 'BUILD', 'BINPERSID',   # checked objects
}


def test_the_pickle_machine_runs_exactly_these_opcodes(tmp_path):
    # accepting one more opcode is a decision to make here, in the open
    assert ACCEPTED_OPCODES == ACCEPTED
    for op in pickletools.opcodes:
        if op.name not in ACCEPTED:
            path = write_archive(tmp_path / f'{op.name}.pth', PROTO + op.code.encode('latin-1') + b'\0' * 16)
            refused(path, f'refused pickle opcode {op.name} (byte 2 of data.pkl)')


def test_shared_containers_that_expand_exponentially(tmp_path):
    body = b']q\x000'                                    # memo 0: the innermost list
    for level in range(1, 40):                           # each level is a tuple of the previous one twice
        body += b'(h' + bytes([level - 1]) * 1 + b'h' + bytes([level - 1]) + b'tq' + bytes([level]) + b'0'
    refused(write_archive(tmp_path / 'x.pth', in_dict(body + b'h' + bytes([39]))), 'expands to more than')


def test_short_pickles_naming_huge_sizes(tmp_path):
    tiny = [PROTO + b'X\xff\xff\xff\xff' + b'abc.', PROTO + b'\x8d' + b'\xff' * 8 + b'.',
            PROTO + b'B\xff\xff\xff\x7f.', PROTO + b'\x8a\xff\x01.']
    for n, pkl in enumerate(tiny):
        assert len(pkl) <= 16
        refused(write_archive(tmp_path / f't{n}.pth', pkl), 'data.pkl')
    huge_storage = in_dict(tensor('0', 2 ** 30, 0, (2 ** 30,), (1,)))
    refused(write_archive(tmp_path / 'h.pth', huge_storage, {'0': FOUR_FLOATS}),
            'declares 1073741824 x torch.FloatStorage', 'its record holds 16 bytes')
    huge_view = in_dict(tensor('0', 4, 0, (2 ** 40,), (1,)))
    refused(write_archive(tmp_path / 'v.pth', huge_view, {'0': FOUR_FLOATS}), 'reaches element')


def test_view_checks(tmp_path):
    stride0 = in_dict(tensor('0', 4, 0, (8,), (0,)))
    refused(write_archive(tmp_path / 'a.pth', stride0, {'0': FOUR_FLOATS}), 'larger than its storage')
    past = in_dict(tensor('0', 4, 3, (2,), (1,)))
    refused(write_archive(tmp_path / 'b.pth', past, {'0': FOUR_FLOATS}), 'reaches element 4')
    ranks = in_dict(tensor('0', 4, 0, (2, 2), (1,)))
    refused(write_archive(tmp_path / 'c.pth', ranks, {'0': FOUR_FLOATS}), 'size has 2 dimensions')
    hooks = in_dict(tensor('0', 4, 0, (4,), (1,), hooks=b')R' + u('h') + i(1) + b's'))
    refused(write_archive(tmp_path / 'd.pth', hooks, {'0': FOUR_FLOATS}), 'hooks must be an empty OrderedDict')
    expand = in_dict(tensor('0', 4, 0, (2, 2), (0, 1)))   # self-overlapping but within its storage: read
    got = read_torch_file(write_archive(tmp_path / 'e.pth', expand, {'0': FOUR_FLOATS}))['w']
    assert torch.equal(got, torch.tensor([[1., 2.], [1., 2.]]))
    bools = in_dict(tensor('0', 2, 0, (2,), (1,), cls='BoolStorage'))
    refused(write_archive(tmp_path / 'f.pth', bools, {'0': b'\x01\x02'}), 'bytes other than 0 and 1')


@pytest.mark.parametrize('pid_body,fragment', [
    (b'(' + u('storage') + g('torch', 'FloatStorage') + u('../data.pkl') + u('cpu') + i(1) + b'tQ',
     'not a plain record name'),
    (b'(' + u('module') + g('torch', 'FloatStorage') + u('0') + u('cpu') + i(4) + b'tQ', 'refused persistent id'),
    (u('0') + b'Q', 'refused persistent id'),
    (pid('7', 4), 'has no record archive/data/7'),
    (pid('0', 4), 'a storage appears in the data'),
    (pid('0', 4) + b'0' + pid('0', 2, 'DoubleStorage'), 'declared twice'),
])
def test_bad_persistent_ids(tmp_path, pid_body, fragment):
    refused(write_archive(tmp_path / 'p.pth', in_dict(pid_body), {'0': FOUR_FLOATS}), fragment)


def test_trailing_bytes_and_truncated_pickle(tmp_path):
    refused(write_archive(tmp_path / 'a.pth', in_dict(i(1)) + b'N'), 'follow the STOP')
    refused(write_archive(tmp_path / 'b.pth', in_dict(i(1))[:-3]), 'data.pkl')


# --------------------------------------------------------------------------------------------------
# refusals: the file and the archive


def test_file_level_refusals(tmp_path):
    with pytest.raises(MissingFileError):
        read_torch_file(tmp_path / 'missing.pth')
    with pytest.raises(CheckpointError, match='is a directory or special file'):
        read_torch_file(tmp_path)
    (tmp_path / 'empty.pth').write_bytes(b'')
    refused(tmp_path / 'empty.pth', 'the file is empty')
    (tmp_path / 'text.pth').write_text('this is not a checkpoint\n')
    refused(tmp_path / 'text.pth', 'not a zip archive')
    torch.save({'w': torch.ones(3)}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    refused(tmp_path / 'legacy.pth', 'legacy (non-zip) torch.save format', 're-save')


def test_truncated_and_corrupt_archives(tmp_path):
    torch.save({'w': torch.arange(64.)}, tmp_path / 'ok.pth')
    data = (tmp_path / 'ok.pth').read_bytes()
    for cut in (40, len(data) // 2, len(data) - 30, len(data) - 1):
        (tmp_path / 'cut.pth').write_bytes(data[:cut])
        refused(tmp_path / 'cut.pth')
    pickle_at = data.index(b'_rebuild_tensor_v2')  # inside data.pkl, whose CRC is checked
    flipped = bytearray(data)
    flipped[pickle_at] ^= 1
    (tmp_path / 'crc.pth').write_bytes(bytes(flipped))
    refused(tmp_path / 'crc.pth', 'fails its CRC check')
    (tmp_path / 'tail.pth').write_bytes(data + b'junk')
    refused(tmp_path / 'tail.pth', 'end-of-directory')


def test_compressed_record_is_refused(tmp_path):
    pkl = in_dict(tensor('0', 1 << 20, 0, (1 << 20,), (1,)))
    path = write_archive(tmp_path / 'z.pth', pkl, {'0': bytes(4 << 20)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    refused(path, "'archive/data/0' is compressed", 'decompression bombs')


def test_archive_layout_refusals(tmp_path):
    ok = in_dict(i(1))
    refused(write_archive(tmp_path / 'a.pth', ok, extra={'other/x': b''}), 'more than one top-level folder')
    refused(write_archive(tmp_path / 'b.pth', ok, extra={'archive/../x': b''}), 'not a plain path')
    refused(write_archive(tmp_path / 'c.pth', ok, extra={'archive/a\\b': b''}), 'not a plain path')
    with zipfile.ZipFile(tmp_path / 'd.pth', 'w') as z:
        z.writestr('archive/version', b'3')
    refused(tmp_path / 'd.pth', 'no archive/data.pkl')
    with zipfile.ZipFile(tmp_path / 'e.pth', 'w') as z:
        z.writestr('archive/data.pkl', ok)
        z.writestr('archive/byteorder', b'big')
    refused(tmp_path / 'e.pth', 'big-endian')
    with zipfile.ZipFile(tmp_path / 'f.pth', 'w') as z:
        z.writestr('archive/data.pkl', ok)
        z.comment = b'hello'
    refused(tmp_path / 'f.pth', 'comment')


# --------------------------------------------------------------------------------------------------
# safetensors


def st_file(path, header, data=b'', length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(raw) if length is None else length) + raw + data)
    return path


def st_refused(path, *fragments):
    return refused(path, *fragments, reader=read_safetensors_file)


def test_safetensors_round_trip(tmp_path):
    save_file = pytest.importorskip('safetensors.torch').save_file
    tensors = {k: v.contiguous() for k, v in state_dict().items()}
    save_file(tensors, str(tmp_path / 'w.safetensors'), metadata={'format': 'pt', 'epoch': '3'})
    got, meta = read_safetensors_file(tmp_path / 'w.safetensors')
    assert meta == {'format': 'pt', 'epoch': '3'}
    assert set(got) == set(tensors)
    for k in tensors:
        same(got[k], tensors[k])
    with pytest.raises(CheckpointError, match='more than max_bytes=10'):
        read_safetensors_file(tmp_path / 'w.safetensors', max_bytes=10)
    with pytest.raises(MissingFileError):
        read_safetensors_file(tmp_path / 'missing.safetensors')


def test_safetensors_refusals(tmp_path):
    entry = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}
    p = tmp_path / 'x.safetensors'
    p.write_bytes(b'')
    st_refused(p, 'the file is empty')
    st_refused(st_file(p, {'a': entry}, bytes(8), length=10 ** 6), 'header length 1000000 is beyond the file')
    st_refused(st_file(p, b'not json at all', bytes(8)), 'not JSON')
    st_refused(st_file(p, b'\xff\xfe{}'), 'not UTF-8')
    st_refused(st_file(p, b'[1, 2]'), 'not a JSON object')
    st_refused(st_file(p, {'a': dict(entry, dtype='F8_E4M3')}, bytes(8)), "dtype 'F8_E4M3' is not read")
    st_refused(st_file(p, {'a': entry, 'b': dict(entry, data_offsets=[4, 12])}, bytes(12)), 'overlaps')
    st_refused(st_file(p, {'a': dict(entry, data_offsets=[8, 16])}, bytes(8)), 'run past the data')
    st_refused(st_file(p, {'a': dict(entry, data_offsets=[0, 12])}, bytes(12)), 'span 12 bytes')
    st_refused(st_file(p, {'a': dict(entry, data_offsets=[4, 12])}, bytes(12)), 'gap of 4')
    st_refused(st_file(p, {'a': entry}, bytes(12)), '4 bytes after the last tensor')
    st_refused(st_file(p, {'a': dict(entry, shape=[2.0])}, bytes(8)), 'shape must be a list')
    st_refused(st_file(p, {'a': dict(entry, shape=[-2])}, bytes(8)), 'shape must be a list')
    st_refused(st_file(p, {'a': dict(entry, extra=1)}, bytes(8)), 'exactly dtype, shape and data_offsets')
    st_refused(st_file(p, {'__metadata__': {'a': 1}}), '__metadata__ must map strings to strings')
    st_refused(st_file(p, b'{"a": 1, "a": 2}'), "names 'a' twice")
    st_refused(st_file(p, b'[' * 100_000 + b']' * 100_000), 'safetensors')
    st_refused(st_file(p, {'a': dict(entry, dtype='BOOL', shape=[8])}, bytes(7) + b'\x05'), 'bytes other than 0')
    got, meta = read_safetensors_file(st_file(p, {'a': entry, '__metadata__': {'k': 'v'}}, FOUR_FLOATS[:8]))
    assert torch.equal(got['a'], torch.tensor([1., 2.])) and meta == {'k': 'v'}


# --------------------------------------------------------------------------------------------------
# fuzz: mutated files read cleanly or raise CheckpointError, and nothing is mutated


def _valid_torch_bytes() -> bytes:
    buf = io.BytesIO()
    obj = collections.OrderedDict(w=torch.arange(6.).reshape(2, 3), b=torch.tensor([True, False]),
                                  i=torch.arange(3), v=torch.arange(4.)[::2])
    torch.save({'model': obj, 'epoch': 3, 'args': argparse.Namespace(lr=0.5)}, buf)
    return buf.getvalue()


def _valid_safetensors_bytes() -> bytes:
    import json
    header = json.dumps({'__metadata__': {'format': 'pt'},
                         'w': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]},
                         'b': {'dtype': 'BOOL', 'shape': [2], 'data_offsets': [16, 18]}}).encode()
    return struct.pack('<Q', len(header)) + header + FOUR_FLOATS + b'\x01\x00'


TORCH_BYTES = _valid_torch_bytes()
SAFETENSORS_BYTES = _valid_safetensors_bytes()
with zipfile.ZipFile(io.BytesIO(TORCH_BYTES)) as _z:
    RECORDS = {n: _z.read(n) for n in _z.namelist()}
PKL_NAME = next(n for n in RECORDS if n.endswith('/data.pkl'))

mutation = st.tuples(st.sampled_from(['flip', 'insert', 'delete', 'overwrite']),
                     st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(1, 8))


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, value, length in mutations:
        at = int(where * len(out)) if out else 0
        if kind == 'flip' and out:
            out[at] ^= 1 << (value % 8)
        elif kind == 'insert':
            out[at:at] = bytes([value]) * length
        elif kind == 'delete':
            del out[at:at + length]
        elif out:
            out[at:at + length] = bytes([value]) * len(out[at:at + length])
    return bytes(out)


@pytest.fixture(scope='module')
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz')


@settings(derandomize=True, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(target=st.sampled_from(['pickle', 'zip', 'safetensors-header', 'safetensors-body']),
       mutations=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutations(fuzz_dir, target, mutations):
    path = os.path.join(fuzz_dir, 'f.pth' if target in ('pickle', 'zip') else 'f.safetensors')
    if target == 'pickle':
        with zipfile.ZipFile(path, 'w') as z:          # a well-formed zip around a mutated pickle
            for name, data in RECORDS.items():
                z.writestr(name, mutate(data, mutations) if name == PKL_NAME else data)
    elif target == 'zip':
        with open(path, 'wb') as f:
            f.write(mutate(TORCH_BYTES, mutations))
    else:
        split = 8 + struct.unpack('<Q', SAFETENSORS_BYTES[:8])[0]
        head, body = SAFETENSORS_BYTES[:split], SAFETENSORS_BYTES[split:]
        data = mutate(head, mutations) + body if target == 'safetensors-header' else head + mutate(body, mutations)
        with open(path, 'wb') as f:
            f.write(data)
    reader = read_torch_file if target in ('pickle', 'zip') else read_safetensors_file
    try:
        reader(path)
    except CheckpointError:
        pass
    assert snapshot() == SNAPSHOT
