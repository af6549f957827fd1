"""blockrep.meta: layout, create/open, corruption refusal, superblock A/B crash safety, the
activity log, the bitmap area and its CRC, on sparse image files in tmp_path.

On-disk positions are computed here from docs/on-disk-format.md, not taken from the store.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockrep import meta, native
from blockrep.bitmap import BLOCK
from blockrep.config import parse
from blockrep.meta import (
    AL_EXTENT,
    AL_SLOT,
    AL_SLOTS,
    SB_SIZE,
    MetaError,
    Superblock,
    create_md,
    dump_md,
    layout,
    open_store,
)
from blockrep.state import DiskState, Generation

MiB = 1 << 20
SIZE = 64 * MiB
REC = 512  # superblock sector: 240 bytes of fields, zero padding, CRC32C at 508


def make_cfg(tmp_path, *, name="r0", size=SIZE, external=False, names=("a", "b")):
    nodes = {}
    for i, n in enumerate(names):
        disk = tmp_path / f"{n}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(size)
        t = {"address": f"127.0.0.1:{7000 + i}", "disk": str(disk),
             "nbd": f"127.0.0.1:{10800 + i}"}
        if external:
            t["meta-disk"] = str(tmp_path / f"{n}.md")
        nodes[n] = t
    return parse({"resource": {"name": name, "shared-secret": "x"}, "node": nodes},
                 str(tmp_path / f"{name}.toml"))


def md_loc(node):
    """-> (path of the metadata file, md_offset, md_size, data_size)"""
    size = os.path.getsize(node.disk)
    if node.meta_disk == "internal":
        data, off, md = layout(size, True)
        return node.disk, off, md, data
    data, off, md = layout(size, False)
    return node.meta_disk, 0, md, data


def pread(path, n, off):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def pwrite(path, data, off):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def flip(path, off, mask=0xFF):
    b = pread(path, 1, off)[0]
    pwrite(path, bytes([b ^ mask]), off)


def ondisk_words(node):
    path, off, md, data = md_loc(node)
    bm_off = off + 2 * SB_SIZE + AL_SLOTS * AL_SLOT
    nwords = (-(-data // BLOCK) + 63) // 64
    return np.frombuffer(pread(path, nwords * 8, bm_off), dtype="<u8")


@pytest.fixture(params=["internal", "external"])
def setup(request, tmp_path):
    cfg = make_cfg(tmp_path, external=request.param == "external")
    return cfg, cfg.nodes["a"]


@pytest.fixture
def created(setup):
    cfg, node = setup
    create_md(cfg, node)
    return cfg, node


def reopen(cfg, node, **kw):
    return open_store(cfg, node, **kw)


# -- layout ------------------------------------------------------------------------------------

def expected_md_size(disk_size):
    blocks = -(-disk_size // BLOCK)
    words = -(-blocks // 64)
    bm = -(-(words * 8) // 4096) * 4096
    return 2 * 4096 + 32 * 4096 + bm


@pytest.mark.parametrize("disk_size", [SIZE, 10 * MiB + 1000, 1 << 40, 300 * 4096,
                                       128 * MiB + 4096])
def test_layout(disk_size):
    md = expected_md_size(disk_size)
    assert layout(disk_size, False) == (disk_size, 0, md)
    data, off, md2 = layout(disk_size, True)
    assert md2 == md
    assert data == off == (disk_size - md) // 4096 * 4096
    assert data + md <= disk_size


def test_layout_known_values():
    # 64 MiB: 16384 blocks -> 256 words -> 2048 bytes -> one 4 KiB page
    assert layout(SIZE, False) == (SIZE, 0, 8192 + 131072 + 4096)
    assert layout(SIZE, True) == (SIZE - 143360, SIZE - 143360, 143360)
    # 1 TiB: 2^28 blocks -> 32 MiB of bitmap
    assert layout(1 << 40, False)[2] == 139264 + (32 << 20)


def test_layout_too_small_for_internal():
    with pytest.raises(MetaError, match="too small"):
        layout(100 * 1024, True)
    assert layout(100 * 1024, False)[0] == 100 * 1024


# -- create / open -----------------------------------------------------------------------------

def test_create_then_open(setup):
    cfg, node = setup
    path, off, md, data = md_loc(node)
    msg = create_md(cfg, node)
    assert "r0/a" in msg and str(data) in msg and str(md) in msg
    store = open_store(cfg, node)
    try:
        assert store.data_size == data
        assert store.md_offset == off
        assert store.sb.md_size == md
        assert store.sb.resource == "r0" and store.sb.node == "a"
        assert store.bitmap.size == data and store.bitmap.count() == 0
        assert store.gen == Generation()
        assert store.clean and not store.was_primary and not store.crashed_primary
        assert store.al_recovered == []
        assert store.initial_disk_state() == DiskState.INCONSISTENT
    finally:
        store.close()
    if node.meta_disk != "internal":
        assert os.path.getsize(node.meta_disk) == md


def test_open_marks_running_not_clean(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.close()  # no clean shutdown
    store = open_store(cfg, node, read_only=True)
    try:
        assert not store.clean
    finally:
        store.close()


def test_create_md_leaves_data_alone(tmp_path):
    cfg = make_cfg(tmp_path)
    node = cfg.nodes["a"]
    path, off, md, data = md_loc(node)
    pattern = os.urandom(4096)
    pwrite(node.disk, pattern, 0)
    pwrite(node.disk, pattern, off - 4096)  # the last data block
    create_md(cfg, node)
    assert pread(node.disk, 4096, 0) == pattern
    assert pread(node.disk, 4096, off - 4096) == pattern
    assert pread(node.disk, 8, off) == b"BREPMETA"


def test_create_md_external_leaves_disk_alone(tmp_path):
    cfg = make_cfg(tmp_path, external=True)
    node = cfg.nodes["a"]
    pattern = os.urandom(8192)
    pwrite(node.disk, pattern, SIZE - 8192)
    create_md(cfg, node)
    assert pread(node.disk, 8192, SIZE - 8192) == pattern
    assert pread(node.meta_disk, 8, 0) == b"BREPMETA"


def test_create_md_refuses_existing_unless_forced(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.bitmap.set_range(0, 10 * BLOCK)
    store.gen.current = 0x42
    store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=False)
    store.clean_shutdown(was_primary=False)
    store.close()
    with pytest.raises(MetaError, match="already holds metadata.*--force"):
        create_md(cfg, node)
    create_md(cfg, node, force=True)
    store = open_store(cfg, node)
    try:
        assert store.bitmap.count() == 0
        assert store.gen.current == 0
        assert store.sb.disk_state == DiskState.INCONSISTENT
    finally:
        store.close()


def test_create_md_refuses_corrupt_unless_forced(created):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    flip(path, off + 20)
    with pytest.raises(MetaError, match="corrupt.*--force"):
        create_md(cfg, node)
    create_md(cfg, node, force=True)
    open_store(cfg, node).close()


def test_open_without_metadata(setup):
    cfg, node = setup
    with pytest.raises(MetaError) as ei:
        open_store(cfg, node)
    msg = str(ei.value)
    assert "no blockrep metadata" in msg and "create-md" in msg
    assert cfg.path in msg and "--node a" in msg
    assert "\n" not in msg


def test_open_other_resource_refused(created, tmp_path):
    cfg, node = created
    other = make_cfg(tmp_path, name="r1", external=node.meta_disk != "internal")
    with pytest.raises(MetaError, match="belongs to resource 'r0' node 'a', not 'r1'"):
        open_store(other, other.nodes["a"])


def test_open_other_node_refused(created, tmp_path):
    cfg, node = created
    # a config whose node "x" points at node a's disk (and meta file)
    raw = {"resource": {"name": "r0", "shared-secret": "x"},
           "node": {"x": {"address": "127.0.0.1:1", "disk": node.disk,
                          "nbd": "127.0.0.1:2", "meta-disk": node.meta_disk},
                    "y": {"address": "127.0.0.1:3", "disk": node.disk, "nbd": "127.0.0.1:4"}}}
    other = parse(raw)
    with pytest.raises(MetaError, match="node 'a', not 'r0' node 'x'"):
        open_store(other, other.nodes["x"])


def test_open_refuses_other_size(tmp_path):
    cfg = make_cfg(tmp_path, external=True)
    node = cfg.nodes["a"]
    create_md(cfg, node)
    with open(node.disk, "r+b") as f:
        f.truncate(SIZE + 4096)
    with pytest.raises(MetaError, match="data size"):
        open_store(cfg, node)


# -- superblock corruption ---------------------------------------------------------------------

def open_expect_error(cfg, node):
    try:
        store = open_store(cfg, node, read_only=True)
    except MetaError as exc:
        return str(exc)
    store.close()
    return None


@pytest.mark.parametrize("copy", [0, 1])
def test_every_record_byte_flip_is_corruption(created, copy):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    base = off + copy * SB_SIZE
    for pos in range(8, REC):  # every field and the CRC; the magic is tested below
        for mask in (0x01, 0x80):
            flip(path, base + pos, mask)
            msg = open_expect_error(cfg, node)
            flip(path, base + pos, mask)
            assert msg is not None, f"flip at {pos} ({mask:#x}) not detected"
            assert "corrupt" in msg and "AB"[copy] in msg, msg
    assert open_expect_error(cfg, node) is None  # restored


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(copy=st.sampled_from([0, 1]), pos=st.integers(8, REC - 1), mask=st.integers(1, 255))
def test_record_byte_flip_hypothesis(created, copy, pos, mask):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    flip(path, off + copy * SB_SIZE + pos, mask)
    try:
        msg = open_expect_error(cfg, node)
    finally:
        flip(path, off + copy * SB_SIZE + pos, mask)
    assert msg is not None and "corrupt" in msg


@pytest.mark.parametrize("copy", [0, 1])
def test_magic_byte_flip_refused(created, copy):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    for pos in range(8):
        flip(path, off + copy * SB_SIZE + pos)
        msg = open_expect_error(cfg, node)
        flip(path, off + copy * SB_SIZE + pos)
        assert msg is not None and "refusing to start" in msg


def test_magic_byte_flip_reported_as_corrupt(created):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    flip(path, off + SB_SIZE + 3)
    msg = open_expect_error(cfg, node)
    assert msg is not None and "corrupt" in msg


@pytest.mark.parametrize("copy", [0, 1])
def test_sector_padding_flip_detected(created, copy):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    flip(path, off + copy * SB_SIZE + 300)
    assert open_expect_error(cfg, node) is not None


def test_only_one_copy_refused(created):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    pwrite(path, bytes(SB_SIZE), off)  # copy A gone
    with pytest.raises(MetaError, match="only one superblock copy"):
        open_store(cfg, node)


# -- superblock updates ------------------------------------------------------------------------

def read_sbs(node):
    path, off, _, _ = md_loc(node)
    a = pread(path, SB_SIZE, off)
    b = pread(path, SB_SIZE, off + SB_SIZE)
    return a, b


def test_seq_increments_and_copies_equal(created):
    cfg, node = created
    a, b = read_sbs(node)
    assert a == b
    seq0 = Superblock.decode(a, "A").seq
    store = open_store(cfg, node)
    try:
        a, b = read_sbs(node)
        assert a == b
        seq1 = Superblock.decode(a, "A").seq
        assert seq1 == seq0 + 1
        store.gen.current = 0x1000
        store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=True)
        a, b = read_sbs(node)
        assert a == b
        sb = Superblock.decode(a, "A")
        assert sb.seq == seq1 + 1
        assert sb.disk_state == DiskState.UP_TO_DATE and sb.gen.current == 0x1000
        assert sb.flags & meta.F_PRIMARY and not sb.flags & meta.F_CLEAN
        # nothing changed: no write
        store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=True)
        assert Superblock.decode(read_sbs(node)[0], "A").seq == seq1 + 1
        # DUnknown keeps the stored disk state
        store.save_state(disk_state=DiskState.DUNKNOWN, was_primary=False)
        a, b = read_sbs(node)
        assert a == b
        sb = Superblock.decode(a, "A")
        assert sb.seq == seq1 + 2 and sb.disk_state == DiskState.UP_TO_DATE
        assert not sb.flags & meta.F_PRIMARY
        store.gen.start_new_data()
        store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=False)
        sb = Superblock.decode(read_sbs(node)[0], "A")
        assert sb.seq == seq1 + 3 and sb.gen == store.gen and sb.gen.bitmap == 0x1000
    finally:
        store.close()


def test_crash_between_copy_b_and_a_newer_b_wins(created):
    cfg, node = created
    path, off, _, _ = md_loc(node)
    a, _ = read_sbs(node)
    sb = Superblock.decode(a, "A")
    sb.seq += 1
    sb.disk_state = DiskState.OUTDATED
    sb.gen = Generation(0x2222, 0, [0x4444])
    pwrite(path, sb.encode(), off + SB_SIZE)  # B written, crash before A
    store = open_store(cfg, node, read_only=True)
    try:
        assert store.sb.seq == sb.seq
        assert store.sb.disk_state == DiskState.OUTDATED
        assert store.gen == Generation(0x2222, 0, [0x4444])
    finally:
        store.close()
    # and a newer A wins the same way
    sb.seq += 1
    sb.disk_state = DiskState.FAILED
    pwrite(path, sb.encode(), off)
    store = open_store(cfg, node)
    try:
        assert store.sb.disk_state == DiskState.FAILED
    finally:
        store.close()
    a, b = read_sbs(node)
    assert a == b  # opening for writing rewrote both copies


def test_crash_during_save_state(created, monkeypatch):
    """Make the copy-A write of save_state fail: B holds the new state, open picks it."""
    cfg, node = created
    _, off, _, _ = md_loc(node)
    store = open_store(cfg, node)
    real = native.pwritev

    def failing(fd, items):
        if items[0][0] == off:
            raise OSError("simulated crash before copy A")
        return real(fd, items)

    monkeypatch.setattr(meta.native, "pwritev", failing)
    store.gen.current = 0x7770
    with pytest.raises(OSError, match="simulated"):
        store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=True)
    monkeypatch.setattr(meta.native, "pwritev", real)
    store.close()
    a, b = read_sbs(node)
    assert Superblock.decode(b, "B").seq == Superblock.decode(a, "A").seq + 1
    store = open_store(cfg, node)
    try:
        assert store.gen.current == 0x7770
        assert store.sb.disk_state == DiskState.UP_TO_DATE
        assert store.crashed_primary
    finally:
        store.close()


def test_superblock_encode_decode_round_trip():
    sb = Superblock(flags=5, seq=99, data_size=123 * 4096, md_size=143360, al_extents=77,
                    disk_state=DiskState.OUTDATED, bitmap_crc=0xDEADBEEF,
                    gen=Generation(10, 20, [30, 40, 50, 60]), resource="res", node="nöde")
    buf = sb.encode()
    assert len(buf) == SB_SIZE
    assert buf[:8] == b"BREPMETA"
    assert buf[REC:] == bytes(SB_SIZE - REC)
    assert buf[240:508] == bytes(268)
    (crc,) = struct.unpack_from("<I", buf, 508)
    assert crc == native.crc32c(buf[:508])
    back = Superblock.decode(buf, "x")
    for k in ("flags", "seq", "data_size", "md_size", "al_extents", "disk_state",
              "bitmap_crc", "gen", "resource", "node"):
        assert getattr(back, k) == getattr(sb, k), k
    assert Superblock.decode(bytes(SB_SIZE), "x") is None


@pytest.mark.parametrize("which", ["resource", "node"])
def test_long_names_are_refused_by_the_config(tmp_path, which):
    """Names are stored in 64-byte fields: the configuration refuses longer ones up front."""
    from blockrep.config import ConfigError
    with pytest.raises(ConfigError, match="longer than 63 bytes"):
        if which == "resource":
            make_cfg(tmp_path, name="r" * 70, external=True)
        else:
            make_cfg(tmp_path, names=("n" * 70, "b"), external=True)


# -- activity log ------------------------------------------------------------------------------

def al_slot_off(node, seq):
    _, off, _, _ = md_loc(node)
    return off + 2 * SB_SIZE + (seq % AL_SLOTS) * AL_SLOT


def test_activity_writes_transaction(created):
    cfg, node = created
    store = open_store(cfg, node)
    try:
        assert store.al_writes == 0
        store.activity(100, 4096, epoch=1, oldest_unacked=lambda: 1)
        assert store.al_writes == 1
        store.activity(8192, 4096, epoch=1, oldest_unacked=lambda: 1)   # same extent: no write
        assert store.al_writes == 1
        store.activity(AL_EXTENT - 10, 20, epoch=2, oldest_unacked=lambda: 1)  # extent 0 and 1
        assert store.al_writes == 2
        assert list(store.al) == [0, 1]
        slot = pread(md_loc(node)[0], AL_SLOT, al_slot_off(node, store.al_seq))
        magic, seq, count, _ = struct.unpack_from("<IQII", slot)
        assert (magic, seq, count) == (0x414C5452, store.al_seq, 2)
        assert struct.unpack_from("<2I", slot, 20) == (0, 1)
        (crc,) = struct.unpack_from("<I", slot, AL_SLOT - 4)
        assert crc == native.crc32c(slot[:28])
    finally:
        store.close()


@pytest.mark.parametrize("was_primary", [True, False])
def test_unclean_shutdown_marks_al_extents(created, was_primary):
    cfg, node = created
    store = open_store(cfg, node)
    store.activity(0, 4096, epoch=1, oldest_unacked=lambda: 1)
    store.activity(2 * AL_EXTENT + 10, 100, epoch=1, oldest_unacked=lambda: 1)
    store.gen.current = 0x10
    store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=was_primary)
    store.close()  # crash: no clean_shutdown
    store = open_store(cfg, node, read_only=True)
    try:
        assert store.al_recovered == [0, 2]
        assert store.bitmap.count() == 0  # read-only: nothing applied
    finally:
        store.close()
    store = open_store(cfg, node)
    try:
        assert not store.clean
        assert store.crashed_primary == was_primary
        assert store.al_recovered == [0, 2]
        per_ext = AL_EXTENT // BLOCK
        assert list(store.bitmap.runs()) == [(0, per_ext), (2 * per_ext, per_ext)]
        assert set(store.al) == {0, 2}  # still hot
        # the marked bits are on disk already
        assert np.array_equal(ondisk_words(node), store.bitmap.words)
    finally:
        store.close()


def test_torn_newest_al_slot_falls_back(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.activity(0, 4096, epoch=1, oldest_unacked=lambda: 1)               # seq 1: [0]
    store.activity(3 * AL_EXTENT, 4096, epoch=1, oldest_unacked=lambda: 1)   # seq 2: [0, 3]
    seq = store.al_seq
    store.close()
    path = md_loc(node)[0]
    flip(path, al_slot_off(node, seq) + 20)  # an extent number of the newest transaction
    store = open_store(cfg, node)
    try:
        assert store.al_seq == seq - 1
        assert store.al_recovered == [0]
        assert list(store.bitmap.runs()) == [(0, AL_EXTENT // BLOCK)]
    finally:
        store.close()


@pytest.mark.parametrize("where", [0, 4, 12, AL_SLOT - 1])
def test_torn_al_slot_any_field(created, where):
    cfg, node = created
    store = open_store(cfg, node)
    store.activity(AL_EXTENT, 1, epoch=1, oldest_unacked=lambda: 1)          # seq 1: [1]
    store.activity(4 * AL_EXTENT, 1, epoch=1, oldest_unacked=lambda: 1)      # seq 2: [1, 4]
    seq = store.al_seq
    store.close()
    flip(md_loc(node)[0], al_slot_off(node, seq) + where)
    store = open_store(cfg, node, read_only=True)
    try:
        assert store.al_recovered == [1]
    finally:
        store.close()


def test_al_ring_wraps(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.al_limit = 1
    for i in range(AL_SLOTS + 5):
        # disconnected: everything is acknowledged, each new extent evicts the previous
        store.activity((i % 10) * AL_EXTENT, 1, epoch=i + 1, oldest_unacked=lambda: 1 << 62)
    last = ((AL_SLOTS + 4) % 10)
    assert list(store.al) == [last]
    store.close()
    store = open_store(cfg, node, read_only=True)
    try:
        assert store.al_seq == AL_SLOTS + 5
        assert store.al_recovered == [last]
    finally:
        store.close()


def test_clean_shutdown_restores_bitmap_exactly(setup):
    cfg, node = setup
    create_md(cfg, node)
    store = open_store(cfg, node)
    store.activity(5 * AL_EXTENT, 4096, epoch=1, oldest_unacked=lambda: 1)
    rng = np.random.default_rng(1)
    for _ in range(40):
        off = int(rng.integers(0, store.data_size))
        store.bitmap.set_range(off, int(rng.integers(1, 300_000)))
    store.bitmap.set_range(store.data_size - 1, 1)
    words = store.bitmap.words.copy()
    store.gen.current = 0x20
    store.clean_shutdown(was_primary=True)
    store.close()
    store = open_store(cfg, node)
    try:
        assert store.clean and store.was_primary and not store.crashed_primary
        assert store.al_recovered == []
        assert np.array_equal(store.bitmap.words, words)
        assert store.gen.current == 0x20
    finally:
        store.close()


def test_clean_shutdown_with_no_bits_marks_nothing(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.activity(0, 4096, epoch=1, oldest_unacked=lambda: 1)
    store.clean_shutdown(was_primary=False)
    store.close()
    store = open_store(cfg, node)
    try:
        assert store.bitmap.count() == 0 and store.al_recovered == []
    finally:
        store.close()


def test_bitmap_external_partial_last_block(tmp_path):
    size = SIZE + 1000
    cfg = make_cfg(tmp_path, external=True, size=size)
    node = cfg.nodes["a"]
    create_md(cfg, node)
    store = open_store(cfg, node)
    assert store.data_size == size and store.bitmap.nbits == SIZE // BLOCK + 1
    store.bitmap.set_range(size - 1, 1)
    store.clean_shutdown(was_primary=False)
    store.close()
    store = open_store(cfg, node)
    try:
        assert list(store.bitmap.runs()) == [(SIZE // BLOCK, 1)]
        assert store.bitmap.count_bytes() == 1000
    finally:
        store.close()


@pytest.mark.parametrize("pos", [0, 7, 100, 2047, 4095])
def test_bitmap_crc_mismatch_after_clean_shutdown(created, pos):
    cfg, node = created
    store = open_store(cfg, node)
    store.bitmap.set_range(0, 100 * BLOCK)
    store.clean_shutdown(was_primary=False)
    store.close()
    path, off, md, _ = md_loc(node)
    bm_off = off + 2 * SB_SIZE + AL_SLOTS * AL_SLOT
    assert bm_off + pos < off + md
    flip(path, bm_off + pos, 0x10)
    with pytest.raises(MetaError, match="bitmap .* corrupt"):
        open_store(cfg, node)
    with pytest.raises(MetaError, match="corrupt"):
        dump_md(cfg, node)


def test_bitmap_not_crc_checked_after_unclean_shutdown(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.close()  # running -> the bitmap CRC is no longer valid
    path, off, _, _ = md_loc(node)
    flip(path, off + 2 * SB_SIZE + AL_SLOTS * AL_SLOT, 0x01)
    store = open_store(cfg, node)
    try:
        assert store.bitmap.test(0)  # the on-disk bit is trusted (it may only lag)
    finally:
        store.close()


# -- AL eviction -------------------------------------------------------------------------------

def test_eviction_flushes_evicted_extent(created):
    cfg, node = created
    store = open_store(cfg, node)
    try:
        store.al_limit = 2
        store.bitmap.set_range(0, 2 * BLOCK)               # bits in extent 0, memory only
        store.activity(0, 4096, epoch=1, oldest_unacked=lambda: 1)
        store.activity(AL_EXTENT, 4096, epoch=2, oldest_unacked=lambda: 1)
        assert int(ondisk_words(node)[0]) == 0              # not yet persisted
        writes = store.bitmap_writes
        store.activity(2 * AL_EXTENT, 4096, epoch=3, oldest_unacked=lambda: 2)  # epoch 1 acked
        assert list(store.al) == [1, 2]
        assert int(ondisk_words(node)[0]) == 0b11
        assert store.bitmap_writes == writes + 1
    finally:
        store.close()
    store = open_store(cfg, node, read_only=True)
    try:
        assert store.al_recovered == [1, 2]
    finally:
        store.close()


def test_no_eviction_of_unacknowledged_extents(created):
    cfg, node = created
    store = open_store(cfg, node)
    try:
        store.al_limit = 1
        store.activity(0, 4096, epoch=5, oldest_unacked=lambda: 5)
        store.activity(AL_EXTENT, 4096, epoch=5, oldest_unacked=lambda: 5)
        store.activity(2 * AL_EXTENT, 4096, epoch=6, oldest_unacked=lambda: 5)
        assert list(store.al) == [0, 1, 2]  # soft limit: nothing acknowledged yet
        store.activity(3 * AL_EXTENT, 4096, epoch=7, oldest_unacked=lambda: 7)
        assert list(store.al) == [3]
    finally:
        store.close()


def test_eviction_is_lru(created):
    cfg, node = created
    store = open_store(cfg, node)
    try:
        store.al_limit = 2
        store.activity(0, 1, epoch=1, oldest_unacked=lambda: 1)
        store.activity(AL_EXTENT, 1, epoch=1, oldest_unacked=lambda: 1)
        store.activity(0, 1, epoch=2, oldest_unacked=lambda: 1)     # extent 0 used again
        store.activity(2 * AL_EXTENT, 1, epoch=3, oldest_unacked=lambda: 3)
        assert list(store.al) == [0, 2]                     # extent 1 was least recent
    finally:
        store.close()


def test_more_active_extents_than_one_transaction_holds(tmp_path):
    n = meta.AL_MAX_PER_SLOT + 2
    cfg = make_cfg(tmp_path, external=True, size=(n + 1) * AL_EXTENT)
    node = cfg.nodes["a"]
    create_md(cfg, node)
    store = open_store(cfg, node)
    # one epoch, nothing acknowledged: no extent can leave the AL
    store.activity(0, n * AL_EXTENT, epoch=1, oldest_unacked=lambda: 1)
    # one transaction holds AL_MAX_PER_SLOT extents; the oldest left, marked out of sync
    assert len(store.al) == meta.AL_MAX_PER_SLOT
    assert store.bitmap.test(0) and store.bitmap.test(AL_EXTENT)
    store.close()  # crash
    store = open_store(cfg, node)
    try:
        for ext in (0, 1, n // 2, n - 1):  # every extent is covered after the crash
            assert store.bitmap.test(ext * AL_EXTENT), ext
    finally:
        store.close()


# -- initial disk state ------------------------------------------------------------------------

@pytest.mark.parametrize("stored, current, was_primary, expected", [
    (DiskState.UP_TO_DATE, 0x10, False, DiskState.OUTDATED),
    (DiskState.UP_TO_DATE, 0x10, True, DiskState.UP_TO_DATE),
    (DiskState.UP_TO_DATE, 0, True, DiskState.INCONSISTENT),
    (DiskState.UP_TO_DATE, 0, False, DiskState.INCONSISTENT),
    (DiskState.OUTDATED, 0x10, True, DiskState.OUTDATED),
    (DiskState.INCONSISTENT, 0x10, True, DiskState.INCONSISTENT),
    (DiskState.FAILED, 0x10, False, DiskState.FAILED),
])
@pytest.mark.parametrize("clean", [True, False])
def test_initial_disk_state(created, stored, current, was_primary, expected, clean):
    cfg, node = created
    store = open_store(cfg, node)
    store.gen.current = current
    store.save_state(disk_state=stored, was_primary=was_primary)
    if clean:
        store.clean_shutdown(was_primary=was_primary)
    store.close()
    store = open_store(cfg, node)
    try:
        assert store.was_primary == was_primary
        assert store.crashed_primary == (was_primary and not clean)
        assert store.initial_disk_state() == expected
    finally:
        store.close()


# -- dump-md -----------------------------------------------------------------------------------

def test_dump_md(created):
    cfg, node = created
    store = open_store(cfg, node)
    store.activity(AL_EXTENT, 1, epoch=1, oldest_unacked=lambda: 1)
    store.bitmap.set_range(0, 3 * BLOCK)
    store.flush_bitmap()
    store.gen.current = 0xABC0
    store.save_state(disk_state=DiskState.UP_TO_DATE, was_primary=True)
    seq = store.sb.seq
    store.close()  # crash
    out = dump_md(cfg, node)
    d = json.loads(out)
    path, _, md, data = md_loc(node)
    assert d["location"].startswith(path)
    assert d["format_version"] == 1
    assert d["seq"] == seq
    assert d["data_size"] == data and d["md_size"] == md
    assert d["flags"] == ["primary"]
    assert d["disk_state"] == "UpToDate"
    assert d["resource"] == "r0" and d["node"] == "a"
    assert d["generation"].startswith("000000000000ABC0:0000000000000000")
    assert d["al_extents_limit"] == 256
    assert d["al_active_extents"] == [1]
    assert d["bitmap_set_bits"] == 3
    assert d["crashed_primary_at_start"] is True
    # read-only: dumping changes nothing
    assert json.loads(dump_md(cfg, node))["seq"] == seq


def test_dump_md_fresh_and_missing(setup):
    cfg, node = setup
    with pytest.raises(MetaError, match="create-md"):
        dump_md(cfg, node)
    create_md(cfg, node)
    d = json.loads(dump_md(cfg, node))
    assert d["flags"] == ["clean", "bitmap-crc"]
    assert d["disk_state"] == "Inconsistent"
    assert d["al_active_extents"] == [] and d["bitmap_set_bits"] == 0
    assert d["crashed_primary_at_start"] is False


# -- exclusive use -------------------------------------------------------------------------------

def test_open_store_locks_disk_and_metadata_before_any_io(created):
    from blockrep.disk import DiskError
    cfg, node = created
    store = open_store(cfg, node)
    try:
        path, off, _, _ = md_loc(node)
        before = pread(path, 2 * SB_SIZE, off)
        for fn in (lambda: open_store(cfg, node), lambda: create_md(cfg, node, force=True),
                   lambda: dump_md(cfg, node)):
            with pytest.raises(DiskError, match="in use"):
                fn()
        assert pread(path, 2 * SB_SIZE, off) == before
    finally:
        store.close()
    open_store(cfg, node).close()


def test_external_metadata_file_is_locked_too(tmp_path):
    from blockrep.disk import DiskError
    cfg = make_cfg(tmp_path, external=True)
    a, b = cfg.nodes["a"], cfg.nodes["b"]
    create_md(cfg, a)
    b.meta_disk = a.meta_disk  # another node/resource pointed at the same metadata file
    store = open_store(cfg, a)
    try:
        with pytest.raises(DiskError, match=f"metadata file {a.meta_disk} is in use"):
            create_md(cfg, b, force=True)
    finally:
        store.close()
