"""The bounded send buffer and its congestion policy (`sndbuf-size`, `congestion-fill`,
`on-congestion = block | pull-ahead`).

Owns: the limits of an established link's send buffer (the transport's write-buffer high
water mark: asyncio calls pause_writing above it and resume_writing once it has drained
below a quarter of it), and what a full buffer does on the Primary:

- block: new client writes wait in the Replicator's `waiting` FIFO behind a marker (HOLD)
  until the buffer has drained; nothing is marked, the peer stays up to date.
- pull-ahead (above `congestion-fill`, else `sndbuf-size`): the Primary goes **Ahead**:
  writes stop going to the peer; each is marked out of sync here (the NO_PEER rule of the
  request core) and announced with a header-only P_OUT_OF_SYNC, so the peer (**Behind**)
  knows what it lacks. What was already queued still arrives and is acknowledged. Once the
  buffer has drained the Primary asks the peer to renegotiate (the peer closes the link
  after reading everything before that request); the link reconnects, the bitmap-based
  resync copies what went out of sync and the pair returns to Established on its own.
  A Diskless Primary (shell/diskless.py) blocks whatever the policy: it has no disk to be
  Ahead on.

Must not: parse packets or decide sync direction; the hot path of an uncongested link pays
nothing here (the transport calls in only when its buffer crosses the marks).
"""

from __future__ import annotations

import logging
import socket

from ..peer import proto
from ..peer.proto import P
from ..state import ReplState

log = logging.getLogger("blockrep.congestion")

HOLD = ("hold",)  # the marker in Replicator.waiting that blocks new writes
_P_OOS = int(P.OUT_OF_SYNC)


class Congestion:
    def __init__(self, node):
        self.node = node
        cfg = node.cfg
        self.policy = cfg.on_congestion
        self.limit = (cfg.congestion_fill or cfg.sndbuf_size if self.policy == "pull-ahead"
                      else cfg.sndbuf_size)
        self.held = False
        self.renegotiating = None  # the link asked to renegotiate after Ahead
        self.times_ahead = 0
        self.times_blocked = 0
        self.ahead_bytes = 0  # written while Ahead (not shipped), this episode

    def configure(self, link) -> None:
        """A link was established: bound its send buffer (this process's and, with
        sndbuf-size, the kernel's socket buffer, which would otherwise hide a slow link)."""
        if not self.limit or link.transport is None:
            return
        # what protocol A corks is not yet in the transport's buffer: a quarter of the
        # limit at most, so the bound (and Ahead/block) still holds within that
        link.cork_bytes = min(link.cork_bytes, max(self.limit // 4, 1))
        link.transport.set_write_buffer_limits(high=self.limit, low=self.limit // 4)
        sock = link.transport.get_extra_info("socket")
        if self.node.cfg.sndbuf_size and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.node.cfg.sndbuf_size)
            except OSError as exc:
                log.warning("could not set the link's SO_SNDBUF: %s", exc)

    def paused(self, link) -> None:
        """The link's send buffer went above its limit."""
        node = self.node
        if link is not node.link or not self.limit or not node.is_primary:
            return
        if self.policy == "block" or not node.diskfail.attached:  # Diskless: no Ahead
            if not self.held:
                self.held = True
                self.times_blocked += 1
                node.replicator.waiting.append(HOLD)
            return
        if node.repl is ReplState.ESTABLISHED:
            self.times_ahead += 1
            self.ahead_bytes = 0
            log.warning("send buffer above %d bytes: Ahead (writes are marked out of sync "
                        "and resynced once it has drained)", self.limit)
            node.set_replication(ReplState.AHEAD)
            link.send_control(P.CONTROL, {"op": "ahead"})

    def resumed(self, link) -> None:
        """The send buffer drained below a quarter of the limit."""
        node = self.node
        if link is not node.link:
            return
        self.release()
        if node.repl is ReplState.AHEAD and self.renegotiating is not link:
            # the peer closes once it has read everything before this (an "ahead", every
            # P_OUT_OF_SYNC); closing here could lose that in flight (TCP reset)
            log.info("send buffer drained: resyncing %d bytes written while Ahead",
                     self.ahead_bytes)
            self.renegotiating = link
            link.send_control(P.CONTROL, {"op": "renegotiate"})

    def release(self) -> None:
        """Let blocked writes go (buffer drained, or link lost: they go local-only)."""
        if self.held:
            self.held = False
            r = self.node.replicator
            r.waiting.remove(HOLD)
            r.drain_waiting()

    def not_shipped(self, offset: int, length: int) -> None:
        """Ahead: a write stayed local (already marked here); tell the peer."""
        link = self.node.link
        self.ahead_bytes += length
        if link is not None and not link.closed:
            link.send(proto.frame(_P_OOS, 0, 0, offset, length, 0, 0))

    # -- the peer side ---------------------------------------------------------------------
    def on_ahead(self, link, body) -> None:
        node = self.node
        if node.is_primary:
            raise proto.LinkProtocolError("peer went Ahead while this node is Primary")
        log.warning("peer is Ahead: Behind (its writes are marked out of sync here until "
                    "the resync)")
        node.set_replication(ReplState.BEHIND)

    def on_out_of_sync(self, link, flags, pid, offset, size, crc, payload) -> None:
        node = self.node
        if node.is_primary or offset + size > node.size:
            raise proto.LinkProtocolError(f"P_OUT_OF_SYNC at {offset}+{size} refused")
        node.mark_out_of_sync(offset, size)

    def status(self) -> dict:
        return {"policy": self.policy, "limit_bytes": self.limit, "blocked": self.held,
                "times_blocked": self.times_blocked, "times_ahead": self.times_ahead,
                "ahead_bytes": self.ahead_bytes}
