"""The peer link against an attacker on the network (docs/security.md): two real nodes and a
party without the secret. A byte pipe between the two nodes' link ports (the relay that
worked against link protocol 1), a reflection of the dialer's own nonce and proof, a
replayed transcript: all refused, and the legitimate link is never disturbed (no
disconnect, a client write still replicates). Before authentication a connection costs
little: 200 connections announcing 64 MiB payloads leave the node's RSS within the bound
docs/security.md gives, and a trickle is closed at the handshake deadline."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

from support.helpers import require_tool, wait_for
from support.repltools import MiB, qemu_io, read_at

from blockrep.peer import proto
from blockrep.peer.proto import HEADER_SIZE, P

RSS_BOUND = 16 * MiB  # docs/security.md: growth of a node's RSS under the 200-connection flood


# -- small attacker tools ---------------------------------------------------------------------

def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_packet(s: socket.socket) -> tuple[int, bytes] | None:
    """One packet (type, raw packet bytes), or None when the node closed the connection."""
    def exactly(n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = s.recv(n - len(buf))
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf
    head = exactly(HEADER_SIZE)
    if head is None:
        return None
    ptype, paylen = struct.unpack_from(">H", head, 4)[0], struct.unpack_from(">I", head, 28)[0]
    body = exactly(paylen) if paylen else b""
    return None if body is None else (ptype, head + body)


def body_of(packet: bytes) -> dict:
    return proto.decode_control(packet[HEADER_SIZE:])


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the node closes the connection within `timeout` (whatever it sends)."""
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


class Events:
    """A subscriber on a node's admin socket: every event it emits from now on."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(json.dumps({"cmd": "events"}).encode() + b"\n")
        self.f = self.sock.makefile("rb")
        json.loads(self.f.readline())  # the status snapshot

    def kinds(self) -> list[str]:
        self.sock.settimeout(0.3)
        out = []
        try:
            while line := self.f.readline():
                out.append(json.loads(line)["event"])
        except (socket.timeout, OSError):
            pass
        return out

    def close(self) -> None:
        self.f.close()
        self.sock.close()


class ScriptedPeer:
    """Listens where alpha dials beta. Connection i is handled by script[i] (a function of
    the accepted socket) while there is one, then forwarded to beta's real port; the first
    forwarded connection's alpha->beta bytes are recorded (a network attacker's capture)."""

    def __init__(self, target_port: int, script: list):
        self.target = target_port
        self.script = list(script)
        self.recorded = bytearray()
        self.results: list = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.forwarded = 0
        self._socks: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self._socks.append(s)
            if self.script:
                step = self.script.pop(0)
                threading.Thread(target=lambda: self.results.append(step(s)),
                                 daemon=True).start()
            else:
                try:
                    t = socket.create_connection(("127.0.0.1", self.target))
                except OSError:  # beta not listening yet: alpha dials again
                    s.close()
                    continue
                self._socks.append(t)
                self.forwarded += 1
                record = self.forwarded == 1
                threading.Thread(target=self._pipe, args=(s, t, record), daemon=True).start()
                threading.Thread(target=self._pipe, args=(t, s, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while data := src.recv(1 << 16):
                if record and len(self.recorded) < 1 << 20:
                    self.recorded += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.lsock.close()
        for s in self._socks:
            s.close()


def reflect_nonce(s: socket.socket) -> str:
    """Posing as beta: send alpha's own HELLO back (names swapped, alpha's nonce)."""
    typ, pkt = read_packet(s)
    hello = body_of(pkt)
    s.sendall(proto.encode_control(P.HELLO, {**hello, "node": "beta", "peer": "alpha"}))
    got = read_packet(s)
    return "no proof given" if got is None or got[0] != P.AUTH else "PROOF GIVEN"


def reflect_proof(s: socket.socket) -> str:
    """Posing as beta with a fresh nonce; alpha proves itself; its proof goes back to it as
    if it were beta's."""
    typ, pkt = read_packet(s)
    s.sendall(proto.encode_control(P.HELLO, {"version": proto.VERSION, "features": 0,
                                             "resource": "r0", "node": "beta",
                                             "peer": "alpha", "nonce": os.urandom(32)}))
    typ, auth = read_packet(s)
    assert typ == P.AUTH
    s.sendall(auth)
    got = read_packet(s)
    return body_of(got[1])["reason"] if got and got[0] == P.REFUSE else f"answer {got}"


def write_replicates(c, offset: int, byte: int) -> None:
    """A client write on alpha reaches beta's disk."""
    before = c.admin("beta")["counters"]["writes_applied"]
    qemu_io(c.uri("alpha"), f"write -P {byte:#x} {offset} 1M")
    c.wait_status("beta", lambda s: s["counters"]["writes_applied"] > before, 20,
                  "the write applied on beta", fast=True)
    assert read_at(c.disk("beta"), offset, MiB) == bytes([byte]) * MiB


def undisturbed(events: dict) -> None:
    for node, ev in events.items():
        kinds = ev.kinds()
        assert "disconnected" not in kinds and "connected" not in kinds, (node, kinds)


