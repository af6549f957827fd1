"""tools/bench --mode distance: replication over a shaped link, beside rsync.

The link between the nodes runs through the userspace proxy (blockrep.faults.proxy, the one
the fault tests use): RTT/2 one-way delay each way and a bandwidth cap. Tables:
1. per RTT x bandwidth: 4K randwrite QD1 / QD32 IOPS and p50/p99, 1M seqwrite MB/s, for
   protocols A, B, C and standalone (a protocol this build refuses prints its error);
2. the data gap during a burst per protocol (status' gap fields when the build has them,
   else the Primary's writes not yet acknowledged by the peer);
3. after an outage in which CHANGE % of the resource changed (text-like or random data):
   bytes on the wire and seconds to resync, per compression setting; then rsync in daemon
   mode through the same proxy bringing a copy of the secondary's image up to date
   (--inplace --no-whole-file, with and without -z);
4. the data gap of rsync from cron (interval + run time) against blockrep's live gap;
5. protocol A's 4K QD1 latency against standalone's in interleaved rounds (both kept up).
Everything printed was measured in this run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

from blockrep.faults.proxy import ProxyThread

import bench as B  # tools/bench.py (this file is loaded from it)

IO_WORKLOADS = {
    "4k-qd1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k-qd32": dict(rw="randwrite", bs="4k", iodepth=32),
    "1m-seq": dict(rw="write", bs="1m", iodepth=32),
}

CHANGE_WRITER = r"""
import nbd, random, sys
uri, listfile, kind = sys.argv[1], sys.argv[2], sys.argv[3]
offs = [int(x) for x in open(listfile)]
rng = random.Random(7)
words = ("GET POST /api/v1/items /static/app.js status=200 status=404 user=alice user=bob "
         "INFO WARN latency_ms= bytes= host=web-01 host=web-02 cache=hit cache=miss").split()
def block(i):
    if kind == "random":
        return rng.randbytes(4096)
    out, n = [], 0
    while n < 4096:
        line = (f"2026-12-02T12:{i % 60:02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d} "
                + " ".join(rng.choice(words) for _ in range(6))
                + f" id={rng.randrange(10**6)}\n")
        out.append(line); n += len(line)
    return "".join(out).encode()[:4096]
h = nbd.NBD(); h.connect_uri(uri)
bufs = [nbd.Buffer.from_bytearray(bytearray(block(i))) for i in range(4096)]
for i, off in enumerate(offs):
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_pwrite(bufs[i % 4096], off)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush(); h.shutdown()
"""


class DistancePair(B.ReplicatedTarget):
    """A replicated pair whose link (alpha dials beta) runs through a shaped proxy."""

    def __init__(self, name: str, disk: str, tmp: str, *, protocol: str, compression: str,
                 rtt_ms: float, rate: str, sndbuf: str = "0", csums: bool = False,
                 busy_poll: float = 0):
        super().__init__(name, disk, tmp, busy_poll=busy_poll)
        beta_link = self.pair.ports["beta"][0]
        self.proxy = ProxyThread(("127.0.0.1", beta_link))
        self.proxy.shape(delay_ms=rtt_ms / 2, rate=rate)
        extra = [f'protocol = "{protocol}"', f'compression = "{compression}"']
        if csums:  # checksum-mode resync for every resync, not only after a crash
            extra.append("csums-after-crash-only = false")
        if sndbuf not in ("", "0"):
            extra.append(f'sndbuf-size = "{sndbuf}"')  # on-congestion = block: A waits when full
        self.add_resource(*extra)
        path = self.pair.configs["alpha"]
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace(f'"127.0.0.1:{beta_link}"', f'"127.0.0.1:{self.proxy.port}"'))

    def wire_bytes(self) -> int:
        return sum(self.proxy.stats()["bytes"].values())

    def stop(self) -> None:
        super().stop()
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None


def _why(exc: Exception) -> str:
    """A table cell for a pair that could not run: the end of its first error line."""
    text = " ".join(str(exc).split()) or repr(exc)
    m = re.search(r"resource\.protocol.*", text)
    return "n/a: " + (m.group(0) if m else text[-120:])


def _fmt_io(r: dict | str) -> str:
    if isinstance(r, str):
        return f"{r[:38]:<38}"
    return f"{r['iops']:>9.0f} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f} {r['mbs']:>8.1f}"


def _run_wl(uri: str, wl: dict, args) -> dict:
    return B.run_fio(uri, wl, args.runtime, 64 << 20 if wl["bs"] == "4k" else
                     min(args.size_mib << 20, 1 << 30))


def _standalone(disk: str, tmp: str, args) -> dict:
    t = B.make_targets(disk, ["blockrep"], tmp)[0]
    t.start(tmp)
    try:
        return {w: _run_wl(t.uri, wl, args) for w, wl in IO_WORKLOADS.items()}
    finally:
        t.stop()


def _gap_fields(status: dict) -> dict:
    """Numeric gap figures of a status: its "gap" map when the build has one, plus the
    Primary's writes the peer has not acknowledged yet."""
    out = {"pending_writes": status["counters"]["writes_pending_peer"],
           "out_of_sync_bytes": status["out_of_sync_bytes"]}
    gap = status.get("gap") or status.get("data_gap") or {}
    if isinstance(gap, dict):
        for k, v in gap.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
    return out


