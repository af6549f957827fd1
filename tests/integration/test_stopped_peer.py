"""A Primary whose peer stops answering (SIGSTOP: a hung host, not a closed connection) while
fio writes to it at QD32. Protocol C holds the writes until the peer is declared lost
(`timeout`); then the Primary goes on alone (writes complete locally and set bitmap bits),
and its RSS stays under the documented bound the whole time (docs/nbd.md, "Bounds"), while
a second client's 4 KiB write-and-read probes keep being served. When the peer resumes it
resyncs what it missed and the disks are identical.

BLOCKREP_STOPPED_PEER_SECONDS: how long fio writes with the peer stopped (default 15)."""

from __future__ import annotations

import os
import signal
import threading
import time

from support.helpers import require_tool
from support.nbd_testlib import MiB, RawClient
from support.repltools import cmp_data, fio, fio_bytes_written

DURATION = float(os.environ.get("BLOCKREP_STOPPED_PEER_SECONDS", "15"))
RSS_BOUND = 128 * MiB  # docs/nbd.md: growth of the Primary's RSS in this test
FIO_REGION = 96 * MiB
PROBE_AT = 112 * MiB  # the probing client's blocks, outside fio's region


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Prober(threading.Thread):
    """A legitimate client: writes a 4 KiB block, reads it back, every 0.2 s."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.client = RawClient(port, timeout=60)
        self.client.handshake()
        self.stop = threading.Event()
        self.done: list[tuple[float, float]] = []  # (finished at, seconds taken)
        self.errors: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            off = PROBE_AT + (i % 256) * 4096
            data = (i.to_bytes(8, "little") * 512)
            t0 = time.monotonic()
            try:
                err = self.client.write(off, data)
                rerr, back = self.client.read(off, 4096)
            except OSError as exc:
                self.errors.append(f"probe {i}: {exc}")
                return
            if err or rerr or back != data:
                self.errors.append(f"probe {i}: write {err}, read {rerr}, "
                                   f"data {'ok' if back == data else 'differs'}")
            t1 = time.monotonic()
            self.done.append((t1, t1 - t0))
            i += 1
            self.stop.wait(0.2)


def test_primary_rss_bounded_with_the_peer_stopped_under_qd32_writes(cluster, tmp_path):
    require_tool("fio", "cmp")
    c = cluster(size="128M")
    c.up_pair("alpha")
    pid = c.procs["alpha"].pid
    prober = Prober(c.nbd_port("alpha"))
    prober.start()
    time.sleep(0.5)
    start = peak = rss(pid)
    lost_at = None
    samples = 0
    t0 = time.monotonic()
    c.procs["beta"].send_signal(signal.SIGSTOP)
    try:
        with fio(tmp_path, c.uri("alpha"), "stopped-peer", "--rw=randwrite", "--bs=1M",
                 "--iodepth=32", f"--size={FIO_REGION}", "--time_based",
                 f"--runtime={DURATION:g}", "--rate=100m", background=True) as job:
            while job.proc.poll() is None and time.monotonic() - t0 < DURATION + 60:
                peak = max(peak, rss(pid))
                samples += 1
                if lost_at is None and samples % 5 == 0:
                    s = c.admin("alpha")
                    assert s["role"] == "Primary", s
                    if s["replication"] == "Off":
                        lost_at = time.monotonic() - t0
                time.sleep(0.1)
            job.wait(60)
            report = job.report()
        end = rss(pid)
        s = c.admin("alpha")
    finally:
        c.procs["beta"].send_signal(signal.SIGCONT)
        prober.stop.set()
        prober.join(60)
        prober.client.close()
    written = fio_bytes_written(report)
    probes_degraded = [d for t, d in prober.done if lost_at is not None and t - t0 > lost_at]
    print(f"\npeer SIGSTOPped, fio randwrite 1 MiB QD32 (rate 100 MiB/s) for {DURATION:g} s: "
          f"{written / MiB:.0f} MiB written; peer declared lost after {lost_at or 0:.1f} s; Primary RSS "
          f"start {start / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB "
          f"(+{(peak - start) / MiB:.1f} MiB, bound +{RSS_BOUND / MiB:.0f} MiB), end "
          f"{end / MiB:.1f} MiB; probe client: {len(prober.done)} write+read probes, "
          f"{len(probes_degraded)} after the peer was lost, slowest "
          f"{max(d for _, d in prober.done):.2f} s")
    assert peak - start < RSS_BOUND, (start, peak)
    assert not prober.errors, prober.errors
    assert lost_at is not None, "the primary never declared its stopped peer lost"
    assert s["role"] == "Primary" and s["replication"] == "Off", s
    assert s["counters"]["writes_local_only"] > 0, s["counters"]
    assert probes_degraded, "the probing client was not served after the peer was lost"
    assert written > 0
    # the peer resumes: it reconnects, resyncs what it missed, the disks are identical
    for n in c.NODES:
        c.wait_status(n, lambda s: s["connection"] == "Connected" and
                      s["replication"] == "Established" and s["out_of_sync_bytes"] == 0 and
                      s["peer"]["disk"] == "UpToDate", 120, "resynced after SIGCONT")
    cmp_data(c, c.status("alpha")["size_bytes"])
