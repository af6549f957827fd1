"""Link compression end to end (blockrep.peer.compress): a pair with lz4 and one with zstd
replicate compressible data and resync after an outage with fewer bytes on the wire and
byte-identical disks; a node configured `none` (like a peer without compression) receives
plain packets and the pair still replicates. A Diskless Primary's reads come from its peer
compressed (P_READ_REPLY), zeroes as a marker."""

from __future__ import annotations

import signal

import pytest
from support.faulttools import faulty_disk_for
from support.helpers import require_tool
from support.nbd_testlib import RawClient
from support.repltools import MiB, cmp_data, fio, fio_bytes_written

from blockrep.faults.disk import TOOLS

COMPRESSIBLE = ("--buffer_compress_percentage=75", "--refill_buffers",
                "--buffer_compress_chunk=4k")


def quiet(c, same_processes: bool = True) -> dict:
    a = c.wait_status("alpha", lambda s: s["counters"]["writes_pending_peer"] == 0 and
                      s["out_of_sync_bytes"] == 0 and s["replication"] == "Established",
                      60, "alpha Established, nothing pending or out of sync", fast=True)
    want = a["counters"]["writes_replicated"] if same_processes else 0
    c.wait_status("beta", lambda s: s["counters"]["writes_pending_peer"] == 0 and
                  s["counters"]["writes_applied"] >= want and s["disk"] == "UpToDate", 60,
                  f"peer applied all {want} replicated writes", fast=True)
    return a


@pytest.mark.parametrize("setting", ["lz4", "zstd:3"])
def test_compressed_pair_replicates_resyncs_identical(cluster, tmp_path, setting):
    require_tool("fio", "cmp")
    c = cluster(size="64M", resource={"compression": setting})
    c.up_pair()
    rep = fio(tmp_path, c.uri("alpha"), "w", "--rw=randwrite", "--bs=4k", "--iodepth=8",
              "--size=8M", *COMPRESSIBLE)
    assert fio_bytes_written(rep) == 8 * MiB
    rep = fio(tmp_path, c.uri("alpha"), "big", "--rw=write", "--bs=1M", "--iodepth=4",
              "--offset=16M", "--size=8M", *COMPRESSIBLE)
    a = quiet(c)
    comp = a["compression"]
    assert comp and comp["algorithm"] == setting, comp
    assert comp["compressed"] > 0 and comp["bytes_out"] * 2 < comp["bytes_in"], comp
    cmp_data(c, a["size_bytes"])

    # an outage: the Secondary gone, 8 MiB changed, then resync (P_RS_DATA) compressed too
    c.kill("beta", signal.SIGKILL)
    c.wait_status("alpha", lambda s: s["replication"] == "Off", 30, "alpha sees beta gone")
    fio(tmp_path, c.uri("alpha"), "outage", "--rw=randwrite", "--bs=64k", "--iodepth=4",
        "--offset=32M", "--size=8M", *COMPRESSIBLE)
    c.start("beta")
    a = quiet(c, same_processes=False)
    comp = a["compression"]
    assert a["last_sync"] and a["last_sync"]["role"] == "SyncSource", a
    assert comp["compressed"] > 0 and comp["bytes_out"] * 2 < comp["bytes_in"], comp
    # the resync covers the 8 MiB outage plus whatever the killed Secondary's activity log
    # still held (it restarts after a crash: 0, 8 or 16 MiB more, by timing); the link
    # carries less than half of it
    total = a["last_sync"]["total_bytes"]
    print(f"\nresync {total >> 20} MiB, link sent {a['counters']['link_bytes_sent']} bytes")
    assert total >= 8 * MiB, a["last_sync"]
    assert a["counters"]["link_bytes_sent"] * 2 < total, (a["counters"], a["last_sync"])
    cmp_data(c, a["size_bytes"])


def test_peer_with_compression_off_gets_plain_packets(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="32M", resource_per_node={"alpha": {"compression": "zstd"},
                                               "beta": {"compression": "none"}})
    c.up_pair()
    fio(tmp_path, c.uri("alpha"), "w", "--rw=randwrite", "--bs=4k", "--iodepth=8",
        "--size=4M", *COMPRESSIBLE)
    a = quiet(c)
    assert a["compression"] is None, a["counters"]
    assert c.status("beta")["compression"] is None
    # everything went plain: at least the data itself crossed the link
    assert a["counters"]["link_bytes_sent"] >= 4 * MiB, a["counters"]
    cmp_data(c, a["size_bytes"])


def _text(i: int) -> bytes:
    return b"".join(b"chunk %03d line %06d: compressible text\n" % (i, n)
                    for n in range(30000))[:MiB]


def test_diskless_primary_reads_come_compressed(cluster):
    """alpha's disk fails (writes), it goes on Diskless: reading back what it wrote before
    comes from beta compressed, the never-written part as zero markers; the data is right."""
    require_tool(*TOOLS)
    c = cluster(size="32M", resource={"compression": "lz4"})
    disk = faulty_disk_for(c, "alpha")
    try:
        c.up_pair()
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            for i in range(8):
                assert nbd.write(i * MiB, _text(i)) == 0
            disk.inject("pwrite")
            assert nbd.write(16 * MiB, _text(16)) == 0  # fails on alpha's disk: detach
            c.wait_status("alpha", lambda s: s["disk"] == "Diskless" and
                          s["diskless"]["serving"], 30, "alpha Diskless", fast=True)
            b0 = c.status("beta")
            for i in (*range(8), 16):
                assert nbd.read(i * MiB, MiB) == (0, _text(i)), i
            for i in range(20, 24):  # never written
                assert nbd.read(i * MiB, MiB) == (0, bytes(MiB)), i
        b = c.status("beta")
        served = b["diskless"]["served_reads_bytes"] - b0["diskless"]["served_reads_bytes"]
        sent = b["counters"]["link_bytes_sent"] - b0["counters"]["link_bytes_sent"]
        comp = b["compression"]
        print(f"\nDiskless Primary read {served} bytes through the peer (lz4): the peer "
              f"sent {sent} bytes; its compression {comp}")
        assert served == 13 * MiB
        assert comp and comp["compressed"] >= 9, comp
        assert sent * 4 < served, (sent, served)
    finally:
        c.stop_all()
        disk.stop()