def _burst_gap(pair: DistancePair, args) -> dict:
    """Max of every gap figure, sampled every 0.1 s during a QD32 4K randwrite burst."""
    wl = dict(rw="randwrite", bs="4k", iodepth=32)
    peak: dict = {}
    done = threading.Event()
    res: dict = {}
    # the workloads before may have left a backlog (protocol A over a slow link): the burst
    # starts once the peer has everything, so its gap is its own
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        g = _gap_fields(pair.status("alpha"))
        if not any(v for k, v in g.items() if k != "out_of_sync_bytes"):
            break
        time.sleep(0.2)
    res["drained_s"] = round(time.monotonic() - t0, 1)

    def run():
        try:
            res["fio"] = B.run_fio(pair.uri, wl, args.burst_s, 64 << 20, ramp=0)
        except RuntimeError as exc:
            res["error"] = str(exc)
        done.set()

    th = threading.Thread(target=run)
    th.start()
    while not done.wait(0.1):
        try:
            for k, v in _gap_fields(pair.status("alpha")).items():
                peak[k] = max(peak.get(k, 0), v)
        except subprocess.CalledProcessError:
            pass
    th.join()
    return {"peak": peak, **res}


def run_link_tables(args, tmp: str, disk: str) -> None:
    size = args.size_mib << 20
    B.prepare_disk(disk, size)
    print("# standalone", flush=True)
    standalone = _standalone(disk, tmp, args)
    rows, gaps = [], []
    for rate in args.rates.split(","):
        for rtt in [float(x) for x in args.rtts.split(",")]:
            for proto in args.protocols.split(","):
                name = f"dist-{proto}-{rtt:g}ms-{rate}"
                print(f"# {name}", flush=True)
                try:
                    pair = DistancePair(name, disk, tmp, protocol=proto,
                                        compression=args.compression, rtt_ms=rtt, rate=rate,
                                        sndbuf=args.sndbuf)
                except Exception as exc:  # noqa: BLE001 - printed in the table
                    rows.append((rate, rtt, proto, {w: _why(exc) for w in IO_WORKLOADS}))
                    continue
                try:
                    pair.start(tmp)
                    r = {w: _run_wl(pair.uri, wl, args) for w, wl in IO_WORKLOADS.items()}
                    if rtt == max(float(x) for x in args.rtts.split(",")) or args.gap_all:
                        gaps.append((rate, rtt, proto, _burst_gap(pair, args)))
                except Exception as exc:  # noqa: BLE001 - e.g. protocol refused by config
                    r = {w: _why(exc) for w in IO_WORKLOADS}
                finally:
                    pair.stop()
                rows.append((rate, rtt, proto, r))
            rows.append((rate, rtt, "standalone", standalone))
    print()
    print(f"link compression: {args.compression}; sndbuf-size {args.sndbuf}; "
          f"fio {args.runtime} s per cell; "
          f"4K on 64 MiB, 1M on {min(args.size_mib, 1024)} MiB; QD32 for 1M")
    print(f"{'rate':<6} {'RTT ms':>6} {'proto':<10} | {'4k-qd1 IOPS':>9} {'p50 us':>9} "
          f"{'p99 us':>9} {'MB/s':>8} | {'4k-qd32':>9} {'p50 us':>9} {'p99 us':>9} {'MB/s':>8}"
          f" | {'1m-seq MB/s':>11}")
    for rate, rtt, proto, r in rows:
        seq = r["1m-seq"]
        seq = f"{seq['mbs']:>11.1f}" if isinstance(seq, dict) else seq[:40]
        print(f"{rate:<6} {rtt:>6g} {proto:<10} | {_fmt_io(r['4k-qd1'])} | "
              f"{_fmt_io(r['4k-qd32'])} | {seq}")
    print()
    print(f"data gap during a {args.burst_s} s 4K QD32 burst (peaks, sampled every 0.1 s):")
    for rate, rtt, proto, g in gaps:
        fields = ", ".join(f"{k}={v:g}" for k, v in sorted(g["peak"].items()))
        iops = f"{g['fio']['iops']:.0f} IOPS" if "fio" in g else g.get("error", "")
        print(f"  {rate} RTT {rtt:g} ms protocol {proto}: {fields} ({iops}; started after "
              f"{g.get('drained_s', 0):g} s of draining what the workloads before left)")


