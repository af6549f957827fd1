"""The request core (sans-IO): one life cycle per replicated write, in one place.

Owns: the neutral request kinds every front end hands to a target, the request record of a
write on the Primary, the transfer log (which writes the peer may not have on stable storage
yet, per epoch), epochs and barriers, and `TransferLog.mod`: the ONE function through which
every event on a request passes (local done, peer ack, negative ack, barrier ack, link lost,
no peer), like DRBD's `__req_mod`. The completion rule of protocol C and the link-loss rule
(invariant 3) are written here once:

    a request completes when its local part AND its peer part are done;
    a range the peer may lack (negative ack, link lost, no link) is marked out of sync
    before the request can complete; on link loss every range still in the transfer log
    (acked but not yet covered by a barrier ack) is marked too;
    a REMOTE request (a Diskless Primary's: its disk was detached, on-io-error = detach) has
    no local part, or one that no longer counts: it completes when the peer has it, and
    fails with EIO when the peer cannot have it (negative ack, link lost, no link): there
    is no other copy, and nothing is marked (there is no disk for the bitmap to describe);
    while I/O is suspended (`hold`, the fencing shell's decision) completed requests are
    not answered until `release`.

Also owns `RangeSet`, the one type that answers every "do these ranges overlap" question
(local writes landing in threads, the secondary's applier, resync and verify requests in
flight).

Must not: import asyncio, socket or time, touch a disk or a link. Time is passed in as `now`;
marking out of sync and completing are callbacks given by the shell. Hot path: plain ints,
no allocation per request beyond the record itself.
"""

from __future__ import annotations

# request kinds (the neutral form of a front end's write-type requests)
WRITE, TRIM, ZERO, FLUSH = 0, 1, 2, 3
KIND_NAMES = ("WRITE", "TRIM", "ZERO", "FLUSH")

# events on a request (arguments of TransferLog.mod)
LOCAL_DONE = 0    # the local disk finished its part (err: errno, 0 on success)
PEER_ACK = 1      # the peer has written it (P_WRITE_ACK)
NEG_ACK = 2       # the peer failed to write it (P_NEG_ACK)
BARRIER_ACK = 3   # the peer flushed the epoch this FLUSH waits for (P_BARRIER_ACK)
LINK_LOST = 4     # the link went away before the peer answered
NO_PEER = 5       # there is no link: the write stays local (degraded mode)
NOT_WRITTEN = 6   # the local part was refused before anything was written (activity-log
                  # write failed, fast zero unsupported): nothing goes to the peer either
QUEUED = 7        # protocol A: the packet is in the send buffer (the peer part is done for
                  # the client, except for a REMOTE request, whose only copy is the peer's;
                  # the request stays in the log until the peer's write ack)
RECEIVED = 8      # protocol B: the peer has received the packet (P_RECV_ACK)
DETACHED = 9      # the local disk was detached (on-io-error = detach) while this request's
                  # local part was running, had failed or was done: from now on only the
                  # peer's copy counts (REMOTE); a later LOCAL_DONE is ignored
EVENT_NAMES = ("LOCAL_DONE", "PEER_ACK", "NEG_ACK", "BARRIER_ACK", "LINK_LOST", "NO_PEER",
               "NOT_WRITTEN", "QUEUED", "RECEIVED", "DETACHED")

# request state bits
LOCAL_PENDING = 1  # the local disk has not finished
PEER_PENDING = 2   # the peer has not answered (or it is not yet known whether it will)
UNSENT = 4         # not (yet) sent to the peer
COMPLETED = 8      # the front end has been answered
GOT = 16           # the peer has received it (protocol B's receive ack)
REMOTE = 32        # no local part (Diskless Primary): only the peer's copy counts
PEER_FAILED = 64   # the peer part ended without the peer having it (neg ack, lost, no link)

PROTOCOLS = ("A", "B", "C")
_NEW = LOCAL_PENDING | PEER_PENDING | UNSENT  # a request just made
_OPEN = LOCAL_PENDING | PEER_PENDING | COMPLETED  # any of these: not to be completed now
REMOTE_NEW = PEER_PENDING | UNSENT | REMOTE  # a Diskless Primary's request just made
_EIO = 5  # errno.EIO (no errno import in the core: the value is fixed on Linux)


