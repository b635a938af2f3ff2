"""The records of a ``torch.save`` zip archive, from its central directory, every one checked.

Only what ``torch.save`` writes is read: stored (uncompressed), unencrypted records under one
top-level folder, with plain relative names, local headers that agree with the directory, and no
two records overlapping. zip64 sizes and offsets are read; comments and multi-disk archives are not.
"""

import re
import struct
import zlib
from typing import BinaryIO, Dict, Optional, Tuple

from .untrusted import FileDefect, read_exact

MAX_RECORDS = 1_000_000            # zip records
MAX_DIRECTORY_BYTES = 64 << 20     # zip central directory

_EOCD = struct.Struct('<4sHHHHIIH')
_ZIP64_LOCATOR = struct.Struct('<4sIQI')
_ZIP64_EOCD = struct.Struct('<4sQHHIIQQQQ')
_CENTRAL = struct.Struct('<4sHHHHHHIIIHHHHHII')
_LOCAL = struct.Struct('<4sHHHHHIIIHH')
_BAD_NAME_CHARS = re.compile(r'[\x00-\x1f\\]')


class Record:
    """One record of the archive: its name, CRC, size and where its header and data start."""

    __slots__ = ('name', 'crc', 'size', 'header_offset', 'data_start')

    def __init__(self, name: str, crc: int, size: int, header_offset: int):
        self.name, self.crc, self.size, self.header_offset = name, crc, size, header_offset
        self.data_start = -1


