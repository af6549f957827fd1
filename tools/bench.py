"""tools/bench: fio (nbd engine) workloads against blockrep and reference NBD servers.

Runs every workload against every target on the same backing file, one at a time, and prints
a table: IOPS, MB/s, p50/p99 completion latency, and blockrep/nbdkit per workload.
Everything it prints was measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

WORKLOADS = {
    "4k-randwrite-qd1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k-randwrite-qd32": dict(rw="randwrite", bs="4k", iodepth=32),
    "4k-randread-qd32": dict(rw="randread", bs="4k", iodepth=32),
    "1m-seqwrite-qd8": dict(rw="write", bs="1m", iodepth=8),
    "1m-seqread-qd8": dict(rw="read", bs="1m", iodepth=8),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


@dataclass
class Target:
    name: str
    argv: list
    port: int
    proc: subprocess.Popen | None = None

    def start(self, log_dir: str) -> None:
        log = open(os.path.join(log_dir, f"{self.name}.log"), "w")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


def make_targets(disk: str, names: list[str]) -> list[Target]:
    out = []
    for name in names:
        port = free_port()
        if name == "blockrep":
            argv = [PY, "-m", "blockrep", "serve", "--disk", disk,
                    "--listen", f"127.0.0.1:{port}"]
        elif name == "nbdkit":
            argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", disk]
        elif name == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "-x", "", "-b", "127.0.0.1", "-p", str(port),
                    "-t", "-e", "8", "--cache=writeback", "--aio=threads", disk]
        else:
            raise SystemExit(f"unknown target {name}")
        out.append(Target(name, argv, port))
    return out


def run_fio(uri: str, wl: dict, runtime: int, size: int) -> dict:
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={wl['rw']}",
            f"--bs={wl['bs']}", f"--iodepth={wl['iodepth']}", "--numjobs=1",
            f"--size={size}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
            "--randrepeat=0", "--norandommap", "--output-format=json"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed: {res.stderr.strip()[-500:]}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in wl["rw"] else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mbs": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "errors": job.get("error", 0),
    }


def prepare_disk(path: str, size: int) -> None:
    """A fully allocated file of random-ish data (so reads hit real data)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    os.sync()


def print_table(results: dict, targets: list[str], workloads: list[str]) -> None:
    hdr = f"{'workload':<20} {'target':<10} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} " \
          f"{'p99 us':>9} {'vs nbdkit':>9}"
    print(hdr)
    print("-" * len(hdr))
    for wl in workloads:
        base = results.get(("nbdkit", wl))
        for t in targets:
            r = results.get((t, wl))
            if r is None:
                continue
            ratio = f"{r['iops'] / base['iops']:.2f}x" if base and base["iops"] else "-"
            print(f"{wl:<20} {t:<10} {r['iops']:>10.0f} {r['mbs']:>9.1f} "
                  f"{r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {ratio:>9}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    ap.add_argument("--targets", default="blockrep,nbdkit,qemu-nbd")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--runtime", type=int, default=8, help="seconds per workload")
    ap.add_argument("--size-mib", type=int, default=1024, help="backing file size")
    ap.add_argument("--dir", help="where the backing file goes (default: a temp dir)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if not shutil.which(tool):
            raise SystemExit(f"tools/bench needs {tool} (see README: tools/setup)")
    names = args.targets.split(",")
    wls = args.workloads.split(",")
    tmp = tempfile.mkdtemp(prefix="blockrep-bench-", dir=args.dir)
    disk = os.path.join(tmp, "disk.img")
    size = args.size_mib << 20
    print(f"# preparing {args.size_mib} MiB backing file in {tmp}", flush=True)
    prepare_disk(disk, size)
    results = {}
    try:
        for target in make_targets(disk, names):
            target.start(tmp)
            try:
                for wl in wls:
                    r = run_fio(target.uri, WORKLOADS[wl], args.runtime, size)
                    results[(target.name, wl)] = r
                    print(f"# {target.name:<9} {wl:<18} {r['iops']:>9.0f} IOPS "
                          f"{r['mbs']:>8.1f} MB/s p50 {r['p50_us']:.0f}us "
                          f"p99 {r['p99_us']:.0f}us", flush=True)
            finally:
                target.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(results, names, wls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{t}/{w}": r for (t, w), r in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
