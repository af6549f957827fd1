"""A short run of tools/fuzz (atheris over every decoder) as part of the suite: every target
runs at least 10^4 inputs and nothing but its documented error classes escapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.helpers import ROOT

RUNS = 10_000


def test_every_decoder_survives_short_fuzzing(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from fuzz_targets import TARGETS

    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fuzz.py"),
                           "--runs", str(RUNS), "--seed", "1", "--work", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    print(proc.stdout)  # the figures: inputs, inputs/s, crashes per decoder
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    by_name = {r["target"]: r for r in res["results"]}
    assert set(by_name) == set(TARGETS)
    for name, r in by_name.items():
        assert r["inputs"] >= RUNS, r
        assert r["crashes"] == 0, r
    assert res["total_crashes"] == 0
