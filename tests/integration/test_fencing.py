"""fencing = "resource-only" on loopback, without a cluster: when a Primary loses its
peer, no write completes to the NBD client before the fence-peer handler has returned; the
handler's exit code 4 makes the peer's disk Outdated in the Primary's view; once the peer
is back and resynced, unfence-peer runs."""

from __future__ import annotations

import os
import threading
import time

from support.helpers import require_tool
from support.repltools import qemu_io


def _handlers(c, tmp_path, delay: float, fencing: str = "resource-only") -> dict:
    """Fencing on in both nodes' configuration files, with two small handler scripts that
    leave marks (the Cluster writes the files and the metadata first)."""
    marks = {"fence": str(tmp_path / "fenced"), "unfence": str(tmp_path / "unfenced")}
    fence = tmp_path / "fence.sh"
    fence.write_text("#!/bin/sh\n"
                     f"sleep {delay}\n"
                     f'echo "$BLOCKREP_RESOURCE $BLOCKREP_NODE $BLOCKREP_PEER" > {marks["fence"]}\n'
                     "exit 4\n")
    unfence = tmp_path / "unfence.sh"
    unfence.write_text(f'#!/bin/sh\necho "$BLOCKREP_PEER" >> {marks["unfence"]}\n')
    for p in (fence, unfence):
        p.chmod(0o755)
    for n in c.NODES:
        with open(c.configs[n]) as f:
            text = f.read()
        text = text.replace("[resource]\n", f'[resource]\nfencing = "{fencing}"\n', 1)
        with open(c.configs[n], "w") as f:
            f.write(text + f'\n[handlers]\nfence-peer = "{fence}"\n'
                           f'unfence-peer = "{unfence}"\n')
    return marks


def test_writes_are_held_until_the_peer_is_fenced(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="16M")
    marks = _handlers(c, tmp_path, delay=1.5)
    c.up_pair()
    c.wait_status("alpha", lambda s: s["fencing"]["policy"] == "resource-only", 5, "policy")
    # a write in flight when the peer dies: its completion waits for the handler
    c.kill("beta")
    t0 = time.monotonic()
    done = {}

    def write():
        qemu_io(c.uri("alpha"), "write -P 0x5a 0 64k")
        done["t"] = time.monotonic()
    th = threading.Thread(target=write)
    th.start()
    s = c.wait_status("alpha", lambda s: s["fencing"]["io_suspended"], 10, "I/O suspended",
                      fast=True)
    assert not os.path.exists(marks["fence"]) and "t" not in done, s["fencing"]
    th.join(60)
    assert "t" in done, "the write never completed"
    with open(marks["fence"]) as f:
        assert f.read().split() == ["r0", "alpha", "beta"]
    fenced_at = os.path.getmtime(marks["fence"])
    assert done["t"] - t0 >= 1.5, "the write completed before the fence-peer handler returned"
    assert time.time() - (time.monotonic() - done["t"]) >= fenced_at - 0.05
    s = c.admin("alpha")
    assert s["fencing"]["last_handler"]["exit"] == 4 and not s["fencing"]["io_suspended"], s
    assert s["peer"]["disk"] == "Outdated" and s["role"] == "Primary", s
    qemu_io(c.uri("alpha"), "read -P 0x5a 0 64k", "write -P 0x6b 64k 64k")  # I/O flows again
    print(f"\nwrite held {done['t'] - t0:.2f}s until fence-peer (sleeps 1.5s) returned")

    # the peer returns: resync, then unfence-peer runs on the Primary (and on the target:
    # either may be the one to remove a constraint; the handler must be idempotent)
    with open(marks["unfence"]) as f:
        before = f.read().split()
    c.start("beta")
    c.wait_status("alpha", lambda s: s["peer"]["disk"] == "UpToDate" and
                  s["replication"] == "Established", 30, "peer resynced")
    c.wait_status("alpha", lambda s: (s["fencing"]["last_handler"] or {}).get("handler")
                  == "unfence-peer", 10, "unfence ran", fast=True)
    with open(marks["unfence"]) as f:
        assert "beta" in f.read().split()[len(before):]


def test_no_fencing_for_a_secondary(cluster, tmp_path):
    """Only a Primary fences: the Secondary losing its Primary runs no fence-peer."""
    require_tool("qemu-io")
    c = cluster(size="16M")
    marks = _handlers(c, tmp_path, delay=0)
    c.up_pair()
    c.kill("alpha")
    c.wait_status("beta", lambda s: s["connection"] == "Connecting", 10, "peer lost",
                  fast=True)
    last = c.admin("beta")["fencing"]["last_handler"]
    assert last is None or last["handler"] == "unfence-peer", last
    assert not os.path.exists(marks["fence"])


def test_no_fencing_with_dont_care(cluster):
    """With the default fencing = dont-care a Primary losing its peer completes writes at
    once and runs no handler."""
    require_tool("qemu-io")
    c2 = cluster(size="16M")
    c2.up_pair()
    c2.kill("beta")
    qemu_io(c2.uri("alpha"), "write -P 0x11 0 64k")
    s = c2.admin("alpha")
    assert s["fencing"] == {"policy": "dont-care", "io_suspended": False,
                            "held_completions": 0, "last_handler": None}, s