def run_qd1_rounds(args, tmp: str) -> None:
    """Protocol A's QD1 write latency against standalone's, in interleaved rounds: both
    stay up (each on its own disk file) and each round runs the 4K QD1 workload on one,
    then the other, so a slow spell of the machine hits both; the ratio of the medians."""
    size = args.size_mib << 20
    sdisk, pdisk = os.path.join(tmp, "qd1-standalone.img"), os.path.join(tmp, "qd1-pair.img")
    B.prepare_disk(sdisk, size)
    B.prepare_disk(pdisk, size)
    rtt, rate, proto = float(args.qd1_rtt), args.qd1_rate, args.qd1_protocol
    wl = IO_WORKLOADS["4k-qd1"]
    poll = args.qd1_busy_poll  # both kept awake alike (else an idle vCPU's wake-up decides)
    alone = B.make_targets(sdisk, ["blockrep-poll" if poll else "blockrep"], tmp)[0]
    pair = DistancePair(f"qd1-{proto}-{rtt:g}ms-{rate}", pdisk, tmp, protocol=proto,
                        compression=args.compression, rtt_ms=rtt, rate=rate,
                        sndbuf=args.sndbuf, busy_poll=B.BUSY_POLL_US if poll else 0)
    rows = []
    try:
        alone.start(tmp)
        pair.start(tmp)
        for i in range(args.qd1_rounds):
            order = [("standalone", alone), (proto, pair)]
            if i % 2:
                order.reverse()  # alternate who goes first
            r = {name: _run_wl(t.uri, wl, args) for name, t in order}
            rows.append(r)
            print(f"# qd1 round {i + 1}: " + ", ".join(
                f"{n} p50 {v['p50_us']:.0f} us" for n, v in r.items()), flush=True)
    finally:
        pair.stop()
        alone.stop()

    def med(name, key):
        return statistics.median(r[name][key] for r in rows)

    print()
    print(f"4K randwrite QD1, protocol {proto} at RTT {rtt:g} ms / {rate} against standalone, "
          f"{len(rows)} interleaved rounds of {args.runtime} s (medians; every round above)"
          + (f"; both with busy-poll = {B.BUSY_POLL_US} us" if poll else ""))
    print(f"{'target':<12} {'IOPS':>9} {'p50 us':>9} {'p99 us':>9}")
    for name in ("standalone", proto):
        print(f"{name:<12} {med(name, 'iops'):>9.0f} {med(name, 'p50_us'):>9.0f} "
              f"{med(name, 'p99_us'):>9.0f}")
    ratio = med(proto, "p50_us") / med("standalone", "p50_us")
    print(f"protocol {proto} / standalone: p50 latency {ratio:.2f}x, per-round p50 ratios "
          + ", ".join(f"{r[proto]['p50_us'] / r['standalone']['p50_us']:.2f}" for r in rows))


