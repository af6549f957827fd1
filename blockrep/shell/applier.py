"""The apply path (secondary side) of replication: the Primary's stream applied in order.

Owns: applying P_DATA / P_TRIM / P_ZERO / P_BARRIER in stream order (small requests inline,
large writes in the I/O threads with later overlapping packets waiting in a FIFO), the
acks (P_WRITE_ACK, P_NEG_ACK, P_RECV_ACK, P_BARRIER_ACK), barrier flushes, and the turn of
other work that must see the stream's order (`ordered`: resync and verify requests, a
Diskless Primary's reads). Nothing a gone link queued is applied after it is gone
(`link_lost`). The primary side is replication.py.
Must not: parse packets (link.py) or decide what a failed write means for the disk
(diskfail.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..peer import proto
from ..peer.proto import P
from ..peer.requests import RangeSet
from .ratelog import RateLimitedLog
from .replication import ASYNC_LOCAL, _errno

log = logging.getLogger("blockrep.repl")
iolog = RateLimitedLog(log)  # a failing disk fails every write: a few lines and a count

_P_DATA, _P_WRITE_ACK = int(P.DATA), int(P.WRITE_ACK)  # ints on the hot path
_P_BARRIER, _P_TRIM, _P_ZERO = int(P.BARRIER), int(P.TRIM), int(P.ZERO)
_P_RECV_ACK = int(P.RECV_ACK)
_F_FUA, _F_NO_HOLE, _F_FLUSH = proto.F_FUA, proto.F_NO_HOLE, proto.F_FLUSH
_F_RECV = proto.F_RECV
_HDR = proto.frame
_crc = proto.native.crc32c
_EIO = 5


class Applier:
    """Secondary side: applies the primary's stream in order and acknowledges it.

    Small requests are applied inline, in stream order. A large write goes to the I/O
    threads; until it has landed, any later packet that overlaps it (and everything behind
    that packet, and any barrier) waits in a FIFO, so the disk sees the stream's order.
    Verify and resync requests that arrive on the stream take their turn in the same FIFO
    (`ordered`). When the link is lost, what it queued is dropped (the primary has marked
    every unacknowledged range out of sync); writes already running in threads still land
    and stay in `busy` until they have, so nothing newer overtakes them."""

    _EVERYTHING = (0, 1 << 63)
    _CALL = -1  # queue item: a deferred call (verify / resync request)

    def __init__(self, node):
        self.node = node
        self.disk = node.disk
        self.writes_applied = 0
        self.bytes_applied = 0
        self.dropped = 0  # queued requests of gone links, never applied
        self.busy = RangeSet()
        self.queue: deque = deque()
        self._idle: list[asyncio.Future] = []
        self.peer_protocol = "C"  # the Primary's, from its STATE (for the failover log)
        self.lost_at: float | None = None  # when the last link went away

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue

    async def wait_idle(self) -> None:
        while not self.idle:
            fut = self.node.loop.create_future()
            self._idle.append(fut)
            await fut

    def _ack(self, link, ptype, pid, offset=0, size=0):
        link.send(_HDR(ptype, 0, pid, offset, size, 0, 0))

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
        self._submit(link, _P_DATA, pid, flags, offset, len(payload), payload)

    def on_trim(self, link, flags, pid, offset, size, crc, payload):
        self._check(offset, size)
        self._submit(link, _P_TRIM, pid, flags, offset, size, None)

    def on_zero(self, link, flags, pid, offset, size, crc, payload):
        self._check(offset, size)
        self._submit(link, _P_ZERO, pid, flags, offset, size, None)

    def on_barrier(self, link, flags, pid, offset, size, crc, payload):
        self._submit(link, _P_BARRIER, pid, flags, *self._EVERYTHING, None)

    def ordered(self, link, offset, size, payload, fn) -> None:
        """Run fn(payload) once every earlier request of the stream that overlaps
        [offset, offset+size) has landed: now, or later from the FIFO."""
        if self.queue or (self.busy and self.busy.overlaps(offset, size)):
            if payload is not None and link.owns(payload):
                payload = bytes(payload)  # the receive ring is reused
            self.queue.append((link, self._CALL, 0, 0, offset, size, (fn, payload)))
            return
        fn(payload)

    def _submit(self, link, ptype, pid, flags, offset, size, payload):
        if flags & _F_RECV:  # protocol B: the receipt is acknowledged before the write
            link.send(_HDR(_P_RECV_ACK, 0, pid, 0, 0, 0, 0))
        if self.queue or (self.busy and self.busy.overlaps(offset, size)):
            if payload is not None and link.owns(payload):
                payload = bytes(payload)  # the receive ring is reused
            self.queue.append((link, ptype, pid, flags, offset, size, payload))
            return
        self._run(link, ptype, pid, flags, offset, size, payload)

    def link_lost(self, link) -> None:
        """Nothing this link queued lands after it is gone."""
        self.lost_at = self.node.loop.time()
        queue = self.queue
        if not queue:
            return
        keep = deque(item for item in queue if item[0] is not link)
        n = len(queue) - len(keep)
        if n:
            self.dropped += n
            log.warning("link lost: %d queued request(s) of it dropped, never applied", n)
            self.queue = keep
            self._drain()

    def _drain(self):
        queue = self.queue
        while queue:
            item = queue[0]
            if self.busy and self.busy.overlaps(item[4], item[5]):
                return
            queue.popleft()
            self._run(*item)
        if not self.busy:
            self._became_idle()

    def _became_idle(self):
        if self._idle:
            waiters, self._idle = self._idle, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _run(self, link, ptype, pid, flags, offset, size, payload):
        disk = self.disk
        if not self.node.diskfail.attached and ptype != self._CALL:
            # detached (on-io-error = detach): nothing reaches the failed disk; the primary
            # knows (state Diskless) and marks every write out of sync
            if ptype == _P_BARRIER:
                self._ack(link, P.BARRIER_ACK, pid)
            else:
                self._ack(link, P.NEG_ACK, pid, offset, _EIO)
            return
        if ptype == _P_DATA:
            if size >= ASYNC_LOCAL:
                if link.owns(payload):
                    payload = bytes(payload)
                key = self.busy.add(offset, size)
                self.node.run_io(lambda: disk.write(offset, payload),
                                 lambda exc: self._written(key, link, pid, flags, offset, size,
                                                           exc))
                return
            try:
                disk.write(offset, payload)
            except OSError as exc:
                self._written(None, link, pid, flags, offset, size, exc)
                return
        elif ptype == _P_ZERO and size >= ASYNC_LOCAL:
            # zeroing (BLKZEROOUT, writing zeroes) off the loop, ordered like a large write
            key = self.busy.add(offset, size)
            self.node.run_io(lambda: disk.zero(offset, size, may_trim=not flags & _F_NO_HOLE),
                             lambda exc: self._written(key, link, pid, flags, offset, size,
                                                       exc))
            return
        elif ptype == _P_BARRIER:
            # every write before the barrier has been applied (nothing is busy)
            if flags & _F_FLUSH:
                self.node.run_io(disk.flush, lambda exc: self._barrier_done(link, pid, exc))
            else:
                self._ack(link, P.BARRIER_ACK, pid)
            return
        elif ptype == self._CALL:
            fn, arg = payload
            fn(arg)
            return
        else:
            try:  # TRIM zeroes, as on the primary (see Replicator._start)
                disk.zero(offset, size, may_trim=ptype == _P_TRIM or not flags & _F_NO_HOLE)
            except OSError as exc:
                self._written(None, link, pid, flags, offset, size, exc)
                return
        self._written(None, link, pid, flags, offset, size, None)

    def _written(self, key, link, pid, flags, offset, size, exc):
        if exc is not None:
            iolog.error("apply I/O error", "applying write at %d+%d failed: %s", offset, size,
                        exc)
            self._ack(link, P.NEG_ACK, pid, offset, _errno(exc))
            # detach: the disk goes Diskless and the primary is told, after this NEG_ACK
            self.node.diskfail.io_error("applying a write", offset, size, exc)
        else:
            self.writes_applied += 1
            self.bytes_applied += size
            if flags & _F_FUA:
                self.node.run_io(self.disk.flush, lambda e: self._fua_done(link, pid, offset,
                                                                           size, e))
            else:
                self._ack(link, _P_WRITE_ACK, pid)
        if key is not None:
            self.landed(key)

    def landed(self, key) -> None:
        """Work on a range in the I/O threads (a write, a read for a Diskless Primary) is
        done: what waited for the range goes on."""
        del self.busy[key]
        if self.queue:
            self._drain()
        elif not self.busy:
            self._became_idle()
        # promoted meanwhile (or verifying): local work may have waited for this write
        self.node.replicator.after_landed()

    def _fua_done(self, link, pid, offset, size, exc):
        if exc is None:
            self._ack(link, _P_WRITE_ACK, pid)
            return
        self._ack(link, P.NEG_ACK, pid, offset, _errno(exc))
        self.node.diskfail.io_error("flush (FUA write)", offset, size, exc)

    def _barrier_done(self, link, epoch, exc):
        if exc is not None and self.node.diskfail.io_error("flush (barrier)", 0, 0, exc):
            # detached: the state Diskless went out before this ack, so the primary has
            # marked every write of the epoch out of sync already
            self._ack(link, P.BARRIER_ACK, epoch)
            return
        if exc is not None:
            log.error("flush for barrier %d failed: %s", epoch, exc)
            link.abort(f"flush failed: {exc}")
            return
        self._ack(link, P.BARRIER_ACK, epoch)
