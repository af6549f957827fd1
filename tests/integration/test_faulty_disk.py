"""The faulty-disk harness (blockrep/faults/disk.py) under blockrep: nbdkit's error filter
behind nbdfuse as a node's disk, faults switched on and off at run time, and ENOSPC from a
sparse file on a tiny tmpfs. These tests show the harness working and what blockrep does with
disk errors under on-io-error = pass-on (detach, the default: test_disk_detach.py); what the
nodes report is printed."""

from __future__ import annotations

import errno
import os

from support.faulttools import faulty_disk_for
from support.helpers import require_tool, start_serve
from support.nbd_testlib import RawClient
from support.repltools import MiB, cmp_data, read_at

from blockrep.faults.disk import TOOLS, FaultyDisk, TinyTmpfs


def test_harness_switches_faults_at_run_time(tmp_path):
    require_tool(*TOOLS)
    with FaultyDisk(str(tmp_path), 8 * MiB, delay_write_ms=2) as d:
        assert os.path.getsize(d.path) == 8 * MiB
        fd = os.open(d.path, os.O_RDWR)
        try:
            os.pwrite(fd, b"a" * 4096, 0)
            d.inject("pwrite")
            assert d.injected() == ["pwrite"]
            try:
                os.pwrite(fd, b"b" * 4096, 4096)
                raise AssertionError("a write succeeded while pwrite errors were on")
            except OSError as exc:
                assert exc.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == b"a" * 4096  # reads still work
            d.heal()
            os.pwrite(fd, b"c" * 4096, 4096)
            os.fdatasync(fd)
            d.inject("pread")
            try:
                os.pread(fd, 4096, 2 * MiB)  # not cached: goes to nbdkit
                raise AssertionError("a read succeeded while pread errors were on")
            except OSError as exc:
                assert exc.errno == errno.EIO
        finally:
            os.close(fd)
    assert not os.path.ismount(d.mountpoint)
    assert d.nbdkit.returncode is not None and d.nbdfuse.returncode is not None


def test_tiny_tmpfs_gives_enospc(tmp_path):
    with TinyTmpfs(str(tmp_path), size=64 * MiB, capacity=MiB) as t:
        assert os.path.getsize(t.path) == 64 * MiB
        fd = os.open(t.path, os.O_RDWR)
        try:
            written = 0
            try:
                while written < 64 * MiB:
                    os.pwrite(fd, b"x" * 65536, written)
                    written += 65536
                raise AssertionError("64 MiB fit on a 1 MiB tmpfs")
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            assert written <= MiB
        finally:
            os.close(fd)
    assert not os.path.ismount(t.mountpoint)


def test_serve_on_failing_disk_returns_eio_to_the_client(tmp_path):
    require_tool(*TOOLS)
    with FaultyDisk(str(tmp_path), 16 * MiB) as d:
        srv = start_serve(d.path, str(tmp_path))
        try:
            with RawClient(srv.port) as nbd:
                nbd.handshake()
                assert nbd.write(0, b"\x01" * 65536) == 0
                d.inject("pwrite")
                assert nbd.write(MiB, b"\x02" * 65536) == errno.EIO
                d.heal()
                assert nbd.write(MiB, b"\x03" * 65536) == 0
                d.inject("pread")
                err, _ = nbd.read(8 * MiB, 4096)
                assert err == errno.EIO
                d.heal()
                assert nbd.read(MiB, 4096) == (0, b"\x03" * 4096)
                nbd.disconnect()
        finally:
            srv.stop()


def test_secondary_disk_eio_today_marks_out_of_sync_and_resync_repairs(cluster, tmp_path):
    """EIO on the Secondary's disk: the Secondary answers NEG_ACK, the Primary marks the
    blocks out of sync and the client sees no error. With on-io-error = pass-on the
    Secondary stays attached (UpToDate; the default, detach, is tested in
    test_disk_detach.py); after the disk heals a `resync` copies the marked blocks and both
    disks are identical."""
    require_tool(*TOOLS, "cmp")
    c = cluster(size="64M", resource={"on-io-error": "pass-on"})
    disk = faulty_disk_for(c, "beta")
    try:
        c.up_pair()
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            assert nbd.write(0, b"\x11" * MiB) == 0
            disk.inject("pwrite")
            assert nbd.write(MiB, b"\x22" * MiB) == 0  # no error for the client
            a = c.wait_status("alpha", lambda s: s["out_of_sync_bytes"] >= MiB, 30,
                              "failed peer write marked", fast=True)
            b = c.admin("beta")
            print(f"\nEIO on the Secondary: primary out of sync {a['out_of_sync_bytes']} bytes, "
                  f"connection {a['connection']}/{a['replication']}; secondary disk "
                  f"{b['disk']}, last_error {b['last_error']!r}")
            assert "errno 5" in c.log("alpha"), c.log("alpha")[-2000:]
            assert read_at(c.disk("alpha"), MiB, MiB) == b"\x22" * MiB
            disk.heal()
            c.admin("alpha", "resync")
            a = c.wait_status("alpha", lambda s: s["out_of_sync_bytes"] == 0 and
                              s["replication"] == "Established", 60, "resynced", fast=True)
            nbd.disconnect()
        c.stop_all()
        cmp_data(c, a["size_bytes"])
    finally:
        c.stop_all()
        disk.stop()
