"""The SyncTarget side of a resync, in process with a disk that forgets unflushed writes:
an acknowledged block is durable, the target's own record (its bitmap) is persisted before
the source may send data and never loses a bit for a block that is not durable yet, and
UpToDate with the source's generation is persisted only after the data disk was flushed."""

from __future__ import annotations

import asyncio
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from blockrep import native
from blockrep.bitmap import BLOCK, Bitmap
from blockrep.peer import proto
from blockrep.peer.proto import P
from blockrep.shell.bitmap_io import BitmapWriter
from blockrep.shell.resync_target import ResyncTarget
from blockrep.state import DiskState, Generation, ReplState

MiB = 1 << 20
SIZE = 16 * MiB


class CrashDisk:
    """In memory: `data` is what reads see, `durable` what survives a power loss (only
    flushed writes). Every call is logged in `ops`."""

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)
        self.durable = bytearray(size)
        self.ops: list[str] = []
        self.zero_threads: list[threading.Thread] = []

    def write(self, offset, data, fua=False):
        self.data[offset:offset + len(data)] = data
        self.ops.append("write")

    def zero(self, offset, length, **kw):
        self.data[offset:offset + length] = bytes(length)
        self.ops.append("zero")
        self.zero_threads.append(threading.current_thread())

    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])

    def flush(self):
        self.durable[:] = self.data
        self.ops.append("flush")


class FakeStore:
    """Metadata in memory: what was persisted, in order."""

    def __init__(self, node):
        self.node = node
        self.persisted_bits: np.ndarray | None = None
        self.states: list[tuple[DiskState, int, bytes]] = []  # (disk, gen current, durable)

    def take_bitmap_pages(self):
        self.node.bitmap.take_dirty_pages()
        return [self.node.bitmap.words.copy()]

    def write_bitmap_pages(self, pages):
        self.persisted_bits = pages[0]
        self.node.disk.ops.append("bitmap")


class FakeLink:
    def __init__(self):
        self.closed = False
        self.sent: list[tuple[int, int, int, int]] = []  # (type, id, offset, size)
        self.controls: list[dict] = []

    def send(self, *parts):
        magic, ptype, flags, pid, offset, size, paylen, crc, _hcrc = proto.HEADER.unpack(parts[0])
        self.sent.append((ptype, pid, offset, size))

    def send_control(self, ptype, body):
        self.controls.append(body)

    def owns(self, payload):
        return False

    def abort(self, reason):
        raise AssertionError(f"link aborted: {reason}")


class NoHandlers:
    """No [handlers] configured (shell/handlers.py's interface)."""

    def configured(self, name):
        return False

    def fire(self, name, **extra):
        pass


class FakeNode:
    def __init__(self, loop):
        self.loop = loop
        self.disk = CrashDisk(SIZE)
        self.bitmap = Bitmap(SIZE)
        self.gen = Generation(0x1234, 0, [])
        self.store = FakeStore(self)
        self.bitmap_writer = BitmapWriter(self)
        self.bitmap_exchange = None
        self.executor = ThreadPoolExecutor(max_workers=2)
        self.disk_state = DiskState.INCONSISTENT
        self.repl = ReplState.SYNC_TARGET
        self.resync_target = None
        self.resync_differing_bytes = 0
        self.last_sync = None
        self.hooks = NoHandlers()
        self.diskfail = types.SimpleNamespace(attached=True)  # on-io-error: never tripped here

    def run_io(self, fn, done):
        fut = self.loop.run_in_executor(self.executor, fn)
        fut.add_done_callback(lambda f: done(f.exception()))

    def persist(self):
        self.store.states.append((self.disk_state, self.gen.current, bytes(self.disk.durable)))
        self.disk.ops.append(f"sb:{self.disk_state.value}")

    is_primary = False

    def set_disk(self, new):
        self.disk_state = new

    def set_replication(self, new):
        self.repl = new

    def bitmap_changed(self):
        self.bitmap_writer.flush()

    def emit(self, *a, **kw):
        pass

    def send_state(self):
        pass


