"""The one switch between the C core (`blockrep._native`) and its pure-Python twin.

Owns: CRC32C, per-block CRC32C and batched positional I/O as seen by the rest of blockrep.
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
    HW_CRC = _native.have_hw_crc()
else:
    crc32c = py_crc32c
    crc32c_blocks = py_crc32c_blocks
    preadv = py_preadv
    pwritev = py_pwritev
    HW_CRC = False

__all__ = ["NATIVE", "HW_CRC", "crc32c", "crc32c_blocks", "preadv", "pwritev",
           "py_crc32c", "py_crc32c_blocks", "py_preadv", "py_pwritev"]