class RangeSet(dict):
    """Byte ranges in flight: key -> (offset, length). Overlap questions are asked often
    and the sets are small (bounded by windows), so a linear scan of a dict wins; an empty
    set is falsy at C speed, which keeps the common case free."""

    __slots__ = ("_seq",)

    def __init__(self):
        super().__init__()
        self._seq = 0

    def add(self, offset: int, length: int) -> int:
        """Record a range; returns its key (remove it with `del s[key]`)."""
        key = self._seq
        self._seq = key + 1
        self[key] = (offset, length)
        return key

    def overlaps(self, offset: int, length: int) -> bool:
        end = offset + length
        for s, n in self.values():
            if s < end and offset < s + n:
                return True
        return False

    def overlapping(self, offset: int, length: int) -> list:
        """Keys of the ranges that overlap [offset, offset+length)."""
        end = offset + length
        return [k for k, (s, n) in self.items() if s < end and offset < s + n]


class Req:
    """One front-end request on the Primary. `cb(cookie, err)` answers the front end."""

    __slots__ = ("kind", "offset", "length", "cb", "cookie", "state", "err", "t")
    # t: when the client was answered before the peer had written it (protocols A, B);
    # set only on that path (the data gap's age), never under protocol C

    def __init__(self, kind, offset, length, cb, cookie):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.cb = cb
        self.cookie = cookie
        self.state = _NEW
        self.err = 0

    def __repr__(self):
        return (f"Req({KIND_NAMES[self.kind]} {self.offset}+{self.length} "
                f"state={self.state:#x} err={self.err})")


