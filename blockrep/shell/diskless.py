"""A Primary without its disk (on-io-error = detach): its I/O through the peer, and the
peer's side of that.

Owns, on the Primary: whether its disk may be detached with its I/O going on through the
peer (`can_serve`: Established, the peer UpToDate and holding every block, i.e. nothing
marked out of sync, and the peer answers P_READ_REQUEST); the switch at the detach (`start`:
the request core's REMOTE requests, writes, trims, zeroes and flushes to the peer only,
completed on its acknowledgement; the NBD server's reads sent here); reads as
P_READ_REQUEST answered by P_READ_REPLY; what a lost link means (every open read and write
fails with EIO: there is no other copy); the check of a peer met again (`check_reconnect`);
the counters. On the Secondary: answering P_READ_REQUEST from its disk once every earlier
write of the stream to that range has landed (the applier's order), small reads inline,
large ones in the I/O threads (ordered like a large write); the reply coded like resync
data for a Primary that decodes it (all zeroes as F_ZERO, else compressed where it pays).
Must not: decide the detach (diskfail.py), parse NBD (the NBD server calls `read`), or
decide when a write completes (blockrep.peer.requests does).
"""

from __future__ import annotations

import errno
import logging

from ..peer import proto
from ..peer.proto import P
from ..state import DiskState, ReplState, Role
from .ratelog import RateLimitedLog

log = logging.getLogger("blockrep.disk")
iolog = RateLimitedLog(log)

READ_INLINE = 256 * 1024  # peer reads this large run in the I/O threads (as writes do)
MAX_READ = proto.MAX_PAYLOAD - 4096  # the largest NBD request (64 MiB)
_P_READ_REQUEST, _P_READ_REPLY = int(P.READ_REQUEST), int(P.READ_REPLY)
_F_ERR, _F_ZERO = proto.F_ERR, proto.F_ZERO
_HDR = proto.frame
_crc = proto.native.crc32c
_EIO = errno.EIO


