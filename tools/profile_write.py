#!/usr/bin/python3
"""CPU per replicated write, by counts rather than wall time (a noisy machine is fine).

Brings up a replicated pair on loopback (blockrep.loopback, the pair the tests and bench
use) from a checkout (this one, or --root another with its own .venv, e.g. a baseline),
issues N sequential 4 KiB random writes at queue depth 1 with libnbd (python3-libnbd, so
this runs on the system Python) and prints, for the Primary and the Secondary:

  --wrap none       CPU per write: utime+stime of all threads (/proc/PID/stat) and on-CPU
                    time (/proc/PID/task/*/schedstat); noisy on a shared machine
  --wrap callgrind  user-space instructions per write (valgrind --tool=callgrind, a dump
                    before and after the writes): deterministic to a few per cent
  --wrap cprofile   Python calls per write, function by function: two runs (N and 2N
                    writes) under cProfile, their difference divided by N, so start-up and
                    shutdown cancel out; saved as PREFIX.NODE.json; --diff OTHER_PREFIX
                    prints a saved profile beside it (e.g. the baseline's)
  --wrap strace     system calls per write (strace -c attached for the writes)
  --wrap opcodes    bytecodes executed per write, function by function (sys.settrace with
                    f_trace_opcodes; exact), the same two runs and --diff

    tools/profile_write.py --wrap callgrind -n 1000                 # this checkout
    tools/profile_write.py --wrap callgrind -n 1000 --root /work/base
    tools/profile_write.py --wrap cprofile --root /work/base --out /tmp/pw-base
    tools/profile_write.py --wrap cprofile --out /tmp/pw-now --diff /tmp/pw-base
    tools/profile_write.py --wrap opcodes -n 300 --root /work/base --out /tmp/op-base

Not a benchmark: nothing is compared against a time (tools/bench does that).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.append("/usr/lib/python3/dist-packages")  # python3-libnbd

import nbd  # noqa: E402

from blockrep.loopback import NODES, LoopbackPair  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
ROLES = dict(zip(NODES, ("primary", "secondary")))


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def sched_cpu(pid: int) -> float:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total / 1e9


# `python -c OPCODES OUT up CONFIG --node NODE`: blockrep run with every bytecode counted by
# function (sys.settrace with f_trace_opcodes), written to OUT as JSON at exit
OPCODES = r"""
import atexit, json, runpy, sys, threading
out = sys.argv[1]
counts = {}
def local(frame, event, arg):
    if event == "opcode":
        k = frame.f_code
        counts[k] = counts.get(k, 0) + 1
    return local
def tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    return local
def dump():
    sys.settrace(None)
    with open(out, "w") as f:
        json.dump({f"{c.co_filename.rsplit('/', 1)[-1]}:{c.co_firstlineno}:{c.co_name}": n
                   for c, n in counts.items()}, f)
atexit.register(dump)
sys.argv = ["blockrep"] + sys.argv[2:]
threading.settrace(tracer)
sys.settrace(tracer)
runpy.run_module("blockrep", run_name="__main__", alter_sys=True)
"""


def proc_io(pid: int) -> tuple[int, int]:
    """(read-type, write-type) system calls of the process so far (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


class Pair(LoopbackPair):
    """The loopback pair, its `up` processes optionally wrapped (valgrind runs the program
    in its own process, so the PID is the node's either way)."""

    def __init__(self, *a, wrap: str = "none", out: str = "", **kw):
        super().__init__(*a, **kw)
        self.wrap, self.out = wrap, out

    def argv(self, node: str, cmd: str, *args: str) -> list[str]:
        argv = super().argv(node, cmd, *args)
        if cmd != "up" or self.wrap == "none":
            return argv
        if self.wrap == "cprofile":
            return [argv[0], "-m", "cProfile", "-o", f"{self.out}.{node}.prof"] + argv[1:]
        if self.wrap == "opcodes":
            return [argv[0], "-c", OPCODES, f"{self.out}.{node}.ops.json", *argv[3:]]
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}.{node}.cg",
                *argv]


