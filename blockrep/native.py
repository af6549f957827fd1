"""The one switch between the C core (`blockrep._native`) and its pure-Python twin.

Owns: CRC32C, per-block CRC32C, batched positional I/O and the peer link's packet header
(built with its checksum, parsed and checked in one call; its layout is
blockrep.peer.proto's) as seen by the rest of blockrep.
Set BLOCKREP_NO_NATIVE=1 to force the fallback. Tests run both and compare.
"""

from __future__ import annotations

import os
import struct

_POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def py_crc32c(data, value: int = 0) -> int:
    """CRC32C of `data`, continuing from `value` (same contract as zlib.crc32)."""
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def py_crc32c_blocks(data, block_size: int) -> bytes:
    if block_size <= 0:
        raise ValueError("block size must be positive")
    mv = memoryview(data).cast("B")
    out = [py_crc32c(mv[i:i + block_size]) for i in range(0, len(mv), block_size)]
    return struct.pack(f"<{len(out)}I", *out)


def _py_batch(fd: int, items, write: bool) -> int:
    """Each (offset, buffer) in turn, short transfers continued; a read stops at EOF."""
    total = 0
    for offset, buf in items:
        if offset < 0:
            raise ValueError("negative offset")
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            n = (os.pwritev if write else os.preadv)(fd, [mv[done:]], offset + done)
            if n == 0:
                if write:
                    raise OSError(5, "pwritev wrote nothing")
                return total + done
            done += n
        total += done
    return total


def py_preadv(fd: int, items) -> int:
    return _py_batch(fd, items, write=False)


def py_pwritev(fd: int, items) -> int:
    return _py_batch(fd, items, write=True)


_LINK_MAGIC = 0x42524550  # blockrep.peer.proto.MAGIC ("BREP")
_FIELDS = struct.Struct(">IHHQQIII")  # the 36 bytes the header checksum covers
_HCRC = struct.Struct(">I")
_HEADER = struct.Struct(">IHHQQIIII")


def py_frame(ptype: int, flags: int, pid: int, offset: int, size: int, paylen: int,
             crc: int) -> bytes:
    """The 40-byte link packet header, its checksum (hcrc) included."""
    head = _FIELDS.pack(_LINK_MAGIC, ptype, flags, pid, offset, size, paylen, crc)
    return head + _HCRC.pack(crc32c(head))


def py_parse_header(buf, pos: int = 0):
    """-> (type, flags, id, offset, size, paylen, crc), or None if the magic or the header
    checksum is wrong; ValueError if fewer than 40 bytes follow `pos`."""
    if pos < 0 or len(buf) - pos < _HEADER.size:
        raise ValueError(f"a packet header needs {_HEADER.size} bytes at offset {pos}")
    fields = _HEADER.unpack_from(buf, pos)
    if fields[0] != _LINK_MAGIC or crc32c(memoryview(buf)[pos:pos + 36]) != fields[8]:
        return None
    return fields[1:8]


def _load():
    if os.environ.get("BLOCKREP_NO_NATIVE"):
        return None
    try:
        from blockrep import _native
    except ImportError:
        return None
    return _native


_native = _load()
NATIVE = _native is not None

if _native is not None:
    crc32c = _native.crc32c
    crc32c_blocks = _native.crc32c_blocks
    preadv = _native.preadv
    pwritev = _native.pwritev
    frame = _native.frame
    parse_header = _native.parse_header
    HW_CRC = _native.have_hw_crc()
else:
    crc32c = py_crc32c
    crc32c_blocks = py_crc32c_blocks
    preadv = py_preadv
    pwritev = py_pwritev
    frame = py_frame
    parse_header = py_parse_header
    HW_CRC = False

__all__ = ["NATIVE", "HW_CRC", "crc32c", "crc32c_blocks", "preadv", "pwritev", "frame",
           "parse_header", "py_crc32c", "py_crc32c_blocks", "py_preadv", "py_pwritev",
           "py_frame", "py_parse_header"]
