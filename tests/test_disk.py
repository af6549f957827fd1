"""blockrep.disk.Disk on a temporary regular file, and parse_size."""

from __future__ import annotations

import errno
import os
import random

import pytest

from blockrep import disk as disk_mod
from blockrep.disk import DIRECT_ALIGN, Disk, parse_size

MiB = 1 << 20
KiB = 1 << 10
BS = 4096


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "disk.img")


@pytest.fixture
def d(path):
    disk = Disk(path, size=MiB, create=True)
    yield disk
    disk.close()


def allocated(disk: Disk) -> int:
    os.fsync(disk.fd)
    return os.fstat(disk.fd).st_blocks * 512


def fill(disk: Disk, seed: int = 1) -> bytes:
    data = _rand(disk.size, seed)
    disk.write(0, data)
    return data


def check_extents_cover(ext, offset, length):
    pos = offset
    for off, n, _ in ext:
        assert off == pos and n > 0
        pos += n
    assert pos == offset + length
    for a, b in zip(ext, ext[1:]):
        assert a[2] != b[2], "neighbouring extents must differ (data/hole)"


# -- open / create -----------------------------------------------------------------------------

def test_create_with_size(path):
    disk = Disk(path, size=3 * MiB, create=True)
    try:
        assert disk.size == 3 * MiB == os.path.getsize(path)
        assert not disk.is_block and not disk.read_only and not disk.direct
        assert disk.read(0, 4096) == bytes(4096)
        assert disk.extents(0, disk.size) == [(0, 3 * MiB, True)]  # created sparse
    finally:
        disk.close()
    assert disk.fd == -1
    disk.close()  # idempotent


def test_reopen_existing_without_size(path):
    Disk(path, size=MiB, create=True).close()
    disk = Disk(path)
    assert disk.size == MiB
    disk.close()
    disk = Disk(path, size=MiB)
    assert disk.size == MiB
    disk.close()


def test_size_mismatch(path):
    Disk(path, size=MiB, create=True).close()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="expected"):
        Disk(path, size=2 * MiB)
    with pytest.raises(ValueError):
        Disk(path, size=2 * MiB, create=True)  # an existing non-empty file is not resized
    assert len(os.listdir("/proc/self/fd")) == before  # the fd was closed
    assert os.path.getsize(path) == MiB


def test_empty(path):
    with pytest.raises(ValueError, match="empty"):
        Disk(path, create=True)
    open(path, "wb").close()
    with pytest.raises(ValueError, match="empty"):
        Disk(path)


def test_missing_file_without_create(path):
    with pytest.raises(OSError) as ei:
        Disk(path, size=MiB)
    assert ei.value.errno == errno.ENOENT
    assert str(ei.value) == f"disk {path} does not exist"


def test_directory_is_one_clear_error(tmp_path):
    with pytest.raises(disk_mod.DiskError) as ei:
        Disk(str(tmp_path))
    assert ei.value.errno == errno.EISDIR
    assert str(ei.value) == f"disk {tmp_path} is a directory, not a disk image or block device"


def test_character_device_refused():
    with pytest.raises(disk_mod.DiskError, match="not a regular file or block device"):
        Disk("/dev/null")


# -- exclusive use -------------------------------------------------------------------------------

def test_second_open_refused_while_in_use(path):
    first = Disk(path, size=MiB, create=True)
    try:
        first.write(0, b"mine")
        for kw in ({}, {"read_only": True}):
            with pytest.raises(disk_mod.DiskError) as ei:
                Disk(path, **kw)
            assert ei.value.errno == errno.EBUSY
            assert str(ei.value) == f"disk {path} is in use by another blockrep process " \
                                    f"(a running node or serve); refusing to open it"
        assert first.read(0, 4) == b"mine"
    finally:
        first.close()
    Disk(path).close()  # free again once closed


