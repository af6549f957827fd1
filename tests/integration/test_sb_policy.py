"""Opt-in automatic split-brain recovery (after-sb-0pri)."""

import subprocess

from support.helpers import require_tool, run


def _write(uri: str, pattern: int, offset: str, length: str) -> None:
    run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri])


def _cmp(c) -> bool:
    size = c.status("alpha")["size_bytes"]
    return subprocess.run(["cmp", "-n", str(size), c.disk("alpha"), c.disk("beta")],
                          capture_output=True).returncode == 0


def _split_brain(c, beta_writes: bool, alpha_writes: bool) -> None:
    c.up_pair()
    _write(c.uri("alpha"), 0x11, "0", "4M")
    c.cli("alpha", "disconnect")
    c.cli("beta", "disconnect")
    c.wait_status("beta", lambda s: s["connection"] == "StandAlone")
    c.cli("beta", "primary")
    if alpha_writes:
        _write(c.uri("alpha"), 0x22, "8M", "1M")
    if beta_writes:
        _write(c.uri("beta"), 0x33, "16M", "2M")
    c.cli("alpha", "secondary")
    c.cli("beta", "secondary")
    c.cli("alpha", "connect")
    c.cli("beta", "connect")


def test_discard_zero_changes_recovers_automatically(cluster):
    require_tool("qemu-io", "cmp")
    c = cluster(size="64M", resource={"after-sb-0pri": "discard-zero-changes"})
    _split_brain(c, beta_writes=True, alpha_writes=False)
    a = c.wait_status("alpha", lambda s: s["replication"] == "Established" and
                      s["out_of_sync_bytes"] == 0 and s["last_sync"], 30, "auto recovery")
    assert a["decision"]["strategy"] == "sync-target"
    assert "discard-zero-changes" in a["decision"]["rule"]
    assert "after-split-brain policy" in c.log("alpha")
    assert _cmp(c)
    with open(c.disk("alpha"), "rb") as f:  # beta's writes won
        f.seek(16 << 20)
        assert f.read(2 << 20) == b"\x33" * (2 << 20)


def test_discard_zero_changes_refuses_when_both_changed(cluster):
    require_tool("qemu-io")
    c = cluster(size="64M", resource={"after-sb-0pri": "discard-zero-changes"})
    _split_brain(c, beta_writes=True, alpha_writes=True)
    for n in ("alpha", "beta"):
        s = c.wait_status(n, lambda s: "split brain" in s["last_error"] and
                          s["connection"] == "StandAlone", 30, "split brain reported")
        assert s["replication"] == "Off"
    assert not _cmp(c)
