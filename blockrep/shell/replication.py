"""The replicated write path (primary side) and the apply path (secondary side).

Owns, on the primary: request ids, the transfer log (which writes the peer may not have on
stable storage yet, per epoch), barriers, and completing client requests only when protocol
C's promise holds. On the secondary: applying the stream in order, acks, barrier flushes.

Ordering (invariant 2): the primary performs each local write inline, in the same loop step
in which it queues the packet for the peer, and the secondary applies packets in stream
order; so overlapping writes land in the same order on both disks without a lock.
Invariant 3: on link loss every range in the transfer log is set in the bitmap before any
pending request is completed.
"""

from __future__ import annotations

import logging
from collections import deque

from ..nbd.constants import NbdErr
from ..nbd.transmission import nbd_error
from ..peer import proto
from ..peer.proto import P

from .nbd_server import FLUSH, TRIM, WRITE, ZERO  # request kinds from the NBD frontend
from .ratelog import RateLimitedLog

log = logging.getLogger("blockrep.repl")
iolog = RateLimitedLog(log)  # a failing disk fails every write: a few lines and a count

ASYNC_LOCAL = 256 * 1024  # writes this large are written locally in the I/O threads
_P_DATA, _P_WRITE_ACK = int(P.DATA), int(P.WRITE_ACK)  # ints on the hot path
_KIND_PACKET = {WRITE: P.DATA, TRIM: P.TRIM, ZERO: P.ZERO}
_HDR = proto.HEADER.pack
_MAGIC = proto.MAGIC
_crc = proto.native.crc32c


class Req:
    __slots__ = ("kind", "offset", "length", "cb", "local_done", "peer_done", "err")

    def __init__(self, kind, offset, length, cb):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.cb = cb
        self.local_done = False
        self.peer_done = False
        self.err = 0