def test_another_path_to_the_same_file_refused(path, tmp_path):
    link = str(tmp_path / "link.img")
    first = Disk(path, size=MiB, create=True)
    try:
        os.symlink(path, link)
        with pytest.raises(disk_mod.DiskError, match="in use"):
            Disk(link)
    finally:
        first.close()


def test_read_only_opens_share(path):
    Disk(path, size=MiB, create=True).close()
    a = Disk(path, read_only=True)
    try:
        Disk(path, read_only=True).close()
        with pytest.raises(disk_mod.DiskError, match="in use"):
            Disk(path)
    finally:
        a.close()


def test_direct_needs_aligned_size(path):
    with open(path, "wb") as f:
        f.truncate(MiB + 512)
    with pytest.raises(ValueError, match="O_DIRECT"):
        Disk(path, direct=True)


def test_read_only(path):
    Disk(path, size=MiB, create=True).close()
    disk = Disk(path, read_only=True)
    try:
        assert disk.read(0, 4) == bytes(4)
        with pytest.raises(OSError) as ei:
            disk.write(0, b"x")
        assert ei.value.errno == errno.EBADF
    finally:
        disk.close()


# -- read / write ------------------------------------------------------------------------------

def test_write_read(d):
    data = _rand(10_000, 2)
    d.write(12_345, data)
    assert d.read(12_345, 10_000) == data
    assert d.read(12_340, 5) == bytes(5)
    assert d.read(12_345 + 10_000, 3) == bytes(3)
    with open(d.path, "rb") as f:
        f.seek(12_345)
        assert f.read(10_000) == data


def test_write_accepts_buffers(d):
    d.write(0, bytearray(b"abc"))
    d.write(3, memoryview(b"xdefx")[1:4])
    assert d.read(0, 7) == b"abcdef\0"


def test_readinto(d):
    data = _rand(9000, 3)
    d.write(100, data)
    buf = bytearray(9000)
    d.readinto(100, buf)
    assert buf == data
    big = bytearray(b"\xee" * 20)
    d.readinto(95, memoryview(big)[2:12])
    assert big == b"\xee\xee" + bytes(5) + data[:5] + b"\xee" * 8


def test_read_past_eof_pads_with_zeroes(d):
    d.write(d.size - 4, b"tail")
    assert d.read(d.size - 4, 10) == b"tail" + bytes(6)
    buf = bytearray(b"\xff" * 10)
    d.readinto(d.size - 4, buf)
    assert buf == b"tail" + bytes(6)


@pytest.mark.parametrize("direct", [False, True])
def test_write_fua(path, direct):
    disk = Disk(path, size=MiB, create=True, direct=direct)
    try:
        data = _rand(5000, 4)
        disk.write(777, data, fua=True)
        assert disk.read(777, 5000) == data
        with open(path, "rb") as f:
            f.seek(777)
            assert f.read(5000) == data
    finally:
        disk.close()


def test_write_fua_syncs(d, monkeypatch):
    """FUA on a buffered file either uses RWF_DSYNC or fdatasync; plain writes do neither."""
    calls = []
    real_pwritev = os.pwritev
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))

    def pwritev(fd, bufs, offset, flags=0):
        if flags & os.RWF_DSYNC:
            calls.append("dsync")
        return real_pwritev(fd, bufs, offset, flags)
    monkeypatch.setattr(os, "pwritev", pwritev)
    d.write(0, b"plain")
    assert calls == []
    d.write(0, b"durable", fua=True)
    assert calls and set(calls) <= {"dsync", "fdatasync"}
    assert d.read(0, 7) == b"durable"


def test_flush_and_cache(d):
    d.write(0, b"x" * 100)
    d.flush()
    d.cache(0, d.size)
    assert d.read(0, 100) == b"x" * 100


# -- trim / zero -------------------------------------------------------------------------------

