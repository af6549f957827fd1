"""A real two-node Pacemaker cluster (Corosync + pacemakerd in network namespaces, started
by the test: tests/integration/pcmk.py) running ocf:blockrep:blockrep as a promotable clone.

One test, cases in order (one cluster start keeps it well under three minutes):
switchover by standby, kill -9 of the Primary's blockrep (recovered by Pacemaker), and
power loss of the Primary node (failover: the survivor is promoted; every acknowledged
pattern written through NBD reads back there with qemu-io; the old node rejoins and resyncs).
Timings are printed (failover: from the node kill to the new Primary serving NBD).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support.helpers import PY, ROOT, require_tool, run, wait_for
from support.pcmk import AGENT_DIR, CLUSTER_NET, NODES, REPL_NET, Pacemaker, clone_xml, status_json
from support.repltools import qemu_io

MiB = 1 << 20
BLOCKREP = os.path.join(os.path.dirname(sys.executable), "blockrep")
NBD_PORT = 10809
FENCE = os.path.join(ROOT, "contrib", "pacemaker", "crm-fence-peer")
CONSTRAINT = "blockrep-fence-by-handler-r0-blockrep-clone"


def _write_config(base: str) -> str:
    lines = ["[resource]", 'name = "r0"', 'shared-secret = "pacemaker-test"',
             f'run-dir = "{os.path.join(base, "run")}"', "timeout = 2.0",
             "ping-interval = 0.5", "connect-interval = 0.2",
             f'fencing = "{os.environ.get("BLOCKREP_TEST_FENCING", "resource-only")}"',
             "", "[handlers]", f'fence-peer = "{FENCE}"', f'unfence-peer = "{FENCE} --unfence"']
    for n in NODES:
        lines += ["", f"[node.{n}]", f'address = "{REPL_NET[n]}:7789"',
                  f'disk = "{os.path.join(base, n + ".img")}"',
                  f'nbd = "{CLUSTER_NET[n]}:{NBD_PORT}"']
    path = os.path.join(base, "r0.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Bed:
    """The cluster plus the blockrep resource's view of it."""

    def __init__(self, pc: Pacemaker, base: str, config: str):
        self.pc, self.base, self.config = pc, base, config
        self.timings: dict[str, float] = {}

    def admin(self, node: str) -> str:
        return os.path.join(self.base, "run", f"r0.{node}.sock")

    def status(self, node: str) -> dict | None:
        return status_json(self.admin(node))

    def uri(self, node: str) -> str:
        return f"nbd://{CLUSTER_NET[node]}:{NBD_PORT}/"

    def serving(self, node: str) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.pc.ns[node], "nbdinfo", "--size",
                            self.uri(node)], capture_output=True, text=True, timeout=20)
        return r.returncode == 0

    def io(self, node: str, *cmds: str) -> None:
        qemu_io(self.uri(node), *cmds, netns=self.pc.ns[node], timeout=60)

    def wait(self, node: str, pred, timeout: float, what: str) -> dict:
        last = {}

        def ok():
            nonlocal last
            s = self.status(node)
            if s is None:
                return False
            last = s
            return pred(s)
        try:
            wait_for(ok, timeout, 0.1, f"{node}: {what}")
        except TimeoutError:
            raise AssertionError(self.report(f"{node}: {what}; last status "
                                             f"{json.dumps(last)}")) from None
        return last

    def wait_promoted(self, node: str, timeout: float, what: str) -> float:
        """Until Pacemaker reports `node` promoted and it serves NBD; seconds taken."""
        t0 = time.monotonic()
        try:
            wait_for(lambda: self.pc.promoted_on(node, "blockrep-clone") == [node] and
                     self.serving(node), timeout, 0.2, what)
        except TimeoutError:
            raise AssertionError(self.report(what)) from None
        return time.monotonic() - t0

    def wait_healthy(self, primary: str, timeout: float = 60) -> None:
        other = next(n for n in NODES if n != primary)
        self.wait(primary, lambda s: s["role"] == "Primary" and
                  s["connection"] == "Connected" and s["replication"] == "Established" and
                  s["peer"]["disk"] == "UpToDate", timeout, "Primary, peer UpToDate")
        self.wait(other, lambda s: s["role"] == "Secondary" and s["disk"] == "UpToDate" and
                  s["replication"] == "Established", timeout, "Secondary UpToDate")

    def report(self, what: str) -> str:
        out = [f"timed out: {what}"]
        for n in NODES:
            if n in self.pc.procs:
                out.append(f"--- crm_mon on {n}:\n{self.pc.crm_mon(n)}")
            log = os.path.join(self.base, "run", f"r0.{n}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    out.append(f"--- blockrep log {n}:\n{f.read()[-2500:]}")
            out.append(f"--- pacemaker {n}:\n" + "\n".join(
                line for line in self.pc.file(n, "log-pacemaker/pacemaker.log").splitlines()
                if "blockrep" in line)[-3000:])
        return "\n".join(out)


@pytest.fixture
def bed(tmp_path):
    require_tool("corosync", "pacemakerd", "cibadmin", "crm_resource", "crm_attribute",
                 "crm_mon", "nsenter", "unshare", "ip", "qemu-io", "nbdinfo")
    assert os.geteuid() == 0, "the Pacemaker cluster test needs root (namespaces, mounts)"
    assert os.path.isdir(AGENT_DIR), f"{AGENT_DIR} missing: run tools/setup"
    assert os.access(BLOCKREP, os.X_OK), f"{BLOCKREP} missing: run tools/setup"
    base = str(tmp_path)
    config = _write_config(base)
    for n in NODES:
        with open(os.path.join(base, f"{n}.img"), "wb") as f:
            f.truncate(32 * MiB)
        run([PY, "-m", "blockrep", "create-md", config, "--node", n], cwd=ROOT)
    pc = Pacemaker(base)
    try:
        pc.make_network()
        _seed_alpha(pc, config, base)
        yield Bed(pc, base, config)
    finally:
        pc.close()


def _seed_alpha(pc: Pacemaker, config: str, base: str) -> None:
    """Make alpha's data the reference once (DRBD's initial `primary --force`), before the
    cluster manages the resource: it comes up UpToDate, beta full-syncs from it."""
    log = open(os.path.join(base, "seed.log"), "w")
    p = subprocess.Popen(["ip", "netns", "exec", pc.ns["alpha"], PY, "-m", "blockrep", "up",
                          config, "--node", "alpha"], cwd=ROOT, stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        sock = os.path.join(base, "run", "r0.alpha.sock")
        wait_for(lambda: p.poll() is not None or status_json(sock) is not None, 30,
                 what="seed node up")
        run([PY, "-m", "blockrep", "primary", config, "--node", "alpha", "--force"], cwd=ROOT)
        run([PY, "-m", "blockrep", "down", config, "--node", "alpha"], cwd=ROOT)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def test_pacemaker_switchover_recovery_failover(bed):
    pc, t = bed.pc, bed.timings

    def recovered():  # the one promoted node, once it serves NBD
        up = [n for n in NODES if n in pc.procs]
        p = pc.promoted_on(up[0], "blockrep-clone")
        return p if len(p) == 1 and bed.serving(p[0]) else None
    t0 = time.monotonic()
    for n in NODES:
        pc.prepare(n)
        pc.start_node(n)
    pc.wait_online(list(NODES), 90)
    pc.exec("alpha", "crm_attribute", "--type", "crm_config", "--name", "stonith-enabled",
            "--update", "false")
    pc.cib("alpha", "--create", "-o", "resources", "--xml-text",
           clone_xml(bed.config, BLOCKREP))
    try:
        first = wait_for(recovered, 90, 0.2, "a node promoted")[0]
    except TimeoutError:
        raise AssertionError(bed.report("initial promotion")) from None
    t[f"start: cluster up -> {first} promoted, serving NBD"] = time.monotonic() - t0
    bed.wait_healthy(first, 90)
    t["start: both UpToDate (incl. beta's full sync)"] = time.monotonic() - t0
    bed.io(first, "write -P 0xa1 0 1M", "flush")

    # -- switchover: the Primary goes to standby, the other node takes over ----------------
    other = next(n for n in NODES if n != first)
    t0 = time.monotonic()
    pc.exec(other, "crm_attribute", "--node", first, "--name", "standby", "--update", "on")
    bed.wait_promoted(other, 60, f"{other} promoted after {first}'s standby")
    t[f"switchover: standby {first} -> {other} serving"] = time.monotonic() - t0
    wait_for(lambda: pc.running_on(other, "blockrep-clone") == [other], 60, 0.2,
             f"{first} stopped")
    bed.io(other, "read -P 0xa1 0 1M", "write -P 0xb2 1M 1M", "flush")
    pc.exec(other, "crm_attribute", "--node", first, "--name", "standby", "--update", "off")
    t0 = time.monotonic()
    bed.wait_healthy(other, 60)
    t[f"{first} back from standby, resynced"] = time.monotonic() - t0
    assert pc.promoted_on(other, "blockrep-clone") == [other]

    # -- kill -9 of the Primary's blockrep: Pacemaker's monitor notices, recovers it --------
    with open(os.path.join(bed.base, "run", f"r0.{other}.pid")) as f:
        pid = int(f.read())
    t0 = time.monotonic()
    pc.exec(other, "kill", "-KILL", str(pid))  # a PID of the node's own PID namespace
    wait_for(lambda: bed.status(other) is None, 10, 0.05, f"{other}'s blockrep gone")

    try:
        primary = wait_for(recovered, 90, 0.2, "a Primary again after kill -9")[0]
    except TimeoutError:
        raise AssertionError(bed.report("recovery after kill -9")) from None
    t[f"kill -9 of {other}'s blockrep -> Primary serving again (on {primary})"] = time.monotonic() - t0
    bed.io(primary, "read -P 0xa1 0 1M", "read -P 0xb2 1M 1M", "write -P 0xc3 2M 1M",
           "flush")
    bed.wait_healthy(primary, 60)
    print(f"\nkill -9: instance restarted in place, promoted role on {primary}")
    fails = pc.exec("alpha", "crm_mon", "-1", "-f", check=False).stdout
    assert "blockrep" in fails and "fail-count" in fails, fails  # Pacemaker saw the failure

    # -- power loss of the Primary node: failover to the survivor --------------------------
    victim, survivor = primary, next(n for n in NODES if n != primary)
    bed.io(victim, "write -P 0xd4 3M 1M", "flush")  # acknowledged = on both disks
    t0 = time.monotonic()
    pc.kill_node(victim)
    t["failover: node kill -> new Primary serving NBD"] = bed.wait_promoted(
        survivor, 90, f"{survivor} promoted after {victim} died")
    bed.io(survivor, "read -P 0xa1 0 1M", "read -P 0xb2 1M 1M", "read -P 0xc3 2M 1M",
           "read -P 0xd4 3M 1M", "write -P 0xe5 4M 1M", "flush")
    s = bed.status(survivor)
    assert s["role"] == "Primary" and s["peer"]["disk"] == "DUnknown", s

    # the old Primary returns: it rejoins as Secondary and resyncs from the new one
    for net in "cr":
        pc.set_link(victim, net, True)
    t0 = time.monotonic()
    pc.start_node(victim)
    bed.wait_healthy(survivor, 90)
    t[f"{victim} restarted -> Secondary, resynced"] = time.monotonic() - t0
    assert pc.promoted_on(survivor, "blockrep-clone") == [survivor]
    bed.io(survivor, "read -P 0xe5 4M 1M")
    for n in NODES:
        with open(os.path.join(bed.base, f"{n}.img"), "rb") as f:
            data = f.read(5 * MiB)
        for i, pat in enumerate((0xa1, 0xb2, 0xc3, 0xd4, 0xe5)):
            assert data[i * MiB:(i + 1) * MiB] == bytes([pat]) * MiB, (n, hex(pat))

    # -- stale promotion: replication link cut, acknowledged write, Primary node dies ------
    p, s = survivor, victim  # p is Primary now, s its UpToDate Secondary
    pc.set_link(p, "r", False)  # only the replication link: Corosync still connects them
    t0 = time.monotonic()
    bed.io(p, "write -P 0xf6 5M 1M", "flush")  # held until fence-peer has returned
    t["stale: write acknowledged after the cut (incl. fencing)"] = time.monotonic() - t0
    st = bed.status(p)
    assert st["connection"] != "Connected" and st["role"] == "Primary", st
    assert st["fencing"]["last_handler"]["exit"] == 4, st["fencing"]
    assert CONSTRAINT in pc.exec(s, "cibadmin", "--query", "--scope", "constraints").stdout
    t0 = time.monotonic()
    pc.kill_node(p)
    wait_for(lambda: pc.nodes_online(s) == [s], 60, 0.2, f"{s} sees {p} gone")
    pc.exec(s, "crm_resource", "--wait", "--timeout=60", timeout=90)
    assert pc.promoted_on(s, "blockrep-clone") == [], bed.report("stale node promoted")
    st = bed.status(s)
    assert st["role"] == "Secondary", st
    t["stale: node kill -> cluster settled, stale node NOT promoted"] = time.monotonic() - t0
    # the fenced node comes back with the newest data: it resyncs its peer (as Secondary or
    # Primary), the unfence handler removes the constraint, one of them is promoted
    for net in "cr":
        pc.set_link(p, net, True)
    t0 = time.monotonic()
    pc.start_node(p)
    try:
        primary = wait_for(recovered, 90, 0.2, f"a Primary after {p}'s restart")[0]
    except TimeoutError:
        raise AssertionError(bed.report(f"a Primary after {p}'s restart")) from None
    bed.wait_healthy(primary, 90)
    wait_for(lambda: CONSTRAINT not in pc.exec(p, "cibadmin", "--query", "--scope",
                                               "constraints").stdout, 30, 0.2, "unfenced")
    st = bed.status(s)
    assert st["last_sync"] and st["last_sync"]["role"] == "SyncTarget", st
    t[f"stale: {p} restarted -> {s} resynced, unfenced, {primary} Primary"] = \
        time.monotonic() - t0
    p = primary
    lost = 0
    for n in NODES:
        with open(os.path.join(bed.base, f"{n}.img"), "rb") as f:
            data = f.read(6 * MiB)
        lost += sum(data[i * MiB:(i + 1) * MiB] != bytes([pat]) * MiB
                    for i, pat in enumerate((0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6)))
    bed.io(p, "read -P 0xf6 5M 1M")
    print(f"\nstale-promotion case: not promoted; acknowledged writes lost: {lost}")
    assert lost == 0
    print("\nPacemaker cluster test timings:")
    for what, secs in t.items():
        print(f"  {what}: {secs:.2f}s")