class Replicator:
    """Primary side. The NBD frontend calls `submit`; the node feeds acks and losses."""

    def __init__(self, node):
        self.node = node
        self.disk = node.disk
        self.next_id = 1
        self.pending: dict[int, Req] = {}
        self.epoch = 1
        self.epoch_writes = 0
        self.tl: dict[int, list] = {}  # epoch -> flat [offset, length, ...] sent to the peer
        self.barrier_waiters: dict[int, list[Req]] = {}
        self.barrier_sent_at: dict[int, float] = {}
        self.writes_replicated = 0
        self.bytes_replicated = 0
        self.writes_local_only = 0
        self.waiting: deque = deque()  # writes held back by a conflict (see submit)
        self.local_busy: dict[int, tuple[int, int]] = {}  # local writes running in threads
        self._busy_seq = 0

    # -- frontend entry ----------------------------------------------------------------------
    def submit(self, kind, offset, length, data, flags, cb) -> None:
        if kind == FLUSH:
            self._flush(Req(kind, offset, length, cb))
            return
        if self.waiting or self._conflicts(offset, length):
            # an overlapping write is still being written locally in a thread, or a resync
            # request for this range is in flight: wait, so both disks see one order and
            # resync data never overtakes a newer application write on the target
            self.waiting.append((kind, offset, length, data, flags, cb))
            return
        self._start(kind, offset, length, data, flags, cb)

    def local_overlaps(self, offset: int, length: int) -> bool:
        """Is a local write to this range running in a thread right now?"""
        end = offset + length
        for s, e in self.local_busy.values():
            if s < end and offset < e:
                return True
        return False

    def _conflicts(self, offset: int, length: int) -> bool:
        if self.local_busy and self.local_overlaps(offset, length):
            return True
        rs = self.node.resync_source
        return rs is not None and rs.overlaps(offset, length)

    def drain_waiting(self) -> None:
        """Start the held-back writes, in arrival order, as far as conflicts allow."""
        waiting = self.waiting
        while waiting:
            item = waiting[0]
            if self._conflicts(item[1], item[2]):
                return
            waiting.popleft()
            self._start(*item)

    def _start(self, kind, offset, length, data, flags, cb) -> None:
        node = self.node
        req = Req(kind, offset, length, cb)
        node.note_local_write(offset, length)  # activity log first (may write metadata)
        fua = bool(flags & 1)
        if length >= ASYNC_LOCAL and (kind == WRITE or kind == ZERO and not flags & 16):
            # large write, or zeroing that may fall back to BLKZEROOUT or writing zeroes:
            # the local part runs in a thread while the packet is on its way
            key = self._busy_seq
            self._busy_seq += 1
            self.local_busy[key] = (offset, offset + length)
            disk = self.disk
            if kind == WRITE:
                fn = lambda: disk.write(offset, data, fua)  # noqa: E731
            else:
                fn = lambda: disk.zero(offset, length, may_trim=not flags & 2,  # noqa: E731
                                       fua=fua)
            node.run_io(fn, lambda exc: self._async_written(key, req, exc))
        else:
            try:
                if kind == WRITE:
                    self.disk.write(offset, data, fua)
                elif kind == TRIM:
                    self.disk.trim(offset, length)
                else:
                    self.disk.zero(offset, length, may_trim=not flags & 2,
                                   fast=bool(flags & 16))
            except OSError as exc:
                req.err = nbd_error(exc)
                if req.err != NbdErr.ENOTSUP:
                    iolog.error("local I/O error", "local %s at %d+%d failed: %s", kind,
                                offset, length, exc)
                cb(req.err)  # nothing was written locally, so nothing goes to the peer
                return
            if fua and kind != WRITE:  # FUA trim/zero: local durability too
                node.run_io(self.disk.flush, lambda exc: self._local_complete(req, exc))
            else:
                req.local_done = True
        self._replicate(req, kind, offset, length, data, flags)

    def _replicate(self, req: Req, kind, offset, length, data, flags) -> None:
        node = self.node
        link = node.replicating_link()
        if link is None:
            node.mark_out_of_sync(offset, length)  # before the request can complete
            self.writes_local_only += 1
            req.peer_done = True
            if req.local_done:
                req.cb(req.err)
            return
        pid = self.next_id
        self.next_id = pid + 1
        self.pending[pid] = req
        tl = self.tl.get(self.epoch)
        if tl is None:
            tl = self.tl[self.epoch] = []
        tl += (offset, length)
        self.epoch_writes += 1
        pflags = (proto.F_FUA if flags & 1 else 0) | (proto.F_NO_HOLE if flags & 2 else 0)
        if kind == WRITE:
            n = len(data)
            link.send(_HDR(_MAGIC, _P_DATA, pflags, pid, offset, n, n, _crc(data)), data)
            self.bytes_replicated += n
        else:
            link.send(_HDR(_MAGIC, _KIND_PACKET[kind], pflags, pid, offset, length, 0, 0))
        self.writes_replicated += 1

    def _async_written(self, key, req: Req, exc) -> None:
        del self.local_busy[key]
        if exc is not None:
            iolog.error("local I/O error", "local write at %d+%d failed: %s", req.offset,
                        req.length, exc)
            self.node.mark_out_of_sync(req.offset, req.length)
        self._local_complete(req, exc)
        if self.waiting:
            self.drain_waiting()

    def _local_complete(self, req: Req, exc) -> None:
        if exc is not None:
            req.err = nbd_error(exc)
        req.local_done = True
        if req.peer_done:
            req.cb(req.err)

    def _flush(self, req: Req) -> None:
        node = self.node
        link = node.replicating_link()
        if link is not None:
            epoch = self.close_epoch(link, flush=True)
            self.barrier_waiters.setdefault(epoch, []).append(req)
        else:
            req.peer_done = True
        node.run_io(self.disk.flush, lambda exc: self._local_complete(req, exc))

    def close_epoch(self, link, flush: bool) -> int:
        """Send a barrier ending the current epoch; returns that epoch's number."""
        epoch = self.epoch
        link.send(_HDR(_MAGIC, P.BARRIER, proto.F_FLUSH if flush else 0, epoch, 0, 0, 0, 0))
        self.barrier_sent_at[epoch] = self.node.loop.time()
        self.epoch = epoch + 1
        self.epoch_writes = 0
        return epoch

    def periodic_barrier(self, link) -> None:
        """Bound the transfer log: a flushing barrier when the epoch has writes."""
        if self.epoch_writes and len(self.barrier_sent_at) < 4:
            self.close_epoch(link, flush=True)

    # -- peer answers ------------------------------------------------------------------------
    def on_write_ack(self, link, flags, pid, offset, size, crc, payload):
        req = self.pending.pop(pid, None)
        if req is None:
            return
        req.peer_done = True
        if req.local_done:
            req.cb(req.err)

    def on_neg_ack(self, link, flags, pid, offset, size, crc, payload):
        req = self.pending.pop(pid, None)
        if req is None:
            return
        log.error("peer failed to apply %s at %d+%d (errno %d); marked out of sync",
                  req.kind, req.offset, req.length, size)
        self.node.mark_out_of_sync(req.offset, req.length)
        req.peer_done = True
        if req.local_done:
            req.cb(req.err)

    def on_barrier_ack(self, link, flags, pid, offset, size, crc, payload):
        for epoch in [e for e in self.tl if e <= pid]:
            del self.tl[epoch]
        for epoch in [e for e in self.barrier_sent_at if e <= pid]:
            del self.barrier_sent_at[epoch]
        for epoch in [e for e in self.barrier_waiters if e <= pid]:
            for req in self.barrier_waiters.pop(epoch):
                req.peer_done = True
                if req.local_done:
                    req.cb(req.err)

    def link_lost(self) -> None:
        """Everything the peer may not have durably goes into the bitmap, then the pending
        client requests complete (their local part is done or finishing)."""
        node = self.node
        for ranges in self.tl.values():
            for i in range(0, len(ranges), 2):
                node.mark_out_of_sync(ranges[i], ranges[i + 1])
        for req in self.pending.values():
            node.mark_out_of_sync(req.offset, req.length)
        self.tl.clear()
        self.barrier_sent_at.clear()
        self.epoch_writes = 0
        pending = list(self.pending.values())
        self.pending.clear()
        waiters = [r for rs in self.barrier_waiters.values() for r in rs]
        self.barrier_waiters.clear()
        for req in pending + waiters:
            req.peer_done = True
            if req.local_done:
                req.cb(req.err)

    @property
    def oldest_unacked_age(self) -> float:
        if not self.barrier_sent_at:
            return 0.0
        return self.node.loop.time() - min(self.barrier_sent_at.values())


