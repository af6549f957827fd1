"""Flow control of an NBD connection, driven in-process with a fake transport: the bounds
pause reading (and parsing) and completions resume it; nothing is lost or reordered."""

from __future__ import annotations

import asyncio

import pytest

from blockrep.nbd import proto
from blockrep.nbd.constants import ClientFlag, NbdCmd, NbdOpt
from blockrep.nbd.handshake import Export
from blockrep.nbd.constants import TransmissionFlag as TF
from blockrep.shell.nbd_limits import NbdLimits
from blockrep.shell.latency import SAMPLE_EVERY
from blockrep.shell.nbd_server import NbdConnection, NbdServer


class FakeTransport:
    def __init__(self):
        self.paused = False
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        self.out += data

    def writelines(self, parts):
        for p in parts:
            self.out += p

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self):
        return self.closed

    def abort(self):
        self.closed = True

    close = abort


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


def feed(conn, data: bytes):
    """Deliver bytes as the transport would, while reading is not paused."""
    pos = 0
    while pos < len(data) and not conn.transport.paused:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
    return pos


def attach(server, loop):
    conn = NbdConnection(server)
    tr = FakeTransport()
    conn.connection_made(tr)
    hello = (proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
             + proto.encode_option(NbdOpt.GO, proto.encode_info_request("", [])))
    assert feed(conn, hello) == len(hello)
    assert conn.hs is None and conn in server.connections
    tr.out.clear()
    return conn, tr


def make_server(limits, pending):
    export = Export("", 1 << 30, TF.HAS_FLAGS | TF.SEND_FLUSH)
    return NbdServer(None, export, limits=limits, target=_HeldTarget(pending))


class _HeldTarget:
    """Answers nothing by itself: each answer waits in `pending` until the test calls it."""
    holds_data = True

    def __init__(self, pending):
        self.pending = pending

    def submit(self, kind, off, n, data, fua, may_trim, fast_zero, cb, key):
        # the answer keeps the payload alive, as a target that holds data does
        self.pending.append(lambda err, data=data: cb(key, err))


def writes(n, size=4096, first_cookie=1):
    return b"".join(proto.encode_request(NbdCmd.WRITE, 0, first_cookie + i, i * size, size)
                    + bytes(size) for i in range(n))


def replies(tr):
    out = bytes(tr.out)
    return [proto.decode_simple_reply(out[i:i + 16])[0] for i in range(0, len(out), 16)]


def test_handshake_pause_for_a_slow_reader_resumes(loop):
    server = make_server(NbdLimits(), [])
    conn = NbdConnection(server)
    tr = FakeTransport()
    conn.connection_made(tr)
    conn.pause_writing()
    assert tr.paused
    conn.resume_writing()
    assert not tr.paused


def test_requests_in_flight_per_connection(loop):
    pending = []
    server = make_server(NbdLimits(conn_requests=8), pending)
    conn, tr = attach(server, loop)
    data = writes(20)
    sent = feed(conn, data)
    assert len(pending) == 8 and tr.paused  # the rest waits in the ring or the socket
    while len(replies(tr)) < 20:
        if not tr.paused and sent < len(data):
            sent += feed(conn, data[sent:])
        for cb in pending[:]:
            pending.remove(cb)
            cb(0)
        loop.run_until_complete(asyncio.sleep(0))
        assert len(pending) <= 8
    assert sorted(c for _, c in replies(tr)) == list(range(1, 21))
    assert server.inflight_bytes == 0


def test_bytes_in_flight_per_server(loop):
    pending = []
    server = make_server(NbdLimits(node_bytes=64 * 1024), pending)
    a, ta = attach(server, loop)
    b, tb = attach(server, loop)
    feed(a, writes(20, first_cookie=1))
    assert ta.paused and server.inflight_bytes == 16 * 4096  # 4 wait in a's ring
    feed(b, writes(10, first_cookie=100))
    assert tb.paused and b in server.throttled and len(pending) == 17  # 9 wait in b's
    for cb in pending[:12]:  # 5 left in flight: under 3/4 of the bound, both resume
        cb(0)
    del pending[:12]
    loop.run_until_complete(asyncio.sleep(0))
    assert len(pending) > 5 and server.inflight_bytes <= 64 * 1024 + 4096
    while pending:
        pending.pop(0)(0)
        loop.run_until_complete(asyncio.sleep(0))
    assert len(replies(ta)) == 20 and len(replies(tb)) == 10
    assert not ta.paused and not tb.paused and not server.throttled
    assert server.inflight_bytes == 0


def test_lost_connection_frees_its_share(loop):
    pending = []
    server = make_server(NbdLimits(node_bytes=64 * 1024), pending)
    a, ta = attach(server, loop)
    b, tb = attach(server, loop)
    feed(a, writes(16))
    feed(b, writes(1, first_cookie=50))
    assert tb.paused and b in server.throttled
    a.connection_lost(None)
    loop.run_until_complete(asyncio.sleep(0))
    assert server.inflight_bytes == 4096 and not tb.paused
    for cb in pending:  # late completions of the lost connection count nothing twice
        cb(0)
    loop.run_until_complete(asyncio.sleep(0))
    assert server.inflight_bytes == 0


