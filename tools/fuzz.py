"""Coverage-guided fuzzing of every decoder of blockrep with atheris (libFuzzer for Python).

    tools/fuzz [--runs N | --seconds S] [--only NAME,...] [--list] [--json FILE]
    tools/fuzz --reproduce NAME FILE...

Each target runs in its own child process (libFuzzer owns the process it runs in), one at a
time, seeded with valid encodings and guided by coverage of blockrep (and tomllib). A target
may only raise the error classes its decoder documents (NbdProtocolError, LinkProtocolError,
MetaError, ConfigError, ValueError for Bitmap.from_rle); anything else, or a broken
invariant, is a crash: the input and its traceback go to WORK/crashes/, fuzzing goes on, and
the run exits 1. WORK (default .fuzz/) also keeps each target's growing corpus, so a later
run starts where the last one stopped. Prints inputs run, seconds, inputs/s and crashes per
target and in total.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fuzz_targets import TARGETS  # noqa: E402  (tools/fuzz_targets.py)


# -- child: one target under libFuzzer -----------------------------------------------------------

def _crash_writer(name: str, workdir: str):
    crashes = os.path.join(workdir, "crashes")
    os.makedirs(crashes, exist_ok=True)
    seen: set = set()
    count_file = os.path.join(workdir, f"{name}.crashes")
    state = {"n": 0}
    with open(count_file, "w") as f:
        f.write("0 0\n")

    def record(data: bytes, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = tb[-1] if tb else None
        sig = (type(exc).__name__, where.filename if where else "", where.lineno if where else 0)
        state["n"] += 1
        if sig not in seen:
            seen.add(sig)
            h = hashlib.sha1(data).hexdigest()[:16]
            base = os.path.join(crashes, f"{name}-{h}")
            with open(base + ".bin", "wb") as f:
                f.write(data)
            with open(base + ".txt", "w") as f:
                f.write("".join(traceback.format_exception(exc)))
            sys.stderr.write(f"CRASH {name}: {type(exc).__name__}: {exc} -> {base}.bin\n")
        with open(count_file, "w") as f:
            f.write(f"{state['n']} {len(seen)}\n")
    return record


def child(name: str, args) -> None:
    import atheris

    with atheris.instrument_imports(include=["blockrep", "tomllib"]):
        tgt = TARGETS[name]
        one, seeds = tgt.build()
    allowed = tgt.allowed()
    record = _crash_writer(name, args.work)

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except allowed:
            pass
        except Exception as exc:  # anything else is a bug in the decoder (or an invariant)
            record(data, exc)

    corpus = os.path.join(args.work, "corpus", name)
    os.makedirs(corpus, exist_ok=True)
    for i, s in enumerate(seeds):
        with open(os.path.join(corpus, f"seed-{i:03d}"), "wb") as f:
            f.write(s)
    lf = [sys.argv[0], f"-max_len={tgt.max_len}", "-timeout=10", "-rss_limit_mb=2048",
          "-print_final_stats=1", f"-artifact_prefix={os.path.join(args.work, 'crashes')}/"
          f"{name}-", "-print_pcs=0", "-reduce_inputs=1"]
    if args.runs:
        lf.append(f"-runs={args.runs}")
    if args.seconds:
        lf.append(f"-max_total_time={int(args.seconds)}")
    if args.seed is not None:
        lf.append(f"-seed={args.seed}")
    lf.append(corpus)
    atheris.Setup(lf, test_one_input)
    atheris.Fuzz()


# -- parent: run the targets one after another, report -------------------------------------------

def run_target(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--work", args.work]
    if args.runs:
        cmd += ["--runs", str(args.runs)]
    if args.seconds:
        cmd += ["--seconds", str(args.seconds)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    log = os.path.join(args.work, f"{name}.log")
    t0 = time.monotonic()
    with open(log, "wb") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    secs = time.monotonic() - t0
    text = open(log, "rb").read().decode(errors="replace")
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    inputs = int(m.group(1)) if m else 0
    if not m:  # libFuzzer stopped early (timeout, OOM, deadly signal): last status line
        ms = re.findall(r"^#(\d+)\s", text, re.M)
        inputs = int(ms[-1]) if ms else 0
    crashes, unique = 0, 0
    try:
        with open(os.path.join(args.work, f"{name}.crashes")) as f:
            crashes, unique = map(int, f.read().split())
    except (OSError, ValueError):
        pass
    fatal = ""
    if rc != 0:  # a libFuzzer-level failure (hang, OOM, signal): one crash more
        crashes += 1
        unique += 1
        fatal = next((ln for ln in text.splitlines() if "ERROR: libFuzzer" in ln
                      or "ERROR:" in ln), f"child exited {rc}")
    cov = re.findall(r"cov: (\d+)", text)
    return {"target": name, "inputs": inputs, "seconds": round(secs, 1),
            "inputs_per_s": round(inputs / secs) if secs > 0 else 0,
            "crashes": crashes, "unique_crashes": unique, "coverage": int(cov[-1]) if cov
            else 0, "fatal": fatal, "log": log}


def reproduce(name: str, files: list[str]) -> int:
    tgt = TARGETS[name]
    one, _ = tgt.build()
    allowed = tgt.allowed()
    bad = 0
    for path in files:
        data = open(path, "rb").read()
        try:
            one(data)
            print(f"{path}: ok")
        except allowed as exc:
            print(f"{path}: ok ({type(exc).__name__}: {exc})")
        except Exception:
            bad += 1
            print(f"{path}: CRASH")
            traceback.print_exc()
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=0, help="inputs per target")
    p.add_argument("--seconds", type=float, default=0, help="seconds per target")
    p.add_argument("--only", help="comma-separated target names (default: all)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--work", default=os.path.join(ROOT, ".fuzz"),
                   help="corpus, crashes and logs (default .fuzz/)")
    p.add_argument("--seed", type=int, help="libFuzzer random seed")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--reproduce", metavar="NAME", help="run target NAME on FILE... once")
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = os.path.abspath(args.work)
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:18} {t.doc}")
        return 0
    if args.reproduce:
        return reproduce(args.reproduce, args.files)
    if args.child:
        child(args.child, args)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("tools/fuzz: atheris is not installed (pip install -e '.[fuzz]'; tools/setup "
              "does it)", file=sys.stderr)
        return 2
    if not args.runs and not args.seconds:
        args.runs = 10_000
    names = args.only.split(",") if args.only else list(TARGETS)
    for n in names:
        if n not in TARGETS:
            p.error(f"unknown target {n!r} (see --list)")
    os.makedirs(args.work, exist_ok=True)
    results = []
    print(f"{'target':18} {'inputs':>10} {'seconds':>8} {'inputs/s':>9} {'crashes':>8} "
          f"{'cov':>6}", flush=True)
    for n in names:
        r = run_target(n, args)
        results.append(r)
        print(f"{n:18} {r['inputs']:>10} {r['seconds']:>8.1f} {r['inputs_per_s']:>9} "
              f"{r['crashes']:>8} {r['coverage']:>6}" + (f"  {r['fatal']}" if r["fatal"]
                                                          else ""), flush=True)
    tot_in = sum(r["inputs"] for r in results)
    tot_s = sum(r["seconds"] for r in results)
    tot_c = sum(r["crashes"] for r in results)
    print(f"{'total':18} {tot_in:>10} {tot_s:>8.1f} {round(tot_in / tot_s) if tot_s else 0:>9} "
          f"{tot_c:>8}")
    if tot_c:
        print(f"crashes: see {os.path.join(args.work, 'crashes')}/ (tools/fuzz --reproduce "
              f"NAME FILE)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "total_inputs": tot_in, "total_crashes": tot_c},
                      f, indent=1)
    return 1 if tot_c else 0


if __name__ == "__main__":
    sys.exit(main())