async def _until(pred, what, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def _payload(offset: int, length: int) -> bytes:
    return os.urandom(length)


def _rs_data(tgt, link, pid, offset, data):
    tgt.on_rs_data(link, 0, pid, offset, len(data), native.crc32c(data), memoryview(data))


@pytest.fixture
def target():
    loop = asyncio.new_event_loop()
    node = FakeNode(loop)
    link = FakeLink()
    tgt = node.resync_target = ResyncTarget(node, link, SIZE)
    node.bitmap.set_all()  # a full sync: the target's record is every block
    yield loop, node, link, tgt
    node.executor.shutdown(wait=True)
    loop.close()


def test_acked_resync_data_is_durable_and_record_kept(target):
    loop, node, link, tgt = target

    async def scenario():
        tgt.on_sync_start({"total": SIZE, "csum": False, "uuid": 0xABCD00})
        await _until(lambda: link.controls, "sync-ready")
        assert link.controls == [{"op": "sync-ready"}]
        # the record (every bit) and the sync identifier were persisted before data may come
        assert node.store.persisted_bits is not None
        assert int(np.bitwise_count(node.store.persisted_bits).sum()) == SIZE // BLOCK
        assert node.store.states[-1][:2] == (DiskState.INCONSISTENT, 0xABCD00)
        assert node.disk.ops.index("bitmap") < node.disk.ops.index("sb:Inconsistent")

        sent = {}
        pid = 1
        # small (inline) and large (threaded) writes, a zero range
        for off, ln in ((0, 64 * 1024), (MiB, MiB), (3 * MiB, 4096), (5 * MiB, 512 * 1024)):
            sent[pid] = (off, _payload(off, ln))
            _rs_data(tgt, link, pid, off, sent[pid][1])
            pid += 1
        tgt.on_rs_data(link, proto.F_ZERO, pid, 8 * MiB, MiB, 0, memoryview(b""))
        sent[pid] = (8 * MiB, bytes(MiB))
        await _until(lambda: len([s for s in link.sent if s[0] == P.RS_ACK]) == len(sent),
                     "every ack")
        acks = [s for s in link.sent if s[0] == P.RS_ACK]
        for ptype, apid, off, ln in acks:
            o, data = sent[apid]
            assert (off, ln) == (o, len(data))
            # a power loss now keeps what was acknowledged
            assert bytes(node.disk.durable[off:off + ln]) == data, f"ack {apid} not durable"
        # the acks went out behind flushes, in batches (not one flush per request)
        assert 1 <= tgt.flushes <= len(sent)
        # the target's own record lost exactly the acked blocks, nothing else
        left = node.bitmap.count_bytes()
        assert left == SIZE - sum(len(d) for _, d in sent.values())
        await node.bitmap_writer.flushed()
        persisted = Bitmap(SIZE, node.store.persisted_bits.copy())
        for blk in range(SIZE // BLOCK):
            if not persisted.test(blk * BLOCK):  # cleared on disk => durable on disk
                off = blk * BLOCK
                assert node.disk.durable[off:off + BLOCK] == node.disk.data[off:off + BLOCK]

    loop.run_until_complete(scenario())


def test_record_cleared_only_for_durable_data(target):
    """Every persisted state of the target's bitmap only lacks bits of durable blocks."""
    loop, node, link, tgt = target
    seen = []
    real = node.store.write_bitmap_pages

    def checking(pages):
        bits = Bitmap(SIZE, pages[0].copy())
        durable = bytes(node.disk.durable)
        for blk in range(0, SIZE // BLOCK, 7):
            off = blk * BLOCK
            if not bits.test(off):
                seen.append(blk)
                assert durable[off:off + BLOCK] == bytes(node.disk.data[off:off + BLOCK])
        real(pages)
    node.store.write_bitmap_pages = checking

    async def scenario():
        tgt.on_sync_start({"total": SIZE, "csum": False, "uuid": 0xABCD00})
        await _until(lambda: link.controls, "sync-ready")
        for i in range(16):
            _rs_data(tgt, link, i + 1, i * MiB, _payload(i * MiB, MiB))
            if i % 4 == 3:
                await _until(lambda: not tgt.flushing and not tgt.unflushed, "flushes")
                await node.bitmap_writer.flushed()
        await _until(lambda: len([s for s in link.sent if s[0] == P.RS_ACK]) == 16, "acks")
        await node.bitmap_writer.flushed()

    loop.run_until_complete(scenario())
    assert seen, "no cleared bit was ever persisted"
    assert node.bitmap.count() == 0


def test_uptodate_persisted_only_after_the_data_disk_is_flushed(target):
    loop, node, link, tgt = target

    async def scenario():
        tgt.on_sync_start({"total": SIZE, "csum": False, "uuid": 0xABCD00})
        await _until(lambda: link.controls, "sync-ready")
        data = _payload(0, SIZE)
        _rs_data(tgt, link, 1, 0, data)
        await _until(lambda: any(s[0] == P.RS_ACK for s in link.sent), "the ack")
        # a replicated application write lands after the resync data, unflushed
        node.disk.write(4 * MiB, b"\x77" * BLOCK)
        src_gen = Generation(0x5555, 0, [0xABCD00])
        tgt.on_sync_done({"gen": src_gen.to_wire()})
        await _until(lambda: node.resync_target is None, "the end of the resync")

    loop.run_until_complete(scenario())
    disk_state, current, durable = node.store.states[-1]
    assert (disk_state, current) == (DiskState.UP_TO_DATE, 0x5555)
    assert durable == bytes(node.disk.data), "UpToDate persisted before the data flush"
    ops = node.disk.ops
    assert ops.index("sb:UpToDate") > len(ops) - 1 - ops[::-1].index("flush")
    assert node.bitmap.count() == 0 and node.store.persisted_bits.sum() == 0
    assert node.repl == ReplState.ESTABLISHED and node.last_sync["role"] == "SyncTarget"


def test_data_before_sync_ready_is_a_protocol_error(target):
    loop, node, link, tgt = target
    with pytest.raises(proto.LinkProtocolError, match="sync-ready"):
        _rs_data(tgt, link, 1, 0, b"x" * BLOCK)


def test_zeroing_runs_off_the_event_loop(target):
    """BLKZEROOUT or the zero-writing fallback can take seconds: resync zero markers and
    large replicated WRITE_ZEROES are applied in the I/O threads."""
    loop, node, link, tgt = target
    from blockrep.shell.applier import Applier

    async def scenario():
        tgt.on_sync_start({"total": SIZE, "csum": False, "uuid": 0xABCD00})
        await _until(lambda: link.controls, "sync-ready")
        tgt.on_rs_data(link, proto.F_ZERO, 1, 0, MiB, 0, memoryview(b""))
        await _until(lambda: any(s[0] == P.RS_ACK for s in link.sent), "the ack")
        applier = Applier(node)
        applier.on_zero(link, 0, 7, 2 * MiB, MiB, 0, memoryview(b""))
        await _until(lambda: any(s[0] == P.WRITE_ACK for s in link.sent), "the write ack")

    loop.run_until_complete(scenario())
    assert len(node.disk.zero_threads) == 2
    assert threading.main_thread() not in node.disk.zero_threads