def test_trim_punches_hole(d):
    data = fill(d)
    before = allocated(d)
    d.trim(64 * KiB, 128 * KiB)
    assert d.read(64 * KiB, 128 * KiB) == bytes(128 * KiB)
    assert d.read(0, 64 * KiB) == data[:64 * KiB]
    assert d.read(192 * KiB, 64 * KiB) == data[192 * KiB:256 * KiB]
    assert d.extents(0, d.size) == [(0, 64 * KiB, False), (64 * KiB, 128 * KiB, True),
                                    (192 * KiB, MiB - 192 * KiB, False)]
    assert allocated(d) == before - 128 * KiB
    assert os.path.getsize(d.path) == MiB  # size kept


def test_trim_unaligned_reads_zero(d):
    data = fill(d)
    d.trim(1000, 10_000, fua=True)
    assert d.read(0, 1000) == data[:1000]
    assert d.read(1000, 10_000) == bytes(10_000)
    assert d.read(11_000, 1000) == data[11_000:12_000]


def test_zero_may_trim_punches_hole(d):
    data = fill(d)
    before = allocated(d)
    d.zero(256 * KiB, 64 * KiB)
    assert d.read(256 * KiB, 64 * KiB) == bytes(64 * KiB)
    assert d.read(0, 256 * KiB) == data[:256 * KiB]
    assert (256 * KiB, 64 * KiB, True) in d.extents(0, d.size)
    assert allocated(d) == before - 64 * KiB


def test_zero_no_trim_keeps_allocation(d):
    """NBD_CMD_FLAG_NO_HOLE: the range reads as zero but stays allocated.

    (ext4/xfs report unwritten extents as holes to SEEK_DATA, so the allocation is checked
    with st_blocks; the data around the range must be intact.)"""
    data = fill(d)
    before = allocated(d)
    d.zero(256 * KiB, 64 * KiB, may_trim=False)
    assert d.read(256 * KiB, 64 * KiB) == bytes(64 * KiB)
    assert d.read(0, 256 * KiB) == data[:256 * KiB]
    assert d.read(320 * KiB, MiB - 320 * KiB) == data[320 * KiB:]
    assert allocated(d) == before


def test_zero_unaligned(d):
    data = fill(d)
    for may_trim in (True, False):
        d.zero(5000, 9000, may_trim=may_trim, fua=True)
        assert d.read(0, 5000) == data[:5000]
        assert d.read(5000, 9000) == bytes(9000)
        assert d.read(14_000, 2000) == data[14_000:16_000]


def test_zero_fast(d):
    data = fill(d)
    d.zero(0, 8192, fast=True)
    d.zero(8192, 8192, fast=True, may_trim=False)
    assert d.read(0, 16_384) == bytes(16_384)
    assert d.read(16_384, 100) == data[16_384:16_484]


def _no_fallocate(monkeypatch, calls):
    def fail(fd, mode, offset, length):
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")
    monkeypatch.setattr(disk_mod, "fallocate", fail)


def test_zero_fast_without_fallocate_is_enotsup(d, monkeypatch):
    data = fill(d)
    calls = []
    _no_fallocate(monkeypatch, calls)
    with pytest.raises(OSError) as ei:
        d.zero(0, 4096, fast=True)
    assert ei.value.errno == errno.ENOTSUP
    assert len(calls) == 2  # punch hole, then zero range
    assert d.read(0, 4096) == data[:4096]  # nothing was written


def test_zero_without_fallocate_writes_zeroes(tmp_path, monkeypatch):
    disk = Disk(str(tmp_path / "big.img"), size=3 * MiB, create=True)
    try:
        data = fill(disk)
        calls = []
        _no_fallocate(monkeypatch, calls)
        length = MiB + 4096 + 3  # more than the 1 MiB chunk of the fallback
        disk.zero(1000, length)
        assert calls
        assert disk.read(0, 1000) == data[:1000]
        assert disk.read(1000, length) == bytes(length)
        assert disk.read(1000 + length, 5000) == data[1000 + length:6000 + length]
        disk.zero(100, 50, may_trim=False)
        assert disk.read(0, 200) == data[:100] + bytes(50) + data[150:200]
    finally:
        disk.close()


