"""asyncio/uvloop shell of the NBD server: moves bytes between sockets, the protocol core
(blockrep.nbd) and a block backend.

Owns: connections, the receive buffer, reply batching, draining on shutdown.
Must not: decide protocol questions (blockrep.nbd.handshake / transmission do) or make
system calls on the disk (the backend does).

Receive path: one `bytearray` per connection; `get_buffer` hands out its free tail, and
`buffer_updated` parses every complete request in it. A WRITE payload that is already in the
buffer is written from a memoryview (no copy); a large payload is received straight into a
reusable buffer. Replies produced by one `buffer_updated` go out with one `writelines`.
Reads and writes run inline, large ones too (page-cache I/O; measured faster than a hand-off
to a thread even at 1 MiB); FLUSH runs in a thread so the loop keeps serving, which makes
replies out of order. Read buffers of large reads come from a pool (see buffers.py).

Handshake, TLS and the bounds that pause a connection: nbd_session.py (docs/nbd.md); READ,
CACHE and BLOCK_STATUS: nbd_reads.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter as _now

from ..nbd import proto
from .buffers import BufferPool
from .busypoll import BusyPoll
from .latency import SAMPLE_EVERY, IoStats
from .nbd_limits import NbdLimits, NbdTls
from .nbd_reads import NbdReads
from .nbd_session import HS_BUF, RECV_BUF, NbdSession, iolog, log
from ..nbd.constants import (
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    CmdFlag,
    NbdCmd,
    ReplyType,
)
from ..nbd.handshake import Export, HandshakeServer
from ..nbd.transmission import RequestRules, nbd_errno, nbd_error
from ..peer.requests import KIND_NAMES
from .target import FLUSH, TRIM, WRITE, ZERO, LocalTarget  # the neutral request kinds

RECV_CHUNK = 256 * 1024
SMALL_READ = 16 * 1024
BIG_IO = 256 * 1024  # write payloads this large are received into their own buffer
POOL_KEEP = 4  # a pool with more buffers than this gives back free ones beyond ...
POOL_KEEP_BYTES = 8 * 1024 * 1024  # ... this many bytes (after a burst of large requests)

_unpack_req = proto.unpack_request_from
_pack_simple = proto.pack_simple_reply
_pack_chunk = proto.pack_structured_header
_FUA = int(CmdFlag.FUA)  # plain ints on the hot path: IntFlag operations are slow
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_DONE = int(REPLY_FLAG_DONE)


class NbdServer:
    """Serves one backend under one or more export names, on any number of listeners."""

    def __init__(self, backend, export: Export, *, exports: dict[str, Export] | None = None,
                 target=None, executor: ThreadPoolExecutor | None = None,
                 limits: NbdLimits | None = None, tls: NbdTls | None = None):
        """`backend` serves reads (a Disk). Write-type requests go to `target` in the
        neutral form of shell/target.py: the replicator of a replicated resource, or by
        default a LocalTarget on the backend. Thread work runs in `executor` (a replicated
        node passes its one pool), or in a pool of the server's own."""
        self.backend = backend
        self.refusal: str | None = None  # when set, the handshake refuses every export
        self.export = export
        self.exports = exports or {export.name: export}
        self.limits = limits or NbdLimits()
        self.tls = tls or NbdTls()
        self.connections: set[NbdConnection] = set()  # past the handshake: attached clients
        self.handshaking: dict[NbdConnection, None] = {}  # in accept order (oldest first)
        self.inflight_bytes = 0  # write payload bytes in flight, all connections
        self.throttled: set[NbdConnection] = set()  # holding because of node_bytes
        self.handshakes_dropped = 0  # timed out, or dropped for a newer connection
        self.stats = IoStats()  # bytes read/written, sampled latency (shell/latency.py)
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=4,
                                                       thread_name_prefix="blockrep-io")
        self.target = target or LocalTarget(backend, self.executor)
        # a Diskless Primary (shell/diskless.py): when set, READ goes to
        # remote_read(offset, length, cb, key) and is answered at cb(key, errno, data);
        # read_error(offset, length, exc) -> True: a failed local read goes there instead
        self.remote_read = None  # set with set_remote_read
        self.read_error = None
        # the loop's busy polling, kicked by the clients and by a node's peer link
        self.busy = BusyPoll(asyncio.get_event_loop(), self.limits.busy_poll_us) \
            if self.limits.busy_poll_us else None

    def set_remote_read(self, fn) -> None:
        """Reads of every connection go to `fn` (a Diskless Primary's peer), or with None
        to the local disk again."""
        self.remote_read = fn
        for conn in [*self.connections, *self.handshaking]:
            conn._route_reads()

    @property
    def requests_inflight(self) -> int:
        """Write-type requests handed to the target and not yet answered."""
        return sum(c._inflight for c in self.connections)

    def resume_throttled(self) -> None:
        """Connections held by the per-server bound read again (each checks its own)."""
        for conn in list(self.throttled):
            conn._maybe_resume()

    async def listen_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: NbdConnection(self), host, port,
                                       reuse_address=True, backlog=128)
        self.servers.append(srv)
        return srv

    async def listen_unix(self, path: str) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        if os.path.exists(path):
            os.unlink(path)
        srv = await loop.create_unix_server(lambda: NbdConnection(self), path)
        self.servers.append(srv)
        return srv

    async def close(self) -> None:
        """Stop accepting, let every connection finish its in-flight requests, close."""
        self.closing = True
        for srv in self.servers:
            srv.close()
        for c in list(self.handshaking):
            c.abort()
        await asyncio.gather(*(c.drain_and_close() for c in list(self.connections)),
                             return_exceptions=True)
        for srv in self.servers:
            await srv.wait_closed()
        if self._own_executor:
            self.executor.shutdown(wait=True)


