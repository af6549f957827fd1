"""Error handling of `blockrep serve`: invalid requests get the errno the rules give them and
the connection survives; broken clients lose their connection and nobody else notices;
disconnect and SIGTERM drain in-flight writes; bad command lines fail cleanly."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import threading

import pytest
from support.helpers import PY, ROOT, free_port, require_tool, run, start_serve, wait_for
from support.nbd_testlib import MiB, RawClient, popen_libnbd, run_libnbd, still_open, \
    wait_closed_by_peer

from blockrep.nbd import proto
from blockrep.nbd.constants import REQUEST_MAGIC, ClientFlag, NbdCmd, NbdErr

SIZE = 64 * MiB


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One writable 64M server for the request-rule tests (each test uses fresh
    connections; the rules do not depend on what earlier tests wrote)."""
    d = tmp_path_factory.mktemp("errors-shared")
    srv = start_serve(str(d / "disk.img"), str(d), size="64M")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors-ro")
    disk = d / "ro.img"
    with open(disk, "wb") as f:
        f.write(b"\x5a" * SIZE)
    srv = start_serve(str(disk), str(d), "--read-only")
    yield srv
    srv.stop()


# -- request rules (python3-libnbd with strict mode off, so it sends what we ask) -----------

RULE_SCRIPT = r'''
SIZE = int(sys.argv[2])
M = 1 << 20
h = connect(strict=0, meta=True)
marker = os.urandom(4096)
h.pwrite(marker, 0)
bad = lambda: (BAD)
good = lambda: (GOOD)
out = {"bad": err_of(bad)}
out["read_after_error"] = h.pread(4096, 0) == marker
out["good"] = err_of(good)
out["bad_again"] = err_of(bad)
out["read_after_second_error"] = h.pread(4096, 0) == marker
h.shutdown()
result(out)
'''

BS_CB = "lambda *a: 0"