def run(args, n: int, wrap: str, out: str) -> dict:
    """One pair, `args.warmup` + n writes; CPU per write of each node over the n."""
    root = os.path.abspath(args.root)
    slow = wrap in ("callgrind", "opcodes")
    resource = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.resource)}
    if slow:  # valgrind or tracing runs the nodes ~30x slower: no liveness timeouts
        resource.setdefault("ping-interval", 10)
        resource.setdefault("timeout", 60)
    d = tempfile.mkdtemp(prefix="profile-write-")
    pair = Pair(d, name="pw", size=args.size, python=os.path.join(root, ".venv", "bin", "python"),
                root=root, resource=resource, wrap=wrap, out=out)
    for path in glob.glob(f"{out}.*.cg*"):
        os.unlink(path)
    try:
        pair.create_md()
        pair.up_pair("alpha", blank=True, timeout=600 if slow else 60)
        h = nbd.NBD()
        h.connect_uri(pair.uri("alpha"))
        blocks = h.get_size() // args.bs  # internal metadata takes the end of the image
        rnd = random.Random(7)
        buf = os.urandom(args.bs)
        offsets = [rnd.randrange(blocks) * args.bs for _ in range(args.warmup + n)]
        for off in offsets[:args.warmup]:
            h.pwrite(buf, off)
        pids = {node: pair.procs[node].pid for node in NODES}
        if wrap == "callgrind":
            for pid in pids.values():
                subprocess.run(["callgrind_control", "-d", "start", str(pid)], check=True,
                               capture_output=True)
        tracers = {}
        if wrap == "strace":  # attached for the writes only
            for node, pid in pids.items():
                tracers[node] = subprocess.Popen(
                    ["strace", "-f", "-c", "-o", f"{out}.{node}.strace", "-p", str(pid)],
                    stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached to every thread
        c0 = {node: (proc_cpu(p), sched_cpu(p), *proc_io(p)) for node, p in pids.items()}
        t0 = time.perf_counter()
        for off in offsets[args.warmup:]:
            h.pwrite(buf, off)
        wall = time.perf_counter() - t0
        c1 = {node: (proc_cpu(p), sched_cpu(p), *proc_io(p)) for node, p in pids.items()}
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        if wrap == "callgrind":
            for pid in pids.values():
                subprocess.run(["callgrind_control", "-d", "writes", str(pid)], check=True,
                               capture_output=True)
        h.shutdown()
    finally:
        pair.stop_all()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    res = {"wall_us": wall / n * 1e6}
    for node in NODES:
        res[node] = {"cpu_us": (c1[node][0] - c0[node][0]) / n * 1e6,
                     "sched_us": (c1[node][1] - c0[node][1]) / n * 1e6,
                     "syscr": (c1[node][2] - c0[node][2]) / n,
                     "syscw": (c1[node][3] - c0[node][3]) / n}
        if wrap == "strace":
            res[node]["syscalls"] = strace_calls(f"{out}.{node}.strace", n)
        if wrap == "callgrind":
            res[node]["ir"] = callgrind_writes(f"{out}.{node}.cg") / n
    return res


def strace_calls(path: str, n: int) -> dict:
    """strace -c's table -> {syscall: calls per write} (the 1 s of attaching included)."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                out[parts[-1]] = int(parts[3]) / n
    return out


def callgrind_writes(prefix: str) -> int:
    """Instructions in the dump triggered by 'writes' (the writes only)."""
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            head = [next(f, "") for _ in range(40)]
        if "desc: Trigger: dump writes\n" in head:
            for line in head:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError(f"no 'writes' dump among {prefix}.*")


def per_write(path_a: str, path_b: str, n: int) -> dict:
    """(profile of the 2N run - profile of the N run) / N: {function: [calls, tottime us]}."""
    import pstats

    def load(path):
        out: dict = {}
        for (f, line, fn), (_cc, nc, tt, _ct, _callers) in pstats.Stats(path).stats.items():
            key = fn if f == "~" else f"{os.path.basename(f)}:{line}:{fn}"
            a = out.setdefault(key, [0, 0.0])
            a[0] += nc
            a[1] += tt
        return out
    a, b = load(path_a), load(path_b)
    return {k: [(b.get(k, [0, 0])[0] - a.get(k, [0, 0])[0]) / n,
                (b.get(k, [0, 0])[1] - a.get(k, [0, 0])[1]) / n * 1e6]
            for k in set(a) | set(b)}


def per_write_ops(path_a: str, path_b: str, n: int) -> dict:
    """Bytecodes per write by function, as per_write's [count, count] (the same figure in
    both columns: the count is exact, there is no time)."""
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)
    return {k: [(b.get(k, 0) - a.get(k, 0)) / n] * 2 for k in set(a) | set(b)}


def print_profile(now: dict, other: dict | None, top: int) -> None:
    def short(k):  # the same function in two checkouts sits on different lines
        parts = k.split(":")
        return k if len(parts) < 3 else f"{parts[0]}:{parts[2]}"
    if other is not None:
        merged_now, merged_other = {}, {}
        for src, dst in ((now, merged_now), (other, merged_other)):
            for k, (c, t) in src.items():
                v = dst.setdefault(short(k), [0.0, 0.0])
                v[0] += c
                v[1] += t
        now, other = merged_now, merged_other
    keys = [k for k in set(now) | set(other or {})
            if abs(now.get(k, [0])[0]) >= 0.05 or other and abs(other.get(k, [0])[0]) >= 0.05]
    keys.sort(key=lambda k: -max(now.get(k, [0, 0])[1], (other or {}).get(k, [0, 0])[1]))
    tot = sum(v[0] for v in now.values())
    head = f"{'function':<58} {'calls':>6} {'us':>6}"
    if other is not None:
        head += f" | {'calls':>6} {'us':>6}  (other)"
        tot_o = sum(v[0] for v in other.values())
        print(f"  total per write: {tot:.1f} (other {tot_o:.1f})")
    else:
        print(f"  total per write: {tot:.1f}")
    print("  " + head)
    for k in keys[:top]:
        c, t = now.get(k, [0, 0])
        line = f"  {k[:58]:<58} {c:6.2f} {t:6.2f}"
        if other is not None:
            co, to = other.get(k, [0, 0])
            line += f" | {co:6.2f} {to:6.2f}"
        print(line)
    if other is not None:
        changed = [(k, now.get(k, [0, 0])[0], other.get(k, [0, 0])[0]) for k in
                   set(now) | set(other)]
        changed = [c for c in changed if abs(c[1] - c[2]) >= 0.05]
        changed.sort(key=lambda c: -(abs(c[1] - c[2])))
        print("  counts per write that differ (now, other):")
        for k, a, b in changed[:top]:
            print(f"    {k[:64]:<64} {a:6.2f} {b:6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=HERE, help="checkout to run (its .venv/bin/python)")
    ap.add_argument("-n", type=int, default=2000, help="measured writes")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--size", type=int, default=1 << 30, help="device size (bytes)")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--wrap", choices=("none", "cprofile", "callgrind", "opcodes", "strace"),
                    default="none")
    ap.add_argument("--out", default="/tmp/profile_write", help="prefix of profile files")
    ap.add_argument("--diff", metavar="PREFIX", help="with cprofile: a saved profile to "
                                                     "print beside this one")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--keep", action="store_true", help="keep the pair's directory")
    ap.add_argument("--resource", action="append", default=[], metavar="KEY=JSON",
                    help="an extra resource key, e.g. protocol='\"A\"'")
    args = ap.parse_args()
    print(f"checkout {os.path.abspath(args.root)}: {args.n} random writes of {args.bs} B at "
          f"QD1 after {args.warmup}, wrap={args.wrap}")
    if args.wrap in ("none", "callgrind", "strace"):
        res = run(args, args.n, args.wrap, args.out)
        print(f"  wall {res['wall_us']:.0f} us/write (noisy)")
        for node in NODES:
            r = res[node]
            ir = f"   {r['ir']:>9,.0f} Ir/write" if "ir" in r else ""
            print(f"  {ROLES[node]:<9} cpu {r['cpu_us']:7.1f} us/write   "
                  f"sched {r['sched_us']:7.1f} us/write   read/write-type syscalls "
                  f"{r['syscr']:.2f}/{r['syscw']:.2f} per write{ir}")
            if "syscalls" in r:
                calls = sorted(r["syscalls"].items(), key=lambda kv: -kv[1])
                print("    syscalls/write: " + ", ".join(f"{k} {v:.2f}" for k, v in calls
                                                        if v >= 0.01))
        return 0
    for k, n in (("a", args.n), ("b", 2 * args.n)):
        run(args, n, args.wrap, f"{args.out}-{k}")
    for node in NODES:
        if args.wrap == "opcodes":
            prof = per_write_ops(f"{args.out}-a.{node}.ops.json",
                                 f"{args.out}-b.{node}.ops.json", args.n)
        else:
            prof = per_write(f"{args.out}-a.{node}.prof", f"{args.out}-b.{node}.prof", args.n)
        with open(f"{args.out}.{node}.json", "w") as f:
            json.dump(prof, f)
        other = None
        if args.diff:
            with open(f"{args.diff}.{node}.json") as f:
                other = json.load(f)
        what = ("bytecodes executed, by function (both columns)" if args.wrap == "opcodes"
                else "calls and tottime under cProfile (inflated by the profiler)")
        print(f"\n== {ROLES[node]} ({node}): per write, {what}")
        print_profile(prof, other, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
