"""Resource bounds of the NBD server measured on real processes (RSS from /proc/PID/status):
connections that never finish the handshake are closed at the deadline (a trickle does not
extend it) and cost little, at most `--max-handshakes` of them exist at once, a legitimate
client keeps working meanwhile; half-open connections never count as attached clients
(`secondary` and `down` work); a client that pipelines reads and never reads the replies
makes the server pause reading instead of buffering (docs/nbd.md, "Bounds")."""

from __future__ import annotations

import os
import selectors
import socket

import threading
import time

import pytest
from support.helpers import wait_for
from support.nbd_testlib import MiB, RawClient, recv_exact

from blockrep.nbd import proto
from blockrep.nbd.constants import ClientFlag, NbdCmd, NbdOpt

# a LIST option announcing a 1 MiB payload, sent one byte at a time: never completes
TRICKLE = (proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
           + proto.encode_option_header(NbdOpt.LIST, MiB) + bytes(64))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class HalfOpen:
    """`n` connections that never finish the handshake; every other one trickles a byte
    per `every` seconds. Tracks when each is closed by the server."""

    def __init__(self, port: int, n: int, every: float = 0.25):
        self.sel = selectors.DefaultSelector()
        self.socks = []
        self.opened = []
        self.closed_at: dict[int, float] = {}
        self.sent = [0] * n
        self.every = every
        self.next_trickle = time.monotonic()
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            self.socks.append(s)
            self.opened.append(time.monotonic())
            self.sel.register(s, selectors.EVENT_READ, i)

    def _close(self, i: int) -> None:
        if i not in self.closed_at:
            self.closed_at[i] = time.monotonic()
            self.sel.unregister(self.socks[i])

    def step(self, wait: float = 0.05) -> None:
        for key, _ in self.sel.select(wait):
            try:
                if key.fileobj.recv(4096) == b"":  # the greeting is read and dropped
                    self._close(key.data)
            except (ConnectionResetError, BrokenPipeError):
                self._close(key.data)
        now = time.monotonic()
        if now >= self.next_trickle:
            self.next_trickle = now + self.every
            for i in range(1, len(self.socks), 2):
                if i in self.closed_at or self.sent[i] >= len(TRICKLE):
                    continue
                try:
                    self.socks[i].send(TRICKLE[self.sent[i]:self.sent[i] + 1])
                    self.sent[i] += 1
                except (ConnectionResetError, BrokenPipeError):
                    self._close(i)
                except BlockingIOError:
                    pass

    def all_closed(self) -> bool:
        return len(self.closed_at) == len(self.socks)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.sel.close()


def _legit_io(client: RawClient, round_: int) -> None:
    block = os.urandom(4096)
    off = (round_ % 1024) * 4096
    assert client.write(off, block) == 0
    assert client.read(off, 4096) == (0, block)


@pytest.mark.parametrize("n", [500])
def test_half_open_connections_are_capped_and_closed(serve, n):
    """500 connections that never finish the handshake, against the default cap (64 in the
    handshake at once, the oldest dropped) and a 3 s deadline."""
    srv = serve("64M", "--handshake-timeout", "3")
    pid = srv.proc.pid
    with RawClient(srv.port) as legit:
        legit.handshake()
        _legit_io(legit, 0)
        base = peak = rss_kib(pid)
        half = HalfOpen(srv.port, n)
        rounds = newcomers = 0
        try:
            deadline = time.monotonic() + 3 + 10
            while not half.all_closed() and time.monotonic() < deadline:
                half.step()
                rounds += 1
                _legit_io(legit, rounds)
                if rounds % 10 == 1:  # a new legitimate client gets in meanwhile
                    with RawClient(srv.port, timeout=10) as late:
                        late.handshake()
                        _legit_io(late, rounds + 1)
                        late.disconnect()
                    newcomers += 1
                peak = max(peak, rss_kib(pid))
            closed = len(half.closed_at)
            last = max(half.closed_at.values(), default=0) - half.opened[0]
        finally:
            half.close()
        _legit_io(legit, rounds + 2)
        legit.disconnect()
    print(f"{n} half-open connections: all closed {last:.1f} s after the first was opened; "
          f"server RSS {base} KiB before, peak {peak} KiB (+{peak - base} KiB); legitimate "
          f"client did {rounds} write+read rounds meanwhile, {newcomers} new clients got in")
    assert closed == n, f"only {closed} of {n} half-open connections were closed"
    assert peak - base < 16 * 1024, (base, peak)
    assert newcomers >= 1