class TransferLog:
    """The Primary's requests, epochs and barriers.

    `mark(offset, length)` sets out-of-sync bits (in memory); it is called before any request
    whose range the peer may lack completes."""

    def __init__(self, mark):
        self.mark = mark
        self.next_id = 1
        self.pending: dict[int, Req] = {}  # packet id -> request awaiting the peer's ack
        self.epoch = 1
        self.epoch_writes = 0
        self.tl: dict[int, list] = {}  # epoch -> flat [offset, length, ...] sent to the peer
        self.barrier_waiters: dict[int, list[Req]] = {}  # epoch -> FLUSHes waiting for it
        self.barrier_sent_at: dict[int, float] = {}
        self.held: list[Req] | None = None  # answers held while I/O is suspended (hold)

    # -- the one function -------------------------------------------------------------------
    def mod(self, req: Req, ev: int, err: int = 0) -> None:
        """Apply one event to a request; complete it when both of its parts are done."""
        s = req.state
        if ev == LOCAL_DONE:
            if s & REMOTE:
                return  # detached meanwhile: the local part no longer counts
            s &= ~LOCAL_PENDING
            if err:
                req.err = err
                if s & UNSENT:
                    s &= ~(PEER_PENDING | UNSENT)  # failed before sending: nothing goes out
                # the local disk may hold part of it, the peer all of it (or none)
                self.mark(req.offset, req.length)
        elif ev == PEER_ACK or ev == BARRIER_ACK:
            s &= ~PEER_PENDING
        elif ev == NEG_ACK or ev == LINK_LOST or ev == NO_PEER:
            if s & REMOTE:
                req.err = _EIO  # the peer's copy was the only one
            elif req.kind != FLUSH:
                self.mark(req.offset, req.length)  # before the request can complete
            s = (s & ~(PEER_PENDING | UNSENT)) | PEER_FAILED
        elif ev == QUEUED:
            if not s & REMOTE:  # a REMOTE request's only copy is the peer's: it waits
                s &= ~PEER_PENDING
        elif ev == RECEIVED:
            s = (s & ~PEER_PENDING) | GOT
        elif ev == DETACHED:
            s = (s & ~LOCAL_PENDING) | REMOTE
            req.err = _EIO if s & PEER_FAILED else 0  # no local copy to fall back on
        elif ev == NOT_WRITTEN:
            if not s & UNSENT:
                raise ValueError("NOT_WRITTEN after the request was sent")
            req.err = err
            s &= ~(LOCAL_PENDING | PEER_PENDING | UNSENT)
        else:
            raise ValueError(f"unknown request event {ev}")
        if not s & _OPEN:
            req.state = s | COMPLETED
            if self.held is None:
                req.cb(req.cookie, req.err)
            else:
                self.held.append(req)  # I/O suspended: answered by release()
        else:
            req.state = s

    # -- suspended I/O (fencing) -------------------------------------------------------------
    def hold(self) -> None:
        """From now on a completed request's answer is held (its state and bits are
        decided as usual); `release` gives the held answers, in completion order."""
        if self.held is None:
            self.held = []

    def release(self) -> int:
        """Give every held answer and stop holding; returns how many there were."""
        held, self.held = self.held, None
        for req in held or ():
            req.cb(req.cookie, req.err)
        return len(held or ())

    # -- sending ----------------------------------------------------------------------------
    def sent(self, req: Req) -> int:
        """The request goes to the peer now: its packet id; its range joins the epoch."""
        pid = self.next_id
        self.next_id = pid + 1
        self.pending[pid] = req
        req.state &= ~UNSENT
        tl = self.tl.get(self.epoch)
        if tl is None:
            tl = self.tl[self.epoch] = []
        tl += (req.offset, req.length)
        self.epoch_writes += 1
        return pid

    def close_epoch(self, now: float, flush_req: Req | None = None) -> int:
        """A barrier ends the current epoch (the shell sends it); returns its number.
        `flush_req` (a FLUSH) completes its peer part when that barrier is acknowledged."""
        epoch = self.epoch
        self.barrier_sent_at[epoch] = now
        if flush_req is not None:
            flush_req.state &= ~UNSENT
            self.barrier_waiters.setdefault(epoch, []).append(flush_req)
        self.epoch = epoch + 1
        self.epoch_writes = 0
        return epoch

    def wants_periodic_barrier(self) -> bool:
        return bool(self.epoch_writes) and len(self.barrier_sent_at) < 4

    # -- peer answers -----------------------------------------------------------------------
    def acked(self, pid: int, ev: int) -> Req | None:
        """P_WRITE_ACK (ev=PEER_ACK) or P_NEG_ACK (ev=NEG_ACK) for packet `pid`."""
        req = self.pending.pop(pid, None)
        if req is not None:
            self.mod(req, ev)
        return req

    def barrier_acked(self, epoch: int) -> None:
        """The peer has every write of epochs <= `epoch` on stable storage."""
        for e in [e for e in self.tl if e <= epoch]:
            del self.tl[e]
        for e in [e for e in self.barrier_sent_at if e <= epoch]:
            del self.barrier_sent_at[e]
        for e in [e for e in self.barrier_waiters if e <= epoch]:
            for req in self.barrier_waiters.pop(e):
                self.mod(req, BARRIER_ACK)

    def link_lost(self) -> None:
        """Invariant 3: everything the peer may not have durably goes into the bitmap, then
        the requests waiting for the peer complete (their local part done or finishing)."""
        mark = self.mark
        for ranges in self.tl.values():
            for i in range(0, len(ranges), 2):
                mark(ranges[i], ranges[i + 1])
        self.tl.clear()
        self.barrier_sent_at.clear()
        self.epoch_writes = 0
        waiting = list(self.pending.values())
        self.pending.clear()
        for reqs in self.barrier_waiters.values():
            waiting += reqs
        self.barrier_waiters.clear()
        for req in waiting:
            self.mod(req, LINK_LOST)

    # -- questions --------------------------------------------------------------------------
    def oldest_unacked_epoch(self, connected: bool) -> int:
        """The oldest epoch the peer may not have durably (activity-log eviction bound)."""
        if self.tl:
            return min(self.tl)
        return self.epoch if connected else 1 << 62

    def gap(self, now: float) -> dict:
        """The live data gap: writes the client was answered for (protocols A and B) that
        the peer has not acknowledged as written. Under A the peer sends no receive acks,
        so "not received" counts every such write (an upper bound). Status-time only: a
        scan of the requests waiting for the peer."""
        n = nbytes = unrecv = unrecv_bytes = 0
        oldest = None
        for req in self.pending.values():
            s = req.state
            if not s & COMPLETED or req.err:
                continue
            n += 1
            nbytes += req.length
            if not s & GOT:
                unrecv += 1
                unrecv_bytes += req.length
            if oldest is None:
                oldest = req.t  # pending is in packet order: the first is the oldest
        return {"writes_not_on_peer_disk": n, "bytes_not_on_peer_disk": nbytes,
                "writes_not_received": unrecv, "bytes_not_received": unrecv_bytes,
                "oldest_s": round(now - oldest, 3) if oldest is not None else 0.0}

    def oldest_unacked_age(self, now: float) -> float:
        if not self.barrier_sent_at:
            return 0.0
        return now - min(self.barrier_sent_at.values())