# name: (bad request, expected NBD error, a good request just inside the rule)
RULES = {
    "write_past_end": ("h.pwrite(b'x' * 4096, SIZE - 2048)", errno.ENOSPC,
                       "h.pwrite(b'x' * 4096, SIZE - 4096)"),
    "large_write_past_end": ("h.pwrite(b'x' * (1 << 20), SIZE - 4096)", errno.ENOSPC,
                             "h.pwrite(b'x' * (1 << 20), SIZE - (1 << 20))"),
    "write_starting_past_end": ("h.pwrite(b'x' * 512, SIZE + 4096)", errno.ENOSPC,
                                "h.pwrite(b'x' * 512, SIZE - 512)"),
    "write_zeroes_past_end": ("h.zero(4096, SIZE - 2048)", errno.ENOSPC,
                              "h.zero(4096, SIZE - 4096)"),
    "read_past_end": ("h.pread(4096, SIZE - 2048)", errno.EINVAL,
                      "h.pread(4096, SIZE - 4096)"),
    "read_huge_offset": ("h.pread(4096, (1 << 64) - 4096)", errno.EINVAL,
                         "h.pread(1, SIZE - 1)"),
    "trim_past_end": ("h.trim(4096, SIZE - 2048)", errno.EINVAL,
                      "h.trim(4096, SIZE - 4096)"),
    "block_status_past_end": (f"h.block_status(4096, SIZE - 2048, {BS_CB})", errno.EINVAL,
                              f"h.block_status(4096, SIZE - 4096, {BS_CB})"),
    "write_with_df": ("h.pwrite(b'x' * 512, 8192, nbd.CMD_FLAG_DF)", errno.EINVAL,
                      "h.pwrite(b'x' * 512, 8192, nbd.CMD_FLAG_FUA)"),
    "read_with_req_one": ("h.pread(512, 8192, nbd.CMD_FLAG_REQ_ONE)", errno.EINVAL,
                          "h.pread(512, 8192, nbd.CMD_FLAG_DF)"),
    "trim_with_no_hole": ("h.trim(4096, 8192, nbd.CMD_FLAG_NO_HOLE)", errno.EINVAL,
                          "h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)"),
    "write_with_fast_zero": ("h.pwrite(b'x' * 512, 8192, nbd.CMD_FLAG_FAST_ZERO)",
                             errno.EINVAL,
                             "h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)"),
    "block_status_with_df": (f"h.block_status(4096, 0, {BS_CB}, nbd.CMD_FLAG_DF)",
                             errno.EINVAL,
                             f"h.block_status(4096, 0, {BS_CB}, nbd.CMD_FLAG_REQ_ONE)"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_request_rule(shared, tmp_path, rule):
    require_tool("nbdsh")
    bad, want, good = RULES[rule]
    body = RULE_SCRIPT.replace("(BAD)", f"({bad})").replace("(GOOD)", f"({good})")
    res = run_libnbd(tmp_path, shared.uri, body, str(SIZE), name=rule)
    assert res["bad"] == want, f"{rule}: got errno {res['bad']}, want {want}"
    assert res["bad_again"] == want
    assert res["good"] == 0, f"{rule}: the control request failed with errno {res['good']}"
    assert res["read_after_error"] and res["read_after_second_error"]
    assert shared.proc.poll() is None


RO_SCRIPT = r'''
h = connect(strict=0)
assert h.is_read_only()
first = bytes(h.pread(4096, 0))
out = {
    "write": err_of(h.pwrite, b"x" * 4096, 0),
    "write_fua": err_of(h.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
    "trim": err_of(h.trim, 4096, 0),
    "zero": err_of(h.zero, 4096, 0),
    "write_past_end": err_of(h.pwrite, b"x" * 4096, (64 << 20) - 1024),
    "large_write": err_of(h.pwrite, b"x" * (1 << 20), 1 << 20),
    "flush": err_of(h.flush),
    "read": err_of(h.pread, 4096, 4096),
}
out["same_after"] = bytes(h.pread(4096, 0)) == first
out["first_ok"] = first == b"\x5a" * 4096
h.shutdown()
result(out)
'''


def test_read_only_export_refuses_writes(read_only, tmp_path):
    require_tool("nbdsh")
    res = run_libnbd(tmp_path, read_only.uri, RO_SCRIPT, name="ro")
    for op in ("write", "trim", "zero", "write_past_end", "large_write"):
        assert res[op] == errno.EPERM, (op, res)
    # FUA is not advertised on a read-only export: the flag alone makes it EINVAL
    assert res["write_fua"] in (errno.EPERM, errno.EINVAL), res
    assert res["flush"] == 0 and res["read"] == 0  # controls: allowed commands work
    assert res["first_ok"] and res["same_after"]
    with open(read_only.disk, "rb") as f:
        assert f.read(8192) == b"\x5a" * 8192


def test_oversized_requests_refused_connection_survives(shared):
    """65 MiB > the advertised 64 MiB maximum: libnbd will not even send it, so a raw
    client does. The payload is drained, the error is EINVAL, the connection lives on."""
    with RawClient(shared.port) as c:
        c.handshake()
        assert c.size == SIZE
        marker = os.urandom(4096)
        assert c.write(0, marker) == 0
        assert c.write(0, os.urandom(65 * MiB)) == NbdErr.EINVAL
        err, data = c.read(0, 4096)
        assert err == 0 and data == marker  # the refused write changed nothing
        err, _ = c.read(0, 65 * MiB)
        assert err == NbdErr.EINVAL
        new = os.urandom(8192)
        assert c.write(12345, new) == 0
        assert c.read(12345, 8192) == (0, new)
        # a request of exactly the maximum is fine (the control)
        assert c.read(0, 64 * MiB)[0] == 0
        c.disconnect()
    assert shared.proc.poll() is None


BIG_SCRIPT = r'''
M = 1 << 20
h = connect()
data = os.urandom(48 * M)
h.pwrite(data, 4096)
back = h.pread(48 * M, 4096)
h.pwrite(b"\x11" * 4096, 0)
h.shutdown()
result({"same": back == data, "len": len(back)})
'''


def test_48m_requests_succeed(shared, tmp_path):
    require_tool("nbdsh")
    res = run_libnbd(tmp_path, shared.uri, BIG_SCRIPT, name="big")
    assert res == {"same": True, "len": 48 * MiB}


# -- raw-socket misbehaviour -----------------------------------------------------------------

def _server_still_works(srv):
    assert srv.proc.poll() is None, srv.log_text()
    require_tool("qemu-io")
    pat = os.urandom(1)[0] | 1
    res = run(["qemu-io", "-f", "raw", "-c", f"write -P {pat} 1M 64k",
               "-c", f"read -P {pat} 1M 64k", srv.uri], timeout=60)
    assert "Pattern verification failed" not in res.stdout


def test_garbage_instead_of_client_flags(serve):
    require_tool("qemu-io")
    srv = serve("8M")
    good = RawClient(srv.port)
    try:
        good.handshake()  # control: a well-behaved connection is kept open
        with RawClient(srv.port) as c:
            c.read_greeting()
            c.sock.sendall(b"\xde\xad\xbe\xef" + b"\x5a" * 200)
            assert wait_closed_by_peer(c.sock)
        assert still_open(good.sock)
        assert good.read(0, 4096)[0] == 0
    finally:
        good.close()
    _server_still_works(srv)
    assert "handshake: protocol error" in srv.log_text()


def test_bad_option_magic(serve):
    require_tool("qemu-io")
    srv = serve("8M")
    with RawClient(srv.port) as c:
        c.read_greeting()
        c.sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE))
        c.sock.sendall(struct.pack(">QII", 0x1122334455667788, 7, 0))
        assert wait_closed_by_peer(c.sock)
    _server_still_works(srv)
    assert "bad option magic" in srv.log_text()


