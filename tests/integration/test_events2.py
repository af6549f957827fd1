"""`blockrep events2 --now --statistics --timestamps`: drbdsetup events2's shape."""

from __future__ import annotations

import datetime
import queue
import subprocess
import threading
import time

from support.helpers import PY, ROOT, require_tool
from support.repltools import qemu_io


def _events2(c, node: str, *flags: str, **kw):
    return [PY, "-m", "blockrep", "events2", c.configs[node], "--node", node, *flags]


def _stamp(line: str) -> tuple[datetime.datetime, str]:
    ts, rest = line.split(" ", 1)
    return datetime.datetime.fromisoformat(ts), rest


def test_events2_now_dump_and_changes(cluster):
    require_tool("qemu-io")
    c = cluster(size="64M", resource={"resync-rate": "16M"})
    c.up_pair()
    res = subprocess.run(_events2(c, "beta", "--now", "--statistics", "--timestamps"),
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1].endswith(" exists -"), lines
    body = [_stamp(line)[1] for line in lines]
    t = _stamp(lines[0])[0]
    assert abs(t.timestamp() - time.time()) < 60, t  # wall clock, not monotonic
    assert body[0].startswith("exists resource name:r0 role:Secondary"), body
    assert "may_promote:no" in body[0]  # the peer is Primary
    assert any(b.startswith("exists connection name:r0 conn-name:alpha "
                            "connection:Connected role:Primary") for b in body), body
    dev = next(b for b in body if b.startswith("exists device"))
    size_kib = c.admin("beta")["size_bytes"] // 1024
    assert "disk:UpToDate" in dev and f"size:{size_kib}" in dev, dev
    pd = next(b for b in body if b.startswith("exists peer-device"))
    assert "replication:Established" in pd and "out-of-sync:0" in pd, pd

    # changes: old->new, resync progress, may_promote, wall-clock stamps
    ev = subprocess.Popen(_events2(c, "alpha", "--statistics", "--timestamps"), cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in ev.stdout] and None,
                              daemon=True)
    reader.start()

    def until(pred, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout}s in {seen}") from None
            seen.append(_stamp(line.rstrip("\n"))[1])
            if pred(seen[-1]):
                return seen[-1]
    try:
        until(lambda b: b == "exists -", "exists -")
        c.kill("beta")
        until(lambda b: "connection:Connected->Connecting" in b, "connection change")
        qemu_io(c.uri("alpha"), "write -P 0x61 0 40M")
        c.cli("alpha", "adjust")  # nothing changed; an event line all the same
        c.start("beta")
        until(lambda b: "replication:Off->SyncSource" in b, "replication change")
        until(lambda b: "replication:SyncSource->Established" in b, "resync end")
        # 40 MiB at 16 MiB/s: 2.5 s, so at least one progress line (one a second)
        assert any(b.startswith("change peer-device") and " done:" in b and " rate:" in b
                   for b in seen), seen
        c.cli("alpha", "secondary")
        until(lambda b: "role:Primary->Secondary" in b, "role change")
        line = until(lambda b: "may_promote:no->yes" in b, "may_promote change")
        assert line.startswith("change resource name:r0"), line
    finally:
        ev.terminate()
        ev.wait(10)
    print("\n" + "\n".join(seen[-12:]))
