"""A silent link cut between the nodes: each node in its own network namespace, joined by a
veth pair; taking one end down blackholes the replication link without any RST or FIN. The
Primary must notice within the configured timeout, keep serving its client, and resync the
peer once the link is back."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
from support.helpers import require_tool, run
from support.repltools import MiB, cmp_data, fio, fio_bytes_written, qemu_io, read_at

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


def test_link_cut_primary_keeps_serving_then_resyncs(netns_pair, cluster, tmp_path):
    require_tool("fio", "qemu-io", "cmp")
    ns, veth = netns_pair
    c = cluster(size="64M", addresses=ADDR)
    for n in c.NODES:
        c.start(n, netns=ns[n])
    c.wait_status("alpha", lambda s: s["connection"] == "Connected", 30, "connected over veth",
                  fast=True)
    c.cli("alpha", "primary", "--force", "--skip-initial-sync")
    c.wait_status("alpha", lambda s: s["role"] == "Primary" and
                  s["replication"] == "Established" and s["peer"]["disk"] == "UpToDate", 30,
                  "Primary with UpToDate peer", fast=True)
    size = c.admin("alpha")["size_bytes"]

    with fio(tmp_path, c.uri("alpha"), "cut", "--rw=randwrite", "--bs=4k", "--iodepth=16",
             "--numjobs=2", "--offset=0", "--size=32M", "--time_based", "--runtime=8",
             netns=ns["alpha"], background=True) as job:
        c.wait_status("beta", lambda s: s["counters"]["writes_applied"] > 500, 20,
                      "writes replicated over veth", fast=True)
        assert job.proc.poll() is None, "fio ended before the cut"
        t_cut = time.monotonic()
        _ip("netns", "exec", ns["alpha"], "ip", "link", "set", veth["alpha"], "down")
        a = c.wait_status("alpha", lambda s: s["connection"] == "Connecting" and
                          s["replication"] == "Off", TIMEOUT + MARGIN, "peer declared lost",
                          fast=True)
        detected = time.monotonic() - t_cut
        assert job.proc.poll() is None, "fio ended before the loss was detected"
        assert a["role"] == "Primary" and a["peer"]["disk"] == "DUnknown", a
        assert "timed out" in c.log("alpha") or "lost peer" in c.log("alpha")
        job.wait(60)
    assert fio_bytes_written(job.report()) > 0

    # still serving after the cut: write and read back through the Primary
    qemu_io(c.uri("alpha"), "write -P 0x6b 40M 1M", "flush", "read -P 0x6b 40M 1M",
            netns=ns["alpha"], timeout=60)
    a = c.admin("alpha")
    assert a["connection"] != "Connected" and a["out_of_sync_bytes"] >= 1 << 20, a
    assert a["counters"]["writes_local_only"] > 0, a
    b = c.wait_status("beta", lambda s: s["connection"] != "Connected", TIMEOUT + MARGIN,
                      "beta notices the cut too", fast=True)
    assert b["role"] == "Secondary", b

    _ip("netns", "exec", ns["alpha"], "ip", "link", "set", veth["alpha"], "up")
    a = c.wait_status("alpha", lambda s: s["connection"] == "Connected" and
                      s["replication"] == "Established" and s["out_of_sync_bytes"] == 0 and
                      s["peer"]["disk"] == "UpToDate", 60, "reconnected and resynced",
                      fast=True)
    assert a["last_sync"] and a["last_sync"]["role"] == "SyncSource", a
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    b = c.wait_status("beta", lambda s: s["disk"] == "UpToDate" and
                      s["replication"] == "Established", 30, "beta UpToDate", fast=True)
    assert b["last_sync"] and b["last_sync"]["role"] == "SyncTarget", b
    c.wait_status("alpha", lambda s: s["counters"]["writes_pending_peer"] == 0, 30,
                  "no writes pending", fast=True)
    cmp_data(c, size, "data areas differ after resync")
    assert read_at(c.disk("beta"), 40 * MiB, MiB) == b"\x6b" * MiB
    print(f"\nlink loss detected after {detected:.2f}s (timeout {TIMEOUT}s)")
    assert detected <= TIMEOUT + MARGIN