# -- tests ----------------------------------------------------------------------------------

def test_relay_between_the_two_link_ports_is_refused(cluster):
    """A party without the secret pipes a connection to alpha's link port into one to
    beta's. With link protocol 1 each node answered the other's challenge and the pipe
    replaced the real link; now alpha (the dialer) accepts no inbound link and beta
    waits for a dialer's proof that never comes."""
    require_tool("qemu-io")
    c = cluster(size="32M")  # default handshake-timeout (5 s): link protocol 1 had none
    c.up_pair()
    events = {n: Events(c.admin_socket(n)) for n in c.NODES}
    a, b = connect(c.ports["alpha"][0]), connect(c.ports["beta"][0])
    relayed: dict[str, list[int]] = {"to alpha": [], "to beta": []}

    def pipe(src, dst, name):
        buf = b""
        try:
            while data := src.recv(1 << 16):
                buf += data
                while len(buf) >= HEADER_SIZE:
                    paylen = struct.unpack_from(">I", buf, 28)[0]
                    if len(buf) < HEADER_SIZE + paylen:
                        break
                    relayed[name].append(struct.unpack_from(">H", buf, 4)[0])
                    buf = buf[HEADER_SIZE + paylen:]
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    threads = [threading.Thread(target=pipe, args=(a, b, "to beta"), daemon=True),
               threading.Thread(target=pipe, args=(b, a, "to alpha"), daemon=True)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(5.0 + 4.0)  # the handshake deadline, and some
        assert not any(t.is_alive() for t in threads), \
            f"the nodes kept the relayed connections open; relayed packets: {relayed}"
        assert P.STATE not in relayed["to alpha"] + relayed["to beta"], relayed
        assert P.AUTH not in relayed["to alpha"] + relayed["to beta"], relayed
        print(f"\nrelay: packets relayed {relayed}")
        undisturbed(events)
        write_replicates(c, 4 * MiB, 0x6b)
        undisturbed(events)
        for n in c.NODES:
            s = c.admin(n)
            assert s["connection"] == "Connected" and s["last_error"] == "", s
        assert c.admin("alpha")["link_rejections"]["count"] >= 1
    finally:
        a.close()
        b.close()
        for ev in events.values():
            ev.close()


def test_junk_connections_leave_the_healthy_link_alone(cluster):
    """Garbage, a header announcing a 64 MiB HELLO and an undecodable HELLO, sent to the
    Secondary's link port while the link is up: each connection is closed, the healthy
    link's last_error stays empty (link protocol 1 wrote every one of them into it)."""
    c = cluster(size="32M")
    c.up_pair()
    events = {n: Events(c.admin_socket(n)) for n in c.NODES}
    junk = [b"GET / HTTP/1.0\r\n\r\n" + bytes(40),
            proto.pack_header(P.HELLO, paylen=64 * MiB),
            proto.pack_header(P.HELLO, paylen=3) + b"\xc1\xc1\xc1"]
    try:
        for data in junk:
            s = connect(c.ports["beta"][0])
            s.sendall(data)
            assert closed_by_peer(s, 10.0), data[:40]
            s.close()
        undisturbed(events)
        for n in c.NODES:
            st = c.admin(n)
            assert st["connection"] == "Connected" and st["last_error"] == "", st
        rej = c.admin("beta")["link_rejections"]
        assert rej["count"] >= len(junk), rej
    finally:
        for ev in events.values():
            ev.close()


def test_reflection_and_replay_are_refused_link_undisturbed(cluster):
    """alpha dials through a party that first reflects alpha's own nonce, then its own
    proof, then lets the real link through (and records it). Then that recorded
    transcript is replayed to beta, and beta's own HELLO is sent back to it."""
    require_tool("qemu-io")
    from support.faulttools import set_node_value

    c = cluster(size="32M", resource={"handshake-timeout": 2.0})
    peer = ScriptedPeer(c.ports["beta"][0], [reflect_nonce, reflect_proof])
    set_node_value(c, "alpha", "beta", "address", f"127.0.0.1:{peer.port}")
    try:
        c.up_pair()
        assert peer.results == ["no proof given",
                                "authentication failed: the shared secrets differ"], \
            peer.results
        rej = c.admin("alpha")["link_rejections"]
        assert rej["count"] >= 2, rej
        log = c.log("alpha")  # the first refusal is logged (then at most one per 10 s)
        assert "the peer sent back this node's own nonce (a reflection)" in log, log
        events = {n: Events(c.admin_socket(n)) for n in c.NODES}

        # replay: the recorded dialer side of the real handshake, to beta, now
        transcript = bytes(peer.recorded)
        kinds = []
        pos = 0
        while pos < len(transcript) and len(kinds) < 3:
            paylen = struct.unpack_from(">I", transcript, pos + 28)[0]
            kinds.append(struct.unpack_from(">H", transcript, pos + 4)[0])
            pos += HEADER_SIZE + paylen
        assert kinds == [P.HELLO, P.AUTH, P.STATE], kinds
        s = connect(c.ports["beta"][0])
        s.sendall(transcript[:pos])
        answers = []
        while (got := read_packet(s)) is not None:
            answers.append((got[0], body_of(got[1]) if got[0] != P.STARTTLS else None))
        s.close()
        assert [t for t, _ in answers] == [P.HELLO, P.REFUSE], answers
        assert answers[1][1]["reason"] == "authentication failed: the shared secrets differ"

        # reflection at the acceptor: beta's own HELLO sent back to it
        s = connect(c.ports["beta"][0])
        s.sendall(transcript[:HEADER_SIZE + struct.unpack_from(">I", transcript, 28)[0]])
        typ, hello_b = read_packet(s)
        s2 = connect(c.ports["beta"][0])
        s2.sendall(hello_b)
        typ2, refusal = read_packet(s2)
        assert typ2 == P.REFUSE and "unexpected peer node 'beta'" in body_of(refusal)["reason"]
        assert closed_by_peer(s2, 5.0)
        assert closed_by_peer(s, 2.0 + 3.0)  # the deadline ends the first one
        s.close()
        s2.close()

        undisturbed(events)
        write_replicates(c, 8 * MiB, 0x3c)
        undisturbed(events)
        b = c.admin("beta")
        assert b["connection"] == "Connected" and b["last_error"] == "", b
        assert b["link_rejections"]["count"] >= 3, b["link_rejections"]
        print(f"\nreflection/replay: alpha rejections {rej}, beta rejections "
              f"{b['link_rejections']}")
        for ev in events.values():
            ev.close()
    finally:
        peer.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_unauthenticated_flood_bounded_rss_and_trickle_closed_at_deadline(cluster):
    """200 connections to beta's link port, each announcing a 64 MiB HELLO, while a client
    writes on alpha (replicated to beta); one more trickles a HELLO at 1 byte/s."""
    from support.nbd_testlib import RawClient

    c = cluster(size="64M", resource={"handshake-timeout": 2.0})
    c.up_pair()
    pid = c.procs["beta"].pid
    events = {n: Events(c.admin_socket(n)) for n in c.NODES}
    port = c.ports["beta"][0]
    stop = threading.Event()
    writes = {"ok": 0, "failed": 0}

    def client():
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            i = 0
            while not stop.is_set():
                err = nbd.write((i % 32) * MiB, bytes([i % 251]) * (256 << 10))
                writes["ok" if err == 0 else "failed"] += 1
                i += 1
            nbd.disconnect()
    th = threading.Thread(target=client, daemon=True)
    th.start()
    wait_for(lambda: writes["ok"] > 10, 20, what="client writes")
    base = _rss(pid)
    trickle = connect(port)
    hello = proto.encode_control(P.HELLO, {"version": proto.VERSION, "features": 0,
                                           "resource": "r0", "node": "alpha",
                                           "peer": "beta", "nonce": os.urandom(32)})
    t_trickle = time.monotonic()
    trickle.sendall(hello[:1])
    flood = []
    header = proto.pack_header(P.HELLO, paylen=64 * MiB)
    peak = base
    try:
        for _ in range(200):
            try:
                s = connect(port)
                s.sendall(header + b"\x80" * 1000)
                flood.append(s)
            except OSError:
                pass  # refused or reset at once: fine too
            peak = max(peak, _rss(pid))
        closed_at = None
        sent = 1
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and closed_at is None:
            peak = max(peak, _rss(pid))
            try:
                trickle.sendall(hello[sent:sent + 1])
                sent += 1
                trickle.settimeout(1.0)
                if trickle.recv(1) == b"":
                    closed_at = time.monotonic() - t_trickle
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.monotonic() - t_trickle
        open_flood = 0
        for s in flood:
            if not closed_by_peer(s, 0.05):
                open_flood += 1
        peak = max(peak, _rss(pid))
        ok_during = writes["ok"]
        time.sleep(0.5)
        after = _rss(pid)
        print(f"\nflood of 200 x 64 MiB HELLO headers on beta: RSS before {base / MiB:.1f} "
              f"MiB, peak {peak / MiB:.1f} MiB (+{(peak - base) / MiB:.1f} MiB, bound "
              f"{RSS_BOUND / MiB:.0f} MiB), after {after / MiB:.1f} MiB; connections still "
              f"open {open_flood}/{len(flood)}; trickle closed after "
              f"{closed_at if closed_at is None else round(closed_at, 2)} s "
              f"({sent} bytes sent, deadline 2.0 s); client writes {ok_during} ok, "
              f"{writes['failed']} failed")
        assert peak - base < RSS_BOUND
        assert closed_at is not None and closed_at < 2.0 + 2.5, closed_at
        assert sent < len(hello)
        assert open_flood == 0
        assert writes["failed"] == 0
        n0 = writes["ok"]
        wait_for(lambda: writes["ok"] > n0 + 10, 20, what="client writes after the flood")
        undisturbed(events)
        b = c.admin("beta")
        assert b["connection"] == "Connected" and b["last_error"] == "", b
        assert b["link_rejections"]["count"] >= 200, b["link_rejections"]
    finally:
        stop.set()
        th.join(10)
        trickle.close()
        for s in flood:
            s.close()
        for ev in events.values():
            ev.close()