def test_trim_without_punch_hole_is_advisory(d, monkeypatch):
    data = fill(d)
    _no_fallocate(monkeypatch, [])
    d.trim(0, 4096)  # no error, data may stay
    assert d.read(0, 4096) == data[:4096]


def test_zero_other_errors_propagate(d, monkeypatch):
    def fail(fd, mode, offset, length):
        raise OSError(errno.ENOSPC, "full")
    monkeypatch.setattr(disk_mod, "fallocate", fail)
    with pytest.raises(OSError) as ei:
        d.zero(0, 4096)
    assert ei.value.errno == errno.ENOSPC


def test_fallocate_errors_are_oserror(d):
    with pytest.raises(OSError) as ei:
        disk_mod.fallocate(d.fd, 0x7FFF0000, 0, 4096)  # unknown mode bits
    assert ei.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)


# -- extents -----------------------------------------------------------------------------------

LAYOUT = [(64 * KiB, 64 * KiB), (512 * KiB, 4 * KiB), (1020 * KiB, 4 * KiB)]


@pytest.fixture
def sparse(d):
    for i, (off, n) in enumerate(LAYOUT):
        d.write(off, _rand(n, i + 10))
    return d


def test_extents_sparse(sparse):
    ext = sparse.extents(0, MiB)
    assert ext == [
        (0, 64 * KiB, True), (64 * KiB, 64 * KiB, False), (128 * KiB, 384 * KiB, True),
        (512 * KiB, 4 * KiB, False), (516 * KiB, 504 * KiB, True),
        (1020 * KiB, 4 * KiB, False),
    ]
    check_extents_cover(ext, 0, MiB)


@pytest.mark.parametrize("offset,length", [(1000, 70_000), (65 * KiB, 1), (100 * KiB, 500 * KiB),
                                           (130 * KiB, 10), (1020 * KiB + 7, 100),
                                           (600 * KiB, 424 * KiB)])
def test_extents_subranges(sparse, offset, length):
    ext = sparse.extents(offset, length)
    check_extents_cover(ext, offset, length)
    for off, n, hole in ext:
        for probe in (off, off + n - 1):
            in_data = any(o <= probe < o + ln for o, ln in LAYOUT)
            assert hole is not in_data, (off, n, hole, probe)


def test_extents_all_hole_and_all_data(d):
    assert d.extents(4096, 8192) == [(4096, 8192, True)]
    fill(d)
    assert d.extents(0, MiB) == [(0, MiB, False)]
    assert d.extents(10, 20) == [(10, 20, False)]


def test_extents_max_extents(sparse):
    ext = sparse.extents(0, MiB, max_extents=2)
    assert ext == [(0, 64 * KiB, True), (64 * KiB, 64 * KiB, False)]
    assert sparse.extents(0, MiB, max_extents=1) == [(0, 64 * KiB, True)]
    assert len(sparse.extents(0, MiB, max_extents=6)) == 6


def test_starts_with_data(sparse):
    assert sparse.starts_with_data(64 * KiB)
    assert sparse.starts_with_data(128 * KiB - 1)
    assert not sparse.starts_with_data(128 * KiB)
    assert not sparse.starts_with_data(0)
    assert sparse.starts_with_data(MiB - 1)


def test_starts_with_data_tail_hole(d):
    d.write(0, b"x" * 4096)
    assert d.starts_with_data(0)
    assert not d.starts_with_data(8192)  # SEEK_DATA past the last data: ENXIO


def test_dense_disk_answers_hole_probes_until_a_hole_is_punched(path, d):
    """A fully allocated file needs no SEEK_DATA per read; a punched range makes the probes
    real again (a stale 'dense' would hide the hole)."""
    assert not d.dense  # a new sparse image
    fill(d)
    d.close()
    dense = Disk(path)
    try:
        assert dense.dense
        assert dense.starts_with_data(128 * KiB)
        assert dense.extents(0, MiB) == [(0, MiB, False)]
        dense.trim(128 * KiB, 64 * KiB)
        assert not dense.dense
        assert not dense.starts_with_data(128 * KiB)
        assert (128 * KiB, 64 * KiB, True) in dense.extents(0, MiB)
    finally:
        dense.close()


