"""`blockrep adjust`: changed tunables reach a running node (a running resync included);
changes that need a restart are refused as a whole. Resync rate control: beneath
application writes the resync is held to c-min-rate (figures printed, not asserted)."""

from __future__ import annotations

import re
import subprocess
import time

from support.helpers import require_tool
from support.repltools import qemu_io


def _edit(c, node: str, fn) -> None:
    with open(c.configs[node]) as f:
        text = f.read()
    with open(c.configs[node], "w") as f:
        f.write(fn(text))


def _set(text: str, key: str, value: str) -> str:
    """Set `key = value` in [resource] (replacing an existing line)."""
    if re.search(rf"^{key} = ", text, re.M):
        return re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    return text.replace("[resource]\n", f"[resource]\n{key} = {value}\n", 1)


def test_adjust_applies_tunables_and_refuses_restart_changes(cluster, tmp_path):
    require_tool("qemu-io")
    c = cluster(size="32M", resource={"resync-rate": "1M"})
    c.up_pair()
    c.kill("beta")
    qemu_io(c.uri("alpha"), "write -P 0x31 0 12M")
    c.start("beta")
    s = c.wait_status("alpha", lambda s: s["replication"] == "SyncSource" and s["sync"]
                      and s["sync"].get("control"), 20, "resync running", fast=True)
    assert s["sync"]["control"]["resync_rate"] == 1 << 20

    fence = tmp_path / "fence.sh"
    fence.write_text("#!/bin/sh\nexit 4\n")
    fence.chmod(0o755)
    _edit(c, "alpha", lambda t: _set(_set(_set(t, "resync-rate", '"0"'), "c-min-rate", '"8M"'),
                                     "fencing", '"resource-only"')
          + f'\n[handlers]\nfence-peer = "{fence}"\n')
    res = c.cli("alpha", "adjust")
    out = res.stdout
    for key in ("resync-rate", "c-min-rate", "fencing", "handlers"):
        assert key in out, out
    # the running resync now goes unlimited and finishes
    s = c.wait_status("alpha", lambda s: s["replication"] == "Established" and
                      s["peer"]["disk"] == "UpToDate", 30, "resync done after adjust")
    assert s["fencing"]["policy"] == "resource-only", s
    assert s["last_sync"]["total_bytes"] >= 12 << 20
    print(f"\nresync of {s['last_sync']['total_bytes'] >> 20} MiB: rate-limited to 1 MiB/s, "
          f"then adjusted to unlimited; took {s['last_sync']['elapsed_s']} s")
    assert c.cli("alpha", "adjust").stdout.strip() == "nothing to change"

    # an address change needs a restart: refused, nothing applied, a clear message
    port = c.ports["alpha"][1]
    _edit(c, "alpha", lambda t: _set(t, "timeout", "3.5").replace(f':{port}"',
                                                                 f':{port + 1}"'))
    res = c.cli("alpha", "adjust", check=False)
    assert res.returncode == 5, (res.returncode, res.stderr)
    assert "node.alpha.nbd changed; that needs a restart" in res.stderr, res.stderr
    assert "nothing was applied" in res.stderr
    assert "Traceback" not in res.stderr
    res = c.cli("alpha", "adjust", "--json", check=False)
    assert '"code": "needs-restart"' in res.stdout, res.stdout


def test_resync_is_held_to_c_min_rate_beneath_application_writes(cluster):
    require_tool("qemu-io", "fio")
    floor = 4 << 20
    c = cluster(size="64M", resource={"c-min-rate": "4M"})
    c.up_pair()
    c.kill("beta")
    qemu_io(c.uri("alpha"), "write -P 0x41 0 48M")
    # application writes while the resync runs: one fio process writing steadily (16 MiB/s)
    # to the last 8 MiB, on before the resync starts (short qemu-io runs left gaps under load
    # in which the resync saw no application traffic and ran unthrottled to its end)
    app = subprocess.Popen(["fio", "--name=app", "--ioengine=nbd", f"--uri={c.uri('alpha')}",
                            "--rw=randwrite", "--bs=64k", "--iodepth=4", "--offset=56M",
                            "--size=8M", "--rate=16m", "--time_based", "--runtime=120"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the load must be arriving before the resync starts: under CI load fio can take
        # longer to connect than the Secondary takes to start and the resync to end
        first = c.admin("alpha")["counters"]["writes_local_only"]
        c.wait_status("alpha", lambda s: s["counters"]["writes_local_only"] >= first + 32,
                      60, "fio writing", fast=True)
        c.start("beta")
        c.wait_status("alpha", lambda s: s["replication"] == "SyncSource" and s["sync"]
                      and s["sync"].get("control"), 20, "resync running", fast=True)
        time.sleep(1.0)  # settle; now measure
        s0 = c.admin("alpha")
        t0 = time.monotonic()
        time.sleep(2.0)
        s1 = c.admin("alpha")
        t1 = time.monotonic()
    finally:
        app.terminate()
        app.wait(60)
    loaded = (s1["sync"]["done_bytes"] - s0["sync"]["done_bytes"]) / (t1 - t0) \
        if s1["sync"] else None
    k = (s1["sync"] or {}).get("control") or {}
    s = c.wait_status("alpha", lambda s: s["replication"] == "Established" and
                      s["peer"]["disk"] == "UpToDate", 60, "resync done")
    print(f"\nresync beneath application writes: "
          f"{loaded / 2**20 if loaded is not None else float('nan'):.1f} MiB/s "
          f"(c-min-rate {floor >> 20} MiB/s, throttled {k.get('throttled')} times); "
          f"whole resync {s['last_sync']['total_bytes'] >> 20} MiB in "
          f"{s['last_sync']['elapsed_s']} s")
    assert s1["sync"] is not None, "the resync ended before the measurement"
    assert k["c_min_rate"] == floor and k["throttled"] > 0, k
