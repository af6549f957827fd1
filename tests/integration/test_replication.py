"""Replication of a two-node resource, end to end with standard NBD clients: both disks end
up byte-identical under concurrent overlapping writes; losing the Secondary never fails the
client and is repaired by resync; every write acknowledged to a client is on the Secondary
when the Primary dies; mismatched configurations never connect; failover keeps the data;
role changes are refused while they would hurt; FUA and flush reach both disks."""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import time

import pytest
from support.helpers import SYSTEM_PY, require_tool, run, wait_for
from support.repltools import MiB, cmp_data, fio, fio_bytes_written, qemu_io, read_at


# -- helpers (local to this file) -----------------------------------------------------------

def wait_quiet(c, same_processes: bool = True) -> None:
    """No write pending on the Primary and (while neither node was restarted, so the
    counters compare) everything it replicated applied on the peer."""
    a = c.wait_status("alpha", lambda s: s["counters"]["writes_pending_peer"] == 0,
                      30, "no writes pending", fast=True)
    want = a["counters"]["writes_replicated"] if same_processes else 0
    c.wait_status("beta", lambda s: s["counters"]["writes_pending_peer"] == 0 and
                  s["counters"]["writes_applied"] >= want, 30,
                  f"peer applied all {want} replicated writes", fast=True)


# -- 1. overlapping concurrent writes, then verify ----------------------------------------------