def test_bad_request_magic_after_go(serve):
    require_tool("qemu-io")
    srv = serve("8M")
    with RawClient(srv.port) as c:
        c.handshake()
        assert c.read(0, 512)[0] == 0  # control: a good request on this connection
        assert still_open(c.sock, 0.2)
        c.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC ^ 1, 0, NbdCmd.READ, 7, 0, 512))
        assert wait_closed_by_peer(c.sock)
    _server_still_works(srv)
    assert "bad request magic" in srv.log_text()


def test_truncated_requests_then_close(serve):
    require_tool("qemu-io")
    srv = serve("8M")
    # a request header cut short
    with RawClient(srv.port) as c:
        c.handshake()
        c.sock.sendall(proto.encode_request(NbdCmd.READ, 0, 1, 0, 4096)[:11])
    # a small write whose payload is cut short
    with RawClient(srv.port) as c:
        c.handshake()
        c.sock.sendall(proto.encode_request(NbdCmd.WRITE, 0, 2, 2 * MiB, 4096) + b"\xee" * 100)
    # a large (thread-path) write whose payload is cut short
    with RawClient(srv.port) as c:
        c.handshake()
        c.sock.sendall(proto.encode_request(NbdCmd.WRITE, 0, 3, 4 * MiB, 1 * MiB)
                       + b"\xee" * 300000)
    # a handshake cut short
    with RawClient(srv.port) as c:
        c.read_greeting()
        c.sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE) + b"IHAVE")
    _server_still_works(srv)
    # writes never fully received were not applied
    with open(srv.disk, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4096) == bytes(4096)
        f.seek(4 * MiB)
        assert f.read(1 * MiB) == bytes(1 * MiB)


def test_garbage_connections_do_not_disturb_a_concurrent_client(serve):
    require_tool("qemu-io")
    srv = serve("64M")
    stop = threading.Event()
    closed = []
    problems = []

    def garbage():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with RawClient(srv.port, timeout=10) as c:
                    if i % 2:
                        c.read_greeting()
                        c.sock.sendall(os.urandom(3) + b"\xff" + os.urandom(4000))
                    else:
                        c.handshake()
                        c.sock.sendall(b"\0" * 28 + os.urandom(4000))
                    if wait_closed_by_peer(c.sock, 10):
                        closed.append(i)
                    else:
                        problems.append(f"connection {i} was not closed")
            except OSError as exc:
                problems.append(f"connection {i}: {exc!r}")

    t = threading.Thread(target=garbage, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(closed) >= 3, what="garbage connections")
        cmds = []
        for k in range(16):
            cmds += ["-c", f"write -P {k + 1} {k * 2}M 2M"]
        cmds += ["-c", "flush"]
        for k in range(16):
            cmds += ["-c", f"read -P {k + 1} {k * 2}M 2M"]
        res = run(["qemu-io", "-f", "raw", *cmds, srv.uri], timeout=120, check=False)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Pattern verification failed" not in res.stdout
    assert len(closed) >= 4, closed
    assert not problems, problems[:5]
    assert srv.proc.poll() is None


# -- disconnect and shutdown with writes in flight -------------------------------------------

DISC_SCRIPT = r'''
M = 1 << 20
h = connect()
writes = []
done = {}
sizes = [4096, 65536, 512 * 1024, 1 * M, 3000, 300 * 1024, 2 * M, 8192] * 4
off = 0
for i, n in enumerate(sizes):
    data = bytes([i + 1]) * n
    def cb(err, i=i):
        done[i] = err.value
        return 1
    h.aio_pwrite(data, off, completion=cb)
    writes.append([off, n, i + 1])
    off += n
in_flight = h.aio_in_flight()
h.shutdown()
result({"writes": writes, "done": done, "in_flight_at_shutdown": in_flight})
'''