def test_handshake_deadline_is_not_extended_by_a_trickle(serve):
    """With room for all of them, 300 half-open connections (half trickling a byte every
    0.25 s) are closed at the 2 s deadline, not before, not much later."""
    n = 300
    srv = serve("16M", "--handshake-timeout", "2", "--max-handshakes", "1000")
    pid = srv.proc.pid
    base = peak = rss_kib(pid)
    half = HalfOpen(srv.port, n)
    try:
        deadline = time.monotonic() + 2 + 15
        while not half.all_closed() and time.monotonic() < deadline:
            half.step()
            peak = max(peak, rss_kib(pid))
        ages = [half.closed_at[i] - half.opened[i] for i in half.closed_at]
        trickled = max(half.sent[1::2])
    finally:
        half.close()
    print(f"{n} half-open connections: closed after {min(ages):.2f}..{max(ages):.2f} s "
          f"(deadline 2 s; tricklers sent up to {trickled} bytes); server RSS {base} KiB "
          f"before, peak {peak} KiB (+{peak - base} KiB, {(peak - base) / n:.1f} KiB each)")
    assert len(ages) == n
    assert min(ages) > 1.8 and max(ages) < 2 + 8, (min(ages), max(ages))
    assert trickled >= 4  # they did trickle
    assert peak - base < 32 * 1024, (base, peak)


def test_pipelined_reads_never_read_pause_the_server(serve):
    """A client sends 400 READs of 1 MiB and reads no reply: the server stops reading
    requests once a read batch waits for the socket (instead of building 400 MiB of
    replies); when the client reads, every reply arrives, in order, correct."""
    srv = serve("64M")
    pid = srv.proc.pid
    with open(srv.disk, "r+b") as f:
        pattern = os.urandom(MiB)
        f.write(pattern)
    with RawClient(srv.port) as c:
        c.handshake()
        base = rss_kib(pid)
        n = 400
        reqs = b"".join(proto.encode_request(NbdCmd.READ, 0, i + 1, 0, MiB) for i in range(n))
        sender = threading.Thread(target=c.sock.sendall, args=(reqs,))
        sender.start()
        peak = base
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            peak = max(peak, rss_kib(pid))
            time.sleep(0.05)
        for i in range(n):
            err, cookie = c.simple_reply()
            assert (err, cookie) == (0, i + 1)
            assert recv_exact(c.sock, MiB) == pattern
        sender.join(30)
        c.disconnect()
    print(f"{n} x 1 MiB reads pipelined, replies unread for 3 s: server RSS {base} KiB "
          f"before, peak {peak} KiB (+{peak - base} KiB)")
    assert peak - base < 48 * 1024, (base, peak)


def test_half_open_connections_are_not_attached_clients(cluster):
    """Idle TCP connections and connections part way through the handshake do not block
    `secondary` or `down` (they used to count as attached NBD clients)."""
    c = cluster(size="16M")
    c.up_pair("alpha")
    port = c.nbd_port("alpha")
    socks = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            recv_exact(s, 18)  # the greeting: the server has accepted it
            if i % 2:
                s.sendall(TRICKLE[:10])
            socks.append(s)
        assert c.status("alpha")["nbd"]["clients"] == 0
        with RawClient(port) as real:  # a real client counts, and refuses `secondary`
            real.handshake()
            wait_for(lambda: c.status("alpha")["nbd"]["clients"] == 1, timeout=10,
                     what="one attached client")
            res = c.cli("alpha", "secondary", check=False)
            assert res.returncode != 0 and "attached" in res.stderr + res.stdout
            real.disconnect()
        wait_for(lambda: c.status("alpha")["nbd"]["clients"] == 0, timeout=10,
                 what="no attached client")
        c.cli("alpha", "secondary")
        c.cli("alpha", "down")
        wait_for(lambda: c.procs["alpha"].poll() is not None, timeout=30, what="alpha down")
    finally:
        for s in socks:
            s.close()




def test_replicated_writes_bounded_while_the_peer_is_stopped(cluster):
    """With the Secondary SIGSTOPped, protocol C holds every write until the peer is
    declared lost; a client pipelining 256 x 1 MiB writes meets the per-connection bound
    (64 MiB in flight) and is paused instead of buffered; every write completes after."""
    import signal

    c = cluster(size="320M")
    c.up_pair("alpha")
    pid = c.procs["alpha"].pid
    port = c.nbd_port("alpha")
    n = 256
    block = os.urandom(MiB)
    with RawClient(port) as cl:
        cl.handshake()
        assert cl.write(0, block) == 0
        base = peak = rss_kib(pid)
        c.procs["beta"].send_signal(signal.SIGSTOP)
        try:
            def send():
                for i in range(n):
                    cl.sock.sendall(proto.encode_request(NbdCmd.WRITE, 0, i + 1, i * MiB, MiB)
                                    + block)
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            t_end = time.monotonic() + 2.5  # the peer is declared lost after 3 s
            while time.monotonic() < t_end:
                peak = max(peak, rss_kib(pid))
                time.sleep(0.05)
        finally:
            c.procs["beta"].send_signal(signal.SIGCONT)
        errs = [cl.simple_reply()[0] for _ in range(n)]
        sender.join(60)
        cl.disconnect()
    print(f"{n} x 1 MiB replicated writes pipelined with the peer stopped: primary RSS "
          f"{base} KiB before, peak {peak} KiB (+{peak - base} KiB) in the first 2.5 s")
    assert errs == [0] * n
    assert peak - base < 100 * 1024, (base, peak)  # 64 MiB in flight + one request

