"""A silent link cut between the nodes: each node in its own network namespace, joined by a
veth pair; taking one end down blackholes the replication link without any RST or FIN. The
Primary must notice within the configured timeout, keep serving its client, and resync the
peer once the link is back."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time

import pytest
from helpers import require_tool, run, wait_for

ADDR = {"alpha": "10.99.0.1", "beta": "10.99.0.2"}
TIMEOUT = 3.0  # the Cluster default resource.timeout
MARGIN = 4.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], timeout=30, check=check)


@pytest.fixture
def netns_pair():
    """Two fresh namespaces joined by a veth pair (unique names), removed afterwards."""
    require_tool("ip")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}{random.randrange(1 << 16):04x}"
    ns = {"alpha": f"brA{tag}", "beta": f"brB{tag}"}
    veth = {"alpha": f"va{tag}", "beta": f"vb{tag}"}  # <= 15 characters
    try:
        for n in ("alpha", "beta"):
            _ip("netns", "add", ns[n])
        _ip("link", "add", veth["alpha"], "type", "veth", "peer", "name", veth["beta"])
        for n in ("alpha", "beta"):
            _ip("link", "set", veth[n], "netns", ns[n])
            _ip("-n", ns[n], "addr", "add", f"{ADDR[n]}/24", "dev", veth[n])
            _ip("-n", ns[n], "link", "set", "lo", "up")
            _ip("-n", ns[n], "link", "set", veth[n], "up")
        yield ns, veth
    finally:
        for n in ("alpha", "beta"):
            _ip("netns", "del", ns[n], check=False)  # also destroys the veth end inside
        _ip("link", "del", veth["alpha"], check=False)  # in case it was never moved


def _admin_status(c, node: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(c.admin_socket(node))
        with s.makefile("rwb") as f:
            f.write(b'{"cmd": "status"}\n')
            f.flush()
            reply = json.loads(f.readline())
    assert reply.get("ok"), reply
    return reply["result"]


def _wait(c, node: str, pred, timeout: float, what: str) -> dict:
    last = {}

    def check():
        nonlocal last
        try:
            last = _admin_status(c, node)
        except (OSError, ValueError):
            return False
        return pred(last)
    try:
        wait_for(check, timeout=timeout, interval=0.05, what=what)
    except TimeoutError:
        raise AssertionError(f"{node}: timed out after {timeout}s waiting for {what}; last "
                             f"status {json.dumps(last)}\n--- log:\n{c.log(node)[-4000:]}") \
            from None
    return last


def _qemu_io(uri: str, netns: str, *cmds: str) -> str:
    argv = ["ip", "netns", "exec", netns, "qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    res = run([*argv, uri], timeout=60, check=False)
    low = res.stdout.lower()
    assert res.returncode == 0 and "fail" not in low and "error" not in low and \
        "pattern verification" not in low, \
        f"qemu-io {cmds} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_link_cut_primary_keeps_serving_then_resyncs(netns_pair, cluster, tmp_path):
    require_tool("fio", "qemu-io", "cmp")
    ns, veth = netns_pair
    c = cluster(size="64M", addresses=ADDR)
    for n in c.NODES:
        c.start(n, netns=ns[n])
    _wait(c, "alpha", lambda s: s["connection"] == "Connected", 30, "connected over veth")
    c.cli("alpha", "primary", "--force", "--skip-initial-sync")
    _wait(c, "alpha", lambda s: s["role"] == "Primary" and s["replication"] == "Established"
          and s["peer"]["disk"] == "UpToDate", 30, "Primary with UpToDate peer")
    size = _admin_status(c, "alpha")["size_bytes"]

    out = str(tmp_path / "fio-cut.json")
    fio = subprocess.Popen(
        ["ip", "netns", "exec", ns["alpha"], "fio", "--name=cut", "--ioengine=nbd",
         f"--uri={c.uri('alpha')}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
         "--numjobs=2", "--offset=0", "--size=32M", "--time_based", "--runtime=8",
         "--verify_state_save=0", "--output-format=json", f"--output={out}"],
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(c, "beta", lambda s: s["counters"]["writes_applied"] > 500, 20,
              "writes replicated over veth")
        assert fio.poll() is None, "fio ended before the cut"
        t_cut = time.monotonic()
        _ip("netns", "exec", ns["alpha"], "ip", "link", "set", veth["alpha"], "down")
        a = _wait(c, "alpha", lambda s: s["connection"] == "Connecting" and
                  s["replication"] == "Off", TIMEOUT + MARGIN, "peer declared lost")
        detected = time.monotonic() - t_cut
        assert fio.poll() is None, "fio ended before the loss was detected"
        assert a["role"] == "Primary" and a["peer"]["disk"] == "DUnknown", a
        assert "timed out" in c.log("alpha") or "lost peer" in c.log("alpha")
        stdout, stderr = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    text = ""
    if os.path.exists(out):
        with open(out) as f:
            text = f.read()
    assert fio.returncode == 0, f"fio exited {fio.returncode}\n{stdout}\n{stderr}\n{text[-3000:]}"
    report = json.loads(text[text.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, job
    assert sum(j["write"]["io_bytes"] for j in report["jobs"]) > 0

    # still serving after the cut: write and read back through the Primary
    _qemu_io(c.uri("alpha"), ns["alpha"], "write -P 0x6b 40M 1M", "flush",
             "read -P 0x6b 40M 1M")
    a = _admin_status(c, "alpha")
    assert a["connection"] != "Connected" and a["out_of_sync_bytes"] >= 1 << 20, a
    assert a["counters"]["writes_local_only"] > 0, a
    b = _wait(c, "beta", lambda s: s["connection"] != "Connected", TIMEOUT + MARGIN,
              "beta notices the cut too")
    assert b["role"] == "Secondary", b

    _ip("netns", "exec", ns["alpha"], "ip", "link", "set", veth["alpha"], "up")
    a = _wait(c, "alpha", lambda s: s["connection"] == "Connected" and
              s["replication"] == "Established" and s["out_of_sync_bytes"] == 0 and
              s["peer"]["disk"] == "UpToDate", 60, "reconnected and resynced")
    assert a["last_sync"] and a["last_sync"]["role"] == "SyncSource", a
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    b = _wait(c, "beta", lambda s: s["disk"] == "UpToDate" and
              s["replication"] == "Established", 30, "beta UpToDate")
    assert b["last_sync"] and b["last_sync"]["role"] == "SyncTarget", b
    _wait(c, "alpha", lambda s: s["counters"]["writes_pending_peer"] == 0, 30,
          "no writes pending")
    res = run(["cmp", "-n", str(size), c.disk("alpha"), c.disk("beta")], check=False)
    assert res.returncode == 0, f"data areas differ after resync: {res.stdout}{res.stderr}"
    with open(c.disk("beta"), "rb") as f:
        f.seek(40 << 20)
        assert f.read(1 << 20) == b"\x6b" * (1 << 20)
    print(f"\nlink loss detected after {detected:.2f}s (timeout {TIMEOUT}s)")
    assert detected <= TIMEOUT + MARGIN
