"""[handlers] beyond fence-peer: split-brain, before-/after-resync-target, out-of-sync; each
runs with DRBD's environment (BLOCKREP_...), a failing before-resync-target defers the
resync; fencing = resource-and-stonith keeps I/O suspended after a failed fence-peer."""

from __future__ import annotations

import os
import threading
import time

from support.helpers import require_tool
from support.repltools import qemu_io

VARS = ("BLOCKREP_RESOURCE", "BLOCKREP_NODE", "BLOCKREP_PEER", "BLOCKREP_PEER_ADDRESS",
        "BLOCKREP_MY_ADDRESS", "BLOCKREP_BACKING_DEV", "BLOCKREP_CONFIG", "BLOCKREP_HANDLER",
        "DRBD_RESOURCE", "DRBD_PEER")

def _install(c, tmp_path, names, *, fencing: str | None = None, exits: dict | None = None):
    """A handler script for each name: it appends its environment to
    marks/<handler>.<node> and exits with the number in marks/<handler>.exit (if any)."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    script = tmp_path / "handler.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'out="{marks}/$BLOCKREP_HANDLER.$BLOCKREP_NODE"\n'
        "env | grep -E '^(BLOCKREP|DRBD)_' | sort >> \"$out\"\n"
        'echo "--" >> "$out"\n'
        f'code="{marks}/$BLOCKREP_HANDLER.exit"\n'
        'if [ -f "$code" ]; then rc=$(cat "$code"); rm -f "$code"; exit "$rc"; fi\n'
        "exit 0\n")
    script.chmod(0o755)
    for name, rc in (exits or {}).items():
        (marks / f"{name}.exit").write_text(f"{rc}\n")
    for n in c.NODES:
        with open(c.configs[n]) as f:
            text = f.read()
        if fencing:
            text = text.replace("[resource]\n", f'[resource]\nfencing = "{fencing}"\n', 1)
        lines = "".join(f'{name} = "{script}"\n' for name in names)
        with open(c.configs[n], "w") as f:
            f.write(text + "\n[handlers]\nhandler-timeout = 20\n" + lines)
    return marks

def _runs(marks, handler: str, node: str) -> list[dict]:
    path = marks / f"{handler}.{node}"
    if not path.exists():
        return []
    runs, cur = [], {}
    for line in path.read_text().splitlines():
        if line == "--":
            runs.append(cur)
            cur = {}
        elif "=" in line:
            k, v = line.split("=", 1)
            cur[k] = v
    return runs

def _wait_runs(marks, handler, node, n=1, timeout=20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(marks, handler, node)
        if len(runs) >= n:
            return runs
        time.sleep(0.05)
    raise AssertionError(f"{handler} did not run {n} time(s) on {node}: "
                         f"{sorted(os.listdir(marks))}")

def _check_env(env: dict, c, handler: str, node: str, peer: str) -> None:
    for v in VARS:
        assert v in env, (v, env)
    assert env["BLOCKREP_HANDLER"] == handler
    assert env["BLOCKREP_NODE"] == node and env["BLOCKREP_PEER"] == peer
    assert env["BLOCKREP_RESOURCE"] == env["DRBD_RESOURCE"] == "r0"
    assert os.path.samefile(env["BLOCKREP_CONFIG"], c.configs[node])
    assert os.path.samefile(env["BLOCKREP_BACKING_DEV"], c.disk(node))

def test_resync_target_and_out_of_sync_handlers(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="32M")
    marks = _install(c, tmp_path, ("before-resync-target", "after-resync-target",
                                   "out-of-sync"))
    c.up_pair()
    c.kill("beta")
    qemu_io(c.uri("alpha"), "write -P 0x21 0 2M")
    c.start("beta")
    c.wait_connected()
    before = _wait_runs(marks, "before-resync-target", "beta")[0]
    _check_env(before, c, "before-resync-target", "beta", "alpha")
    after = _wait_runs(marks, "after-resync-target", "beta")[0]
    _check_env(after, c, "after-resync-target", "beta", "alpha")
    assert int(after["BLOCKREP_RESYNC_BYTES"]) >= 2 << 20, after
    assert not _runs(marks, "before-resync-target", "alpha")  # the source runs neither

    # verify finds a block that differs: out-of-sync runs (on the verify source)
    with open(c.disk("beta"), "r+b") as f:
        f.seek(8 << 20)
        f.write(b"\xee" * 4096)
        f.flush()
        os.fsync(f.fileno())
    c.cli("alpha", "verify")
    oos = _wait_runs(marks, "out-of-sync", "alpha")[0]
    _check_env(oos, c, "out-of-sync", "alpha", "beta")
    assert int(oos["BLOCKREP_OUT_OF_SYNC_BYTES"]) == 4096, oos

def test_split_brain_handler(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="32M")
    marks = _install(c, tmp_path, ("split-brain", "initial-split-brain"))
    c.up_pair()
    c.cli("alpha", "disconnect")
    c.cli("beta", "disconnect")
    c.wait_status("beta", lambda s: s["connection"] == "StandAlone")
    c.cli("beta", "primary")
    qemu_io(c.uri("alpha"), "write -P 0x22 0 64k")
    qemu_io(c.uri("beta"), "write -P 0x33 1M 64k")
    c.cli("alpha", "secondary")
    c.cli("beta", "secondary")
    c.cli("alpha", "connect")
    c.cli("beta", "connect")
    for node, peer in (("alpha", "beta"), ("beta", "alpha")):
        env = _wait_runs(marks, "split-brain", node)[0]
        _check_env(env, c, "split-brain", node, peer)
        _wait_runs(marks, "initial-split-brain", node)

def test_failing_before_resync_target_defers_the_resync(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="32M")
    marks = _install(c, tmp_path, ("before-resync-target",), exits={"before-resync-target": 3})
    c.up_pair()
    c.kill("beta")
    qemu_io(c.uri("alpha"), "write -P 0x44 0 1M")
    c.start("beta")
    # first connect: the handler exits 3, the connection is dropped before any resync
    # data; the next connect runs it again (now exit 0) and the resync completes
    _wait_runs(marks, "before-resync-target", "beta", 2)
    c.wait_connected()
    s = c.wait_status("beta", lambda s: s["disk"] == "UpToDate", 20, "resynced")
    log = c.log("beta")
    assert "before-resync-target handler exited 3: resync deferred" in log, log[-2000:]
    assert s["last_sync"]["role"] == "SyncTarget", s

def test_resource_and_stonith_keeps_io_suspended_after_a_failed_fence(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="16M")
    marks = _install(c, tmp_path, ("fence-peer",), fencing="resource-and-stonith",
                     exits={"fence-peer": 1})
    c.up_pair()
    c.wait_status("alpha", lambda s: s["fencing"]["policy"] == "resource-and-stonith", 5)
    c.kill("beta")
    done = {}

    def write():
        qemu_io(c.uri("alpha"), "write -P 0x5a 0 64k")
        done["t"] = time.monotonic()
    th = threading.Thread(target=write)
    th.start()
    try:
        env = _wait_runs(marks, "fence-peer", "alpha")[0]
        _check_env(env, c, "fence-peer", "alpha", "beta")
        s = c.wait_status("alpha", lambda s: (s["fencing"]["last_handler"] or {})
                          .get("exit") == 1, 20, "fence-peer failed", fast=True)
        # DRBD's resource-and-stonith: a failed fence-peer leaves I/O frozen
        assert s["fencing"]["io_suspended"] and s["fencing"].get("fence_failed"), s
        time.sleep(0.5)  # give a wrongly released completion the chance to show
        assert "t" not in done, "the write completed although the peer was not fenced"
        assert c.admin("alpha")["fencing"]["io_suspended"]
        out = c.cli("alpha", "resume-io").stdout
        assert "resumed" in out, out
    finally:
        th.join(60)
    assert "t" in done, "the write never completed after resume-io"
    s = c.admin("alpha")
    assert not s["fencing"]["io_suspended"] and "fence_failed" not in s["fencing"], s
    qemu_io(c.uri("alpha"), "read -P 0x5a 0 64k")
