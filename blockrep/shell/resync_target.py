"""The sync target's side of a resync (shell/resync.py tells the whole story).

Owns: writing resync data (plain, batched runs, checksum replies), acknowledging a block
only after the data disk was flushed, its own persisted record of what remains, adopting
the source's sync identifier, and persisting UpToDate with the new generation only after a
final flush.
Must not: read the peer's bitmap walk or throttle (the source does).
"""

from __future__ import annotations

import asyncio
import logging

from .. import digest
from ..bitmap import BLOCK
from ..peer import messages, proto
from ..peer.proto import P
from ..state import DiskState, ReplState
from .bitmap_io import BitmapExchange
from .resync import ASYNC_MIN, Progress, _check_data, finished

log = logging.getLogger("blockrep.resync")

_HDR = proto.frame


class ResyncTarget:
    """Applies resync data in stream order; in checksum mode asks only for what differs.
    Acks leave only after the data disk was flushed; the node's bitmap is the target's
    own record of what remains (bits cleared when the acked data is durable)."""

    def __init__(self, node, link, total: int):
        self.node = node
        self.link = link
        self.disk = node.disk
        self.csum = False
        self.progress = Progress(total, node.loop.time())
        self.partial: dict[int, int] = {}  # pid -> bytes still expected (checksum mode)
        self.partial_range: dict[int, tuple[int, int]] = {}  # pid -> the whole request
        self.ready = False  # our record is on disk; the source may send data
        self.unflushed: list[tuple[int, tuple]] = []  # (pid, runs) written, not flushed
        self.flushing = False
        self.flushes = 0
        self.prior = node.disk_state  # before this resync made it Inconsistent
        self.gate: asyncio.Task | None = None  # the before-resync-target handler

    # -- start and end -----------------------------------------------------------------------
    def on_sync_start(self, body: dict) -> None:
        """The source's bits are merged into ours (or all are set): adopt its sync
        identifier, persist our record, then tell the source to send data."""
        node = self.node
        self.progress.total, self.csum, uuid = messages.sync_start(body)
        node.bitmap_exchange = None
        if node.hooks.configured("before-resync-target"):
            # DRBD's before-resync-target: run before any resync data lands here (e.g. a
            # snapshot of the consistent, older data); non-zero exit drops the connection
            self.gate = node.loop.create_task(self._before(uuid))
            node.tasks.append(self.gate)  # cancelled (handler killed) on shutdown
            return
        self._adopt(uuid)

    async def _before(self, uuid) -> None:
        node = self.node
        rc = await node.hooks.run("before-resync-target",
                                  RESYNC_BYTES=self.progress.total)
        if self.link.closed or node.resync_target is not self:
            return
        if rc != 0:
            why = f"before-resync-target handler exited {rc}: resync deferred"
            log.error("%s; dropping the connection", why)
            node.last_error = why
            if self.prior in (DiskState.UP_TO_DATE, DiskState.OUTDATED):
                node.set_disk(DiskState.OUTDATED)  # no resync data written yet
                node.persist()
            self.link.close(why)
            return
        self._adopt(uuid)

    def _adopt(self, uuid) -> None:
        node = self.node
        node.gen.current, node.gen.bitmap = uuid, 0
        node.bitmap_writer.flush(lambda exc: self._record_persisted(exc))

    def _record_persisted(self, exc) -> None:
        if self.link.closed or self.node.resync_target is not self:
            return
        if exc is not None:
            self.link.abort(f"persisting the resync record failed: {exc}")
            return
        self.node.persist()  # Inconsistent, current = the sync identifier
        self.ready = True
        self.link.send_control(P.CONTROL, {"op": "sync-ready"})

    def on_sync_done(self, body: dict) -> None:
        if not self.ready or self.unflushed or self.flushing or self.partial:
            raise proto.LinkProtocolError("sync-done before every resync request was acked")
        gen = messages.sync_done(body)
        # replicated writes since the last barrier may sit in the page cache: UpToDate and
        # the new generation reach the metadata only after the data disk is flushed
        self.node.run_io(self.disk.flush, lambda exc: self._final_flushed(exc, gen))

    def _final_flushed(self, exc, gen) -> None:
        node = self.node
        if self.link.closed or node.resync_target is not self:
            return
        if exc is not None:
            self.link.abort(f"flush at the end of the resync failed: {exc}")
            return
        node.bitmap.clear_all()
        node.bitmap_writer.flush(lambda exc: self._finished(exc, gen))

    def _finished(self, exc, gen) -> None:
        node = self.node
        if self.link.closed or node.resync_target is not self:
            return
        if exc is not None:
            self.link.abort(f"persisting the bitmap at the end of the resync failed: {exc}")
            return
        node.gen.adopt(gen)
        node.resync_target = None
        node.set_replication(ReplState.ESTABLISHED)
        node.set_disk(DiskState.UP_TO_DATE)
        finished(node, "target", self.progress, flushes=self.flushes)
        node.hooks.fire("after-resync-target", RESYNC_BYTES=self.progress.done)

    # -- data --------------------------------------------------------------------------------
    def on_rs_data(self, link, flags, pid, offset, size, crc, payload):
        if not self.ready:
            raise proto.LinkProtocolError("resync data before sync-ready")
        if flags & proto.F_RUNS:
            self._on_runs(link, pid, offset, size, crc, payload)
            return
        if offset + size > self.disk.size:
            raise proto.LinkProtocolError("resync data past the end of the disk")
        if flags & proto.F_ZERO:
            # zeroing may fall back to BLKZEROOUT or writing zeroes: never on the loop. The
            # source holds back application writes to this range until our ack, so doing it
            # in a thread cannot reorder it against one
            disk = self.disk
            self.node.run_io(lambda: disk.zero(offset, size, may_trim=True),
                             lambda exc: self._written(link, pid, offset, size, exc))
            return
        _check_data(payload, size, crc, offset)
        if size >= ASYNC_MIN and not flags & proto.F_PART:
            if link.owns(payload):  # a view of the receive ring, reused soon: copy
                payload = bytes(payload)
            self.node.run_io(lambda: self.disk.write(offset, payload),
                             lambda exc: self._written(link, pid, offset, size, exc))
            return
        self.disk.write(offset, payload)
        if flags & proto.F_PART:  # part of a checksum-mode request
            left = self.partial.get(pid, 0) - size
            if left > 0:
                self.partial[pid] = left
                return
            self.partial.pop(pid, None)
            offset, size = self.partial_range.pop(pid)
        self._landed(pid, offset, size)

    def _on_runs(self, link, pid, offset, size, crc, payload) -> None:
        """Batched small runs: written in an I/O thread after every earlier write of the
        stream to their span has landed, acknowledged as one after the next flush."""
        _check_data(payload, size, crc, offset)
        runs, base = proto.parse_runs(payload, self.disk.size)
        first, (last, last_ln) = runs[0][0], runs[-1]
        self.node.applier.ordered(link, first, last + last_ln - first, payload,
                                  lambda p: self._write_runs(link, pid, runs, base, p))

    def _write_runs(self, link, pid, runs, base, payload) -> None:
        if link.closed or self.node.resync_target is not self:
            return
        if link.owns(payload):  # a view of the receive ring, reused soon: copy
            payload = bytes(payload)
        data, disk = memoryview(payload), self.disk

        def write():
            pos = base
            for off, ln in runs:
                disk.write(off, data[pos:pos + ln])
                pos += ln

        def done(exc):
            if exc is not None:
                log.error("batched resync write of %d runs from %d failed: %s", len(runs),
                          runs[0][0], exc)
                link.abort(f"resync write failed: {exc}")
            elif not link.closed:
                self._land(pid, runs)

        self.node.run_io(write, done)

    def on_rs_csum(self, link, flags, pid, offset, size, crc, payload):
        if not self.ready:
            raise proto.LinkProtocolError("resync checksums before sync-ready")
        alg = self.node.link_params.csums_alg
        if offset + size > self.disk.size or len(payload) != digest.count(alg, size):
            raise proto.LinkProtocolError("malformed resync checksum request")
        differ = digest.differing(alg, digest.block_digests(alg, self.disk.read(offset, size)),
                                  payload)
        if not differ:
            self._landed(pid, offset, size)  # equal, but maybe only in the page cache
            return
        # ask for each differing run of blocks
        want = 0
        runs = []
        k = 0
        while k < len(differ):
            j = k
            while j + 1 < len(differ) and differ[j + 1] == differ[j] + 1:
                j += 1
            o = offset + differ[k] * BLOCK
            ln = min(offset + size, offset + (differ[j] + 1) * BLOCK) - o
            runs.append((o, ln))
            want += ln
            k = j + 1
        self.partial[pid] = want
        self.partial_range[pid] = (offset, size)
        for o, ln in runs:
            link.send(_HDR(P.RS_REQUEST, 0, pid, o, ln, 0, 0))
        self.node.resync_differing_bytes += want

    def _written(self, link, pid, offset, size, exc):
        if exc is not None:
            log.error("resync write at %d+%d failed: %s", offset, size, exc)
            link.abort(f"resync write failed: {exc}")
            return
        if not link.closed:
            self._landed(pid, offset, size)

    # -- durable acks ------------------------------------------------------------------------
    def _landed(self, pid, offset, size) -> None:
        """The request's data is written: ack it after the next flush."""
        self._land(pid, ((offset, size),))

    def _land(self, pid, runs) -> None:
        self.unflushed.append((pid, runs))
        self._start_flush()

    def _start_flush(self) -> None:
        if self.flushing or not self.unflushed:
            return
        batch, self.unflushed = self.unflushed, []
        self.flushing = True
        self.node.run_io(self.disk.flush, lambda exc: self._flushed(batch, exc))

    def _flushed(self, batch, exc) -> None:
        self.flushing = False
        link, node = self.link, self.node
        if link.closed or node.resync_target is not self:
            return
        if exc is not None:
            log.error("flush of resync data failed: %s", exc)
            link.abort(f"resync flush failed: {exc}")
            return
        self.flushes += 1
        now = node.loop.time()
        bitmap = node.bitmap
        for pid, runs in batch:
            size = 0
            for offset, ln in runs:
                bitmap.clear_range(offset, ln)
                size += ln
            link.send(_HDR(P.RS_ACK, 0, pid, runs[0][0], size, 0, 0))
            self.progress.add(size, now)
        node.bitmap_changed()
        self._start_flush()


def start_target(node, link, *, full: bool, total: int) -> None:
    node.resync_target = ResyncTarget(node, link, total)  # remembers the disk state
    node.set_replication(ReplState.SYNC_TARGET)
    node.set_disk(DiskState.INCONSISTENT)
    if full:
        node.bitmap.set_all()
    else:
        ex = node.bitmap_exchange = BitmapExchange(node, link)
        node.resync_task = node.loop.create_task(_run_exchange(ex, link))


async def _run_exchange(ex, link) -> None:
    try:
        await ex.run()
    except asyncio.CancelledError:
        return
    except Exception:
        log.exception("bitmap exchange failed")
        link.abort("bitmap exchange failed")
