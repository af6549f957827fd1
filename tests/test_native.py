"""blockrep._native (C) and its pure-Python twin in blockrep.native: same answers, same errors.

CRC32C known answers come from RFC 3720 (iSCSI), appendix B.4, plus the classic "123456789"
check value. Every native result is compared against the fallback.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import subprocess
import sys

import pytest

from blockrep import _native
from blockrep import native
from blockrep.native import (py_crc32c, py_crc32c_blocks, py_frame, py_parse_header,
                             py_preadv, py_pwritev)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# RFC 3720 B.4 + the CRC catalogue check value.
VECTORS = [
    pytest.param(bytes(32), 0x8A9136AA, id="32-zeros"),
    pytest.param(b"\xff" * 32, 0x62A8AB43, id="32-ones"),
    pytest.param(bytes(range(32)), 0x46DD794E, id="32-incrementing"),
    pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="32-decrementing"),
    pytest.param(b"123456789", 0xE3069283, id="check-123456789"),
    pytest.param(b"", 0x00000000, id="empty"),
]

CRC_IMPLS = [
    pytest.param(_native.crc32c, id="native"),
    pytest.param(_native.crc32c_sw, id="native-sw"),
    pytest.param(py_crc32c, id="python"),
    pytest.param(native.crc32c, id="selected"),
]

STRIPE = 8192  # native.c: three 8 KiB stripes per round of the hardware path


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- CRC32C ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", CRC_IMPLS)
@pytest.mark.parametrize("data,expected", VECTORS)
def test_crc32c_known_answers(impl, data, expected):
    assert impl(data) == expected
    assert impl(bytearray(data)) == expected
    assert impl(memoryview(data)) == expected


def test_native_is_selected_here():
    """The extension is built in this tree, so blockrep.native must use it."""
    assert native.NATIVE is True
    assert native.crc32c is _native.crc32c
    assert native.preadv is _native.preadv
    assert native.HW_CRC == _native.have_hw_crc()
    assert native.frame is _native.frame


@pytest.mark.parametrize("impl", CRC_IMPLS)
def test_crc32c_returns_unsigned_32_bit(impl):
    v = impl(b"\xff" * 7)
    assert isinstance(v, int) and 0 <= v <= 0xFFFFFFFF


def test_native_matches_fallback_small_lengths_and_offsets():
    data = _rand(300, seed=1)
    for length in range(0, 130):
        for off in range(0, 9):
            mv = memoryview(data)[off:off + length]
            want = py_crc32c(mv)
            assert _native.crc32c(mv) == want, (length, off)
            assert _native.crc32c_sw(mv) == want, (length, off)


@pytest.mark.parametrize("length", [
    3 * STRIPE - 1, 3 * STRIPE, 3 * STRIPE + 1, 3 * STRIPE + 7,
    2 * 3 * STRIPE, 2 * 3 * STRIPE + 13, 64 * 1024 - 1, 64 * 1024, 100_003,
])
@pytest.mark.parametrize("off", [0, 1, 3, 7])
def test_native_matches_fallback_large(length, off):
    """Lengths around and past 3*8192 exercise the 3-stream combine of the hardware path;
    >= 64 KiB takes the GIL-releasing branch. Misaligned views start off the 8-byte grid."""
    data = _rand(length + 8, seed=length)
    mv = memoryview(data)[off:off + length]
    want = py_crc32c(mv)
    assert _native.crc32c(mv) == want
    assert _native.crc32c_sw(mv) == want


def test_native_hw_matches_sw_many_lengths():
    data = _rand(8 * STRIPE + 64, seed=7)
    rnd = random.Random(3)
    for _ in range(200):
        off = rnd.randrange(0, 64)
        length = rnd.randrange(0, len(data) - off)
        mv = memoryview(data)[off:off + length]
        assert _native.crc32c(mv) == _native.crc32c_sw(mv), (off, length)


@pytest.mark.parametrize("impl", CRC_IMPLS)
@pytest.mark.parametrize("split", [0, 1, 5, 8, 4095, 3 * STRIPE, 3 * STRIPE + 3, 50_000])
def test_crc32c_continuation(impl, split):
    data = _rand(split + 3 * STRIPE + 11, seed=split)
    a, b = data[:split], data[split:]
    assert impl(b, impl(a)) == impl(data)
    if split:  # the start value matters
        assert impl(b, impl(a)) != impl(b)


def test_crc32c_continuation_large_value_path():
    """A non-zero start value must flow through the 3-stream path correctly."""
    data = _rand(5 * 3 * STRIPE + 17, seed=11)
    start = 0xDEADBEEF
    assert _native.crc32c(data, start) == py_crc32c(data, start)
    assert _native.crc32c_sw(data, start) == py_crc32c(data, start)


def test_crc32c_changes_with_every_bit():
    """Guard against an implementation that ignores part of its input."""
    data = bytearray(_rand(3 * STRIPE + 100, seed=5))
    base = _native.crc32c(data)
    for pos in (0, 7, STRIPE, 2 * STRIPE + 1, 3 * STRIPE - 1, len(data) - 1):
        data[pos] ^= 0x10
        assert _native.crc32c(data) != base, pos
        data[pos] ^= 0x10
    assert _native.crc32c(data) == base


# -- crc32c_blocks -----------------------------------------------------------------------------

BLOCKS_IMPLS = [pytest.param(_native.crc32c_blocks, id="native"),
                pytest.param(py_crc32c_blocks, id="python")]


@pytest.mark.parametrize("impl", BLOCKS_IMPLS)
@pytest.mark.parametrize("length,bs", [(0, 512), (1, 512), (4096, 512), (4097, 512),
                                       (5000, 4096), (3 * 4096, 4096), (100, 1), (33, 7)])
def test_crc32c_blocks(impl, length, bs):
    data = _rand(length, seed=length + bs)
    out = impl(data, bs)
    assert isinstance(out, bytes)
    nblocks = -(-length // bs)
    assert len(out) == 4 * nblocks
    want = [py_crc32c(data[i:i + bs]) for i in range(0, length, bs)]
    assert list(struct.unpack(f"<{nblocks}I", out)) == want


def test_crc32c_blocks_native_matches_fallback_misaligned():
    data = _rand(3 * 8192 * 2 + 1234, seed=9)
    for off in (0, 1, 5):
        mv = memoryview(data)[off:]
        for bs in (512, 4096, 3 * 8192 + 5):
            assert _native.crc32c_blocks(mv, bs) == py_crc32c_blocks(mv, bs)


def test_crc32c_blocks_partial_last_block():
    data = b"123456789" + bytes(32)
    out = _native.crc32c_blocks(data, 9)
    # block 0 is "123456789"; blocks 1..3 are 9 zero bytes; block 4 is 5 zero bytes
    vals = struct.unpack("<5I", out)
    assert vals[0] == 0xE3069283
    assert vals[1] == vals[2] == vals[3] == py_crc32c(bytes(9))
    assert vals[4] == py_crc32c(bytes(5)) != vals[3]
    assert py_crc32c_blocks(data, 9) == out


@pytest.mark.parametrize("impl", BLOCKS_IMPLS)
@pytest.mark.parametrize("bs", [0, -1, -4096])
def test_crc32c_blocks_bad_block_size(impl, bs):
    with pytest.raises(ValueError):
        impl(b"abc", bs)


# -- preadv / pwritev --------------------------------------------------------------------------

IO_IMPLS = [pytest.param((_native.preadv, _native.pwritev), id="native"),
            pytest.param((py_preadv, py_pwritev), id="python")]


@pytest.fixture
def tmpfd(tmp_path):
    fd = os.open(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT, 0o644)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_pwritev_preadv_contiguous(impls, tmpfd):
    preadv, pwritev = impls
    chunks = [_rand(n, seed=n) for n in (1, 100, 4096, 7, 65536)]
    items, off = [], 10
    for c in chunks:
        items.append((off, c))
        off += len(c)
    total = sum(map(len, chunks))
    assert pwritev(tmpfd, items) == total
    assert os.pread(tmpfd, total + 10, 0) == bytes(10) + b"".join(chunks)
    bufs = [bytearray(len(c)) for c in chunks]
    assert preadv(tmpfd, [(o, b) for (o, _), b in zip(items, bufs)]) == total
    assert [bytes(b) for b in bufs] == chunks


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_pwritev_preadv_non_contiguous(impls, tmpfd):
    preadv, pwritev = impls
    items = [(5000, b"hello"), (0, bytearray(b"abc")), (100, memoryview(b"xyz")),
             (103, b"!"), (1 << 20, b"far")]
    assert pwritev(tmpfd, items) == 5 + 3 + 3 + 1 + 3
    assert os.fstat(tmpfd).st_size == (1 << 20) + 3
    assert os.pread(tmpfd, 4, 100) == b"xyz!"
    assert os.pread(tmpfd, 5, 5000) == b"hello"
    assert os.pread(tmpfd, 5, 0) == b"abc\0\0"
    b1, b2, b3 = bytearray(5), bytearray(8), bytearray(3)
    assert preadv(tmpfd, [(5000, b1), (98, b2), (1 << 20, b3)]) == 16
    assert (b1, b2, b3) == (b"hello", b"\0\0xyz!\0\0", b"far")


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_many_contiguous_items(impls, tmpfd):
    """More contiguous items than one iovec array holds (MAX_IOV=1024 in native.c)."""
    preadv, pwritev = impls
    data = _rand(3 * 2500, seed=2500)
    items = [(i, data[i:i + 3]) for i in range(0, len(data), 3)]
    assert pwritev(tmpfd, items) == len(data)
    assert os.pread(tmpfd, len(data) + 1, 0) == data
    bufs = [bytearray(3) for _ in items]
    assert preadv(tmpfd, [(o, b) for (o, _), b in zip(items, bufs)]) == len(data)
    assert b"".join(bufs) == data


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_misaligned_memoryview_buffers(impls, tmpfd):
    preadv, pwritev = impls
    data = _rand(10_001, seed=10)
    assert pwritev(tmpfd, [(3, memoryview(data)[1:])]) == 10_000
    assert os.pread(tmpfd, 10_000, 3) == data[1:]
    buf = bytearray(10_005)
    assert preadv(tmpfd, [(3, memoryview(buf)[5:])]) == 10_000
    assert bytes(buf[5:]) == data[1:]
    assert bytes(buf[:5]) == bytes(5)


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_preadv_short_read_at_eof(impls, tmpfd):
    preadv, _ = impls
    os.pwrite(tmpfd, b"0123456789", 0)
    a, b = bytearray(b"\xaa" * 6), bytearray(b"\xbb" * 6)
    # the run [4, 16) crosses EOF at 10: 6 + 0 bytes, the rest of b untouched
    assert preadv(tmpfd, [(4, a), (10, b)]) == 6
    assert a == b"456789" and b == b"\xbb" * 6
    c = bytearray(b"\xcc" * 8)
    assert preadv(tmpfd, [(6, c)]) == 4
    assert c == b"6789" + b"\xcc" * 4
    assert preadv(tmpfd, [(100, bytearray(4))]) == 0
    assert preadv(tmpfd, []) == 0


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_bad_fd(impls, tmp_path):
    preadv, pwritev = impls
    fd = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        preadv(fd, [(0, bytearray(4))])
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        pwritev(fd, [(0, b"abcd")])
    assert ei.value.errno == errno.EBADF


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_write_to_read_only_fd(impls, tmp_path):
    _, pwritev = impls
    p = tmp_path / "ro"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            pwritev(fd, [(0, b"abcd")])
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("impls", IO_IMPLS)
@pytest.mark.parametrize("ro", [b"abcd", memoryview(b"abcd"), memoryview(bytearray(4)).toreadonly()],
                         ids=["bytes", "memoryview-bytes", "readonly-view"])
def test_preadv_read_only_buffer(impls, tmpfd, ro):
    preadv, _ = impls
    os.pwrite(tmpfd, b"zzzz", 0)
    with pytest.raises((TypeError, BufferError)):
        preadv(tmpfd, [(0, ro)])


@pytest.mark.parametrize("impls", IO_IMPLS)
def test_negative_offset(impls, tmpfd):
    preadv, pwritev = impls
    with pytest.raises(ValueError):
        preadv(tmpfd, [(-1, bytearray(4))])
    with pytest.raises(ValueError):
        pwritev(tmpfd, [(-4096, b"abcd")])
    assert os.fstat(tmpfd).st_size == 0


def test_native_accepts_list_pairs_like_fallback(tmpfd):
    assert py_pwritev(tmpfd, [[0, b"ab"]]) == 2
    assert _native.pwritev(tmpfd, [[0, b"cd"]]) == 2
    buf = bytearray(2)
    assert _native.preadv(tmpfd, [[0, buf]]) == 2
    assert buf == b"cd"


# -- the link packet header (blockrep.peer.proto's layout) -----------------------------------

FRAMES = [pytest.param(_native.frame, id="native"), pytest.param(py_frame, id="python")]
PARSERS = [pytest.param(_native.parse_header, id="native"),
           pytest.param(py_parse_header, id="python")]
_FIELDS = [(10, 1, 0x0102030405060708, 0x1122334455667788, 4096, 4096, 0xCAFEBABE),
           (0, 0, 0, 0, 0, 0, 0),
           (0xFFFF, 0xFFFF, (1 << 64) - 1, (1 << 64) - 1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)]


def _hand_frame(fields) -> bytes:
    head = struct.pack(">IHHQQIII", 0x42524550, *fields)
    return head + struct.pack(">I", py_crc32c(head))


@pytest.mark.parametrize("impl", FRAMES)
@pytest.mark.parametrize("fields", _FIELDS)
def test_frame_known_bytes(impl, fields):
    assert impl(*fields) == _hand_frame(fields)


@pytest.mark.parametrize("impl", FRAMES)
@pytest.mark.parametrize("bad", [(-1, 0, 0, 0, 0, 0, 0), (1 << 16, 0, 0, 0, 0, 0, 0),
                                 (0, 1 << 16, 0, 0, 0, 0, 0), (0, 0, 1 << 64, 0, 0, 0, 0),
                                 (0, 0, 0, -1, 0, 0, 0), (0, 0, 0, 0, 1 << 32, 0, 0),
                                 (0, 0, 0, 0, 0, 0, 1 << 32)])
def test_frame_refuses_what_does_not_fit(impl, bad):
    with pytest.raises((OverflowError, struct.error)):
        impl(*bad)


def test_frame_takes_index_integers():
    class Idx:
        def __index__(self):
            return 7
    assert _native.frame(Idx(), 0, Idx(), 0, 0, 0, 0) == py_frame(7, 0, 7, 0, 0, 0, 0)
    with pytest.raises(TypeError):
        _native.frame(1.0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(TypeError):
        _native.frame(1, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("impl", PARSERS)
@pytest.mark.parametrize("fields", _FIELDS)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_header_round_trip(impl, fields, kind):
    buf = b"\xee" * 3 + _hand_frame(fields) + b"\xdd"
    assert impl(kind(buf), 3) == fields
    assert impl(kind(buf[3:])) == fields


@pytest.mark.parametrize("impl", PARSERS)
def test_parse_header_refuses_bad_magic_and_any_flipped_bit(impl):
    good = _hand_frame(_FIELDS[0])
    for pos in range(40):
        for bit in range(8):
            buf = bytearray(good)
            buf[pos] ^= 1 << bit
            assert impl(buf) is None, (pos, bit)


@pytest.mark.parametrize("impl", PARSERS)
def test_parse_header_needs_40_bytes(impl):
    good = _hand_frame(_FIELDS[0])
    for buf, pos in ((good[:39], 0), (good, 1), (good, -1), (b"", 0)):
        with pytest.raises(ValueError):
            impl(buf, pos)


def test_header_selected_by_the_switch():
    assert native.frame is _native.frame and native.parse_header is _native.parse_header


# -- BLOCKREP_NO_NATIVE ------------------------------------------------------------------------

_PROBE = r"""
import json, sys
from blockrep import native
data = bytes(range(256)) * 200 + b"tail"
print(json.dumps({
    "native": native.NATIVE,
    "hw": native.HW_CRC,
    "is_py": native.crc32c is native.py_crc32c and native.preadv is native.py_preadv
             and native.frame is native.py_frame,
    "crcs": [native.crc32c(v) for v in (bytes(32), b"\xff" * 32, bytes(range(32)),
                                         b"123456789", data)],
    "blocks": native.crc32c_blocks(data, 4096).hex(),
}))
"""


def _probe(env_extra: dict) -> dict:
    env = dict(os.environ)
    env.pop("BLOCKREP_NO_NATIVE", None)
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_no_native_env_switch():
    fallback = _probe({"BLOCKREP_NO_NATIVE": "1"})
    regular = _probe({})
    assert fallback["native"] is False and fallback["hw"] is False and fallback["is_py"]
    assert regular["native"] is True and not regular["is_py"]
    assert fallback["crcs"] == regular["crcs"]
    assert fallback["crcs"][:4] == [0x8A9136AA, 0x62A8AB43, 0x46DD794E, 0xE3069283]
    assert fallback["blocks"] == regular["blocks"]
