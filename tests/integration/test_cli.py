"""The operator's view: `blockrep demo`, status text, events, bad configs, refusals."""

import json
import os
import subprocess
import time

from support.helpers import PY, ROOT, free_port, require_tool, run, wait_for


def test_demo_runs_replicated_device(tmp_path):
    require_tool("qemu-io")
    port = free_port()
    d = tmp_path / "demo"
    proc = subprocess.Popen([PY, "-m", "blockrep", "demo", "--dir", str(d), "--size", "64M",
                             "--nbd-port", str(port), "--duration", "60"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        def ready():
            line = proc.stdout.readline()
            out.append(line)
            return "Ctrl-C stops both nodes" in line or proc.poll() is not None
        wait_for(ready, timeout=60, interval=0, what="demo to be ready")
        text = "".join(out)
        assert "NBD URI: nbd://127.0.0.1:" in text, text
        assert "Primary/UpToDate, peer Secondary/UpToDate, Connected, Established" in text
        uri = next(w for w in text.split() if w.startswith("nbd://"))
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "read -P 0x3c 0 1M",
             uri])
        cfg = str(d / "r0.toml")
        st = json.loads(run([PY, "-m", "blockrep", "status", cfg, "--node", "beta",
                             "--json"], cwd=ROOT).stdout)
        assert st["counters"]["writes_applied"] >= 1
        with open(d / "alpha.img", "rb") as a, open(d / "beta.img", "rb") as b:
            assert a.read(1 << 20) == b.read(1 << 20) == b"\x3c" * (1 << 20)
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[0]
    assert "node alpha stopped (exit 0)" in rest and "node beta stopped (exit 0)" in rest, rest


def test_status_text_and_events(cluster):
    c = cluster(size="64M")
    c.up_pair()
    text = c.cli("alpha", "status").stdout
    assert "role:Primary" in text and "connection:Connected" in text
    assert "replication:Established" in text and "peer-disk:UpToDate" in text
    ev = subprocess.Popen([PY, "-m", "blockrep", "events", c.configs["beta"], "--node",
                           "beta"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(ev.stdout.readline())
        assert first["event"] == "exists" and first["role"] == "Secondary"
        c.cli("beta", "disconnect")
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen.append(json.loads(ev.stdout.readline()))
            if any(e["event"] == "connection" and e.get("connection") == "StandAlone"
                   for e in seen):
                break
        assert any(e.get("connection") == "StandAlone" for e in seen), seen
    finally:
        ev.terminate()
        ev.wait(10)
    c.cli("beta", "connect")
    c.wait_connected()


def test_bad_config_one_line_errors(tmp_path):
    cases = {
        "[resource]\nname='r0'\nshared-secret='x'\nbogus=1\n": "unknown key 'bogus'",
        "[resource]\nname='r0'\n": "shared-secret is required",
        "[resource]\nname='r0'\nshared-secret='x'\n[node.a]\naddress='1.2.3.4'\n"
        "disk='/d'\nnbd='1.2.3.4:1'\n[node.b]\naddress='1.2.3.5:1'\ndisk='/d'\n"
        "nbd='1.2.3.5:2'\n": "bad address '1.2.3.4'",
        "not toml [": "not valid TOML",
    }
    for i, (text, msg) in enumerate(cases.items()):
        p = tmp_path / f"c{i}.toml"
        p.write_text(text)
        res = run([PY, "-m", "blockrep", "status", str(p), "--node", "a"], check=False,
                  cwd=ROOT)
        assert res.returncode != 0
        assert msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_commands_refused_with_reasons(cluster):
    c = cluster(size="64M")
    c.start("alpha")
    c.start("beta")
    c.wait_status("alpha", lambda s: s["connection"] == "Connected")
    res = c.cli("alpha", "primary", check=False)
    assert res.returncode != 0 and "not UpToDate" in res.stderr, res.stderr
    res = c.cli("alpha", "verify", check=False)
    assert res.returncode != 0
    c.cli("alpha", "primary", "--force", "--skip-initial-sync")
    c.wait_connected()
    res = c.cli("alpha", "invalidate", check=False)
    assert res.returncode != 0 and "Primary" in res.stderr
    res = c.cli("beta", "connect", "--discard-my-data", check=False)
    assert res.returncode == 0  # allowed on a Secondary (used only on split brain)
    assert os.path.exists(c.admin_socket("alpha"))
    c.cli("alpha", "secondary")
    c.cli("alpha", "down")
    wait_for(lambda: c.procs["alpha"].poll() is not None, timeout=30, what="alpha down")
    assert c.procs["alpha"].returncode == 0


def test_status_without_a_resource_shows_every_resource_and_common_toml_applies(cluster):
    """drbdadm's conventions: resources live in one directory (BLOCKREP_CONFIG_DIR, by
    default /etc/blockrep) and are named, not pathed; `status` with none named shows each
    one's nodes on this host; common.toml's [common] is every resource's default."""
    c = cluster(size="32M")
    c.up_pair()
    env = dict(os.environ, BLOCKREP_CONFIG_DIR=c.dir)

    def blockrep(*args, check=True):
        res = subprocess.run([PY, "-m", "blockrep", *args], cwd=ROOT, env=env, check=False,
                             capture_output=True, text=True, timeout=60)
        assert not check or res.returncode == 0, (res.returncode, res.stderr)
        return res

    text = blockrep("status").stdout
    assert "node:alpha role:Primary" in text and "node:beta role:Secondary" in text, text
    both = json.loads(blockrep("status", "all", "--json").stdout)
    assert sorted(s["node"] for s in both) == ["alpha", "beta"], both
    drbd = json.loads(blockrep("status", "--drbd").stdout)
    assert len(drbd) == 2 and {r["name"] for r in drbd} == {both[0]["resource"]}, drbd
    name = both[0]["resource"]
    one = json.loads(blockrep("status", name, "--node", "beta", "--json").stdout)
    assert one["role"] == "Secondary"  # by name, from the directory

    # [common] in common.toml reaches a running node through `adjust`
    with open(os.path.join(c.dir, "common.toml"), "w") as f:
        f.write('[common]\nc-min-rate = "3M"\n')
    out = blockrep("adjust", name, "--node", "alpha").stdout
    assert "c-min-rate" in out, out
    assert blockrep("adjust", name, "--node", "alpha").stdout.strip() == "nothing to change"

    c.kill("beta")
    text = blockrep("status").stdout  # no host name matches: the nodes running here
    assert "node:alpha role:Primary" in text and "node:beta" not in text, text
    res = blockrep("status", "--node", "beta", check=False)  # a node of this host: down
    assert res.returncode == 4, (res.returncode, res.stderr)  # EXIT_NOT_RUNNING
    assert res.stdout.strip() == f"{name} node:beta not running", res.stdout
    res = blockrep("status", "nosuch", check=False)
    assert res.returncode == 3 and "no resource 'nosuch' in" in res.stderr, res.stderr
    env["BLOCKREP_CONFIG_DIR"] = c.dir + "/none"
    res = blockrep("status", check=False)
    assert res.returncode == 3 and "no resources configured in" in res.stderr, res.stderr