def test_fio_overlapping_writes_then_verify_disks_identical(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="160M")
    c.up_pair()
    uri = c.uri("alpha")
    # 4 connections, 32 in flight each, all on the same 32 MiB: writes to one block race
    rep = fio(tmp_path, uri, "overlap", "--rw=randwrite", "--bs=4k", "--iodepth=32",
              "--numjobs=4", "--offset=0", "--size=32M", "--io_size=24M",
              "--randrepeat=0", "--norandommap")
    assert fio_bytes_written(rep) == 4 * 24 * MiB
    # then 4 distinct regions (32M..160M-ish) written and read back with checksums
    rep = fio(tmp_path, uri, "verify", "--rw=randwrite", "--bs=4k", "--iodepth=32",
              "--numjobs=4", "--offset=32M", "--offset_increment=24M", "--size=24M",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
    assert fio_bytes_written(rep) == 4 * 24 * MiB
    wait_quiet(c)
    a = c.status("alpha")
    assert a["connection"] == "Connected" and a["replication"] == "Established", a
    assert a["out_of_sync_bytes"] == 0, a
    assert a["counters"]["writes_local_only"] == 0, a
    cmp_data(c, a["size_bytes"])


def test_busy_polling_pair_replicates_and_verifies(cluster, tmp_path):
    """busy-poll (shell/busypoll.py) only changes when the loop sleeps: QD1 writes with
    fio's crc32c verify through a busy-polling pair, then identical disks."""
    require_tool("fio", "cmp")
    c = cluster(size="64M", resource={"busy-poll": 100})
    c.up_pair()
    rep = fio(tmp_path, c.uri("alpha"), "qd1", "--rw=randwrite", "--bs=4k", "--iodepth=1",
              "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
    assert fio_bytes_written(rep) == 8 * MiB
    wait_quiet(c)
    a = c.status("alpha")
    assert a["replication"] == "Established" and a["out_of_sync_bytes"] == 0, a
    cmp_data(c, a["size_bytes"])


# -- 2. the Secondary dies in the middle of a run -----------------------------------------------

def test_secondary_killed_during_fio_then_resyncs(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="64M")
    c.up_pair()
    with fio(tmp_path, c.uri("alpha"), "kill-secondary", "--rw=randwrite", "--bs=4k",
             "--iodepth=16", "--numjobs=2", "--offset=0", "--size=48M", "--time_based",
             "--runtime=6", background=True) as job:
        # kill once writes are really flowing to the peer, ~2 s into the run
        t0 = time.monotonic()
        c.wait_status("beta", lambda s: s["counters"]["writes_applied"] > 1000, 20,
                      "writes reaching the secondary", fast=True)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
        assert job.proc.poll() is None, "fio ended before the secondary was killed"
        c.kill("beta", signal.SIGKILL)
        job.wait(60)
    assert fio_bytes_written(job.report()) > 0
    a = c.status("alpha")
    assert a["role"] == "Primary", a
    assert a["connection"] != "Connected", a
    assert a["replication"] == "Off", a
    assert a["peer"]["disk"] == "DUnknown", a
    assert a["out_of_sync_bytes"] > 0, a
    assert a["counters"]["writes_local_only"] > 0, a

    c.start("beta")
    b = c.wait_status("beta", lambda s: s["replication"] == "Established" and
                      s["disk"] == "UpToDate", 60, "resync finished on beta")
    assert b["last_sync"] and b["last_sync"]["role"] == "SyncTarget", b
    assert b["decision"]["strategy"] == "sync-target", b["decision"]  # bitmap-based, not full
    a = c.wait_status("alpha", lambda s: s["replication"] == "Established" and
                      s["out_of_sync_bytes"] == 0 and s["peer"]["disk"] == "UpToDate", 60,
                      "alpha Established, nothing out of sync")
    assert a["last_sync"] and a["last_sync"]["role"] == "SyncSource", a
    wait_quiet(c, same_processes=False)
    cmp_data(c, a["size_bytes"])


# -- 3. acknowledged writes survive a Primary crash ----------------------------------------------

ACK_CLIENT = r'''
import os, struct, sys, time, random
import nbd

uri, record = sys.argv[1], sys.argv[2]
nblocks, inflight_max, base = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
BS = 4096
h = nbd.NBD()
h.connect_uri(uri)
fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, b"connected\n")
version = [base] * nblocks     # last version issued per block (above all earlier rounds)
busy = set()                   # blocks with a write in flight
cookies = {}                   # cookie -> (block, version, buffer)
rng = random.Random()
acked = 0
def issue():
    while True:
        b = rng.randrange(nblocks)
        if b not in busy:
            break
    v = version[b] + 1
    version[b] = v
    buf = nbd.Buffer.from_bytearray(bytearray(struct.pack("<QQ", b, v) * (BS // 16)))
    cookie = h.aio_pwrite(buf, b * BS)
    busy.add(b)
    cookies[cookie] = (b, v, buf)
lines = []
try:
    while True:
        while len(cookies) < inflight_max:
            issue()
        h.poll(-1)
        while True:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            b, v, _ = cookies.pop(cookie)
            busy.discard(b)
            h.aio_command_completed(cookie)  # raises if the write failed: not acknowledged
            lines.append(b"%d %d\n" % (b, v))
            acked += 1
        if lines:
            os.write(fd, b"".join(lines))  # only after the acknowledgement arrived
            lines = []
except Exception as exc:  # the primary died: stop, everything recorded was acknowledged
    os.write(fd, b"".join(lines) + b"end %r\n" % (str(exc)[:200],))
os.fsync(fd)
os.close(fd)
print("acked", acked, flush=True)
'''

ACK_ROUNDS = 20
ACK_BLOCKS = 2048  # 8 MiB of 4 KiB blocks: lots of blocks get many versions per round


def _check_acked(path_disk: str, record: str, nblocks: int) -> tuple[int, list]:
    latest: dict[int, int] = {}
    count = 0
    with open(record) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                continue
            b, v = int(parts[0]), int(parts[1])
            count += 1
            if v > latest.get(b, 0):
                latest[b] = v
    data = read_at(path_disk, 0, nblocks * 4096)
    violations = []
    for b in range(nblocks):
        blk = data[b * 4096:(b + 1) * 4096]
        if blk == bytes(4096):
            stored = 0
        else:
            idx, stored = struct.unpack_from("<QQ", blk)
            if idx != b or blk != blk[:16] * 256:
                violations.append((b, "corrupt block", blk[:32].hex()))
                continue
        if stored < latest.get(b, 0):
            violations.append((b, f"stored version {stored} < acknowledged {latest[b]}"))
    return count, violations


def require_libnbd() -> None:
    require_tool(SYSTEM_PY)
    if subprocess.run([SYSTEM_PY, "-c", "import nbd"], capture_output=True,
                      check=False).returncode:
        if os.environ.get("CI"):
            pytest.fail(f"python3-libnbd is not installed for {SYSTEM_PY}")
        pytest.skip(f"python3-libnbd is not installed for {SYSTEM_PY}")


def test_acknowledged_writes_survive_primary_kill(cluster, tmp_path, record_property):
    require_libnbd()
    t_start = time.monotonic()
    c = cluster(size="16M")
    c.up_pair()
    script = tmp_path / "ack_client.py"
    script.write_text(ACK_CLIENT)
    rng = random.Random()
    total_acked = 0
    all_violations = []
    for rnd in range(ACK_ROUNDS):
        record = tmp_path / f"acks-{rnd}.txt"
        with open(tmp_path / f"ack-client-{rnd}.out", "w") as out:
            client = subprocess.Popen([SYSTEM_PY, str(script), c.uri("alpha"), str(record),
                                       str(ACK_BLOCKS), "64", str((rnd + 1) << 32)],
                                      stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda r=record: r.exists() and r.stat().st_size > 200, timeout=20,
                     what="first acknowledgements")
            time.sleep(rng.uniform(0.2, 1.2))  # the random moment of the crash
            assert client.poll() is None, (tmp_path / f"ack-client-{rnd}.out").read_text()
            c.kill("alpha", signal.SIGKILL)
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        count, violations = _check_acked(c.disk("beta"), str(record), ACK_BLOCKS)
        assert count > 0, f"round {rnd}: no write was acknowledged"
        total_acked += count
        all_violations += [(rnd, *v) for v in violations]
        if rnd == ACK_ROUNDS - 1:
            break
        # the crashed primary comes back as Secondary, catches up, is promoted again
        c.start("alpha")
        c.wait_status("alpha", lambda s: s["connection"] == "Connected" and
                      s["replication"] == "Established" and s["disk"] == "UpToDate" and
                      s["peer"]["disk"] == "UpToDate", 60, f"round {rnd}: alpha back in sync",
                      fast=True)
        c.admin("alpha", "primary", force=0, skip_initial_sync=0)
        c.wait_status("alpha", lambda s: s["role"] == "Primary" and
                      s["replication"] == "Established", 30, "alpha Primary again", fast=True)
    elapsed = time.monotonic() - t_start
    record_property("acknowledged_writes_checked", total_acked)
    print(f"\nacknowledged writes checked: {total_acked} in {ACK_ROUNDS} rounds "
          f"({elapsed:.1f}s)")
    assert not all_violations, f"{len(all_violations)} acknowledged writes lost on the " \
                               f"secondary (of {total_acked}): {all_violations[:20]}"
    assert total_acked >= ACK_ROUNDS * 10


# -- 4. configurations that disagree never connect ----------------------------------------------

MISMATCHES = {
    "secret": ({"secrets_per_node": {"alpha": "secret-one", "beta": "secret-two"}},
               "authentication failed: the shared secrets differ"),
    "name": ({"names_per_node": {"alpha": "r0", "beta": "r1"}}, "resource name differs"),
    "size": ({"sizes": {"alpha": "64M", "beta": "72M"}}, "disk sizes differ"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHES))
def test_mismatched_configuration_never_connects(cluster, kind):
    kw, reason = MISMATCHES[kind]
    c = cluster(size="64M", **kw)
    pattern = b"\x5a" * MiB
    with open(c.disk("alpha"), "r+b") as f:
        f.write(pattern)
    beta_before = read_at(c.disk("beta"), 0, 16 * MiB)
    assert beta_before == bytes(16 * MiB)
    for n in c.NODES:
        c.start(n)
    # alpha claims its data (a full sync to beta would follow if they ever connected)
    c.cli("alpha", "primary", "--force")
    for n in c.NODES:
        s = c.wait_status(n, lambda s: reason in s["last_error"], 20, f"error {reason!r}",
                          fast=True)
        assert s["connection"] != "Connected", s
        assert s["replication"] == "Off", s
    # several more connection attempts (connect-interval 0.5 s): still never connected
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for n in c.NODES:
            s = c.admin(n)
            assert s["connection"] != "Connected" and s["replication"] == "Off", s
            assert s["peer"]["disk"] == "DUnknown", s
        time.sleep(0.1)
    for n in c.NODES:
        s = c.status(n)  # the CLI shows it too
        assert reason in s["last_error"], s
        assert reason in c.log(n), c.log(n)
    c.stop_all()
    assert read_at(c.disk("beta"), 0, 16 * MiB) == beta_before, "beta's disk was written"
    assert read_at(c.disk("alpha"), 0, MiB) == pattern


# -- 5. failover ---------------------------------------------------------------------------------

def test_failover_to_secondary_keeps_data(cluster):
    require_tool("qemu-io")
    c = cluster(size="32M")
    c.up_pair()
    qemu_io(c.uri("alpha"), "write -P 0x5a 0 8M", "write -P 0xa5 8M 8M")
    c.kill("alpha", signal.SIGKILL)
    c.wait_status("beta", lambda s: s["connection"] != "Connected", 15, "peer lost")
    res = c.cli("beta", "primary")
    assert "Primary" in res.stdout
    b = c.status("beta")
    assert b["role"] == "Primary" and b["disk"] == "UpToDate", b
    qemu_io(c.uri("beta"), "read -P 0x5a 0 8M", "read -P 0xa5 8M 8M", "read -P 0 16M 1M")


# -- 6. role rules -------------------------------------------------------------------------------

HOLD_CLIENT = r'''
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * 4096, 0)
print("connected", flush=True)
sys.stdin.readline()
h.shutdown()
print("closed", flush=True)
'''


def test_role_changes_refused_while_unsafe(cluster, tmp_path):
    require_tool("nbdinfo")
    require_libnbd()
    c = cluster(size="32M")
    c.up_pair()
    res = c.cli("beta", "primary", check=False)
    assert res.returncode != 0, res
    msg = res.stderr + res.stdout
    assert "refused" in msg and "peer is Primary" in msg, msg
    assert c.status("beta")["role"] == "Secondary"

    # nbdinfo (libnbd 1.14) fails but prints the server's error text only in debug mode
    res = run(["nbdinfo", c.uri("beta")], check=False, timeout=30,
              env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert res.returncode != 0, res.stdout
    assert "server error message: resource r0 is Secondary on node beta" in res.stderr, \
        res.stderr[-3000:]
    if shutil.which("qemu-io"):  # qemu-io shows it without help
        res = qemu_io(c.uri("beta"), "read 0 4k", check=False)
        assert res.returncode != 0, res.stdout
        assert "is Secondary on node beta" in res.stderr + res.stdout, res.stderr

    script = tmp_path / "hold.py"
    script.write_text(HOLD_CLIENT)
    holder = subprocess.Popen([SYSTEM_PY, str(script), c.uri("alpha")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "connected", holder.stderr.read()
        assert c.status("alpha")["nbd"]["clients"] == 1
        res = c.cli("alpha", "secondary", check=False)
        assert res.returncode != 0, res
        msg = res.stderr + res.stdout
        assert "refused" in msg and "NBD client" in msg, msg
        assert c.status("alpha")["role"] == "Primary"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0, holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    c.wait_status("alpha", lambda s: s["nbd"]["clients"] == 0, 15, "client gone")
    res = c.cli("alpha", "secondary")
    assert "Secondary" in res.stdout
    a = c.status("alpha")
    assert a["role"] == "Secondary" and a["nbd"]["serving"] is False, a
    c.wait_status("beta", lambda s: s["peer"]["role"] == "Secondary", 15, "peer Secondary")
    # now beta may take over, and sees the client's write
    c.cli("beta", "primary")
    assert read_at(c.disk("beta"), 0, 4096) == b"\x11" * 4096


# -- 7. FUA and flush ------------------------------------------------------------------------

def test_fua_write_and_flush_reach_both_disks(cluster):
    require_tool("qemu-io")
    c = cluster(size="32M")
    c.up_pair()
    qemu_io(c.uri("alpha"), "write -f -P 0x3c 0 1M", "flush", "write -P 0xc3 1M 1M",
            "flush", "write -f -P 0x7e 4M 64k", "read -P 0x3c 0 1M")
    a = c.status("alpha")
    assert a["counters"]["writes_pending_peer"] == 0
    assert a["counters"]["writes_local_only"] == 0
    assert a["out_of_sync_bytes"] == 0
    for n in c.NODES:
        assert read_at(c.disk(n), 0, MiB) == b"\x3c" * MiB, n
        assert read_at(c.disk(n), MiB, MiB) == b"\xc3" * MiB, n
        assert read_at(c.disk(n), 4 * MiB, 64 * 1024) == b"\x7e" * 65536, n
    cmp_data(c, a["size_bytes"])