def _rsync(src: str, dst_dir: str, tmp: str, rtt_ms: float, rate: str, z: bool) -> dict:
    """rsync daemon on loopback behind the shaped proxy; the client pushes src into the
    module's copy of the secondary's image."""
    port = B.free_port()
    conf = os.path.join(tmp, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\nlog file = {tmp}/rsyncd.log\npid file = {tmp}/rsyncd.pid\n"
                f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
                f"[img]\npath = {dst_dir}\nread only = no\n")
    d = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                          "--address=127.0.0.1", f"--port={port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = ProxyThread(("127.0.0.1", port))
    proxy.shape(delay_ms=rtt_ms / 2, rate=rate)
    try:
        B.wait_port(port, d)
        t0 = time.monotonic()
        res = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats",
                              *(["-z"] if z else []), src,
                              f"rsync://127.0.0.1:{proxy.port}/img/{os.path.basename(src)}"],
                             capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"rsync failed ({res.returncode}): {res.stderr.strip()[-300:]}")
        out = res.stdout
        secs = time.monotonic() - t0
        wire = sum(proxy.stats()["bytes"].values())
    finally:
        proxy.close()
        d.send_signal(signal.SIGTERM)
        d.wait()
    m = re.search(r"Total bytes sent: ([\d,]+)", out)
    return {"seconds": secs, "wire": wire,
            "sent": int(m.group(1).replace(",", "")) if m else -1}


def run_outage_tables(args, tmp: str) -> None:
    size = args.resync_size_mib << 20
    rtt, rate = float(args.outage_rtt), args.outage_rate
    rows, rsyncs, live = [], [], []
    comps = args.resync_compression.split(",")
    cases = [(c, "bitmap") for c in comps]
    if "checksum" in args.resync_modes.split(","):
        cases += [(c, "checksum") for c in comps]
    for data in args.change_data.split(","):
        for comp, mode in cases:
            disk = os.path.join(tmp, "outage.img")
            print(f"# outage: {data} data, compression {comp}, {mode} mode: preparing "
                  f"{size >> 20} MiB", flush=True)
            B.prepare_disk(disk, size)
            pair = DistancePair(f"outage-{data}-{comp}-{mode}", disk, tmp, protocol="C",
                                compression=comp, rtt_ms=rtt, rate=rate,
                                csums=mode == "checksum")
            try:
                pair.start(tmp)
                data_size = pair.status("alpha")["size_bytes"]
                nblocks = data_size // 4096
                offs = sorted(random.Random(42).sample(range(nblocks),
                                                       int(nblocks * args.change_pct / 100)))
                listfile = os.path.join(tmp, "change.txt")
                with open(listfile, "w") as f:
                    f.write("\n".join(str(b * 4096) for b in offs))
                pair.cli("beta", "disconnect")
                B._wait_disconnected(pair)
                rsync_dir = os.path.join(tmp, "rsync-dst")
                os.makedirs(rsync_dir, exist_ok=True)
                rsync_copy = os.path.join(rsync_dir, os.path.basename(disk))
                first = (comp, mode) == cases[0]
                if first:
                    shutil.copyfile(pair.secondary, rsync_copy)  # what the secondary has
                subprocess.run(["/usr/bin/python3", "-c", CHANGE_WRITER, pair.uri, listfile,
                                data], check=True, timeout=3600)
                dirty = pair.status("alpha")["out_of_sync_bytes"]
                os.sync()
                w0 = pair.wire_bytes()
                t0 = time.monotonic()
                pair.cli("beta", "connect")
                s = B._wait_sync_done(pair, "alpha", timeout=3600)
                secs = time.monotonic() - t0
                wire = pair.wire_bytes() - w0
                if not B._same(disk, pair.secondary, data_size):
                    raise RuntimeError("disks differ after the resync")
                rows.append((data, comp, mode, dirty, wire, s["last_sync"]["elapsed_s"],
                             secs))
                if first:
                    pair.stop()
                    for z in (False, True):
                        print(f"# rsync {'-z' if z else 'no -z'} ({data} data)", flush=True)
                        if z:  # the secondary's copy again, for the same delta
                            shutil.copyfile(pair.secondary + ".pre", rsync_copy)
                        else:
                            shutil.copyfile(rsync_copy, pair.secondary + ".pre")
                        r = _rsync(disk, rsync_dir, tmp, rtt, rate, z)
                        if not B._same(disk, rsync_copy, data_size):
                            raise RuntimeError("rsync left the copy different")
                        rsyncs.append((data, "-z" if z else "", r))
                    os.unlink(pair.secondary + ".pre")
            finally:
                pair.stop()
            live.append(secs)
    print()
    print(f"after an outage: {args.change_pct:g} % of a {args.resync_size_mib} MiB resource "
          f"changed in scattered 4 KiB blocks; link RTT {rtt:g} ms at {rate}")
    print(f"{'data':<7} {'tool':<22} {'mode':<7} {'changed':>12} {'on wire':>12} "
          f"{'ratio':>6} {'seconds':>8}")
    for data, comp, mode, dirty, wire, el, secs in rows:
        print(f"{data:<7} {'blockrep ' + comp:<22} {mode:<7} {dirty:>12} {wire:>12} "
              f"{dirty / wire if wire else 0:>5.1f}x {secs:>8.2f}")
    for data, z, r in rsyncs:
        print(f"{data:<7} {'rsync --inplace ' + z:<22} {'delta':<7} {'':>12} {r['wire']:>12} "
              f"{'':>6} {r['seconds']:>8.2f}")
    print("(checksum mode: csums-after-crash-only = false, a digest per dirty block first, "
          "data only where the digests differ; here every changed block differs)")
    print()
    print(f"data gap if the secondary is brought up to date by rsync from cron every "
          f"{args.cron_interval_s:g} s: up to interval + run time")
    for data, z, r in rsyncs:
        print(f"  rsync {z or 'no -z'} ({data}): worst {args.cron_interval_s + r['seconds']:.1f} s, "
              f"mean {args.cron_interval_s / 2 + r['seconds']:.1f} s")
    print("  blockrep: the live gap per protocol is the burst table above (protocol C: "
          "nothing acknowledged is missing while connected)")


