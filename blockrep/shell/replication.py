"""The replicated write path (primary side; the secondary's apply path is applier.py).

Owns, on the primary: running each request's local part and sending its packet, feeding
every event on it to the request core (blockrep.peer.requests: the transfer log and the one
function that decides when a request completes and what is marked out of sync); a Diskless
Primary's requests to the peer only (REMOTE, shell/diskless.py).

Ordering (invariant 2): the primary performs each small local write inline, in the same
loop step in which it queues the packet for the peer, and the secondary applies packets in
stream order. A large write runs in the I/O threads on either node; until it has landed, a
later overlapping request waits (primary: `waiting`, secondary: the applier's FIFO), so
overlapping writes land in the same order on both disks.
Protocols (`set_protocol`, the resource's `protocol`): C answers the client when the local
write is done and the peer has written it (P_WRITE_ACK); B when the peer has received it
(P_RECV_ACK, asked for with F_RECV, sent before the peer writes); A once the packet is
queued on the link. Under A and B the request stays in the transfer log until the peer's
write ack, so a negative ack or a lost link marks it out of sync like any other; FLUSH waits
for the barrier ack and FUA for the write ack in all three.
Invariant 3: on link loss every range in the transfer log is set in the bitmap before any
pending request is completed (TransferLog.link_lost). Nothing a gone link queued on the
secondary is applied after the link is gone (Applier.link_lost).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from time import perf_counter as _now

from ..peer import proto
from ..peer.proto import P
from ..peer.requests import (COMPLETED, DETACHED, FLUSH, KIND_NAMES, LOCAL_DONE, NEG_ACK,
                             NO_PEER, NOT_WRITTEN, PEER_ACK, PROTOCOLS, QUEUED, RECEIVED,
                             REMOTE, REMOTE_NEW, WRITE, ZERO, RangeSet, Req, TransferLog)
from ..state import ReplState
from .congestion import HOLD
from .latency import ACK_SAMPLE_MASK, LatencyHistogram
from .ratelog import RateLimitedLog

log = logging.getLogger("blockrep.repl")
iolog = RateLimitedLog(log)  # a failing disk fails every write: a few lines and a count

ASYNC_LOCAL = 256 * 1024  # writes this large are written locally in the I/O threads
_P_DATA = int(P.DATA)  # ints on the hot path
_P_BARRIER, _P_TRIM, _P_ZERO = int(P.BARRIER), int(P.TRIM), int(P.ZERO)
_F_FUA, _F_NO_HOLE, _F_FLUSH = proto.F_FUA, proto.F_NO_HOLE, proto.F_FLUSH
_F_RECV = proto.F_RECV
_HDR = proto.frame
_crc = proto.native.crc32c
_EIO = errno.EIO


def _errno(exc) -> int:
    if exc is None:
        return 0
    return getattr(exc, "errno", None) or _EIO


class Replicator:
    """Primary side, the Target of a replicated resource: the NBD front end calls `submit`;
    the node feeds acks and losses."""

    holds_data = True  # the payload is kept after submit returns (queued on the link)
    writes_inline = False  # a WRITE completes when its protocol's promise holds

    def __init__(self, node):
        self.node = node
        self.disk = node.disk
        self.log = TransferLog(node.mark_out_of_sync)
        self._mod = self.log.mod
        self._pending_pop = self.log.pending.pop
        self.writes_replicated = 0
        self.bytes_replicated = 0
        self.writes_local_only = 0
        self.waiting: deque = deque()  # writes held back by a conflict (see submit)
        self.local_busy = RangeSet()  # local writes running in threads
        self.local_reqs: dict[int, Req] = {}  # their requests, by local_busy key
        self.remote = False  # Diskless Primary (shell/diskless.py): requests go to the peer only
        self.applier_busy = node.applier.busy  # writes of a gone link still landing here
        self._landed: list[asyncio.Future] = []  # wait_landed() callers
        # send -> P_WRITE_ACK time of the packets whose id has no ACK_SAMPLE_MASK bit set
        self.ack_latency = LatencyHistogram()
        self._ack_sent: dict[int, float] = {}
        self.marked_since: float | None = None  # when acked writes began to be only here
        self.set_protocol(node.cfg.protocol)

    @property
    def pending(self) -> dict:
        return self.log.pending

    def set_protocol(self, protocol: str) -> None:
        """When a write is acknowledged to the client (see the module docstring); takes
        effect for the next request. FLUSH and FUA wait for the peer's disk in all three."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: use A, B or C")
        self.protocol = protocol
        self._early = protocol == "A"  # the peer part is done once the packet is queued
        self._pflags = _F_RECV if protocol == "B" else 0  # B: the peer acks on receipt

    def gap(self) -> dict:
        """The live data gap (status, events): what the clients were told is written that
        the peer may lack, and since when (an RPO estimate)."""
        now = self.node.loop.time()
        g = self.log.gap(now)
        oos = self.node.bitmap.count_bytes()
        if not oos:
            self.marked_since = None
        elif self.marked_since is not None:
            g["oldest_s"] = max(g["oldest_s"], round(now - self.marked_since, 3))
        g["out_of_sync_bytes"] = oos
        g["protocol"] = self.protocol
        return g

    # -- the Target interface ----------------------------------------------------------------
    def submit(self, kind, offset, length, data, fua, may_trim, fast_zero, cb, cookie):
        """Start a request; `cb(cookie, err)` is called when protocol C's promise holds (or
        with the errno). Returns None: the answer always comes through `cb`."""
        req = Req(kind, offset, length, cb, cookie)
        if kind == FLUSH:
            self._flush(req)
            return None
        if self.waiting or not self.remote and self._conflicts(offset, length):
            # an overlapping write is still being written locally in a thread, or a resync
            # request for this range is in flight: wait, so both disks see one order and
            # resync data never overtakes a newer application write on the target
            self.waiting.append((req, data, fua, may_trim, fast_zero))
            return None
        self._start(req, data, fua, may_trim, fast_zero)
        return None

    def oldest_unacked(self) -> int:
        """The oldest epoch the peer may lack: the activity log keeps its extents."""
        return self.log.oldest_unacked_epoch(self.node.replicating_link() is not None)

    def landing(self, offset: int, length: int) -> bool:
        """Is a write to this range still landing on the local disk (in a thread)?"""
        return bool(self.local_busy and self.local_busy.overlaps(offset, length) or
                    self.applier_busy and self.applier_busy.overlaps(offset, length))

    async def wait_landed(self, offset: int, length: int) -> None:
        """Return once no write to this range is landing locally."""
        while self.landing(offset, length):
            fut = self.node.loop.create_future()
            self._landed.append(fut)
            await fut

    def wake_landed(self) -> None:
        waiters, self._landed = self._landed, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _conflicts(self, offset: int, length: int) -> bool:
        """Must a request to this range wait: is a write to it landing locally (`landing`,
        spelled out: this runs for every write) or a resync request for it in flight?"""
        lb, ab, rs = self.local_busy, self.applier_busy, self.node.resync_source
        return bool(lb and lb.overlaps(offset, length) or ab and ab.overlaps(offset, length)
                    or rs is not None and rs.inflight.overlaps(offset, length))

    def drain_waiting(self) -> None:
        """Start the held-back writes, in arrival order, as far as conflicts allow."""
        waiting = self.waiting
        while waiting:
            item = waiting[0]
            if item is HOLD:  # the send buffer is full (on-congestion = block)
                return
            req = item[0]
            if not self.remote and self._conflicts(req.offset, req.length):
                return
            waiting.popleft()
            self._start(*item)

    def _start(self, req: Req, data, fua, may_trim, fast_zero) -> None:
        if self.remote:  # no local disk: the peer's copy is the only one
            req.state = REMOTE_NEW
            self._send_remote(req, data, fua, may_trim)
            return
        node = self.node
        kind, offset, length = req.kind, req.offset, req.length
        try:  # the activity log covers the extents first (may write metadata)
            if node.store is not None:
                node.store.activity(offset, length, self.log.epoch, self.oldest_unacked,
                                    self.local_busy)
        except OSError as exc:
            if node.diskfail.io_error("activity-log write", offset, length, exc):
                req.state = REMOTE_NEW  # detached: nothing was written here, the peer's
                self._send_remote(req, data, fua, may_trim)  # copy will be the only one
                return
            log.error("activity-log write before %s at %d+%d failed: %s; answering EIO",
                      KIND_NAMES[kind], offset, length, exc)
            self._mod(req, NOT_WRITTEN, _EIO)
            return
        if length >= ASYNC_LOCAL and (kind == WRITE or kind == ZERO and not fast_zero):
            # large write, or zeroing that may fall back to BLKZEROOUT or writing zeroes:
            # the local part runs in a thread while the packet is on its way
            key = self.local_busy.add(offset, length)
            self.local_reqs[key] = req
            disk = self.disk
            if kind == WRITE:
                fn = lambda: disk.write(offset, data, fua)  # noqa: E731
            else:
                fn = lambda: disk.zero(offset, length, may_trim=may_trim, fua=fua)  # noqa: E731
            node.run_io(fn, lambda exc: self._async_written(key, req, exc))
            self._replicate(req, data, fua, may_trim)
            return
        try:
            if kind == WRITE:
                self.disk.write(offset, data, fua)
            elif kind == ZERO:
                self.disk.zero(offset, length, may_trim=may_trim, fast=fast_zero)
            else:
                # TRIM on a replicated resource zeroes (punching a hole where the backing
                # can): both replicas read the same bytes whatever their backing supports
                self.disk.zero(offset, length, may_trim=True)
        except OSError as exc:
            err = _errno(exc)
            if kind == ZERO and fast_zero and err in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self._mod(req, NOT_WRITTEN, errno.ENOTSUP)  # fast zero refused: untouched
                return
            if node.diskfail.io_error(KIND_NAMES[kind].lower(), offset, length, exc):
                self._mod(req, DETACHED)  # detached (a Diskless Primary now): not yet sent,
                self._send_remote(req, data, fua, may_trim)  # it goes to the peer only
                return
            iolog.error("local I/O error", "local %s at %d+%d failed: %s", KIND_NAMES[kind],
                        offset, length, exc)
            self._mod(req, LOCAL_DONE, err)  # not sent: completes now, marked out of sync
            return
        self._replicate(req, data, fua, may_trim)
        if fua and kind != WRITE:  # FUA trim/zero: local durability too
            node.run_io(self.disk.flush, lambda exc: self._local_done(req, exc, "flush"))
        else:
            self._mod(req, LOCAL_DONE)

    def _send_remote(self, req: Req, data, fua, may_trim) -> None:
        """A REMOTE request (Diskless Primary) goes to the peer only; EIO without one."""
        if req.kind != FLUSH:
            self.node.diskless.wrote(req.length)
        if self.node.replicating_link() is None:
            self._mod(req, NO_PEER)  # REMOTE: EIO, nothing marked
        else:
            self._replicate(req, data, fua, may_trim)

    def _local_done(self, req: Req, exc, what: str) -> None:
        """The local part of `req` ended (exc: its error). Under on-io-error = detach an
        error detaches the disk (a Diskless Primary then answers from the peer's copy)."""
        if exc is None:
            self._mod(req, LOCAL_DONE)
        elif req.state & REMOTE:
            pass  # detached already: its local part no longer counts
        elif self.node.diskfail.io_error(what, req.offset, req.length, exc):
            self._mod(req, DETACHED)
        else:
            iolog.error("local I/O error", "local %s at %d+%d failed: %s", what, req.offset,
                        req.length, exc)
            self._mod(req, LOCAL_DONE, _errno(exc))

    def detached(self) -> None:
        """This Primary's disk was detached (shell/diskless.py): from now on every request
        goes to the peer only, and the open ones stop waiting for their local part (the
        peer's acknowledgement completes them; a peer that fails them fails the client)."""
        self.remote = True
        tl = self.log
        reqs = [*self.local_reqs.values(), *tl.pending.values(),
                *(r for waiters in tl.barrier_waiters.values() for r in waiters)]
        for req in reqs:
            self._mod(req, DETACHED)
        if self.waiting:
            self.drain_waiting()  # nothing waits for a local write any more
    def _replicate(self, req: Req, data, fua, may_trim) -> None:
        link = self.node.replicating_link()
        if link is None:
            self.writes_local_only += 1
            if self.marked_since is None:
                self.marked_since = self.node.loop.time()
            self._mod(req, NO_PEER)  # marked out of sync before it can complete
            if self.node.repl is ReplState.AHEAD:  # the peer learns what it lacks
                self.node.congestion.not_shipped(req.offset, req.length)
            return
        pid = self.log.sent(req)
        if not pid & ACK_SAMPLE_MASK:
            self._ack_sent[pid] = _now()
        pflags = _F_FUA if fua else self._pflags  # FUA: durable on both, whatever protocol
        # protocol A: queued is enough for the client, so its packet may wait a moment for
        # company (link.send_corked); not for a REMOTE request (Diskless Primary): the peer's
        # copy is the only one, so it waits for the peer's write ack as under C
        early = self._early and not fua and not req.state & REMOTE
        kind = req.kind
        if kind == WRITE:
            n = len(data)
            if early or link.compressor is not None:
                link.send_data(_P_DATA, pflags, pid, req.offset, data, early)
            else:  # protocol C's plain packet, framed here (the common case)
                link.send(_HDR(_P_DATA, pflags, pid, req.offset, n, n, _crc(data)), data)
            self.bytes_replicated += n
        else:
            if kind == ZERO and not may_trim:
                pflags |= _F_NO_HOLE
            link.send(_HDR(_P_ZERO if kind == ZERO else _P_TRIM, pflags, pid,
                           req.offset, req.length, 0, 0))
        self.writes_replicated += 1
        if early:
            req.t = self.node.loop.time()
            self._mod(req, QUEUED)  # stays in the log until the peer's write ack

    def _async_written(self, key, req: Req, exc) -> None:
        del self.local_busy[key]
        del self.local_reqs[key]
        self._local_done(req, exc, KIND_NAMES[req.kind].lower())
        self.after_landed()

    def after_landed(self) -> None:
        """A write finished landing locally: held-back work may go on."""
        if self._landed:
            self.wake_landed()
        if self.waiting:
            self.drain_waiting()

    def _flush(self, req: Req) -> None:
        node = self.node
        if self.remote:
            req.state = REMOTE_NEW  # the peer's barrier ack is the flush
        link = node.replicating_link()
        if link is not None:
            self._send_barrier(link, True, req)
        else:
            self._mod(req, NO_PEER)
        if not self.remote:
            node.run_io(self.disk.flush, lambda exc: self._local_done(req, exc, "flush"))

    def _send_barrier(self, link, flush: bool, req: Req | None = None) -> int:
        epoch = self.log.close_epoch(self.node.loop.time(), req)
        link.send(_HDR(_P_BARRIER, _F_FLUSH if flush else 0, epoch, 0, 0, 0, 0))
        return epoch

    def close_epoch(self, link, flush: bool) -> int:
        """Send a barrier ending the current epoch; returns that epoch's number."""
        return self._send_barrier(link, flush)

    async def settle(self, link, timeout: float) -> None:
        """Clean stop of a connected Primary: end the epoch with a flushing barrier and
        wait (at most `timeout`) for its ack, so the transfer log is empty and its writes
        need not be marked out of sync when the link closes."""
        tl = self.log
        if link is None or not (tl.tl or tl.pending or tl.epoch_writes):
            return
        self.close_epoch(link, flush=True)
        deadline = self.node.loop.time() + timeout
        while (tl.tl or tl.pending) and not link.closed and self.node.loop.time() < deadline:
            await asyncio.sleep(0.01)

    def periodic_barrier(self, link) -> None:
        """Bound the transfer log: a flushing barrier when the epoch has writes."""
        if self.log.wants_periodic_barrier():
            self._send_barrier(link, True)

    # -- peer answers ------------------------------------------------------------------------
    def on_write_ack(self, link, flags, pid, offset, size, crc, payload):
        req = self._pending_pop(pid, None)
        if req is not None:
            if not pid & ACK_SAMPLE_MASK:
                t0 = self._ack_sent.pop(pid, None)
                if t0 is not None:
                    self.ack_latency.observe(_now() - t0)
            self._mod(req, PEER_ACK)

    def on_recv_ack(self, link, flags, pid, offset, size, crc, payload):
        """Protocol B: the peer has the packet (not yet written); it stays in the log."""
        req = self.log.pending.get(pid)
        if req is not None:
            req.t = self.node.loop.time()
            self._mod(req, RECEIVED)

    def on_neg_ack(self, link, flags, pid, offset, size, crc, payload):
        req = self._pending_pop(pid, None)
        if req is None:
            return
        self._ack_sent.pop(pid, None)
        log.error("peer failed to apply %s at %d+%d (errno %d); marked out of sync",
                  KIND_NAMES[req.kind], req.offset, req.length, size)
        self._mod(req, NEG_ACK)

    def on_barrier_ack(self, link, flags, pid, offset, size, crc, payload):
        self.log.barrier_acked(pid)

    def link_lost(self) -> None:
        """Everything the peer may not have durably goes into the bitmap, then the pending
        client requests complete (their local part is done or finishing)."""
        self._ack_sent.clear()
        if self.marked_since is not None and not self.node.bitmap.count_bytes():
            self.marked_since = None  # a resync emptied the bitmap since
        oldest = self.node.loop.time()
        for req in self.log.pending.values():
            if req.state & COMPLETED and not req.err:  # acked early (A, B)
                oldest = min(oldest, req.t)
                break
        if self.marked_since is None or oldest < self.marked_since:
            self.marked_since = oldest
        if self.remote:
            self.log.tl.clear()  # Diskless: no bitmap to mark (the open requests fail EIO)
        self.log.link_lost()

    @property
    def oldest_unacked_age(self) -> float:
        return self.log.oldest_unacked_age(self.node.loop.time())
