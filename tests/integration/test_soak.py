"""A short fault soak in CI (tools/soak): two nodes under the versioned writer while nodes are
killed and stopped, failovers happen, the link is cut and blackholed through the proxy and
the Secondary's disk fails (nbdkit's error filter; detached, then attached again);
nothing acknowledged may be lost, fio's verify jobs beside the writer must pass, the disks
must end identical and no node stuck."""

from __future__ import annotations

import json
import os

import pytest
from support.helpers import ROOT, require_tool, run


@pytest.mark.slow
def test_short_soak_loses_nothing(tmp_path):
    require_tool("fio", "nbdkit", "nbdfuse")
    res = run(["nice", "-n", "10", os.path.join(ROOT, "tools", "soak"), "--minutes", "2",
               "--seed", "8", "--fio", "--disk-faults", "--json", "--dir", str(tmp_path)],
              timeout=600,
              check=False)
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    print(json.dumps({k: v for k, v in summary.items() if k not in ("examples", "dir")}))
    assert res.returncode == 0 and summary["result"] == "PASS", \
        f"{res.stdout[-4000:]}\n{res.stderr[-3000:]}"
    assert summary["rounds"] >= 10, summary
    assert summary["lost"] == 0 and summary["corrupt"] == 0, summary
    assert summary["disks_identical"] and not summary["stuck"], summary
    assert summary["acknowledged_blocks_checked"] > 0, summary
    assert summary["fio"]["verified"] > 0 and summary["fio"]["failed"] == 0, summary
    kinds = summary["faults"]
    assert sum(1 for k in ("kill-secondary", "kill-primary", "stop", "cut", "blackhole",
                           "disk-eio") if kinds[k]) >= 5, kinds
    assert kinds["disk-eio"] == 0 or kinds["attach"] > 0, kinds  # detached, then attached
