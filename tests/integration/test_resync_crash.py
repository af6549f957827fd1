"""A resync survives kill -9 of either side: a full sync is a bitmap with every bit set, so
after a restart it resumes where it was (a bitmap-based resync of what is left) instead of
starting again from zero; a SyncSource that came back Outdated ends UpToDate with its
peer; the SyncTarget's status shows what remains to copy; and a Primary stopped cleanly
right after a write burst keeps no bits that a clean stop could clear."""

from __future__ import annotations

import json
import signal

from support.helpers import require_tool
from support.repltools import MiB, cmp_data, fio, qemu_io

RATE = "40M"  # a 256 MiB full sync takes ~6 s: time to kill a node in the middle


def _synced_pair(c, size):
    def done(s):
        return (s["connection"] == "Connected" and s["replication"] == "Established" and
                s["disk"] == "UpToDate" and s["peer"]["disk"] == "UpToDate" and
                s["out_of_sync_bytes"] == 0 and s["last_sync"] is not None)
    a = c.wait_status("alpha", done, 90, "alpha synced, both UpToDate")
    b = c.wait_status("beta", done, 30, "beta synced, both UpToDate")
    cmp_data(c, size)
    return a, b


def _source_part_done(c, src, size):
    """Wait until 60% of the full sync is done; -> the source's status then. Both sides
    persist their progress every 2 s (3.8 s at 40 MB/s for 60%), so after a kill the union of
    their records leaves at most ~2 s of copying to be done again."""
    return c.wait_status(src, lambda s: s["replication"] == "SyncSource" and s["sync"] and
                         s["sync"]["done_bytes"] >= size * 6 // 10, 60,
                         "60% of the full sync done", fast=True)


LAG = 40 * MiB  # what 0.5 s between two persisted records holds at 40 MB/s, with margin


def test_full_sync_resumes_after_kill_of_the_target(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M", resource={"resync-rate": RATE})
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0x3c 0 {8 * MiB}")
    size = c.status("alpha")["size_bytes"]
    c.cli("beta", "invalidate")
    # the target's status shows what is left to copy, and it shrinks
    b = c.wait_status("beta", lambda s: s["replication"] == "SyncTarget" and s["sync"] and
                      0 < s["sync"]["remaining_bytes"] < size, 60,
                      "beta SyncTarget with part of the copy done", fast=True)
    assert b["out_of_sync_bytes"] == b["sync"]["remaining_bytes"], b
    mid = _source_part_done(c, "alpha", size)
    c.kill("beta", signal.SIGKILL)
    c.start("beta")
    a, b = _synced_pair(c, size)
    done_before = mid["sync"]["done_bytes"]
    print(f"\ntarget killed after {done_before} of {size} bytes; the resync after the "
          f"restart copied {a['last_sync']['total_bytes']} bytes "
          f"(rule: {b['decision']['rule']})")
    assert b["decision"]["strategy"] == "sync-target", b["decision"]  # not a full sync
    assert a["last_sync"]["total_bytes"] <= size - done_before + LAG, a["last_sync"]
    qemu_io(c.uri("alpha"), f"read -P 0x3c 0 {8 * MiB}")


def test_full_sync_resumes_after_kill_of_a_secondary_source(cluster):
    """The source is a Secondary: it restarts Outdated, resumes the sync, and ends
    UpToDate (it can be promoted without --force), as does the target."""
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M", resource={"resync-rate": RATE})
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0x4d 0 {8 * MiB}")
    c.cli("alpha", "secondary")
    size = c.status("alpha")["size_bytes"]
    c.cli("beta", "invalidate")
    mid = _source_part_done(c, "alpha", size)
    c.kill("alpha", signal.SIGKILL)
    c.start("alpha")
    a, b = _synced_pair(c, size)
    done_before = mid["sync"]["done_bytes"]
    print(f"\nsource killed after {done_before} of {size} bytes; the resync after the "
          f"restart copied {a['last_sync']['total_bytes']} bytes "
          f"(rule: {a['decision']['rule']})")
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert a["last_sync"]["total_bytes"] <= size - done_before + LAG, a["last_sync"]
    c.cli("alpha", "primary")  # UpToDate: no --force needed
    qemu_io(c.uri("alpha"), f"read -P 0x4d 0 {8 * MiB}")


def test_clean_stop_after_write_burst_keeps_no_bits(cluster, tmp_path):
    require_tool("fio")
    c = cluster(size="256M")
    c.up_pair()
    # no flush at the end: the writes sit in the transfer log until the next barrier
    fio(tmp_path, c.uri("alpha"), "burst", "--rw=randwrite", "--bs=4k", "--iodepth=16",
        "--size=200M", "--io_size=32M", "--end_fsync=0")
    c.stop("alpha")
    md = json.loads(c.cli("alpha", "dump-md").stdout)
    print(f"\nbits kept by the clean stop: {md['bitmap_set_bits']}")
    assert md["bitmap_set_bits"] == 0, md
    assert "clean" in md["flags"], md


def test_split_brain_survivor_that_restarted_ends_uptodate(cluster):
    """The node whose data survives a split brain was a Secondary and restarted (so it came
    back Outdated): once the resync to the discarding node is done both are UpToDate."""
    require_tool("qemu-io", "cmp")
    c = cluster(size="64M")
    c.up_pair()
    for n in c.NODES:
        c.cli(n, "disconnect")
    c.cli("beta", "primary")
    qemu_io(c.uri("alpha"), f"write -P 0xa7 0 {MiB}")
    qemu_io(c.uri("beta"), f"write -P 0xb7 {2 * MiB} {MiB}")
    for n in c.NODES:
        c.cli(n, "secondary")
    c.stop("alpha")
    c.start("alpha")
    assert c.status("alpha")["disk"] == "Outdated"
    c.cli("alpha", "disconnect")  # StandAlone again after the restart, as before it
    c.cli("beta", "connect", "--discard-my-data")
    c.cli("alpha", "connect")
    size = c.status("alpha")["size_bytes"]
    a, b = _synced_pair(c, size)
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert "discard" in b["decision"]["rule"], b["decision"]
    c.cli("alpha", "primary")  # the survivor is UpToDate: no --force
    qemu_io(c.uri("alpha"), f"read -P 0xa7 0 {MiB}", f"read -P 0 {2 * MiB} {MiB}")
