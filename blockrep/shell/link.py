"""asyncio shell of the peer link: one TCP connection to the peer node.

Owns: framing on a receive ring buffer (payloads handed on as memoryviews, no copies),
batched sends (everything queued during one loop iteration goes out in one `writelines`),
the handshake (HELLO, mutual HMAC challenge-response, STATE) and liveness (`last_rx`).
Must not: decide anything about replication; established packets go to the node's
dispatch table, refusals and losses to the node's callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from ..peer import proto
from ..peer.proto import HEADER_SIZE, P, LinkProtocolError
from .buffers import BufferPool

log = logging.getLogger("blockrep.link")

RECV_BUF = 4 * 1024 * 1024
RECV_CHUNK = 256 * 1024
SMALL_READ = 16 * 1024
BIG = 256 * 1024


class PeerLink(asyncio.BufferedProtocol):
    def __init__(self, node, outbound: bool):
        self.node = node
        self.outbound = outbound
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.challenge = os.urandom(proto.CHALLENGE_LEN)
        self.phase = "hello"  # hello -> auth -> state -> established -> closed
        self.peer_hello: dict | None = None
        self.peer_addr = "?"
        self.last_rx = self.loop.time()
        self.closed = False
        self.close_reason = ""
        self._buf = bytearray(RECV_BUF)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._pool = BufferPool()
        self._read_size = RECV_CHUNK  # small right after a large payload (see _parse)
        self._big: tuple | None = None  # header fields of a payload received outside the ring
        self._big_view: memoryview | None = None
        self._got = 0
        self._out: list = []
        self._flush_scheduled = False
        self._paused = False
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending -----------------------------------------------------------------------------
    def send(self, *parts) -> None:
        """Queue parts; they go out together at the end of this loop iteration."""
        if self.closed:
            return
        self._out.extend(parts)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed:
            for p in self._out:
                self.bytes_sent += len(p)
            self.transport.writelines(self._out)
        self._out.clear()

    def send_control(self, ptype: int, body: dict) -> None:
        self.send(proto.encode_control(ptype, body))

    def refuse(self, reason: str) -> None:
        """Tell the peer why, log it, close."""
        log.error("refusing peer %s: %s", self.peer_addr, reason)
        self.node.on_link_error(self, reason, refused_by_me=True)
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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for opt, val in ((socket.SO_SNDBUF, 4 << 20), (socket.SO_RCVBUF, 4 << 20)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, val)
                except OSError:
                    pass
        peer = transport.get_extra_info("peername")
        self.peer_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self.node.on_link_made(self)
        self.send_control(P.HELLO, {**self.node.hello(), "challenge": self.challenge})

    def connection_lost(self, exc):
        self.closed = True
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "peer closed")
        self.node.on_link_lost(self, reason)

    def pause_writing(self):
        self._paused = True

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
            log.error("peer %s broke the link protocol: %s", self.peer_addr, exc)
            self.node.on_link_error(self, f"protocol error: {exc}", refused_by_me=True)
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
        if self.phase == "established":
            handler = self.node.handlers.get(ptype)
            if handler is None:
                raise LinkProtocolError(f"unexpected packet type {ptype}")
            handler(self, flags, pid, offset, size, crc, payload)
            return
        body = proto.decode_control(payload) if ptype in proto.CONTROL_TYPES else None
        if ptype == P.REFUSE:
            reason = str(body.get("reason", "no reason given"))
            log.error("peer %s refused the connection: %s", self.peer_addr, reason)
            self.node.on_link_error(self, f"peer refused: {reason}", refused_by_me=False)
            self.close(f"peer refused: {reason}")
        elif ptype == P.HELLO and self.phase == "hello":
            self.peer_hello = body
            reason = self.node.check_hello(body)
            if reason:
                self.refuse(reason)
                return
            self.phase = "auth"
            challenge = proto.need(body, "challenge", bytes)
            self.send_control(P.AUTH, {"response": self.node.auth_response(challenge)})
        elif ptype == P.AUTH and self.phase == "auth":
            if not self.node.auth_ok(self.challenge, proto.need(body, "response", bytes)):
                self.refuse("authentication failed: the shared secrets differ")
                return
            reason = self.node.check_peer_after_auth(self.peer_hello)
            if reason:
                self.refuse(reason)
                return
            self.phase = "state"
            self.send_control(P.STATE, self.node.local_state())
        elif ptype == P.STATE and self.phase == "state":
            self.phase = "established"
            self.node.on_link_established(self, body)
        elif ptype in (P.PING, P.PING_ACK):
            pass
        else:
            raise LinkProtocolError(f"packet type {ptype} not valid in phase {self.phase}")
