#!/usr/bin/env python3
"""Scale figures for a large sparse resource (default 1 TiB) on this machine: seconds for
`create-md` on each node, for `up` (start until the admin socket answers), for the first
connect of a new blank pair (until Connected and, after `primary --force
--skip-initial-sync`, Established), for a reconnect in which every bit of the bitmap is set
(the Secondary was `invalidate`d: a full sync; until the resync runs), and the memory of
each node process (resident set, from /proc/PID/status) per TiB of resource.

    tools/scale [--size 1024G] [--dir DIR] [--json FILE]

Nothing is asserted; every figure printed was measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from blockrep.disk import parse_size  # noqa: E402
from blockrep.loopback import NODES, LoopbackPair  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1024G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    size = parse_size(args.size)
    tib = size / 2**40
    tmp = args.dir or tempfile.mkdtemp(prefix="blockrep-scale-")
    os.makedirs(tmp, exist_ok=True)
    pair = LoopbackPair(tmp, size=size)
    fig: dict = {"size_bytes": size}
    try:
        for n in NODES:
            t0 = time.monotonic()
            res = pair.cli(n, "create-md", "--force", timeout=600)
            if res.returncode != 0:
                raise SystemExit(f"create-md on {n}: {(res.stderr or res.stdout).strip()}")
            fig[f"create_md_s_{n}"] = time.monotonic() - t0
        for n in NODES:
            t0 = time.monotonic()
            pair.start(n)
            pair.wait_status(n, lambda s: True, 120, "the admin socket answering")
            fig[f"up_s_{n}"] = time.monotonic() - t0
        t0 = time.monotonic()
        pair.wait_status("alpha", lambda s: s["connection"] == "Connected", 300, "connected")
        fig["first_connect_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        res = pair.cli("alpha", "primary", "--force", "--skip-initial-sync")
        if res.returncode != 0:
            raise SystemExit(f"primary: {(res.stderr or res.stdout).strip()}")
        for n in NODES:
            pair.wait_status(n, lambda s: s["replication"] == "Established", 300,
                             "Established")
        fig["first_primary_established_s"] = time.monotonic() - t0
        for n in NODES:
            fig[f"rss_mib_{n}"] = rss_kib(pair.procs[n].pid) / 1024
        # every bit set: the Secondary discards its data (a full sync from the Primary)
        res = pair.cli("beta", "invalidate")
        if res.returncode != 0:
            raise SystemExit(f"invalidate: {(res.stderr or res.stdout).strip()}")
        pair.wait_status("alpha", lambda s: s["replication"] == "SyncSource", 300,
                         "a full sync running")
        pair.stop("beta")
        pair.wait_status("alpha", lambda s: s["connection"] != "Connected", 60,
                         "the peer gone")
        oos = pair.admin("alpha")["out_of_sync_bytes"]
        t0 = time.monotonic()
        pair.start("beta")
        s = pair.wait_status("alpha", lambda s: s["replication"] == "SyncSource" and
                             s["sync"] is not None, 300, "the full sync running again",
                             interval=0.01)
        fig["full_bitmap_reconnect_s"] = time.monotonic() - t0
        fig["full_bitmap_out_of_sync_bytes"] = oos
        fig["full_bitmap_sync_total_bytes"] = s["sync"]["total_bytes"]
        for n in NODES:
            fig[f"rss_mib_full_{n}"] = rss_kib(pair.procs[n].pid) / 1024
    finally:
        pair.stop_all()
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    g = 2**30
    print(f"resource {size / g:.0f} GiB ({tib:g} TiB), sparse images, loopback")
    for n in NODES:
        print(f"  create-md {n:5}  {fig[f'create_md_s_{n}']:7.2f} s")
    for n in NODES:
        print(f"  up {n:5}         {fig[f'up_s_{n}']:7.2f} s (start -> admin socket answers)")
    print(f"  first connect    {fig['first_connect_s']:7.2f} s (after both up -> Connected)")
    print(f"  primary --force --skip-initial-sync -> Established on both: "
          f"{fig['first_primary_established_s']:.2f} s")
    print(f"  full-bitmap reconnect {fig['full_bitmap_reconnect_s']:7.2f} s (Secondary "
          f"started -> full sync running; {fig['full_bitmap_out_of_sync_bytes'] / g:.0f} GiB "
          f"out of sync)")
    for n in NODES:
        print(f"  memory {n:5}     {fig[f'rss_mib_{n}']:7.1f} MiB RSS connected, "
              f"{fig[f'rss_mib_full_{n}']:.1f} MiB during the full sync "
              f"= {fig[f'rss_mib_full_{n}'] / tib:.1f} MiB per TiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
