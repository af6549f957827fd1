"""The session half of an NBD connection: accept, handshake (TLS upgrade included), the
bounds that pause reading, and the switch to transmission. nbd_server.NbdConnection adds the
receive path and the commands on top of it.

Owns: the handshake deadline and the cap on connections in the handshake, the upgrade of the
transport when the handshake core asks for TLS (`loop.start_tls`), counting a connection as
attached only once it is past the handshake, and holding/resuming a connection whose
in-flight requests or bytes reached a limit (nbd_limits.py). Must not: parse NBD messages
(blockrep.nbd does) or touch the disk.

A connection in the handshake has a small receive buffer (the 2 MiB ring comes with
transmission), a deadline from accept, and a place among at most `max_handshakes` (the oldest
is dropped for a newcomer). In transmission, requests and write bytes in flight are counted
with ints per connection and per server; over a limit the connection stops parsing (what is
in the ring stays there) and pauses reading from the socket until completions bring it back
under 3/4 of the limit. Only connections past the handshake are in `server.connections`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from ..nbd.constants import BASE_ALLOCATION_ID
from ..nbd.handshake import Closed, Negotiated, StartTls
from ..nbd.transmission import RequestRules
from .ratelog import RateLimitedLog

log = logging.getLogger("blockrep.nbd")
iolog = RateLimitedLog(log)  # per-connection troubles repeat: a few lines and a count

RECV_BUF = 2 * 1024 * 1024  # the transmission ring
HS_BUF = 4 * 1024  # receive buffer while in the handshake (options are parsed as they come)


class NbdSession:
    """Mixin: expects the attributes that NbdConnection.__init__ sets."""

    # -- accept and close --------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        server = self.server
        if server.closing:
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = server.handshaking
        if len(hs) >= self._limits.max_handshakes:
            oldest = next(iter(hs))
            del hs[oldest]  # at once: connection_lost comes a loop step later
            server.handshakes_dropped += 1
            iolog.warning("NBD handshake limit", "%s: dropped: %d connections are in the "
                          "handshake (limit), this is the oldest", oldest.peer, len(hs))
            oldest.abort()
        hs[self] = None
        self._hs_timer = self._loop.call_later(self._limits.handshake_timeout,
                                               self._handshake_expired)
        transport.write(self.hs.data_to_send())

    def connection_lost(self, exc):
        self._forget()
        self._wake_idle()

    def _forget(self):
        """Leave every count of the server (idempotent: connection_lost, failed TLS)."""
        server = self.server
        server.connections.discard(self)
        server.handshaking.pop(self, None)
        server.throttled.discard(self)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        if self._wbytes:  # completions still due do not count twice (see _completed_cb)
            server.inflight_bytes -= self._wbytes
            self._wbytes = 0
            if server.throttled:  # they may have waited for these bytes only
                self._loop.call_soon(server.resume_throttled)
        self._lost = True
        self._closing = True

    def abort(self):
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self):
        self._hs_timer = None
        if self.hs is not None:
            self.server.handshakes_dropped += 1
            iolog.warning("NBD handshake timeout", "%s: handshake not finished in %.0f s; "
                          "closing", self.peer, self._limits.handshake_timeout)
            self.abort()

    def pause_writing(self):
        """The client does not read its replies: stop parsing and reading until it does."""
        self._paused_writing = True
        self._hold()

    def resume_writing(self):
        self._paused_writing = False
        self._maybe_resume()

    # -- bounds ------------------------------------------------------------------------------
    def _hold(self):
        """Stop parsing and reading: a bound is reached (requests may stay in the ring)."""
        self._held = True
        self.transport.pause_reading()

    def _maybe_resume(self):
        """Parse and read again once every bound is met (writes drained, budgets free)."""
        if self._closing or self._paused_writing:
            return
        if self.hs is not None:  # the handshake pauses only for a slow reader (or TLS)
            if not self._tls_pending:
                self._held = False
                self.transport.resume_reading()
            return
        srv = self.server
        # resume at 3/4 of a limit, so a connection at its limit does not flap
        if self._wbytes * 4 >= self._max_bytes * 3 or self._inflight * 4 >= self._max_reqs * 3:
            return
        if srv.inflight_bytes * 4 >= self._node_max * 3:
            srv.throttled.add(self)
            return
        srv.throttled.discard(self)
        was_held, self._held = self._held, False
        self.transport.resume_reading()
        if was_held and self._end > self._start and self._pending_payload is None:
            self._process()

    def eof_received(self):
        return False  # close our side too

    # -- handshake ---------------------------------------------------------------------------
    def _handshake(self):
        hs = self.hs
        data = bytes(self._mv[self._start:self._end])
        self._start = self._end = 0
        for ev in hs.receive_data(data):
            out = hs.data_to_send()
            if out:
                self.transport.write(out)
            if isinstance(ev, Closed):
                if ev.error:
                    iolog.warning("NBD handshake error", "%s: handshake: %s", self.peer,
                                  ev.reason)
                self.hs = None
                self._closing = True
                self.transport.close()
                return
            if isinstance(ev, StartTls):
                self._tls_pending = True
                self.transport.pause_reading()  # nothing more until the TLS handshake
                asyncio.ensure_future(self._start_tls())
                return
            if isinstance(ev, Negotiated):
                self._start_transmission(ev)
                return
        out = hs.data_to_send()
        if out:
            self.transport.write(out)

    async def _start_tls(self):
        """Upgrade the transport (the ACK is queued on it); the deadline still runs."""
        try:
            tr = await self._loop.start_tls(self.transport, self, self.server.tls.context,
                                            server_side=True)
        except (OSError, ConnectionError, asyncio.CancelledError, ValueError) as exc:
            iolog.warning("NBD TLS handshake", "%s: TLS handshake failed: %s", self.peer,
                          exc or type(exc).__name__)
            self.abort()
            self._forget()
            return
        self._tls_pending = False
        if tr is None or self.hs is None or self._closing:
            if tr is not None:
                tr.abort()
            return
        self.transport = tr
        self.hs.tls_established()

    def _set_ring(self, size: int):
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)

    def _start_transmission(self, ev: Negotiated):
        hs = self.hs
        self.hs = None
        server = self.server
        server.handshaking.pop(self, None)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        if server.closing:
            self.abort()
            return
        server.connections.add(self)
        if server.busy is not None:
            self._kick = server.busy.kick
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._set_ring(RECV_BUF)
        self.structured = ev.structured
        self.meta = BASE_ALLOCATION_ID in ev.meta_contexts
        self.rules = RequestRules(ev.export.size, ev.flags, ev.structured, self.meta,
                                  ev.export.max_block)
        left = hs.leftover
        if left:
            self._mv[:len(left)] = left
            self._end = len(left)
            self._process()