def test_slow_reader_with_requests_in_flight_resumes(loop):
    """The socket fills while many requests are in flight (under their bound): once the
    client reads again and the requests complete, reading resumes."""
    pending = []
    server = make_server(NbdLimits(conn_requests=8), pending)
    conn, tr = attach(server, loop)
    feed(conn, writes(7))
    assert len(pending) == 7 and not tr.paused
    conn.pause_writing()
    assert tr.paused
    conn.resume_writing()  # 7 of 8 in flight: above 3/4, stays paused for now
    for cb in pending:
        cb(0)
    loop.run_until_complete(asyncio.sleep(0))
    assert not tr.paused
    assert feed(conn, writes(2, first_cookie=10)) > 0 and len(pending) == 9


def test_small_requests_do_not_rescan_a_pool_of_buffers_in_use(loop):
    """Large payloads held by the target keep their pool buffers in use; with more of them
    than POOL_KEEP the pool cannot shrink, and small requests must not scan it on every
    receive pass (it is trimmed after a pass that took a buffer, or when nothing is in
    flight)."""
    from blockrep.shell import nbd_server
    from blockrep.shell.buffers import BufferPool

    class CountingPool(BufferPool):
        __slots__ = ()
        trims = 0

        def trim(self, keep_bytes):
            CountingPool.trims += 1
            return super().trim(keep_bytes)

    pending = []
    server = make_server(NbdLimits(), pending)
    conn, tr = attach(server, loop)
    conn._pool = CountingPool()
    big = nbd_server.BIG_IO
    n = nbd_server.POOL_KEEP_BYTES // (1 << 20) + 2  # buffers are at least 1 MiB
    feed(conn, writes(n, size=big))
    assert len(conn._pool) == n and len(pending) == n
    before = CountingPool.trims
    for i in range(50):  # 50 receive passes of one small write each
        feed(conn, proto.encode_request(NbdCmd.WRITE, 0, 1000 + i, 0, 512) + bytes(512))
    assert CountingPool.trims - before <= 50 // SAMPLE_EVERY + 1  # on the sampled passes
    while pending:
        pending.pop(0)(0)
    loop.run_until_complete(asyncio.sleep(0))
    # nothing in flight: the free buffers beyond POOL_KEEP_BYTES are given back
    assert sum(map(len, conn._pool)) <= nbd_server.POOL_KEEP_BYTES


def test_a_read_only_connection_gives_back_the_buffers_of_a_burst(tmp_path, loop):
    """Large READs take their buffers from the pool (a burst of them, many at once); once
    they are sent, later receive passes give the free ones back beyond POOL_KEEP_BYTES,
    though nothing is ever written on this connection."""
    from blockrep.disk import Disk
    from blockrep.shell import nbd_server

    path = tmp_path / "disk"
    path.write_bytes(bytes(64 << 20))
    disk = Disk(str(path))
    export = Export("", disk.size, TF.HAS_FLAGS | TF.SEND_FLUSH)
    server = NbdServer(disk, export)
    try:
        conn, tr = attach(server, loop)
        kept = []
        tr.writelines = kept.extend  # a slow client: the transport keeps what it queued
        burst = b"".join(proto.encode_request(NbdCmd.READ, 0, i + 1, i << 20, 1 << 20)
                         for i in range(32))
        feed(conn, burst)
        assert sum(map(len, conn._pool)) >= 32 << 20  # the burst's buffers, all in use
        kept.clear()  # sent at last: the buffers are free
        for i in range(2 * SAMPLE_EVERY):  # small reads, one pass each
            feed(conn, proto.encode_request(NbdCmd.READ, 0, 100 + i, 0, 4096))
        assert sum(map(len, conn._pool)) <= nbd_server.POOL_KEEP_BYTES
    finally:
        disk.close()
        server.executor.shutdown(wait=True)


def test_large_writes_are_timed_too(loop):
    """One receive pass in SAMPLE_EVERY is timed; a large WRITE whose payload arrives after
    its header's pass is timed when that pass was (its latency is in the histogram)."""
    from blockrep.shell import nbd_server
    pending = []
    server = make_server(NbdLimits(), pending)
    conn, tr = attach(server, loop)
    big = nbd_server.BIG_IO
    for i in range(2 * SAMPLE_EVERY):  # one pass per header, the payload after it
        req = proto.encode_request(NbdCmd.WRITE, 0, i + 1, i * big, big)
        feed(conn, req)
        feed(conn, bytes(big))
        pending.pop(0)(0)
    loop.run_until_complete(asyncio.sleep(0))
    assert len(replies(tr)) == 2 * SAMPLE_EVERY
    assert server.stats.latency["write"].snapshot()[1] >= 1