class NbdConnection(NbdReads, NbdSession, asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer):
        self.server = server
        self.backend = server.backend
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.hs: HandshakeServer | None = HandshakeServer(server.exports,
                                                          server.export.name,
                                                          refusal=server.refusal,
                                                          tls=server.tls.mode)
        self._hs_timer: asyncio.TimerHandle | None = None
        self._limits = lim = server.limits
        self._max_bytes = lim.conn_bytes
        self._max_reqs = lim.conn_requests
        self._node_max = lim.node_bytes
        self._read_batch = lim.read_batch
        self._lost = False
        self._tls_pending = False  # STARTTLS acknowledged, TLS handshake running
        self._submit = server.target.submit
        self._kick = None  # BusyPoll.kick once past the handshake, when busy polling is on
        self._copy = server.target.holds_data  # it keeps the payload: not a view of the ring
        # WRITE: the short path to a target that answers it inline, else the general one
        # (every SAMPLE_EVERY-th receive pass uses _write_timed; a target answering later
        # times its requests itself, see _submit_req)
        if getattr(server.target, "writes_inline", False):
            self._write = self._write_inline
            self._write_timed = self._write_inline_timed
            self._target_write = server.target.write
        else:
            self._write = self._submit_write
            self._write_timed = self._submit_write_timed
        self._complete_scheduled = False
        self._stats = server.stats
        self._tick = SAMPLE_EVERY  # write-type requests until the next timed one
        self._rtick = SAMPLE_EVERY  # receive passes until one whose reads are timed
        self.rules: RequestRules | None = None
        self.structured = False
        self.meta = False
        self._buf = bytearray(HS_BUF)  # the transmission ring replaces it (see _set_ring)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._out: list = []
        self._pool = BufferPool()
        self._loop = asyncio.get_event_loop()
        self._executor = server.executor
        # payload being received outside the ring: (cmd, flags, cookie, offset, length, err)
        self._read_size = RECV_CHUNK  # small right after a large payload (see _process)
        self._pending_payload = None  # (flags, cookie, offset, length, err, write)
        self._payload_view: memoryview | None = None  # None: drain a refused payload
        self._got = 0
        self._inflight = 0  # requests executing asynchronously
        self._wbytes = 0  # write payload bytes of those
        self._held = False  # parsing stopped by a bound; requests may wait in the ring
        self._idle: asyncio.Future | None = None
        self._closing = False
        self._paused_writing = False
        self._dispatch = {
            NbdCmd.READ: self._cmd_read,
            NbdCmd.FLUSH: self._cmd_flush,
            NbdCmd.TRIM: self._cmd_trim,
            NbdCmd.CACHE: self._cmd_cache,
            NbdCmd.WRITE_ZEROES: self._cmd_zero,
            NbdCmd.BLOCK_STATUS: self._cmd_block_status,
        }
        # every SAMPLE_EVERY-th receive pass uses this table: its reads are timed
        self._dispatch_timed = {**self._dispatch, NbdCmd.READ: self._cmd_read_timed}
        self._route_reads()

    # -- receive path ------------------------------------------------------------------------
    def get_buffer(self, sizehint):
        if self._pending_payload is not None:
            if self._payload_view is None:
                return self._mv[:min(RECV_BUF, self._pending_payload[3] - self._got)]
            return self._payload_view[self._got:]
        if self._end >= RECV_BUF - RECV_CHUNK:
            self._compact()
        # at most RECV_CHUNK per read: a large WRITE's header is parsed early and the rest
        # of its payload is received straight into its own buffer
        return self._mv[self._end:self._end + self._read_size]

    def buffer_updated(self, nbytes):
        if self._pending_payload is not None:
            self._got += nbytes
            if self._got < self._pending_payload[3]:
                return
            flags, cookie, offset, length, err, write = self._pending_payload
            view, self._payload_view = self._payload_view, None
            self._pending_payload = None
            if view is None:
                self._reply_err(cookie, err)
                self._flush_out()
            else:
                self._stats.written_bytes += length  # taken back if it fails
                write(flags, cookie, offset, length, view)  # timed if its header's pass was
                self._flush_out()  # an answer given inline
            return
        self._end += nbytes
        if self.hs is not None:
            self._handshake()
        else:
            if self._kick is not None:
                self._kick()
            self._process()

    # -- transmission ------------------------------------------------------------------------
    def _compact(self):
        n = self._end - self._start
        if self._start:
            self._mv[:n] = self._mv[self._start:self._end]
        self._start = 0
        self._end = n

    def _process(self):
        buf = self._buf
        mv = self._mv
        pos = self._start
        end = self._end
        check = self.rules.check
        t = self._rtick = self._rtick - 1
        if t:
            dispatch = self._dispatch
            write = self._write
        else:  # this pass's reads and (inline) writes are timed
            self._rtick = SAMPLE_EVERY
            dispatch = self._dispatch_timed
            write = self._write_timed
        big = False
        nread = 0  # read bytes served in this pass (added to the server's count once)
        nwritten = 0  # write payload bytes taken in (failures are taken back where they fail)
        copy = self._copy
        read_batch = flush_at = self._read_batch  # replies go out every read_batch bytes
        while end - pos >= REQUEST_SIZE and not self._closing and not self._held:
            magic, flags, cmd, cookie, offset, length = _unpack_req(buf, pos)
            if magic != REQUEST_MAGIC:
                log.warning("%s: bad request magic %#x; disconnecting", self.peer, magic)
                self._stats.written_bytes += nwritten
                self._start = self._end = 0
                self._flush_out()
                self._closing = True
                self.transport.close()
                return
            if cmd == 1:  # NbdCmd.WRITE: a payload follows
                err = check(cmd, flags, offset, length)
                have = end - pos - REQUEST_SIZE
                if have >= length:
                    p0 = pos + REQUEST_SIZE
                    pos = p0 + length
                    if err:
                        self._reply_err(cookie, err)
                    else:  # the ring is reused: a target that keeps the data gets a copy
                        nwritten += length
                        write(flags, cookie, offset, length,
                              bytes(mv[p0:pos]) if copy else mv[p0:pos])
                    continue
                if length >= BIG_IO or err:
                    # receive the rest outside the ring (or drain it, for a refused write)
                    self._pending_payload = (flags, cookie, offset, length, err, write)
                    if not err:
                        view = self._payload_view = self._pool.get(length)
                        view[:have] = mv[pos + REQUEST_SIZE:end]
                    self._got = have
                    pos = end
                    big = True
                    break
                if pos + REQUEST_SIZE + length > RECV_BUF:
                    self._start = pos
                    self._compact()
                    pos, end = self._start, self._end
                break  # wait for the rest of the payload
            pos += REQUEST_SIZE
            if cmd == 2:  # NbdCmd.DISC
                self._stats.read_bytes += nread
                self._stats.written_bytes += nwritten
                self._start = self._end = 0
                self._flush_out()
                asyncio.ensure_future(self.drain_and_close())
                return
            err = check(cmd, flags, offset, length)
            if err:
                self._reply_err(cookie, err, cmd)
                continue
            try:
                dispatch[cmd](flags, cookie, offset, length)
            except Exception as exc:  # the backend failed: this request fails, not the server
                if cmd == 0 and self._read_elsewhere(cookie, offset, length, exc):
                    continue  # the disk was detached: the peer answers this read
                if not isinstance(exc, OSError):
                    log.exception("%s: %s failed", self.peer, NbdCmd(cmd).name)
                else:
                    iolog.error("NBD I/O error", "%s: %s at %d+%d failed: %s", self.peer,
                                NbdCmd(cmd).name, offset, length, exc)
                self._reply_err(cookie, nbd_error(exc), cmd, str(exc))
                if cmd == 0:
                    nread -= length
            if cmd == 0:  # READ: bound what waits in memory for a slow reader
                nread += length
                if nread >= flush_at:
                    flush_at = nread + read_batch
                    self._flush_out()
                    if self._paused_writing:
                        self._hold()  # resume_writing parses the rest of the ring
        if nread:
            self._stats.read_bytes += nread
        if nwritten:
            self._stats.written_bytes += nwritten
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos
        # after a large payload the next read is small: it brings the next header and
        # little else, so a following large payload is copied out of the ring only a bit
        self._read_size = SMALL_READ if big else RECV_CHUNK
        self._flush_out()
        if not t and len(self._pool) > POOL_KEEP:  # on the sampled pass: free buffers of a
            self._pool.trim(POOL_KEEP_BYTES)  # burst go back, without a scan on every pass

    def _flush_out(self):
        out = self._out
        if out:
            if not self.transport.is_closing():
                self.transport.writelines(out)
            out.clear()

    def _reply_err(self, cookie: int, err: int, cmd: int = -1, msg: str = ""):
        if self.structured and cmd in (NbdCmd.READ, NbdCmd.BLOCK_STATUS):
            payload = proto.encode_error_payload(err, msg)
            self._out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.ERROR,
                                         cookie, len(payload)))
            self._out.append(payload)
        else:
            self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, err, cookie))

    # -- commands ----------------------------------------------------------------------------
    def _cmd_flush(self, flags, cookie, offset, length):
        self._submit_req(FLUSH, flags, cookie, offset, length, None)

    def _cmd_trim(self, flags, cookie, offset, length):
        self._submit_req(TRIM, flags, cookie, offset, length, None)

    def _cmd_zero(self, flags, cookie, offset, length):
        self._submit_req(ZERO, flags, cookie, offset, length, None)

    # -- asynchronous completion -------------------------------------------------------------
    def _write_inline(self, flags, cookie, offset, length, data):
        """A WRITE to a target that answers it inline (LocalTarget): nothing stays in flight,
        so no accounting of held bytes. Its bytes were counted as written by the caller
        (taken back here on an error)."""
        try:
            self._target_write(offset, data, flags & _FUA)
            err = 0
        except OSError as exc:
            self._stats.written_bytes -= length
            err = self._inline_error(WRITE, offset, length, exc.errno or errno.EIO)
        self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, err, cookie))

    def _write_inline_timed(self, flags, cookie, offset, length, data):
        t0 = _now()
        self._write_inline(flags, cookie, offset, length, data)
        self._stats.by_kind[WRITE].observe(_now() - t0)

    def _inline_error(self, kind, offset, length, err) -> int:
        if err != errno.ENOTSUP:
            iolog.error("NBD I/O error", "%s: %s at %d+%d failed: %s", self.peer,
                        KIND_NAMES[kind], offset, length, os.strerror(err))
        return nbd_errno(err)

    def _submit_write(self, flags, cookie, offset, length, data, timed=None):
        """A WRITE to a target that answers later (the Replicator): its payload is held
        until then, within the connection's and the node's bounds (`timed`: the key of a
        timed one)."""
        self._inflight += 1
        self._wbytes += length
        self.server.inflight_bytes += length
        if timed is None:
            cb, key = self._completed_cb, (cookie, length)
        else:
            cb, key = self._completed_timed, timed
        # the neutral form (shell/target.py): no NBD flag bits beyond this point
        err = self._submit(WRITE, offset, length, data, flags & _FUA, True, 0, cb, key)
        if err is not None:
            self._answered(WRITE, cookie, offset, length, length, err, timed)
        else:
            self._bound()

    def _submit_write_timed(self, flags, cookie, offset, length, data):
        self._submit_write(flags, cookie, offset, length, data, (cookie, length, WRITE, _now()))

    def _submit_req(self, kind, flags, cookie, offset, length, data):
        """Hand a FLUSH, TRIM or WRITE_ZEROES to the target: it answers inline (a
        LocalTarget's page-cache write) or calls back when its promise holds."""
        self._inflight += 1
        t = self._tick = self._tick - 1
        if t:
            cb, key = self._completed_cb, (cookie, 0)
        else:  # every SAMPLE_EVERY-th request is timed
            self._tick = SAMPLE_EVERY
            cb, key = self._completed_timed, (cookie, 0, kind, _now())
        # the neutral form (shell/target.py): no NBD flag bits beyond this point
        err = self._submit(kind, offset, length, data, flags & _FUA, not flags & _NO_HOLE,
                           flags & _FAST_ZERO, cb, key)
        if err is not None:
            self._answered(kind, cookie, offset, length, 0, err, None if t else key)
        else:
            self._bound()

    def _bound(self) -> None:
        """Stop parsing while this connection or the node holds too much in flight."""
        srv = self.server
        if self._wbytes >= self._max_bytes or self._inflight >= self._max_reqs:
            self._hold()
        elif srv.inflight_bytes >= self._node_max:
            srv.throttled.add(self)
            self._hold()

    def _answered(self, kind, cookie, offset, length, n, err, key) -> None:
        """The target answered inline: nothing of the request (n payload bytes held) stays
        in flight; `key` of a timed request."""
        self._inflight -= 1
        self._wbytes -= n
        self.server.inflight_bytes -= n
        if key is not None:
            self._stats.by_kind[kind].observe(_now() - key[3])
        if err:
            self._stats.written_bytes -= n  # a WRITE counted by the caller failed
            err = self._inline_error(kind, offset, length, err)
        self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, err, cookie))

    def _completed_cb(self, key, err):
        """A target's answer: errno (0 = done) for the request `key` = (cookie, bytes)."""
        self._inflight -= 1
        n = key[1]
        if n and not self._lost:  # completions still due do not count twice (nbd_session)
            self._wbytes -= n
            self.server.inflight_bytes -= n
        if err:
            self._stats.written_bytes -= n  # counted when it came in: it failed
            err = nbd_errno(err)
        self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, err, key[0]))
        if not self._complete_scheduled:  # coalesce replies completed in one loop step
            self._complete_scheduled = True
            self._loop.call_soon(self._flush_completed)
        if self._idle is not None:
            self._wake_idle()

    def _completed_timed(self, key, err):
        """The answer to a timed request: `key` = (cookie, bytes, kind, start)."""
        self._stats.by_kind[key[2]].observe(_now() - key[3])
        self._completed_cb(key, err)

    def _flush_completed(self):
        self._complete_scheduled = False
        self._flush_out()  # (dropped if the transport is closing)
        if self._held:
            self._maybe_resume()
        srv = self.server
        if srv.throttled and srv.inflight_bytes * 4 < self._node_max * 3:
            srv.resume_throttled()
        if not self._inflight and len(self._pool) > POOL_KEEP:
            self._pool.trim(POOL_KEEP_BYTES)

    def _wake_idle(self):
        if self._idle is not None and not self._idle.done() and (
                self._inflight == 0 or self.transport.is_closing()):
            self._idle.set_result(None)

    async def drain_and_close(self):
        """Stop reading, finish what is in flight, send the replies, close."""
        self._closing = True
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.pause_reading()
        if self._inflight:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle
        self._flush_out()
        self.transport.close()
