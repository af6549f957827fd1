"""The OCF resource agent ocf/blockrep (ocf:blockrep:blockrep), without a cluster: ocf-tester
against a real resource on loopback, the promotion-score ladder, and what monitor reports for
a killed node and for a split brain."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest
from support.helpers import ROOT, require_tool, run
from support.repltools import qemu_io

AGENT = os.path.join(ROOT, "ocf", "blockrep")
BLOCKREP = os.path.join(os.path.dirname(sys.executable), "blockrep")  # the venv's


def _load_agent():
    loader = importlib.machinery.SourceFileLoader("blockrep_ocf_agent", AGENT)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def agent(action: str, config: str, node: str, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env.update({"OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "r0",
                "OCF_RESKEY_config": config, "OCF_RESKEY_node": node,
                "OCF_RESKEY_blockrep": BLOCKREP, "OCF_RESKEY_wfc_timeout": "0",
                "OCF_RESKEY_CRM_meta_timeout": "30000", **extra})
    return subprocess.run([AGENT, action], capture_output=True, text=True, timeout=60, env=env)


def _blockrep_bin() -> str:
    assert os.access(BLOCKREP, os.X_OK), f"{BLOCKREP} missing: run tools/setup"
    return BLOCKREP


def test_ocf_tester_passes_on_a_real_resource(cluster, tmp_path):
    """ocf-tester runs every action (start/stop twice, promote/demote twice, notify, reload)
    against node alpha of a real resource; the peer is not running."""
    require_tool("ocf-tester", "xmllint")
    _blockrep_bin()
    c = cluster(size="16M")
    c.start("alpha")  # make alpha's data UpToDate (as Primary at shutdown it stays so)
    c.cli("alpha", "primary", "--force")
    c.cli("alpha", "down")
    c.procs["alpha"].wait(30)
    res = run(["ocf-tester", "-v", "-n", "r0", "-o", f"config={c.configs['alpha']}",
               "-o", "node=alpha", "-o", f"blockrep={BLOCKREP}", "-o", "wfc_timeout=0",
               AGENT], timeout=300, check=False)
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert res.returncode == 0, f"ocf-tester failed:\n{res.stdout}\n{res.stderr}"
    assert "passed all tests" in res.stdout
    log = os.path.join(c.dir, "run", "r0.alpha.log")  # the agent's default log file
    with open(log) as f:
        text = f.read()
    assert text.count("role: Secondary -> Primary") >= 2, text[-3000:]
    assert not os.path.exists(os.path.join(c.dir, "run", "r0.alpha.pid"))


def test_promotion_score_ladder():
    """UpToDate with the peer known > UpToDate, peer unknown > data only on the peer > none,
    as ocf:linbit:drbd's default adjust_master_score (0 10 1000 10000)."""
    mod = _load_agent()
    a = mod.Agent("monitor")

    def st(role="Secondary", disk="UpToDate", peer_disk="UpToDate", conn="Connected",
           repl="Established", decision=None, error=""):
        return {"role": role, "disk": disk, "connection": conn, "replication": repl,
                "peer": {"disk": peer_disk}, "decision": decision, "last_error": error}

    assert a.score_for(st(role="Primary", peer_disk="DUnknown", conn="Connecting",
                          repl="Off")) == 10000
    assert a.score_for(st()) == 10000
    assert a.score_for(st(peer_disk="DUnknown", conn="Connecting", repl="Off")) == 1000
    assert a.score_for(st(disk="Inconsistent", repl="SyncTarget")) == 10
    assert a.score_for(st(disk="Outdated", peer_disk="DUnknown", conn="Connecting",
                          repl="Off")) == 0
    assert a.score_for(st(disk="Failed", peer_disk="DUnknown", conn="Connecting",
                          repl="Off")) == 0
    sb = {"strategy": "split-brain", "rule": "both-changed-since-common-ancestor"}
    assert a.score_for(st(peer_disk="DUnknown", conn="StandAlone", repl="Off",
                          decision=sb)) == 0
    os.environ["OCF_RESKEY_promotion_scores"] = "5 20 2000 20000"
    try:
        assert a.score_for(st(disk="Outdated", peer_disk="DUnknown", conn="Connecting",
                              repl="Off")) == 5
        assert a.score_for(st(peer_disk="DUnknown", conn="Connecting", repl="Off")) == 2000
    finally:
        del os.environ["OCF_RESKEY_promotion_scores"]


def test_monitor_reports_kill_and_split_brain(cluster):
    """Primary -> 8, Secondary -> 0; kill -9 -> 7 (Pacemaker recovers it); after both nodes
    wrote while disconnected and reconnect: split brain, monitor 191 on the Primary and 190
    on the Secondary (running but degraded, shown as a failure in crm_mon), exit reason set."""
    require_tool("qemu-io")
    _blockrep_bin()
    c = cluster(size="16M")
    c.up_pair()
    cfg = c.configs
    assert agent("monitor", cfg["alpha"], "alpha").returncode == 8
    assert agent("monitor", cfg["beta"], "beta").returncode == 0
    probe = agent("monitor", cfg["beta"], "beta", OCF_RESKEY_CRM_meta_interval="0")
    assert probe.returncode == 0

    for n in c.NODES:
        c.cli(n, "disconnect")
    c.cli("beta", "primary")
    qemu_io(c.uri("alpha"), "write -P 0x11 0 64k")
    qemu_io(c.uri("beta"), "write -P 0x22 1M 64k")
    for n in c.NODES:
        c.cli(n, "connect")
    for n in c.NODES:
        c.wait_status(n, lambda s: s["connection"] == "StandAlone" and
                      (s.get("decision") or {}).get("strategy") == "split-brain", 30,
                      "split brain detected")
    for n in c.NODES:
        r = agent("monitor", cfg[n], n, OCF_RESKEY_CRM_meta_interval="10000")
        assert r.returncode == 191, (n, r.returncode, r.stderr)
        assert "ocf-exit-reason:split brain" in r.stderr, r.stderr
    c.cli("beta", "secondary")
    r = agent("monitor", cfg["beta"], "beta", OCF_RESKEY_CRM_meta_interval="10000")
    assert r.returncode == 190 and "split brain" in r.stderr, (r.returncode, r.stderr)

    c.kill("beta")
    assert agent("monitor", cfg["beta"], "beta").returncode == 7
    assert agent("stop", cfg["beta"], "beta").returncode == 0


@pytest.mark.parametrize("action,expect", [("meta-data", 0), ("validate-all", 6),
                                           ("bogus", 3)])
def test_agent_argument_handling(tmp_path, action, expect):
    cfg = tmp_path / "r.toml"
    cfg.write_text('[resource]\nname = "r0"\nshared-secret = "s"\n[node.a]\n'
                   'address = "127.0.0.1:7000"\ndisk = "/tmp/x"\nnbd = "127.0.0.1:7001"\n')
    r = agent(action, str(cfg), "nosuchnode")
    assert r.returncode == expect, (r.returncode, r.stdout, r.stderr)
    if action == "validate-all":
        assert "no [node.nosuchnode] section" in r.stderr
    probe = agent("monitor", str(cfg), "nosuchnode", OCF_RESKEY_CRM_meta_interval="0")
    assert probe.returncode == 7  # a probe where the resource cannot run: not running
