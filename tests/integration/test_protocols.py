"""Protocols A, B and C end to end, and on-congestion = pull-ahead: switched on the running
resource; kill -9 of the Secondary under each loses nothing the Primary keeps, marks everything the peer may lack and
ends with identical disks after resync; under A a write is answered while the Secondary is
frozen, and the Primary's status shows that data gap until the link loss turns it into
out-of-sync bits; behind a bandwidth-capped proxy a burst sends the Primary Ahead and the
pair comes back Established by itself with identical disks."""

from __future__ import annotations

import select
import signal
import subprocess
import time

import pytest
from support.faulttools import route_through_proxy
from support.helpers import SYSTEM_PY, require_tool, wait_for
from support.nbd_testlib import MiB, RawClient
from support.repltools import cmp_data, fio, fio_bytes_written, read_at

from test_replication import require_libnbd, wait_quiet


def resync_back(c) -> None:
    c.start("beta")
    c.wait_status("beta", lambda s: s["replication"] == "Established" and
                  s["disk"] == "UpToDate", 60, "resync finished on beta")
    c.wait_status("alpha", lambda s: s["replication"] == "Established" and
                  s["out_of_sync_bytes"] == 0 and s["peer"]["disk"] == "UpToDate", 60,
                  "alpha Established, nothing out of sync")
    wait_quiet(c, same_processes=False)


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_secondary_killed_under_each_protocol_then_identical(cluster, tmp_path, protocol):
    require_tool("fio", "cmp")
    c = cluster(size="32M")
    c.up_pair()
    assert protocol in c.cli("alpha", "protocol", protocol).stdout
    assert c.status("alpha")["data_gap"]["protocol"] == protocol
    with fio(tmp_path, c.uri("alpha"), f"kill-secondary-{protocol}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--offset=0", "--size=24M", "--time_based",
             "--runtime=3", background=True) as job:
        c.wait_status("beta", lambda s: s["counters"]["writes_applied"] > 500, 20,
                      "writes reaching the secondary", fast=True)
        assert job.proc.poll() is None, "fio ended before the secondary was killed"
        c.kill("beta", signal.SIGKILL)
        job.wait(60)
    assert fio_bytes_written(job.report()) > 0
    a = c.status("alpha")
    assert a["replication"] == "Off" and a["out_of_sync_bytes"] > 0, a
    assert a["data_gap"]["out_of_sync_bytes"] == a["out_of_sync_bytes"], a
    assert a["data_gap"]["bytes_not_on_peer_disk"] == 0, a  # nothing left in the log
    assert a["data_gap"]["oldest_s"] > 0, a
    resync_back(c)
    cmp_data(c, a["size_bytes"])


WRITER = r'''
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(bytes([0x40 + i % 64]) * 65536, i * 65536)
print("done", flush=True)
sys.stdin.readline()
'''


def test_protocol_a_answers_while_the_secondary_is_frozen_and_marks_the_gap(cluster):
    """Under A a write is acknowledged once queued: with the Secondary SIGSTOPped the
    writes complete, the Primary's status shows them as not on the peer's disk, and when
    the Secondary is killed they are out of sync; the resync brings them over."""
    require_libnbd()
    require_tool("cmp")
    c = cluster(size="16M")
    c.up_pair()
    c.cli("alpha", "protocol", "A")
    n = 32
    beta = c.procs["beta"]
    beta.send_signal(signal.SIGSTOP)
    writer = subprocess.Popen([SYSTEM_PY, "-c", WRITER, c.uri("alpha"), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([writer.stdout], [], [], 30)
        assert ready, "writes not answered under A with the Secondary frozen"
        assert writer.stdout.readline().strip() == "done"
        g = c.status("alpha")["data_gap"]
        assert g["writes_not_on_peer_disk"] == n, g
        assert g["bytes_not_on_peer_disk"] == n * 65536, g
        assert g["bytes_not_received"] == n * 65536, g  # A: no receive acks
        assert g["oldest_s"] >= 0, g
        time.sleep(0.05)
        assert c.status("alpha")["data_gap"]["oldest_s"] > 0
        c.kill("beta", signal.SIGKILL)
        a = c.wait_status("alpha", lambda s: s["replication"] == "Off", 30, "peer lost")
        assert a["out_of_sync_bytes"] >= n * 65536, a
        assert a["data_gap"]["bytes_not_on_peer_disk"] == 0, a
    finally:
        if beta.poll() is None:
            beta.send_signal(signal.SIGCONT)
        writer.stdin.close()
        writer.wait(10)
    resync_back(c)
    cmp_data(c, c.status("alpha")["size_bytes"])
    assert read_at(c.disk("beta"), (n - 1) * 65536, 65536) == bytes([0x40 + n - 1]) * 65536


def test_pull_ahead_goes_ahead_in_a_burst_and_returns_established(cluster):
    """on-congestion = pull-ahead behind a 24 Mbit/s proxy: a burst fills the send buffer,
    the Primary goes Ahead (the peer Behind, told what went out of sync), and once the
    buffer has drained the pair resyncs and is Established again with identical disks."""
    require_tool("cmp")
    c = cluster(size="64M", resource={"protocol": "A", "on-congestion": "pull-ahead",
                                      "congestion-fill": "128K", "sndbuf-size": "256K"})
    with route_through_proxy(c, seed=8, buffer_bytes=128 * 1024) as proxy:
        c.up_pair()
        proxy.shape(rate="24M")  # 3 MB/s
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            for i in range(16):  # a burst faster than the link
                assert nbd.write(i * MiB, bytes([i + 1]) * MiB) == 0
            a = c.wait_status("alpha", lambda s: s["congestion"]["times_ahead"] >= 1, 30,
                              "went Ahead", fast=True)
            nbd.disconnect()
        # the announcement travels behind what was queued before it
        wait_for(lambda: "-> Behind" in c.log("beta"), 30, what="beta Behind")
        a = c.wait_status("alpha", lambda s: established(s) and s["out_of_sync_bytes"] == 0,
                          90, "back to Established, nothing out of sync", fast=True)
        c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate", 30,
                      "beta UpToDate", fast=True)
        proxy.shape(rate="0")
        wait_quiet(c, same_processes=False)
    assert a["last_sync"] and a["last_sync"]["role"] == "SyncSource", a
    cmp_data(c, a["size_bytes"])
    assert read_at(c.disk("beta"), 15 * MiB, MiB) == bytes([16]) * MiB


def established(s) -> bool:
    return s["connection"] == "Connected" and s["replication"] == "Established"