class Diskless:
    def __init__(self, node):
        self.node = node
        self.active = False  # this Primary's disk is detached: its I/O goes to the peer
        self.since: float | None = None  # loop time of the switch
        self.reads: dict[int, tuple] = {}  # request id -> (cb, key, offset, length)
        self.next_id = 1
        self.peer_reads_bytes = 0   # read from the peer for clients (Diskless Primary)
        self.peer_writes_bytes = 0  # written to the peer only (WRITE, TRIM, ZEROES lengths)
        self.peer_reads_failed = 0  # reads answered EIO (no peer, peer error, link lost)
        self.served_reads_bytes = 0  # read from this disk for a Diskless Primary peer
        self.served_reads = 0

    # -- Primary ----------------------------------------------------------------------------
    def can_serve(self) -> bool:
        """May this Primary detach its disk and go on through the peer? Only while the peer
        holds every block the clients were told is written."""
        node = self.node
        link = node.replicating_link()
        return (link is not None and link.peer_reads and node.repl == ReplState.ESTABLISHED
                and node.peer_disk == DiskState.UP_TO_DATE and node.bitmap.count() == 0)

    def peer_link(self):
        """The link reads go to, or None (no UpToDate peer to read from)."""
        node = self.node
        link = node.replicating_link()
        if link is None or not link.peer_reads or node.peer_disk != DiskState.UP_TO_DATE:
            return None
        return link

    def start(self) -> None:
        """The disk was detached on this Primary: from now on its I/O goes to the peer."""
        node = self.node
        self.active = True
        self.since = node.loop.time()
        node.replicator.detached()  # open requests count their peer part only
        if node.nbd is not None:
            node.nbd.set_remote_read(self.read)
        log.warning("Diskless Primary: reads and writes go to the peer %s only (nothing is "
                    "marked out of sync: there is no local disk)", node.peer_cfg.name)

    def stop(self) -> None:
        """A disk is attached again."""
        node = self.node
        self.active = False
        self.since = None
        node.replicator.remote = False
        if node.nbd is not None:
            node.nbd.set_remote_read(None)

    def read_failed(self, offset: int, length: int, exc) -> bool:
        """The NBD server's local read failed: True if the disk is now detached and the read
        is to go to the peer (`read`), False to answer the error."""
        node = self.node
        if not isinstance(exc, OSError) or not node.is_primary:
            return False
        return node.diskfail.io_error("read", offset, length, exc) and self.active

    def read(self, offset: int, length: int, cb, key) -> None:
        """Read for a client from the peer; `cb(key, errno, data)` when it answers (at once
        with EIO if there is no UpToDate peer)."""
        link = self.peer_link()
        if link is None:
            self.peer_reads_failed += 1
            iolog.error("diskless read", "read at %d+%d failed: Diskless and no UpToDate "
                        "peer to read from", offset, length)
            cb(key, _EIO, None)
            return
        pid = self.next_id
        self.next_id = pid + 1
        self.reads[pid] = (cb, key, offset, length)
        link.send(_HDR(_P_READ_REQUEST, 0, pid, offset, length, 0, 0))

    def on_read_reply(self, link, flags, pid, offset, size, crc, payload) -> None:
        ent = self.reads.pop(pid, None)
        if ent is None:
            raise proto.LinkProtocolError(f"read reply {pid} answers no read request")
        cb, key, off, length = ent
        err = proto.read_reply_error(flags, size)
        zero = flags & _F_ZERO  # all zeroes, no payload (compressed ones arrive decoded)
        n = size if zero else len(payload)
        if not err and (offset != off or n != length or zero and payload):
            cb(key, _EIO, None)
            raise proto.LinkProtocolError(f"read reply {pid}: {offset}+{n}"
                                          f"{' zeroes' if zero else ''} for a read of "
                                          f"{off}+{length}")
        if err:
            self.peer_reads_failed += 1
            iolog.error("diskless read", "the peer failed to read %d+%d (errno %d)", off,
                        length, err)
            cb(key, err, None)
            return
        self.peer_reads_bytes += length
        if zero:
            payload = bytes(length)
        elif link.owns(payload):
            payload = bytes(payload)
        cb(key, 0, payload)

    def wrote(self, length: int) -> None:
        self.peer_writes_bytes += length

    def link_lost(self) -> None:
        """Reads waiting for the peer fail: there is no other copy (the writes fail in the
        request core, REMOTE)."""
        reads, self.reads = self.reads, {}
        if reads:
            self.peer_reads_failed += len(reads)
            log.error("Diskless Primary lost its peer: %d read(s) answered EIO", len(reads))
        for cb, key, _, _ in reads.values():
            cb(key, _EIO, None)
        if self.active:
            log.error("Diskless Primary without its peer: every read and write fails (EIO) "
                      "until the peer is connected again")

    def check_reconnect(self, peer_role, peer_disk, peer_gen) -> str | None:
        """A link to the peer came up while this node is a Diskless Primary: None to go on
        (through the peer again if it is UpToDate), or why the link must be refused."""
        node = self.node
        if not (self.active and node.is_primary):
            return None
        if peer_role == Role.PRIMARY:
            return ("both nodes are Primary (this one Diskless); demote one of them, then "
                    "'blockrep connect'")
        if peer_disk == DiskState.UP_TO_DATE and peer_gen.current != node.gen.current:
            return (f"the peer's data ({peer_gen.current:016X}) is not the data this Diskless "
                    f"Primary served ({node.gen.current:016X}): it was written without this "
                    f"node; demote this node before it reconnects")
        return None

    def status(self) -> dict:
        node = self.node
        return {"active": self.active,
                "serving": self.active and self.peer_link() is not None,
                "since_s": round(node.loop.time() - self.since, 3) if self.since else None,
                "peer_reads_bytes": self.peer_reads_bytes,
                "peer_writes_bytes": self.peer_writes_bytes,
                "peer_reads_failed": self.peer_reads_failed,
                "reads_in_flight": len(self.reads),
                "served_reads": self.served_reads,
                "served_reads_bytes": self.served_reads_bytes}

    # -- Secondary --------------------------------------------------------------------------
    def on_read_request(self, link, flags, pid, offset, size, crc, payload) -> None:
        node = self.node
        if node.is_primary:
            raise proto.LinkProtocolError("read request while Primary")
        if not 0 < size <= MAX_READ or offset + size > node.size:
            raise proto.LinkProtocolError(f"read request {offset}+{size} out of bounds")
        # after every earlier write of the stream to this range (and before later ones)
        node.applier.ordered(link, offset, size, None,
                             lambda _: self._serve(link, pid, offset, size))

    def _serve(self, link, pid, offset, size) -> None:
        node = self.node
        if not node.diskfail.attached:
            self._reply_error(link, pid, offset, _EIO)
            return
        if size < READ_INLINE:
            try:
                data = node.disk.read(offset, size)
            except OSError as exc:
                self._read_error(link, pid, offset, size, exc)
                return
            self._reply(link, pid, offset, data)
            return
        applier = node.applier
        key = applier.busy.add(offset, size)  # later writes to the range wait for it
        fut = node.loop.run_in_executor(node.executor, node.disk.read, offset, size)
        fut.add_done_callback(lambda f: self._served(key, link, pid, offset, size, f))

    def _served(self, key, link, pid, offset, size, fut) -> None:
        exc = fut.exception()
        if exc is None:
            self._reply(link, pid, offset, fut.result())
        else:
            self._read_error(link, pid, offset, size, exc)
        self.node.applier.landed(key)

    def _reply(self, link, pid, offset, data) -> None:
        n = len(data)
        self.served_reads += 1
        self.served_reads_bytes += n
        if not link.coded_reads:  # a Primary of an older build: the data as it is
            link.send(_HDR(_P_READ_REPLY, 0, pid, offset, n, n, _crc(data)), data)
        else:  # all zeroes as a marker, else compressed when negotiated and it pays
            link.send_coded(_P_READ_REPLY, pid, offset, data)

    def _reply_error(self, link, pid, offset, err) -> None:
        link.send(_HDR(_P_READ_REPLY, _F_ERR, pid, offset, err, 0, 0))

    def _read_error(self, link, pid, offset, size, exc) -> None:
        err = getattr(exc, "errno", None) or _EIO
        iolog.error("peer read I/O error", "reading %d+%d for the peer failed: %s", offset,
                    size, exc)
        self._reply_error(link, pid, offset, err)
        self.node.diskfail.io_error("a read for the peer", offset, size, exc)