# -- O_DIRECT ----------------------------------------------------------------------------------

@pytest.fixture
def ddisk(path):
    data = bytearray(_rand(MiB, 99))
    with open(path, "wb") as f:
        f.write(data)
    disk = Disk(path, direct=True)
    yield disk, data
    disk.close()


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


CASES = [
    (0, 4096), (0, 1), (1, 10), (4095, 2), (4000, 100), (100, 4096), (4096, 1),
    (8191, 1), (3, 3 * 4096), (4096, 3 * 4096 + 5), (5000, 3000), (12_345, 70_000),
    (MiB - 10, 10), (MiB - 4096, 4096), (MiB - 5000, 5000), (0, MiB), (1, MiB - 2),
    (8192, 0), (8190, 0),
]


@pytest.mark.parametrize("offset,length", CASES)
def test_direct_unaligned_write_then_read(ddisk, offset, length):
    disk, model = ddisk
    assert disk.direct
    data = _rand(length, offset + length)
    disk.write(offset, data)
    model[offset:offset + length] = data
    assert _file_bytes(disk.path) == model  # read-modify-write kept the neighbours
    assert disk.read(offset, length) == data
    lo, hi = max(0, offset - 5000), min(MiB, offset + length + 5000)
    assert disk.read(lo, hi - lo) == model[lo:hi]
    buf = bytearray(hi - lo)
    disk.readinto(lo, buf)
    assert buf == model[lo:hi]


def test_direct_many_random_writes(ddisk):
    disk, model = ddisk
    rnd = random.Random(5)
    for i in range(150):
        offset = rnd.randrange(0, MiB - 1)
        length = rnd.randrange(0, min(3 * DIRECT_ALIGN, MiB - offset))
        data = rnd.randbytes(length)
        disk.write(offset, memoryview(data), fua=(i % 17 == 0))
        model[offset:offset + length] = data
        o2 = rnd.randrange(0, MiB - 1)
        n2 = rnd.randrange(1, min(20_000, MiB - o2) + 1)
        assert disk.read(o2, n2) == model[o2:o2 + n2]
    assert _file_bytes(disk.path) == model


def test_direct_large_write_grows_bounce(ddisk):
    disk, model = ddisk
    disk.read(0, 4096)  # a 1 MiB bounce exists
    disk.close()
    path = disk.path
    with open(path, "r+b") as f:
        f.truncate(4 * MiB)
    big = Disk(path, direct=True)
    try:
        data = _rand(3 * MiB, 7)
        big.write(77, data)
        assert big.read(77, 3 * MiB) == data
        assert big.read(0, 77) == model[:77]
    finally:
        big.close()


def test_direct_read_returns_a_copy(ddisk):
    disk, model = ddisk
    a = disk.read(10, 100)
    disk.read(5000, 100)  # reuses the bounce buffer
    assert a == model[10:110] and isinstance(a, bytes)


# -- parse_size --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("1", 1), ("1K", 1024), ("1k", 1024), ("1KB", 1024), ("1KiB", 1024),
    ("512M", 512 * MiB), ("512MiB", 512 * MiB), ("1G", 1 << 30), ("10GiB", 10 << 30),
    ("1T", 1 << 40), ("1.5K", 1536), (" 2m ", 2 * MiB), ("64MB", 64 * MiB), ("4096B", 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "abc", "G", "GiB", "0", "-1", "-1G", "0.4",
                                  "1X", "1.2.3", "nan"])
def test_parse_size_invalid(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["inf", "1e400", "infG"])
def test_parse_size_infinite_is_value_error(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_exact_large_integer():
    assert parse_size(str(2**53 + 1)) == 2**53 + 1