class Applier:
    """Secondary side: applies the primary's stream in order and acknowledges it.

    Small requests are applied inline, in stream order. A large write goes to the I/O
    threads; until it has landed, any later packet that overlaps it (and everything behind
    that packet, and any barrier) waits in a FIFO, so the disk sees the stream's order."""

    _EVERYTHING = (0, 1 << 63)

    def __init__(self, node):
        self.node = node
        self.disk = node.disk
        self.writes_applied = 0
        self.bytes_applied = 0
        self.busy: dict[int, tuple[int, int]] = {}
        self._busy_seq = 0
        self.queue: deque = deque()

    def _ack(self, link, ptype, pid, offset=0, size=0):
        link.send(_HDR(_MAGIC, ptype, 0, pid, offset, size, 0, 0))

    def _check(self, offset, size):
        if self.node.is_primary:
            raise proto.LinkProtocolError("received replicated data while Primary")
        if offset + size > self.disk.size:
            raise proto.LinkProtocolError(f"request at {offset}+{size} past the end")

    def on_data(self, link, flags, pid, offset, size, crc, payload):
        self._check(offset, len(payload))
        if _crc(payload) != crc:
            # drop the link: the primary marks everything unacknowledged out of sync
            raise proto.LinkProtocolError(f"CRC32C mismatch in write at {offset}")
        self._submit(link, P.DATA, pid, flags, offset, len(payload), payload)

    def on_trim(self, link, flags, pid, offset, size, crc, payload):
        self._check(offset, size)
        self._submit(link, P.TRIM, pid, flags, offset, size, None)

    def on_zero(self, link, flags, pid, offset, size, crc, payload):
        self._check(offset, size)
        self._submit(link, P.ZERO, pid, flags, offset, size, None)

    def on_barrier(self, link, flags, pid, offset, size, crc, payload):
        self._submit(link, P.BARRIER, pid, flags, *self._EVERYTHING, None)

    def _overlaps(self, offset, size) -> bool:
        end = offset + size
        for s, e in self.busy.values():
            if s < end and offset < e:
                return True
        return False

    def _submit(self, link, ptype, pid, flags, offset, size, payload):
        if self.queue or (self.busy and self._overlaps(offset, size)):
            if payload is not None and link.owns(payload):
                payload = bytes(payload)  # the receive ring is reused
            self.queue.append((link, ptype, pid, flags, offset, size, payload))
            return
        self._run(link, ptype, pid, flags, offset, size, payload)

    def _drain(self):
        queue = self.queue
        while queue:
            item = queue[0]
            if self.busy and self._overlaps(item[4], item[5]):
                return
            queue.popleft()
            self._run(*item)

    def _run(self, link, ptype, pid, flags, offset, size, payload):
        disk = self.disk
        if ptype == P.BARRIER:
            # every write before the barrier has been applied (nothing is busy)
            if flags & proto.F_FLUSH:
                self.node.run_io(disk.flush, lambda exc: self._barrier_done(link, pid, exc))
            else:
                self._ack(link, P.BARRIER_ACK, pid)
            return
        if size >= ASYNC_LOCAL and (ptype == P.DATA or ptype == P.ZERO):
            # large writes and zeroing (BLKZEROOUT, writing zeroes) off the loop
            if ptype == P.DATA:
                if link.owns(payload):
                    payload = bytes(payload)
                fn = lambda: disk.write(offset, payload)  # noqa: E731
            else:
                fn = lambda: disk.zero(offset, size,  # noqa: E731
                                       may_trim=not flags & proto.F_NO_HOLE)
            key = self._busy_seq
            self._busy_seq += 1
            self.busy[key] = (offset, offset + size)
            self.node.run_io(fn, lambda exc: self._written(key, link, pid, flags, offset, size,
                                                           exc))
            return
        try:
            if ptype == P.DATA:
                disk.write(offset, payload)
            elif ptype == P.TRIM:
                disk.trim(offset, size)
            else:
                disk.zero(offset, size, may_trim=not flags & proto.F_NO_HOLE)
        except OSError as exc:
            self._written(None, link, pid, flags, offset, size, exc)
            return
        self._written(None, link, pid, flags, offset, size, None)

    def _written(self, key, link, pid, flags, offset, size, exc):
        if key is not None:
            del self.busy[key]
        if exc is not None:
            iolog.error("apply I/O error", "applying write at %d+%d failed: %s", offset, size,
                        exc)
            self._ack(link, P.NEG_ACK, pid, offset, getattr(exc, "errno", None) or 5)
        else:
            self.writes_applied += 1
            self.bytes_applied += size
            if flags & proto.F_FUA:
                self.node.run_io(self.disk.flush, lambda e: self._ack(
                    link, P.WRITE_ACK if e is None else P.NEG_ACK, pid, offset, 0))
            else:
                self._ack(link, _P_WRITE_ACK, pid)
        if key is not None and self.queue:
            self._drain()

    def _barrier_done(self, link, epoch, exc):
        if exc is not None:
            log.error("flush for barrier %d failed: %s", epoch, exc)
            link.abort(f"flush failed: {exc}")
            return
        self._ack(link, P.BARRIER_ACK, epoch)
