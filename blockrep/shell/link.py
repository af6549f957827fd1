"""asyncio shell of the peer link: one TCP (or TLS) connection to the peer node.

Owns: moving bytes and running timers. Until the link is established the bytes go through
the sans-IO handshake (blockrep.peer.handshake) from a small read buffer; then framing on
a receive ring buffer (payloads handed on as memoryviews, no copies), batched sends
(everything queued during one loop iteration goes out in one `writelines`), liveness
(`last_rx`), and the record of connections refused before authentication (`Rejections`).
Must not: decide anything about the handshake or replication; established packets go to
the node's dispatch table, refusals and losses to the node's callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from ..peer import compress, proto
from ..peer.compress import is_zero
from ..peer.handshake import NONCE_LEN, Established, LinkHandshake, Refused, Send, StartTls
from ..peer.proto import HEADER_SIZE, P, LinkProtocolError
from . import tls
from .buffers import BufferPool

log = logging.getLogger("blockrep.link")

RECV_BUF = 4 * 1024 * 1024
# corked sends (protocol A's data, which no one waits on): out at most this late, or once
# this much is queued; fewer, larger socket writes for the sender, the peer and any proxy
CORK_S = 0.001
CORK_BYTES = 256 * 1024
RECV_CHUNK = 256 * 1024
SMALL_READ = 16 * 1024
BIG = 256 * 1024
HS_READ = 4096  # read buffer until the peer proved itself (a HELLO is ~150 bytes)
_SELF_CHECKED = proto.SELF_CHECKED  # their handlers check the payload CRC themselves
_COMPRESSED_TYPES = proto.COMPRESSED_TYPES
_F_COMPRESSED = compress.F_COMPRESSED
_HDR = proto.frame
_crc = proto.native.crc32c


class Rejections:
    """Link connections refused before the peer proved itself. They never touch the
    healthy link's state: counted here, the latest kept, logged at most once per
    `interval` seconds (with how many were not logged)."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self.count = 0
        self.last = ""
        self.last_from = ""
        self._logged_at = float("-inf")
        self._unlogged = 0

    def record(self, reason: str, addr: str, now: float) -> bool:
        """-> True when this one was logged."""
        self.count += 1
        self.last, self.last_from = reason, addr
        if now - self._logged_at < self.interval:
            self._unlogged += 1
            return False
        more = f" ({self._unlogged} more not logged)" if self._unlogged else ""
        log.warning("link connection with %s refused before authentication: %s%s", addr,
                    reason, more)
        self._logged_at, self._unlogged = now, 0
        return True

    def as_dict(self) -> dict:
        return {"count": self.count, "last": self.last, "from": self.last_from}


