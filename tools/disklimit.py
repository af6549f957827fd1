#!/usr/bin/python3
"""What the backing file system allows a durable copy: the ceiling a resync is measured
against (tools/bench --mode resync; docs/benchmarks.md).

One writer into the page cache, then one fdatasync: SIZE of 1 MiB writes into a new file
and again over it, then 10% of its 4 KiB blocks, scattered, in offset order.

    tools/disklimit.py [--dir /tmp] [--size-mib 2048]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--size-mib", type=int, default=2048)
    args = ap.parse_args()
    size = args.size_mib << 20
    fd, path = tempfile.mkstemp(prefix="disklimit-", dir=args.dir)
    try:
        buf = os.urandom(1 << 20)
        for label in ("new file", "overwrite"):
            os.sync()
            t = time.monotonic()
            for i in range(size >> 20):
                os.pwrite(fd, buf, i << 20)
            t1 = time.monotonic()
            os.fdatasync(fd)
            t2 = time.monotonic()
            print(f"full {args.size_mib} MiB, {label}: write {t1 - t:.2f} s + fdatasync "
                  f"{t2 - t1:.2f} s = {size / (t2 - t) / 1e9:.2f} GB/s durable")
        offs = sorted(random.Random(1).sample(range(size // 4096), size // 4096 // 10))
        block = os.urandom(4096)
        os.sync()
        t = time.monotonic()
        for o in offs:
            os.pwrite(fd, block, o * 4096)
        t1 = time.monotonic()
        os.fdatasync(fd)
        t2 = time.monotonic()
        print(f"10% scattered ({len(offs)} x 4 KiB): write {t1 - t:.2f} s + fdatasync "
              f"{t2 - t1:.2f} s = {len(offs) * 4096 / (t2 - t) / 1e6:.0f} MB/s durable")
    finally:
        os.close(fd)
        os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