def run_distance_bench(args) -> int:
    for tool in ("fio", "rsync", "cmp"):
        if not shutil.which(tool):
            raise SystemExit(f"tools/bench --mode distance needs {tool} (run tools/setup)")
    tmp = tempfile.mkdtemp(prefix="blockrep-distance-", dir=args.dir)
    try:
        parts = args.parts.split(",")
        if "link" in parts:
            run_link_tables(args, tmp, os.path.join(tmp, "disk.img"))
        if "outage" in parts:
            run_outage_tables(args, tmp)
        if "qd1" in parts:
            run_qd1_rounds(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def add_arguments(ap) -> None:
    g = ap.add_argument_group("--mode distance")
    g.add_argument("--parts", default="link,outage,qd1", help="link (IOPS/latency/gap "
                   "tables), outage (resync vs rsync after a change), qd1 (a protocol's "
                   "QD1 latency against standalone in interleaved rounds)")
    g.add_argument("--qd1-rounds", type=int, default=5)
    g.add_argument("--qd1-rtt", default="50", help="RTT (ms) of the qd1 rounds")
    g.add_argument("--qd1-rate", default="1G", help="bandwidth of the qd1 rounds")
    g.add_argument("--qd1-protocol", default="A")
    g.add_argument("--qd1-busy-poll", action="store_true", help="both targets with busy "
                   "polling (tools/bench's BUSY_POLL_US): the CPUs stay awake for both")
    g.add_argument("--rtts", default="0,10,50", help="round-trip times in ms")
    g.add_argument("--rates", default="1G,100M", help="link bandwidths (bits/s)")
    g.add_argument("--protocols", default="A,B,C")
    g.add_argument("--compression", default="none", help="link compression for the IOPS "
                   "table (none, lz4, zstd[:level])")
    g.add_argument("--burst-s", type=int, default=10, help="seconds of the gap burst")
    g.add_argument("--sndbuf", default="0", help="sndbuf-size of the link tables' pairs "
                   "(e.g. 8M; 0 = unbounded): what protocol A may hold unsent, so its gap")
    g.add_argument("--gap-all", action="store_true", help="gap burst at every RTT, not only "
                   "the largest")
    g.add_argument("--resync-size-mib", type=int, default=2048)
    g.add_argument("--change-pct", type=float, default=10.0)
    g.add_argument("--change-data", default="text,random", help="text (text-like, "
                   "compressible) and/or random")
    g.add_argument("--resync-compression", default="none,lz4,zstd")
    g.add_argument("--resync-modes", default="bitmap,checksum",
                   help="bitmap and/or checksum (csums-after-crash-only = false)")
    g.add_argument("--outage-rtt", default="50", help="RTT (ms) of the outage tables")
    g.add_argument("--outage-rate", default="100M", help="bandwidth of the outage tables")
    g.add_argument("--cron-interval-s", type=float, default=300.0)
