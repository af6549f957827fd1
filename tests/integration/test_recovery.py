"""Recovery of a two-node resource: bitmap-based resync after losing the peer (only what was
written travels), checksum resync of the activity-log extents after a Primary crash,
failover and return of the old Primary as sync target, split brain detected and resolved
by hand, online verify finding exactly the blocks that differ, corrupt or missing
metadata refused without re-initializing it, application writes during a resync, and
`invalidate` forcing a full resync."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from support.helpers import PY, ROOT, require_tool, run
from support.repltools import MiB, cmp_data, fio, fio_bytes_written, qemu_io, read_at

BLOCK = 4096
HEADER_BYTES = 40  # blockrep.peer.proto.HEADER_SIZE: one link packet header


# -- helpers (local to this file) -----------------------------------------------------------

class Events:
    """The node's event stream (`blockrep events` over the admin socket)."""

    def __init__(self, c, node: str):
        self.node = node
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(1.0)
        self.sock.connect(c.admin_socket(node))
        self.sock.sendall(b'{"cmd": "events"}\n')
        self.buf = b""
        self.seen: list[dict] = []
        first = self._line(10.0)
        assert first and json.loads(first).get("ok"), first

    def _line(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                return None
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def wait(self, kind: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"{self.node}: no {kind!r} event within {timeout}s; "
                                     f"events seen: {self.seen}")
            ev = json.loads(line)
            self.seen.append(ev)
            if ev.get("event") == kind:
                return ev

    def close(self) -> None:
        self.sock.close()


def flip_byte(path: str, offset: int) -> int:
    """XOR one byte of a file with 0xFF; returns the new value."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return old ^ 0xFF


def up_argv(c, node: str) -> list[str]:
    """`blockrep up` exactly as Cluster.start runs it (with metadata), for a run expected
    to fail."""
    return [PY, "-m", "blockrep", "up", c.configs[node], "--node", node]


def established(s: dict) -> bool:
    return s["connection"] == "Connected" and s["replication"] == "Established"


def synced(s: dict) -> bool:
    return established(s) and s["out_of_sync_bytes"] == 0 and s["last_sync"] is not None


# -- 1. peer lost during random writes: only the dirty blocks are resynced ----------------------

@pytest.mark.parametrize("how", ["sigkill", "disconnect"])
def test_peer_lost_during_random_writes_bitmap_resync(cluster, tmp_path, how):
    require_tool("fio", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    with fio(tmp_path, c.uri("alpha"), f"peer-lost-{how}", "--rw=randwrite", "--bs=4k",
             "--iodepth=16", "--offset=0", "--size=200M", "--io_size=64M", "--norandommap=0",
             "--randrepeat=0", background=True) as job:
        # lose the peer a quarter into the run: the writes before are replicated
        c.wait_status("beta", lambda s: s["counters"]["writes_applied"] >= 4096, 30,
                      "writes reaching the secondary", fast=True)
        assert job.proc.poll() is None, "fio finished before the peer was lost"
        if how == "sigkill":
            c.kill("beta", signal.SIGKILL)
        else:
            c.cli("beta", "disconnect")
        job.wait()
    assert fio_bytes_written(job.report()) == 64 * MiB

    a = c.status("alpha")
    assert a["role"] == "Primary" and a["replication"] == "Off", a
    assert a["counters"]["writes_local_only"] > 0, a
    dirty = a["out_of_sync_bytes"]
    # 4k blocks, each written at most once (random map): at most the 64 MiB fio wrote
    assert 0 < dirty <= 64 * MiB, a
    assert dirty % BLOCK == 0, a

    if how == "sigkill":
        c.start("beta")
    else:
        c.cli("beta", "connect")
    a = c.wait_status("alpha", synced, 90, "alpha Established, nothing out of sync, "
                      "last_sync present")
    b = c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate" and
                      s["last_sync"] is not None, 60, "beta UpToDate after the resync")

    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert b["decision"]["strategy"] == "sync-target", b["decision"]
    ls = a["last_sync"]
    assert ls["role"] == "SyncSource", ls
    assert ls["total_bytes"] == dirty, (ls, dirty)
    assert b["last_sync"]["role"] == "SyncTarget", b["last_sync"]
    sent = ls["sent_bytes"]
    assert sent <= 1.1 * dirty, f"resync sent {sent} payload bytes for {dirty} dirty bytes"
    # The whole link since it came up (handshake with both bitmaps, pings, resync packets):
    # allowance = 10% of the dirty bytes + one 36-byte header per dirty 4 KiB block (a
    # resync request is at least one block) + 64 KiB for the handshake.
    link_sent = a["counters"]["link_bytes_sent"]
    headers = HEADER_BYTES * (dirty // BLOCK)
    limit = int(1.1 * dirty) + headers + 64 * 1024
    print(f"\n[{how}] dirty={dirty} bytes ({dirty / MiB:.1f} MiB), resync sent_bytes={sent} "
          f"({sent / dirty:.3f}x), link_bytes_sent={link_sent} ({link_sent / dirty:.3f}x), "
          f"limit={limit}, elapsed={ls['elapsed_s']}s")
    assert link_sent <= limit, (
        f"link sent {link_sent} bytes for {dirty} dirty bytes; limit 1.1 * {dirty} + "
        f"{HEADER_BYTES} * {dirty // BLOCK} blocks ({headers}) + 65536 = {limit}")
    cmp_data(c, a["size_bytes"])


# -- 2. Primary crash: only activity-log extents, in checksum mode ------------------------------

def test_primary_crash_resyncs_only_activity_log_extents_with_checksums(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    region_off, region = 64 * MiB, 64 * MiB
    with fio(tmp_path, c.uri("alpha"), "primary-crash", "--rw=randwrite", "--bs=4k",
             "--iodepth=16", f"--offset={region_off}", f"--size={region}", "--time_based",
             "--runtime=60", background=True) as job:
        c.wait_status("beta", lambda s: s["counters"]["writes_applied"] >= 3000, 30,
                      "writes reaching the secondary", fast=True)
        assert job.proc.poll() is None, "fio finished before the primary was killed"
        c.kill("alpha", signal.SIGKILL)
        job.wait(30)  # fio fails: its server died
    c.wait_status("beta", lambda s: s["replication"] == "Off", 30, "beta lost its peer")

    c.start("alpha")
    a = c.wait_status("alpha", synced, 60, "alpha resynced its activity-log extents")
    b = c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate" and
                      s["last_sync"] is not None, 60, "beta UpToDate")
    assert a["role"] == "Secondary", a
    assert a["metadata"]["crashed_primary_at_start"] is True, a["metadata"]
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert a["decision"]["rule"].startswith("current-equal"), a["decision"]
    assert b["decision"]["strategy"] == "sync-target", b["decision"]
    assert b["decision"]["rule"].startswith("current-equal"), b["decision"]
    ls = a["last_sync"]
    assert ls["role"] == "SyncSource", ls
    total = ls["total_bytes"]
    print(f"\nprimary crash: resync total={total} ({total / MiB:.0f} MiB), "
          f"sent_bytes={ls['sent_bytes']}, differing bytes on target="
          f"{b['counters']['resync_differing_bytes']}")
    assert total > 0 and total % (4 * MiB) == 0, ls
    assert total <= region + 8 * MiB, f"resynced {total} bytes for a {region}-byte region"
    # checksum mode: a 16-byte digest per 4 KiB block, plus the few blocks whose writes were lost
    # in flight (iodepth 16 x 4 KiB, protocol C)
    assert ls["sent_bytes"] < total // 8, ls
    assert b["counters"]["resync_differing_bytes"] < total // 8, b["counters"]
    cmp_data(c, a["size_bytes"])


# -- 3. failover, then the old Primary returns as sync target -----------------------------------

def test_failover_and_return_of_old_primary_as_sync_target(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0xa1 0 {4 * MiB}")
    c.kill("alpha", signal.SIGKILL)
    c.wait_status("beta", lambda s: s["replication"] == "Off", 30, "beta lost its peer")
    c.cli("beta", "primary")
    c.wait_status("beta", lambda s: s["role"] == "Primary", 10, "beta Primary")
    qemu_io(c.uri("beta"), f"write -P 0xb2 {2 * MiB} {4 * MiB}")

    c.start("alpha")
    a = c.wait_status("alpha", lambda s: synced(s) and s["disk"] == "UpToDate", 60,
                      "alpha resynced from beta")
    b = c.wait_status("beta", lambda s: synced(s) and s["peer"]["disk"] == "UpToDate", 30,
                      "beta Established with an UpToDate peer")
    assert a["role"] == "Secondary" and b["role"] == "Primary", (a["role"], b["role"])
    assert a["decision"]["strategy"] == "sync-target", a["decision"]
    assert "bitmap" in a["decision"]["rule"], a["decision"]
    assert b["decision"]["strategy"] == "sync-source", b["decision"]
    assert a["last_sync"]["role"] == "SyncTarget", a["last_sync"]
    cmp_data(c, a["size_bytes"])
    qemu_io(c.uri("beta"), f"read -P 0xa1 0 {2 * MiB}", f"read -P 0xb2 {2 * MiB} {4 * MiB}",
            f"read -P 0 {6 * MiB} {MiB}")


# -- 4. split brain: detected, both keep their data, resolved by hand ---------------------------

def _diverge(c) -> None:
    """Cut the link, make both nodes Primary, write different data on each."""
    for n in c.NODES:
        c.cli(n, "disconnect")
    for n in c.NODES:
        c.wait_status(n, lambda s: s["connection"] == "StandAlone" and
                      s["replication"] == "Off", 30, "StandAlone")
    b = c.status("beta")
    assert b["disk"] == "UpToDate", b  # so a plain `primary` is enough
    c.cli("beta", "primary")
    qemu_io(c.uri("alpha"), f"write -P 0xa4 0 {2 * MiB}")
    qemu_io(c.uri("beta"), f"write -P 0xb4 {MiB} {2 * MiB}")


def _wait_split_brain(c, timeout: float) -> None:
    for n in c.NODES:
        s = c.wait_status(n, lambda s: "split brain" in s["last_error"].lower() and
                          s["connection"] == "StandAlone", timeout,
                          "split brain reported and StandAlone")
        assert s["replication"] == "Off", s
        assert s["decision"]["strategy"] == "split-brain", s["decision"]


def _resolve_alpha_wins(c) -> None:
    c.cli("beta", "connect", "--discard-my-data")
    c.cli("alpha", "connect")
    b = c.wait_status("beta", lambda s: synced(s) and s["disk"] == "UpToDate", 60,
                      "beta resynced from alpha")
    a = c.wait_status("alpha", lambda s: synced(s) and s["peer"]["disk"] == "UpToDate", 30,
                      "alpha Established with an UpToDate peer")
    assert b["decision"]["strategy"] == "sync-target", b["decision"]
    assert "discard-my-data" in b["decision"]["rule"], b["decision"]
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert a["role"] == "Primary" and b["role"] == "Secondary", (a["role"], b["role"])
    cmp_data(c, a["size_bytes"])
    assert read_at(c.disk("beta"), 0, 2 * MiB) == b"\xa4" * (2 * MiB)
    assert read_at(c.disk("beta"), 2 * MiB, MiB) == bytes(MiB)
    qemu_io(c.uri("alpha"), f"read -P 0xa4 0 {2 * MiB}", f"read -P 0 {2 * MiB} {MiB}")


def test_split_brain_both_primary_detected_then_resolved(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    _diverge(c)
    for n in c.NODES:
        c.cli(n, "connect")
    _wait_split_brain(c, 10)  # a connect attempt every 0.5 s: detection is immediate
    for n in c.NODES:
        assert c.status(n)["role"] == "Primary"
    # both kept their own data
    qemu_io(c.uri("alpha"), f"read -P 0xa4 0 {2 * MiB}", f"read -P 0 {2 * MiB} {MiB}")
    qemu_io(c.uri("beta"), f"read -P 0 0 {MiB}", f"read -P 0xb4 {MiB} {2 * MiB}")
    c.cli("beta", "secondary")
    _resolve_alpha_wins(c)


def test_split_brain_after_demotion_detected_then_resolved(cluster):
    """The same divergence, but beta is demoted before the nodes reconnect (one Primary:
    after-sb-1pri defaults to disconnect)."""
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    _diverge(c)
    c.cli("beta", "secondary")
    for n in ("beta", "alpha"):
        c.cli(n, "connect")
    _wait_split_brain(c, 30)
    assert c.status("alpha")["role"] == "Primary"
    assert c.status("beta")["role"] == "Secondary"
    # both kept their own data (beta, now Secondary, serves no NBD: read its disk)
    qemu_io(c.uri("alpha"), f"read -P 0xa4 0 {2 * MiB}", f"read -P 0 {2 * MiB} {MiB}")
    assert read_at(c.disk("beta"), 0, MiB) == bytes(MiB)
    assert read_at(c.disk("beta"), MiB, 2 * MiB) == b"\xb4" * (2 * MiB)
    _resolve_alpha_wins(c)


# -- 5. online verify finds exactly the flipped blocks; resync repairs them ---------------------

def test_verify_finds_flipped_blocks_and_resync_repairs(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0x5a 0 {8 * MiB}")
    size = c.status("alpha")["size_bytes"]

    def verify() -> dict:
        ev = Events(c, "alpha")
        try:
            c.cli("alpha", "verify")
            done = ev.wait("verify-finished", 60)
        finally:
            ev.close()
        s = c.status("alpha")
        assert s["verify"]["state"] == "done", s["verify"]
        assert s["verify"]["found_bytes"] == done["found_bytes"], (s["verify"], done)
        return s

    # identical disks: nothing found
    s = verify()
    assert s["verify"]["found_bytes"] == 0, s["verify"]
    assert s["out_of_sync_bytes"] == 0, s

    offsets = [10 * BLOCK + 5, 10 * BLOCK + 300, 3 * MiB + 4095, 100 * MiB, size - 1]
    for off in offsets:
        flip_byte(c.disk("beta"), off)
    blocks = {off // BLOCK for off in offsets}
    s = verify()
    assert s["verify"]["found_bytes"] == len(blocks) * BLOCK, (s["verify"], sorted(blocks))
    assert s["out_of_sync_bytes"] == len(blocks) * BLOCK, s
    b = c.wait_status("beta", lambda s: s["replication"] == "Established", 10,
                      "beta out of VerifyT")
    assert b["out_of_sync_bytes"] == len(blocks) * BLOCK, b

    c.cli("alpha", "resync")
    a = c.wait_status("alpha", synced, 60, "alpha resynced the verify findings")
    c.wait_status("beta", lambda s: established(s) and s["out_of_sync_bytes"] == 0 and
                  s["disk"] == "UpToDate", 30, "beta repaired")
    assert a["last_sync"]["total_bytes"] == len(blocks) * BLOCK, a["last_sync"]
    cmp_data(c, size)
    s = verify()
    assert s["verify"]["found_bytes"] == 0, s["verify"]


# -- 6. corrupt or missing metadata: refuse, never re-initialize --------------------------------

def test_corrupt_superblock_refused_without_reinitializing(cluster):
    from blockrep.meta import layout

    c = cluster(size="64M")
    c.up_pair()
    c.stop("beta")  # clean shutdown
    md = json.loads(c.cli("beta", "dump-md").stdout)
    disk = c.disk("beta")
    data_size, md_offset, _ = layout(os.path.getsize(disk), internal=True)
    assert md["data_size"] == data_size == md_offset, md

    for copy in ("A", "B"):
        off = md_offset + (0 if copy == "A" else 4096) + 20
        flipped = flip_byte(disk, off)
        t0 = time.monotonic()
        res = run(up_argv(c, "beta"), timeout=30, check=False, cwd=ROOT)
        elapsed = time.monotonic() - t0
        err = (res.stderr + res.stdout).strip()
        assert res.returncode != 0, f"copy {copy}: up started on corrupt metadata: {err}"
        assert elapsed < 10, f"copy {copy}: up took {elapsed:.1f}s to refuse"
        assert len(err.splitlines()) == 1, f"copy {copy}: not one line:\n{err}"
        assert "corrupt" in err and "checksum" in err, err
        assert "Traceback" not in err, err
        res = c.cli("beta", "dump-md", check=False)
        err = (res.stderr + res.stdout).strip()
        assert res.returncode != 0, f"copy {copy}: dump-md accepted corrupt metadata: {err}"
        assert "corrupt" in err and "Traceback" not in err, err
        assert read_at(disk, off, 1)[0] == flipped, f"copy {copy}: metadata was rewritten"
        flip_byte(disk, off)  # repair for the next round

    # repaired: the node starts and rejoins
    c.start("beta")
    c.wait_connected(30)


def test_missing_metadata_refused_with_create_md_hint(cluster):
    c = cluster(size="64M", metadata=False)
    res = run(up_argv(c, "alpha"), timeout=30, check=False, cwd=ROOT)
    err = (res.stderr + res.stdout).strip()
    assert res.returncode != 0, err
    assert len(err.splitlines()) == 1 and "create-md" in err and "Traceback" not in err, err
    res = c.cli("alpha", "dump-md", check=False)
    err = (res.stderr + res.stdout).strip()
    assert res.returncode != 0 and "create-md" in err, err
    assert read_at(c.disk("alpha"), 0, 1 << 16) == bytes(1 << 16)  # nothing written
    assert not os.path.exists(c.admin_socket("alpha"))


# -- 7. application writes while a resync runs --------------------------------------------------

def test_fio_verify_during_full_resync(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="256M", resource={"resync-rate": "40M"})
    c.up_pair()
    size = c.status("alpha")["size_bytes"]
    c.cli("beta", "invalidate")
    a = c.wait_status("alpha", lambda s: s["replication"] == "SyncSource", 30,
                      "alpha SyncSource", fast=True)
    t0 = time.monotonic()
    rep = fio(tmp_path, c.uri("alpha"), "during-resync", "--rw=randwrite",
              "--bsrange=4k-64k", "--iodepth=16", "--offset=0",
              f"--size={size // (64 * 1024) * 64 * 1024}", "--io_size=128M",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0")
    t_fio = time.monotonic() - t0
    assert fio_bytes_written(rep) >= 128 * MiB
    during = c.admin("alpha")
    a = c.wait_status("alpha", synced, 90, "full resync done")
    c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate", 30,
                  "beta UpToDate")
    print(f"\nfio during resync: {t_fio:.1f}s; resync still running after fio: "
          f"{during['replication']} {during['sync'] and during['sync']['percent']}%; "
          f"resync elapsed {a['last_sync']['elapsed_s']}s")
    assert a["decision"]["strategy"] == "full-sync-source", a["decision"]
    assert a["last_sync"]["total_bytes"] == size, a["last_sync"]
    assert a["counters"]["writes_replicated"] > 0, a["counters"]
    cmp_data(c, size)


# -- 8. invalidate ------------------------------------------------------------------------------

def test_invalidate_secondary_full_resync_refused_on_primary(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="256M")
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0x77 0 {4 * MiB}")
    size = c.status("alpha")["size_bytes"]
    # a difference no bitmap knows of: only a full resync repairs it
    flip_byte(c.disk("beta"), 200 * MiB + 123)

    res = c.cli("alpha", "invalidate", check=False)
    assert res.returncode != 0, res.stdout
    assert "Primary" in res.stderr, res.stderr
    a = c.status("alpha")
    assert a["disk"] == "UpToDate" and established(a), a

    c.cli("beta", "invalidate")
    b = c.wait_status("beta", lambda s: synced(s) and s["disk"] == "UpToDate", 90,
                      "beta fully resynced")
    a = c.wait_status("alpha", synced, 30, "alpha done as sync source")
    assert b["decision"]["strategy"] == "full-sync-target", b["decision"]
    assert a["decision"]["strategy"] == "full-sync-source", a["decision"]
    assert b["last_sync"]["total_bytes"] == size, b["last_sync"]
    assert a["last_sync"]["total_bytes"] == size, a["last_sync"]
    cmp_data(c, size)


# -- csums-after-crash-only = false: every resync compares digests first -----------------------

def test_checksum_resync_for_every_resync_when_not_only_after_crash(cluster):
    """Blocks rewritten with the bytes they already held while the peer was away are marked
    out of sync but equal: with `csums-after-crash-only = false` the resync sends a digest per
    block and no data (with the default, bitmap mode copies them all)."""
    from support.nbd_testlib import RawClient

    c = cluster(size="64M", resource={"csums-after-crash-only": False})
    c.up_pair()
    blocks = 1024  # 4 MiB, every 4th block of the first 16 MiB
    data = {b * 16384: os.urandom(4096) for b in range(blocks)}
    with RawClient(c.nbd_port("alpha")) as cl:
        cl.handshake()
        for off, d in data.items():
            assert cl.write(off, d) == 0
    c.wait_status("beta", lambda s: s["counters"]["writes_applied"] >= blocks, 30,
                  "the writes applied on beta")
    c.cli("beta", "disconnect")
    c.wait_status("alpha", lambda s: s["connection"] != "Connected", 30, "disconnected")
    with RawClient(c.nbd_port("alpha")) as cl:
        cl.handshake()
        for off, d in data.items():  # the same bytes again: the peer already has them
            assert cl.write(off, d) == 0
    dirty = c.status("alpha")["out_of_sync_bytes"]
    assert dirty == blocks * 4096, dirty
    c.cli("beta", "connect")
    a = c.wait_status("alpha", synced, 60, "alpha resynced")
    b = c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate", 60,
                      "beta UpToDate")
    ls = a["last_sync"]
    print(f"\ncsums for every resync: {dirty} bytes marked, sent_bytes={ls['sent_bytes']}, "
          f"differing on target={b['counters']['resync_differing_bytes']}")
    assert a["decision"]["strategy"] == "sync-source", a["decision"]
    assert ls["total_bytes"] == dirty, ls
    assert ls["sent_bytes"] < dirty // 64, ls  # digests only (16 of 4096 bytes per block)
    assert b["counters"]["resync_differing_bytes"] == 0, b["counters"]
    cmp_data(c, a["size_bytes"])
