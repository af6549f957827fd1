"""The link proxy (blockrep/faults/proxy.py) with real sockets on loopback: delay and jitter
(measured, asserted only as lower bounds), the bandwidth cap, cut, refuse, blackhole and byte
flips as a peer sees them, the control socket and signals of the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from support.helpers import PY, ROOT, wait_for

from blockrep.faults.proxy import ProxyError, ProxyThread, control
from blockrep.faults.shaping import Schedule, Shape, parse_rate


class EchoServer:
    """Echoes every byte back; counts bytes; one thread per connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns: list[socket.socket] = []
        self.closed_by_peer = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c):
        try:
            while data := c.recv(1 << 16):
                self.received += len(data)
                c.sendall(data)
        except OSError:
            pass
        self.closed_by_peer.set()

    def close(self):
        for s in (self.sock, *self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def echo():
    srv = EchoServer()
    yield srv
    srv.close()


@pytest.fixture
def proxy(echo):
    with ProxyThread(("127.0.0.1", echo.port), seed=1) as p:
        yield p


def connect(p, timeout=10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_n(s, n) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def rtt(s, rounds=10, size=16) -> list[float]:
    times = []
    for i in range(rounds):
        t0 = time.monotonic()
        s.sendall(bytes([i]) * size)
        recv_n(s, size)
        times.append(time.monotonic() - t0)
    return times


def closed_by_peer(s, timeout=10.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# -- the pure link model ---------------------------------------------------------------------------

def test_schedule_delay_rate_and_order():
    s = Schedule(Shape(delay=0.010, rate=1000.0))
    assert s.release_time(0.0, 500) == pytest.approx(0.510)  # 0.5 s on the wire + 10 ms
    assert s.release_time(0.0, 500) == pytest.approx(1.010)  # queued behind the first
    j = Schedule(Shape(delay=0.010, jitter=0.050))
    times = [j.release_time(i * 0.001, 1) for i in range(200)]
    assert times == sorted(times)  # jitter never reorders a stream
    assert all(t >= i * 0.001 + 0.010 for i, t in enumerate(times))


def test_parse_rate():
    assert parse_rate("8M") == 1e6 and parse_rate("1G") == 1.25e8 and parse_rate("0") == 0
    assert parse_rate("100Mbit") == 12.5e6 and parse_rate(800) == 100
    with pytest.raises(ValueError):
        parse_rate("fast")


# -- real sockets -----------------------------------------------------------------------------------

def test_clean_link_echoes(proxy):
    with connect(proxy) as s:
        payload = os.urandom(300_000)
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        assert recv_n(s, len(payload)) == payload
    st = proxy.stats()
    assert st["bytes"]["fwd"] == st["bytes"]["rev"] == len(payload)


def test_delay_and_jitter_are_lower_bounds(proxy):
    with connect(proxy) as s:
        base = min(rtt(s))
        proxy.shape(delay_ms=20)
        delayed = rtt(s)
        proxy.shape(direction="rev", jitter_ms=30)
        jittered = rtt(s, rounds=20)
    print(f"\nRTT: clean {base * 1000:.2f} ms; delay 20 ms each way: min "
          f"{min(delayed) * 1000:.1f} / max {max(delayed) * 1000:.1f} ms; + jitter 30 ms "
          f"(rev): min {min(jittered) * 1000:.1f} / max {max(jittered) * 1000:.1f} ms")
    assert min(delayed) >= 0.040
    assert min(jittered) >= 0.040


def test_bandwidth_cap(proxy):
    proxy.shape(direction="fwd", rate="8M")  # 1 MB/s toward the server
    n = 1_500_000
    with connect(proxy) as s:
        t0 = time.monotonic()
        threading.Thread(target=s.sendall, args=(bytes(n),), daemon=True).start()
        recv_n(s, n)
        elapsed = time.monotonic() - t0
    rate = n / elapsed
    print(f"\ncap 1.00 MB/s: {n} bytes in {elapsed:.2f} s = {rate / 1e6:.3f} MB/s")
    assert rate <= 1e6 * 1.05  # never faster than the cap (plus one chunk of slack)


def test_a_fast_cap_adds_no_timer_tick_per_chunk(proxy):
    """At 1 Gbit/s a 4 KiB chunk is on the wire for 33 us: the shaped round trip must stay
    close to the clean one (a sleep that cost a timer tick per chunk would not). Compared
    within one run, not against a wall-clock figure."""
    with connect(proxy) as s:
        rtt(s, rounds=20, size=4096)  # warm up
        clean = sorted(rtt(s, rounds=200, size=4096))[100]
        proxy.shape(rate="1G")
        shaped = sorted(rtt(s, rounds=200, size=4096))[100]
    print(f"\nmedian RTT: clean {clean * 1e6:.0f} us, 1 Gbit/s cap {shaped * 1e6:.0f} us")
    assert shaped < clean * 3 + 0.0008, (clean, shaped)


def test_cut_resets_both_sides_and_new_connections_work(proxy, echo):
    s = connect(proxy)
    rtt(s, 1)
    assert proxy.cut() == 1
    assert closed_by_peer(s)
    assert echo.closed_by_peer.wait(10)
    s.close()
    with connect(proxy) as s2:
        rtt(s2, 1)


def test_refuse_resets_new_connections(proxy, echo):
    proxy.refuse(True)
    with connect(proxy) as s:
        assert closed_by_peer(s)
    assert echo.conns == []
    proxy.refuse(False)
    with connect(proxy) as s:
        rtt(s, 1)


def test_blackhole_holds_bytes_keeps_sockets_open_then_flows(proxy, echo):
    s = connect(proxy)
    rtt(s, 1)
    proxy.blackhole(True)
    s.sendall(b"x" * 1000)
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):  # nothing comes back, and the socket stays open
        s.recv(1)
    assert echo.received == 16 and not echo.closed_by_peer.is_set()
    assert proxy.stats()["blackhole"] and proxy.stats()["connections"] == 1
    proxy.blackhole(False)
    s.settimeout(10)
    assert recv_n(s, 1000) == b"x" * 1000  # held, not lost
    s.close()


def test_blackhole_drop_loses_bytes(proxy, echo):
    with connect(proxy) as s:
        rtt(s, 1)
        proxy.blackhole(True, drop=True)
        s.sendall(b"lost" * 100)
        wait_for(lambda: s.send(b"") == 0, what="send")  # the socket is still writable
        time.sleep(0.3)  # give the proxy a chance to (wrongly) forward
        proxy.blackhole(False)
        s.sendall(b"kept")
        assert recv_n(s, 4) == b"kept"
    assert echo.received == 16 + 4


def test_flip_corrupts_one_byte(proxy):
    proxy.flip(direction="fwd", count=1, min_chunk=1000)
    payload = bytes(range(256)) * 16  # 4096 bytes
    with connect(proxy) as s:
        s.sendall(b"small")  # below min_chunk: untouched
        assert recv_n(s, 5) == b"small"
        s.sendall(payload)
        got = recv_n(s, len(payload))
        s.sendall(payload)
        again = recv_n(s, len(payload))
    diff = [i for i in range(len(payload)) if got[i] != payload[i]]
    assert len(diff) == 1, diff
    assert got[diff[0]] == payload[diff[0]] ^ 0xFF
    assert again == payload  # count=1: once only
    flipped = proxy.stats()["flipped"]
    assert len(flipped) == 1 and flipped[0]["direction"] == "fwd"


def test_bad_commands_are_refused(proxy):
    with pytest.raises(ProxyError):
        proxy.command("explode")
    with pytest.raises(ProxyError):
        proxy.shape(direction="sideways", delay_ms=1)
    with pytest.raises(ProxyError):
        proxy.shape(rate="fast")


def test_command_line_control_socket_and_signals(echo, tmp_path):
    sock = str(tmp_path / "proxy.sock")
    proc = subprocess.Popen([PY, "-m", "blockrep.faults.proxy", "--listen", "127.0.0.1:0",
                             "--to", f"127.0.0.1:{echo.port}", "--delay-ms", "15",
                             "--control", sock], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        wait_for(lambda: os.path.exists(sock), what="control socket")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert min(rtt(s, 3)) >= 0.030
            ctl = subprocess.run([PY, "-m", "blockrep.faults.proxy", "ctl", sock, "shape",
                                  "direction=both", "delay_ms=0"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
            assert ctl.returncode == 0, ctl.stderr
            assert control(sock, "stats")["shape"]["fwd"]["delay_ms"] == 0
            proc.send_signal(signal.SIGUSR1)  # blackhole on
            wait_for(lambda: control(sock, "stats")["blackhole"], what="blackhole")
            proc.send_signal(signal.SIGUSR2)  # cut
            assert closed_by_peer(s)
        assert control(sock, "stats")["counts"]["cuts"] == 1
        bad = subprocess.run([PY, "-m", "blockrep.faults.proxy", "ctl", sock, "nope"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "unknown command" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
    assert not os.path.exists(sock)


def test_flip_at_a_chosen_position(proxy):
    proxy.flip(direction="rev", count=2, at=3)
    with connect(proxy) as s:
        s.sendall(b"abcdefgh")
        got = recv_n(s, 8)
        s.sendall(b"xy")  # shorter than `at`: its last byte
        got2 = recv_n(s, 2)
    assert got == b"abc" + bytes([ord("d") ^ 0xFF]) + b"efgh"
    assert got2 == b"x" + bytes([ord("y") ^ 0xFF])


def test_a_shaped_direction_holds_what_a_real_link_would():
    """In flight (rate x delay) plus a 20 ms bottleneck queue, at least 64 KiB; unshaped
    directions are bounded by the proxy's own buffer only."""
    from blockrep.faults.shaping import Shape, parse_rate

    assert Shape().holds() == 0
    assert Shape(delay=0.025, rate=parse_rate("100M")).holds() == int(12.5e6 * 0.045)
    assert Shape(delay=0.0, rate=parse_rate("1M")).holds() == 64 * 1024