class PeerLink(asyncio.BufferedProtocol):
    def __init__(self, node, outbound: bool):
        self.node = node
        nbd = getattr(node, "nbd", None)  # shell/busypoll: the node's busy polling, if on
        self._busy = nbd.busy if nbd is not None else None
        self.outbound = outbound
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.hs: LinkHandshake | None = None  # until established
        self.established = False
        self.tls_version = ""  # "TLSv1.3" once the link runs over TLS
        self.peer_hello: dict | None = None
        self.peer_addr = "?"
        self.last_rx = self.loop.time()
        self.closed = False
        self.close_reason = ""
        self._sock = None
        self._hs_buf = bytearray(HS_READ)
        self._buf = self._mv = None  # the receive ring: allocated once established
        self._start = 0
        self._end = 0
        self._pool: BufferPool | None = None
        self._read_size = RECV_CHUNK  # small right after a large payload (see _parse)
        self._big: tuple | None = None  # header fields of a payload received outside the ring
        self._big_view: memoryview | None = None
        self._got = 0
        self._out: list = []
        self._spare: list = []
        self._flush_scheduled = False
        self._corked = 0  # bytes queued by send_corked since the last flush
        self.cork_bytes = CORK_BYTES  # lower with a small sndbuf-size (shell/congestion.py)
        self._cork_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.compressor: compress.Compressor | None = None  # once established, if negotiated
        self.batch_resync = False  # once established: the peer decodes F_RUNS
        self.peer_reads = False  # once established: the peer answers P_READ_REQUEST
        self.coded_reads = False  # once established: the peer decodes coded P_READ_REPLY

    # -- sending -----------------------------------------------------------------------------
    def send(self, *parts) -> None:
        """Queue parts; they go out together at the end of this loop iteration."""
        if self.closed:
            return
        self._out.extend(parts)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def send_corked(self, nbytes: int, *parts) -> None:
        """Queue parts no one waits on (protocol A's data: its client was answered once
        it was queued): they go out with the next batch that `send` schedules, after at
        most CORK_S, or as soon as `cork_bytes` (CORK_BYTES, less under a small
        sndbuf-size) are queued."""
        if self.closed:
            return
        self._out.extend(parts)
        self._corked += nbytes
        if self._flush_scheduled:
            return
        if self._corked >= self.cork_bytes:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        elif self._cork_timer is None:
            self._cork_timer = self.loop.call_later(CORK_S, self._uncork)

    def _uncork(self) -> None:
        self._cork_timer = None
        if not self._flush_scheduled:
            self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        self._corked = 0
        out = self._out
        if out and not self.closed:
            self.bytes_sent += sum(map(len, out))
            # double buffered: what pause_writing (the congestion policy) queues from
            # inside writelines lands in the other list and goes out next, not cleared
            self._out, self._spare = self._spare, out
            self.transport.writelines(out)
        out.clear()

    def send_data(self, ptype: int, flags: int, pid: int, offset: int, data,
                  corked: bool = False) -> None:
        """A P_DATA / P_RS_DATA / P_READ_REPLY packet, compressed when negotiated and it
        pays (a P_READ_REPLY only to a peer with `coded_reads`; corked: see send_corked)."""
        n = len(data)
        crc = _crc(data)  # of the plain data, compressed or not
        comp = self.compressor
        got = comp.compress(data) if comp is not None else None
        if got is not None:
            flags |= got[0]
            data = got[1]
        hdr = _HDR(ptype, flags, pid, offset, n, len(data), crc)
        if corked:
            self.send_corked(len(data), hdr, data)
        else:
            self.send(hdr, data)

    def send_coded(self, ptype: int, pid: int, offset: int, data) -> bool:
        """Resync data or a read reply: all zeroes as a marker (F_ZERO, no payload), else
        as `send_data`. True if it went as a zero marker."""
        if is_zero(data):
            self.send(_HDR(ptype, proto.F_ZERO, pid, offset, len(data), 0, 0))
            return True
        self.send_data(ptype, 0, pid, offset, data)
        return False

    def send_control(self, ptype: int, body: dict) -> None:
        self.send(proto.encode_control(ptype, body))

    def refuse(self, reason: str) -> None:
        """Established link: tell the peer why, log it, close."""
        log.error("refusing peer %s: %s", self.peer_addr, reason)
        self.node.on_link_refused(self, Refused(reason, by_peer=False, authenticated=True))
        self.send_control(P.REFUSE, {"reason": reason})
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.close_reason = reason
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio protocol --------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = self._sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self.node.on_link_made(self)  # may refuse it at once (abort)
        if self.closed:
            return
        self.hs = LinkHandshake(self.node.link_params, dialer=self.outbound,
                                nonce=os.urandom(NONCE_LEN), now=self.loop.time(),
                                local_state=self.node.local_state)
        self._handle(self.hs.start())

    def check_time(self, now: float, idle_timeout: float) -> None:
        """The node's timer, for a link still in the handshake."""
        hs = self.hs
        if hs is None or self.closed:
            return
        if hs.peer_authenticated:  # trusted now: only a stall ends it (large STATE)
            if now - self.last_rx > idle_timeout:
                self._refused(Refused(f"handshake stalled: nothing received for "
                                      f"{idle_timeout:g}s", False, True))
            return
        self._handle(hs.check_time(now))

    def connection_lost(self, exc):
        self.closed = True
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "peer closed")
        if self.hs is not None and not self.close_reason:
            # ended by the peer (or the network) in the handshake, without a word
            why = f"{reason} during the link handshake"
            if self.tls_version and not self.hs.peer_authenticated:
                why += " (right after TLS: it may not accept this node's certificate)"
            self.node.on_link_refused(self, Refused(why, True, self.hs.peer_authenticated))
        self.node.on_link_lost(self, reason)

    def pause_writing(self):
        self._paused = True
        if self.established:
            self.node.congestion.paused(self)  # above sndbuf-size / congestion-fill

    def resume_writing(self):
        self._paused = False
        self.node.on_link_writable(self)

    def owns(self, payload) -> bool:
        """True if payload is a view of the receive ring (valid only during dispatch)."""
        return isinstance(payload, memoryview) and payload.obj is self._buf

    @property
    def congested(self) -> bool:
        return self._paused

    def get_buffer(self, sizehint):
        if self.hs is not None:
            if self.hs.peer_authenticated and len(self._hs_buf) < RECV_CHUNK:
                self._hs_buf = bytearray(RECV_CHUNK)  # its STATE may be large
            return self._hs_buf
        if self._big is not None:
            return self._big_view[self._got:]
        if self._end >= RECV_BUF - RECV_CHUNK:
            self._compact()
        # at most RECV_CHUNK per read: a large payload's header is parsed early, and the
        # rest of the payload is then received straight into its own buffer (no copy)
        return self._mv[self._end:self._end + self._read_size]

    def buffer_updated(self, nbytes):
        self.last_rx = self.loop.time()
        self.bytes_received += nbytes
        if self.hs is not None:
            self._handshake_data(nbytes)
            return
        if self._busy is not None:
            self._busy.kick()  # an ack or a write arrived: stay awake for the next one
        try:
            if self._big is not None:
                self._got += nbytes
                if self._got < len(self._big_view):
                    return
                fields, view = self._big, self._big_view
                self._big = self._big_view = None
                self._dispatch(*fields, view)
                return
            self._end += nbytes
            self._parse()
        except LinkProtocolError as exc:
            self._broken(exc)

    def _broken(self, exc: LinkProtocolError) -> None:
        """The established peer broke the protocol: record it, drop the connection."""
        log.error("peer %s broke the link protocol: %s", self.peer_addr, exc)
        self.node.on_link_refused(self, Refused(f"protocol error: {exc}", False, True))
        self.abort(f"protocol error: {exc}")

    def eof_received(self):
        return False

    def _compact(self):
        n = self._end - self._start
        if self._start:
            self._mv[:n] = self._mv[self._start:self._end]
        self._start, self._end = 0, n

    def _parse(self):
        buf, mv = self._buf, self._mv
        pos, end = self._start, self._end
        unpack = proto.unpack_header
        big = False
        while end - pos >= HEADER_SIZE and not self.closed:
            ptype, flags, pid, offset, size, paylen, crc = unpack(buf, pos)
            have = end - pos - HEADER_SIZE
            if have >= paylen:
                p0 = pos + HEADER_SIZE
                pos = p0 + paylen
                self._start = pos
                self._dispatch(ptype, flags, pid, offset, size, crc, mv[p0:pos])
                continue
            if paylen >= BIG:
                view = self._pool.get(paylen)
                view[:have] = mv[pos + HEADER_SIZE:end]
                self._big = (ptype, flags, pid, offset, size, crc)
                self._big_view = view
                self._got = have
                pos = end
                big = True
                break
            if pos + HEADER_SIZE + paylen > RECV_BUF:
                self._start = pos
                self._compact()
                pos, end = self._start, self._end
            break
        if pos >= end:
            self._start = self._end = 0
        else:
            self._start = pos
        self._read_size = SMALL_READ if big else RECV_CHUNK

    def _dispatch(self, ptype, flags, pid, offset, size, crc, payload):
        handler = self.node.handlers.get(ptype)
        if handler is None:
            raise LinkProtocolError(f"unexpected packet type {ptype}")
        if flags & _F_COMPRESSED and ptype in _COMPRESSED_TYPES:
            payload = compress.decompress(flags, payload, size)  # `crc` is the plain data's
            flags &= ~_F_COMPRESSED
        if ptype not in _SELF_CHECKED and payload:
            proto.check_payload(ptype, crc, payload)
        handler(self, flags, pid, offset, size, crc, payload)

    # -- handshake ---------------------------------------------------------------------------
    def _handshake_data(self, nbytes: int) -> None:
        hs = self.hs
        try:
            events = hs.receive_data(memoryview(self._hs_buf)[:nbytes], self.loop.time())
        except LinkProtocolError as exc:
            self._refused(Refused(f"protocol error: {exc}", False, hs.peer_authenticated),
                          abort=True)
            return
        self._handle(events)

    def _handle(self, events: list) -> None:
        for ev in events:
            if self.closed:
                return
            if isinstance(ev, Send):
                self.send(ev.data)
            elif isinstance(ev, StartTls):
                self.flush()  # the plaintext STARTTLS answer goes out before TLS starts
                self.transport.pause_reading()
                self.loop.create_task(self._start_tls())
            elif isinstance(ev, Established):
                self._established(ev)
            elif isinstance(ev, Refused):
                self._refused(ev)

    def _refused(self, ev: Refused, abort: bool = False) -> None:
        self.node.on_link_refused(self, ev)
        if abort:
            self.abort(ev.reason)
        else:
            self.close(ev.reason)  # after the REFUSE queued for the peer, if any

    async def _start_tls(self) -> None:
        ctx = self.node.tls_context(server_side=not self.outbound)
        try:
            transport = await self.loop.start_tls(self.transport, self, ctx,
                                                  server_side=not self.outbound)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            if not self.closed:
                self._refused(Refused(f"TLS handshake failed: {exc or type(exc).__name__}",
                                      False, False), abort=True)
            return
        if self.closed:
            transport.abort()
            return
        self.transport = transport
        obj = transport.get_extra_info("ssl_object")
        error = tls.check_peer(obj, self.node.peer_cfg)
        if error is None:
            self.tls_version = obj.version()
            log.info("link to the peer over %s (%s) with %s", obj.version(), obj.cipher()[0],
                     self.peer_addr)
        try:
            events = self.hs.tls_done(error, self.loop.time())
        except LinkProtocolError as exc:
            self._refused(Refused(f"protocol error: {exc}", False, False), abort=True)
            return
        self._handle(events)

    def _established(self, ev: Established) -> None:
        self.hs = None
        self.established = True
        self.peer_hello = ev.hello
        cfg = self.node.cfg
        features = ev.hello.get("features", 0)
        self.compressor = compress.Compressor.for_peer(
            cfg.compression, cfg.compression_level, features)
        self.batch_resync = bool(features & proto.FEATURE_RUNS)  # the peer decodes F_RUNS
        self.peer_reads = bool(features & proto.FEATURE_PEER_READS)  # it answers READ_REQUEST
        self.coded_reads = bool(features & proto.FEATURE_CODED_READS)  # F_ZERO, compressed
        self._buf = bytearray(RECV_BUF)
        self._mv = memoryview(self._buf)
        self._pool = BufferPool()
        self._hs_buf = None
        sock = self._sock
        if sock is not None:
            for opt, val in ((socket.SO_SNDBUF, 4 << 20), (socket.SO_RCVBUF, 4 << 20)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, val)
                except OSError:
                    pass
        n = len(ev.leftover)
        self._mv[:n] = ev.leftover
        self._start, self._end = 0, n
        self.node.on_link_established(self, ev.state)
        if n and not self.closed:
            try:
                self._parse()
            except LinkProtocolError as exc:
                self._broken(exc)
