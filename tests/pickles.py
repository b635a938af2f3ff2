"""Hand-assembled pickles and torch.save-shaped zips, for the hostile-file tests."""
import argparse
import collections
import struct
import zipfile

import torch

PROTO = b'\x80\x02'


def g(module: str, name: str) -> bytes:
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def u(s: str) -> bytes:
    b = s.encode()
    return b'X' + struct.pack('<I', len(b)) + b


def i(n: int) -> bytes:
    if -2 ** 31 <= n < 2 ** 31:
        return b'J' + struct.pack('<i', n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
    return b'\x8a' + bytes([len(raw)]) + raw                # LONG1


def tup(xs) -> bytes:
    return b'(' + b''.join(i(x) for x in xs) + b't'


def pid(key: str, numel: int, cls: str = 'FloatStorage') -> bytes:
    return b'(' + u('storage') + g('torch', cls) + u(key) + u('cpu') + i(numel) + b'tQ'


def tensor(key, numel, offset, size, stride, cls='FloatStorage', hooks=b')R') -> bytes:
    return (g('torch._utils', '_rebuild_tensor_v2') + b'(' + pid(key, numel, cls) + i(offset) + tup(size)
            + tup(stride) + b'\x89' + g('collections', 'OrderedDict') + hooks + b'tR')


def in_dict(body: bytes) -> bytes:
    """A pickle of {'w': <body>}."""
    return PROTO + b'}(' + u('w') + body + b'u.'


def write_archive(path, pkl: bytes, storages=None, prefix='archive', extra=None,
                  compression=zipfile.ZIP_STORED):
    """A zip laid out like torch.save's; ``compression`` applies to the storage records."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr(f'{prefix}/data.pkl', pkl)
        z.writestr(f'{prefix}/byteorder', b'little')
        for key, data in (storages or {}).items():
            z.writestr(f'{prefix}/data/{key}', data, compress_type=compression)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


FOUR_FLOATS = struct.pack('<4f', 1, 2, 3, 4)


def allowed_callables():
    return [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, collections.OrderedDict,
            argparse.Namespace, torch.FloatStorage, torch.LongStorage, torch.BoolStorage]


def snapshot():
    """What a file could try to change on the callables the readers accept, by identity."""
    out = []
    for f in allowed_callables():
        out.append((getattr(f, '__defaults__', None), getattr(f, '__kwdefaults__', None),
                    {k: id(v) for k, v in vars(f).items() if k != '__slotnames__'}))  # cached by pickle.dump
    return out


SNAPSHOT = snapshot()


