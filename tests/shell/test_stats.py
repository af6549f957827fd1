"""The observer's numbers on two in-process nodes: latency histograms (sampled, folded in
batches), the Prometheus families a scrape renders (parsed with prometheus_client's own
parser) and `drbdsetup status --json`'s shape, during an online verify and a resync held
half-way."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockrep.peer.requests import WRITE
from blockrep.shell import admin, latency
from blockrep.shell.latency import BOUNDS, LatencyHistogram
from blockrep.shell.metrics import MetricsServer
from blockrep.shell.stats import drbdsetup_status

from support.inprocess import Pair, pattern, run, settle, wait_until

MiB = 1 << 20


def test_histogram_buckets_are_inclusive_and_cumulative():
    h = LatencyHistogram()
    for v in (BOUNDS[0], BOUNDS[0] * 1.01, BOUNDS[2], 100.0):
        h.observe(v)
    buckets, count, total = h.snapshot()
    assert count == 4 and total == pytest.approx(BOUNDS[0] * 2.01 + BOUNDS[2] + 100.0)
    assert buckets[0] == (BOUNDS[0], 1)  # le is inclusive
    assert buckets[1] == (BOUNDS[1], 2) and buckets[2] == (BOUNDS[2], 3)
    assert buckets[-2] == (BOUNDS[-1], 3) and buckets[-1] == (float("inf"), 4)
    assert [c for _, c in buckets] == sorted(c for _, c in buckets)


def test_histogram_folds_raw_samples_in_batches():
    h = LatencyHistogram()
    for _ in range(latency.BATCH - 1):
        h.observe(1e-3)
    assert len(h._raw) == latency.BATCH - 1  # nothing folded per observation
    h.observe(1e-3)
    assert h._raw == []  # one batch folded, memory stays bounded without scrapes
    assert h.snapshot()[1] == latency.BATCH


def scrape(node) -> dict:
    """Every sample of a render: (name, frozenset of labels) -> value."""
    body, ctype = MetricsServer(node, ("127.0.0.1", 0)).render()
    assert ctype.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    hits = [v for (n, ls), v in samples.items() if n == name and
            set(labels.items()) <= ls]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def test_verify_half_way_in_metrics_and_drbdsetup_json(tmp_path):
    async def main():
        p = await Pair(tmp_path, size=32 * MiB).start()
        try:
            tb = p.link.tb  # what beta sends: its verify replies
            tb.hold()
            assert admin.cmd_verify(p.alpha) == "verify started"
            await settle(50)
            tb.release()  # the first window of replies arrives, the next ones are held
            tb.hold()
            v = p.alpha.verifier.current
            await wait_until(lambda: v.progress.done > 0, "first replies counted")
            await settle(50)
            assert 0 < v.progress.done < p.alpha.size
            pd = drbdsetup_status(p.alpha)[0]["connections"][0]["peer_devices"][0]
            assert pd["replication-state"] == "VerifyS"
            assert pd["has-sync-details"] and pd["has-online-verify-details"]
            assert pd["rs-total"] == p.alpha.size // 512
            assert pd["ov-left"] == (p.alpha.size - v.progress.done) // 512
            assert pd["ov-position"] == v.progress.done // 512
            assert 0 < pd["percent-resync-done"] < 100
            assert "rs-failed" not in pd  # verify shows ov-*, a resync rs-failed
            m = scrape(p.alpha)
            assert sample(m, "blockrep_peerdevice_replicationstate",
                          blockrep_peerdevice_replicationstate="VerifyS") == 1
            ratio = sample(m, "blockrep_peerdevice_verify_done_ratio")
            assert ratio == pytest.approx(v.progress.done / p.alpha.size)
            assert sample(m, "blockrep_peerdevice_verify_total_bytes") == p.alpha.size
            assert sample(m, "blockrep_peerdevice_resync_done_ratio") is None
            tb.release()
            await wait_until(lambda: p.alpha.verifier.current is None, "verify done")
            m = scrape(p.alpha)
            assert sample(m, "blockrep_peerdevice_verify_done_ratio") is None
            assert sample(m, "blockrep_peerdevice_verify_found_bytes") == 0
        finally:
            await p.close()
    run(main())


def test_resync_half_way_in_metrics_and_drbdsetup_json(tmp_path):
    async def main():
        p = await Pair(tmp_path, size=32 * MiB).start()
        try:
            p.cfg.resync_window = 1  # one 1 MiB request at a time: easy to stop half-way
            await p.cut()
            for i in range(8):  # written while disconnected: 8 MiB out of sync
                assert await p.submit(p.alpha, WRITE, i * 2 * MiB,
                                      data=pattern(i, MiB)) == 0
            m = scrape(p.alpha)
            assert sample(m, "blockrep_peerdevice_outofsync_bytes") == 8 * MiB
            assert sample(m, "blockrep_connection_state",
                          blockrep_connection_state="Connecting") == 1
            # beta's write of the third extent waits in its I/O thread: with one request
            # in flight the resync stops there, two of eight extents done
            gate = p.beta.disk.hold("write", 4 * MiB, MiB)
            await p.reconnect()
            await wait_until(gate.entered.is_set, "third resync write held")
            src = p.alpha.resync_source
            await wait_until(lambda: src.progress.done == 2 * MiB, "two extents acked")
            s = drbdsetup_status(p.alpha)[0]
            pd = s["connections"][0]["peer_devices"][0]
            assert pd["replication-state"] == "SyncSource"
            assert pd["has-sync-details"] and not pd["has-online-verify-details"]
            assert pd["rs-total"] == 8 * MiB // 512 and pd["rs-failed"] == 0
            assert pd["out-of-sync"] == p.alpha.bitmap.count_bytes() // 1024
            assert 0 < pd["percent-resync-done"] < 100
            assert s["connections"][0]["rs-in-flight"] > 0
            assert pd["pending"] == 1  # the held request
            m = scrape(p.alpha)
            assert sample(m, "blockrep_peerdevice_resync_done_bytes") == src.progress.done
            assert sample(m, "blockrep_peerdevice_resync_total_bytes") == 8 * MiB
            assert sample(m, "blockrep_connection_rsinflight_bytes") > 0
            gate.release()
            await wait_until(lambda: p.alpha.resync_source is None and
                             p.beta.resync_target is None, "resync done")
            m = scrape(p.alpha)
            assert sample(m, "blockrep_peerdevice_outofsync_bytes") == 0
            assert sample(m, "blockrep_peerdevice_resync_done_ratio") is None
            assert drbdsetup_status(p.beta)[0]["devices"][0]["disk-state"] == "UpToDate"
        finally:
            await p.close()
    run(main())