class Archive:
    """The records of a torch.save zip, from its central directory, every one checked."""

    def __init__(self, f: BinaryIO, file_size: int):
        self.f = f
        self.file_size = file_size
        self.records: Dict[str, Record] = {}
        self.prefix = ''
        self._parse()

    def _directory_bounds(self) -> Tuple[int, int, int, int]:
        size = self.file_size
        if size < _EOCD.size:
            raise FileDefect('the zip archive is truncated (no end-of-directory record)')
        tail_at = size - _EOCD.size
        sig, disk, cd_disk, _, n32, cd_size32, cd_offset32, comment = _EOCD.unpack(
            read_exact(self.f, tail_at, _EOCD.size, 'the end-of-directory record'))
        if sig != b'PK\x05\x06':
            raise FileDefect('no zip end-of-directory record at the end of the file (truncated, or a comment or '
                       'data appended)')
        if comment or disk not in (0, 0xFFFF) or cd_disk not in (0, 0xFFFF):
            raise FileDefect('the zip archive has a comment or spans several disks; torch.save writes neither')
        end = tail_at
        if size >= _EOCD.size + _ZIP64_LOCATOR.size:
            at = tail_at - _ZIP64_LOCATOR.size
            locator = _ZIP64_LOCATOR.unpack(read_exact(self.f, at, _ZIP64_LOCATOR.size, 'the zip64 locator'))
            if locator[0] == b'PK\x06\x07':
                eocd64_at = locator[2]
                if eocd64_at + _ZIP64_EOCD.size > at:
                    raise FileDefect('the zip64 end-of-directory record lies outside the file')
                (sig, _, _, _, _, _, _, n, cd_size, cd_offset) = _ZIP64_EOCD.unpack(
                    read_exact(self.f, eocd64_at, _ZIP64_EOCD.size, 'the zip64 end-of-directory record'))
                if sig != b'PK\x06\x06':
                    raise FileDefect('the zip64 locator points at no zip64 end-of-directory record')
                return n, cd_size, cd_offset, eocd64_at
        if n32 == 0xFFFF or cd_size32 == 0xFFFFFFFF or cd_offset32 == 0xFFFFFFFF:
            raise FileDefect('the zip archive needs a zip64 record that is missing')
        return n32, cd_size32, cd_offset32, end

    def _parse(self) -> None:
        count, cd_size, cd_offset, cd_limit = self._directory_bounds()
        if count > MAX_RECORDS or cd_size > MAX_DIRECTORY_BYTES:
            raise FileDefect(f'the zip archive lists {count} records in {cd_size} bytes, more than read')
        if cd_offset + cd_size > cd_limit:
            raise FileDefect('the zip central directory lies outside the file')
        directory = read_exact(self.f, cd_offset, cd_size, 'the zip central directory')
        pos = 0
        prefixes = set()
        for _ in range(count):
            if pos + _CENTRAL.size > cd_size:
                raise FileDefect('the zip central directory is shorter than its record count')
            (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _,
             header_offset) = _CENTRAL.unpack_from(directory, pos)
            if sig != b'PK\x01\x02':
                raise FileDefect('the zip central directory is corrupt (bad record signature)')
            pos += _CENTRAL.size
            raw_name = directory[pos:pos + name_len]
            extra = directory[pos + name_len:pos + name_len + extra_len]
            pos += name_len + extra_len + comment_len
            if pos > cd_size:
                raise FileDefect('the zip central directory is corrupt (a record runs past its end)')
            try:
                name = raw_name.decode('utf-8')
            except UnicodeDecodeError:
                raise FileDefect('a zip record name is not valid UTF-8') from None
            usize, csize, header_offset = self._zip64_extra(extra, usize, csize, header_offset, name)
            if flags & 0x41:
                raise FileDefect(f'zip record {name[:80]!r} is encrypted')
            if method != 0 or csize != usize:
                raise FileDefect(f'zip record {name[:80]!r} is compressed (method {method}); torch.save stores '
                           'records uncompressed and compressed records are refused (decompression bombs)')
            parts = name.split('/')
            if (len(parts) < 2 or _BAD_NAME_CHARS.search(name) or name.startswith('/')
                    or any(p in ('', '.', '..') for p in parts)):
                raise FileDefect(f'zip record name {name[:80]!r} is not a plain path inside one top-level folder')
            if name in self.records:
                raise FileDefect(f'zip record {name[:80]!r} appears twice')
            prefixes.add(parts[0])
            if len(prefixes) > 1:
                raise FileDefect('the zip archive has more than one top-level folder; torch.save writes one')
            self.records[name] = Record(name, crc, usize, header_offset)
        if pos != cd_size:
            raise FileDefect('the zip central directory has bytes beyond its records')
        if not prefixes:
            raise FileDefect('the zip archive is empty')
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
                        raise FileDefect(f'zip record {name[:80]!r} has a short zip64 field')
                    v, = struct.unpack_from('<Q', body, j)
                    j += 8
                out.append(v)
            return out[0], out[1], out[2]
        if 0xFFFFFFFF in (usize, csize, offset):
            raise FileDefect(f'zip record {name[:80]!r} lacks its zip64 sizes')
        return usize, csize, offset

    def _locate(self, cd_offset: int) -> None:
        """Reads every local header, checks it against the directory; records may not overlap."""
        spans = []
        for rec in self.records.values():
            head = read_exact(self.f, rec.header_offset, _LOCAL.size, f'the zip header of {rec.name[:80]!r}')
            sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack(head)
            if sig != b'PK\x03\x04' or method != 0 or flags & 0x41:
                raise FileDefect(f'the local zip header of {rec.name[:80]!r} does not match the directory')
            name = read_exact(self.f, rec.header_offset + _LOCAL.size, name_len, 'a zip record name')
            if name != rec.name.encode('utf-8'):
                raise FileDefect(f'the local zip header of {rec.name[:80]!r} names another record')
            rec.data_start = rec.header_offset + _LOCAL.size + name_len + extra_len
            if rec.data_start + rec.size > cd_offset:
                raise FileDefect(f'zip record {rec.name[:80]!r} runs into the central directory or past the file')
            spans.append((rec.header_offset, rec.data_start + rec.size, rec.name))
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
            if start < end:
                raise FileDefect(f'zip records {name[:80]!r} and {other[:80]!r} overlap')

    def get(self, name: str) -> Optional[Record]:
        """The record ``name`` under the archive's top-level folder, or None."""
        return self.records.get(f'{self.prefix}/{name}')

    def check_crc(self, rec: Record, data) -> None:
        if rec.crc and zlib.crc32(data) != rec.crc:   # a zero CRC: written with torch's CRC option off
            raise FileDefect(f'zip record {rec.name[:80]!r} fails its CRC check (corrupt file)')

    def read_small(self, rec: Record, limit: int) -> bytes:
        """A record of at most ``limit`` bytes, CRC checked."""
        if rec.size > limit:
            raise FileDefect(f'zip record {rec.name[:80]!r} holds {rec.size} bytes, more than the {limit} read')
        data = read_exact(self.f, rec.data_start, rec.size, f'zip record {rec.name[:80]!r}')
        self.check_crc(rec, data)
        return data
