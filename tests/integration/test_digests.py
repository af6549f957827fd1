"""csums-alg and verify-alg on a real pair: with each algorithm, online verify finds exactly
the blocks that differ and the checksum-mode resync that follows copies only the blocks
whose digests differ (its wire bytes are the digests of the configured size plus those
blocks); nodes configured with different algorithms never connect, and both say why."""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.helpers import require_tool
from support.repltools import MiB, cmp_data, qemu_io

from blockrep import digest

BLOCK = 4096


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def established(s: dict) -> bool:
    return s["connection"] == "Connected" and s["replication"] == "Established"


def verify(c, node: str = "alpha") -> dict:
    before = c.admin(node).get("verify")
    c.cli(node, "verify")
    return c.wait_status(node, lambda s: s["verify"] is not None and s["verify"] != before
                         and s["verify"]["state"] == "done" and established(s), 60,
                         "verify done", fast=True)


@pytest.mark.parametrize("alg", sorted(digest.ALGORITHMS))
def test_verify_and_checksum_resync_with_each_digest(cluster, alg):
    require_tool("qemu-io", "cmp")
    c = cluster(size="32M", resource={"csums-alg": alg, "verify-alg": alg})
    c.up_pair()
    qemu_io(c.uri("alpha"), f"write -P 0x5a 0 {8 * MiB}")
    size = c.status("alpha")["size_bytes"]
    assert verify(c)["verify"]["found_bytes"] == 0

    # verify (verify-alg) finds exactly the blocks changed behind the nodes' back
    blocks = [3, 4, 5, 700, 6000, size // BLOCK - 1]  # a run of three, and single blocks
    for b in blocks:
        flip_byte(c.disk("beta"), b * BLOCK + 77)
    s = verify(c)
    assert s["verify"]["found_bytes"] == len(blocks) * BLOCK, s["verify"]
    assert s["out_of_sync_bytes"] == len(blocks) * BLOCK, s
    c.cli("alpha", "resync")
    c.wait_status("beta", lambda s: established(s) and s["out_of_sync_bytes"] == 0 and
                  s["disk"] == "UpToDate", 30, "beta repaired")
    cmp_data(c, size)

    # a crash of the Primary: its activity-log extents resync in checksum mode (csums-alg);
    # of the blocks there, only those that differ travel
    c.kill("alpha", signal.SIGKILL)
    c.wait_status("beta", lambda s: s["replication"] == "Off", 30, "beta lost its peer")
    changed = [10, 11, 1500, 2047]  # inside the 8 MiB written above
    for b in changed:
        flip_byte(c.disk("beta"), b * BLOCK + 5)
    c.start("alpha")
    a = c.wait_status("alpha", lambda s: established(s) and s["out_of_sync_bytes"] == 0 and
                      s["last_sync"] is not None, 60, "alpha resynced its AL extents")
    b = c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate" and
                      s["last_sync"] is not None, 30, "beta UpToDate")
    assert a["decision"]["rule"].startswith("current-equal"), a["decision"]  # checksum mode
    ls = a["last_sync"]
    total = ls["total_bytes"]
    # the 8 MiB of AL extents, and bits the crash kept from the repair before (the kill may
    # come before they were cleared on disk)
    assert 8 * MiB <= total <= 8 * MiB + 16 * BLOCK, ls
    # every marked block's digest travels, then only the blocks that differ
    assert ls["sent_bytes"] == total // BLOCK * digest.size(alg) + len(changed) * BLOCK, ls
    assert b["counters"]["resync_differing_bytes"] == len(changed) * BLOCK, b["counters"]
    print(f"\n{alg}: verify found {len(blocks)} blocks; checksum resync of {total} bytes "
          f"sent {ls['sent_bytes']} ({digest.size(alg)}-byte digests, {len(changed)} blocks)")
    cmp_data(c, size)
    assert verify(c)["verify"]["found_bytes"] == 0


@pytest.mark.parametrize("key", ["csums-alg", "verify-alg"])
def test_different_digests_never_connect(cluster, key):
    c = cluster(size="16M", resource_per_node={"alpha": {key: "sha256"},
                                              "beta": {key: "blake2b-256"}})
    for n in c.NODES:
        c.start(n)
    want = {"alpha": f"{key} differs: this node (alpha) uses 'sha256', the peer (beta) uses "
                     f"'blake2b-256'; configure the same {key} on both nodes",
            "beta": f"{key} differs: this node (beta) uses 'blake2b-256', the peer (alpha) "
                    f"uses 'sha256'; configure the same {key} on both nodes"}
    for n in c.NODES:
        s = c.wait_status(n, lambda s: want[n] in s["last_error"], 20,
                          f"error {want[n]!r}", fast=True)
        assert s["connection"] != "Connected" and s["replication"] == "Off", s
    deadline = time.monotonic() + 1.5  # further attempts (connect-interval 0.5 s) fail too
    while time.monotonic() < deadline:
        for n in c.NODES:
            s = c.admin(n)
            assert s["connection"] != "Connected" and s["replication"] == "Off", s
        time.sleep(0.1)
    for n in c.NODES:
        assert want[n] in c.log(n), c.log(n)[-2000:]