def test_disconnect_with_writes_in_flight(serve, tmp_path):
    require_tool("nbdsh")
    srv = serve("64M")
    res = run_libnbd(tmp_path, srv.uri, DISC_SCRIPT, name="disc")
    assert res["in_flight_at_shutdown"] > 0
    # libnbd's shutdown waits for the replies: every write was acknowledged, successfully
    assert len(res["done"]) == len(res["writes"]), res["done"]
    assert all(v == 0 for v in res["done"].values()), res["done"]

    def on_disk():
        with open(srv.disk, "rb") as f:
            for off, n, val in res["writes"]:
                f.seek(off)
                if f.read(n) != bytes([val]) * n:
                    return False
        return True

    # NBD_CMD_DISC: the server finishes every request sent before it
    wait_for(on_disk, timeout=20, what="all writes sent before NBD_CMD_DISC on disk")
    assert srv.proc.poll() is None


SIGTERM_SCRIPT = r"""
import functools, struct
SLOT = 256 * 1024  # large writes: these run in the server's I/O threads
SLOTS = 256        # write i goes to slot i % SLOTS, round and round until the server stops
ready_file = sys.argv[2]
h = connect()
acked, failed = [], []
bufs = {}

def cb(i, err):
    (acked if err.value == 0 else failed).append(i)
    bufs.pop(i, None)
    return 1

issued = 0
ready = False
error = None
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        while h.aio_in_flight() < 16:  # never two writes to one slot in flight at once
            bufs[issued] = struct.pack(">I", issued) * (SLOT // 4)
            h.aio_pwrite(bufs[issued], (issued % SLOTS) * SLOT,
                         completion=functools.partial(cb, issued), flags=nbd.CMD_FLAG_FUA)
            issued += 1
        h.poll(1000)
    except nbd.Error as e:
        error = str(e)
        break
    if not ready and len(acked) >= 50:
        open(ready_file, "w").close()
        ready = True
result({"acked": acked, "failed": failed, "issued": issued, "slots": SLOTS,
        "slot": SLOT, "error": error})
"""


def test_sigterm_drains_in_flight_writes(serve, tmp_path):
    """A client streams FUA writes (16 in flight, forever) when the server gets SIGTERM:
    the server exits 0 after draining, and every slot of the disk holds the last write
    to it that was acknowledged, or a later one that was in flight."""
    require_tool("nbdsh")
    srv = serve("64M")
    ready = tmp_path / "ready"
    client = popen_libnbd(tmp_path, srv.uri, SIGTERM_SCRIPT, str(ready), name="sigterm")
    try:
        wait_for(lambda: ready.exists() or client.poll() is not None, timeout=30,
                 what="client ready")
        assert client.poll() is None, (tmp_path / "sigterm.out").read_text()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(30)
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    out = (tmp_path / "sigterm.out").read_text()
    log = srv.log_text()
    assert rc == 0, log
    assert "draining 1 connection(s)" in log, log
    assert "stopped" in log, log
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert line, out
    res = json.loads(line[-1][len("RESULT "):])
    assert res["error"], "the client never saw the connection end"
    slots, slot = res["slots"], res["slot"]
    acked = res["acked"]
    assert len(acked) >= 50
    last_acked = {}
    for i in acked:
        last_acked[i % slots] = max(i, last_acked.get(i % slots, -1))
    with open(srv.disk, "rb") as f:
        for s in range(slots):
            f.seek(s * slot)
            data = f.read(slot)
            j = struct.unpack_from(">I", data)[0]
            if s not in last_acked and data == bytes(slot):
                continue  # never written, never acknowledged
            assert data == struct.pack(">I", j) * (slot // 4), f"slot {s}: torn write"
            assert j % slots == s and j < res["issued"], (s, j)
            assert j >= last_acked.get(s, -1), \
                f"slot {s}: holds write {j}, but write {last_acked[s]} was acknowledged"


# -- command line ----------------------------------------------------------------------------

def _serve_cli(*args: str):
    return run([PY, "-m", "blockrep", "serve", *args], timeout=60, check=False, cwd=ROOT)


def _assert_clean_error(res, *needles: str):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_missing_disk_without_create(tmp_path):
    missing = tmp_path / "nope.img"
    res = _serve_cli("--disk", str(missing), "--listen", f"127.0.0.1:{free_port()}")
    _assert_clean_error(res, str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("listen,needle", [("127.0.0.1:notaport", "not a number"),
                                           ("127.0.0.1:70000", "out of range")])
def test_cli_bad_listen_port(tmp_path, listen, needle):
    disk = tmp_path / "d.img"
    res = _serve_cli("--disk", str(disk), "--size", "1M", "--create", "--listen", listen)
    _assert_clean_error(res, needle, listen)


def test_cli_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _serve_cli("--disk", str(tmp_path / "d.img"), "--size", "1M", "--create",
                         "--listen", f"127.0.0.1:{port}")
    _assert_clean_error(res, "blockrep serve")
