"""Batched resync (F_RUNS): scattered small dirty runs travel many to a request, read and
written in the I/O threads, acknowledged as one; an application write to a batch's span
waits for its ack; the result is the same bytes on both nodes."""

from __future__ import annotations

import dataclasses

import pytest

from blockrep.peer import proto
from blockrep.peer.requests import WRITE
from blockrep.shell import resync

from support.inprocess import Pair, pattern, run, settle, wait_until

BLK = 4096


def _scattered(n: int, stride: int = 3) -> list[int]:
    """Offsets of n 4 KiB blocks with gaps between them (one run each)."""
    return [(1 << 20) + i * stride * BLK for i in range(n)]


def test_scattered_runs_resync_in_batches_and_match(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            await p.cut()
            offs = _scattered(600)
            for i, off in enumerate(offs):  # degraded: each one a dirty run of its own
                assert await p.submit(p.alpha, WRITE, off, data=pattern(i, BLK)) == 0
            assert p.alpha.bitmap.count_bytes() == 600 * BLK
            await p.reconnect()
            await p.resynced()
            last = p.alpha.last_sync
            assert last["total_bytes"] == 600 * BLK, last
            assert last["batched_runs"] == 600, last  # every run in a batch ...
            assert last["requests"] <= 600 // resync.BATCH_RUNS + 2, last  # ... few requests
            for i, off in enumerate(offs):
                assert p.read(p.beta, off, BLK) == pattern(i, BLK), f"run {i}"
            assert p.read(p.beta, offs[0] + BLK, 2 * BLK) == bytes(2 * BLK)  # gaps untouched
            assert p.alpha.bitmap.count() == 0 and p.beta.bitmap.count() == 0
        finally:
            await p.close()
    run(main())


def test_a_peer_without_the_feature_gets_every_run_alone(tmp_path):
    """A Secondary of an older build (no FEATURE_RUNS in its HELLO) would write the run
    table as data: it is sent one request per run."""
    async def main():
        p = await Pair(tmp_path).start()
        try:
            await p.cut()
            p.beta.link_params = dataclasses.replace(
                p.beta.link_params, features=p.beta.link_params.features & ~proto.FEATURE_RUNS)
            offs = _scattered(40)
            for i, off in enumerate(offs):
                assert await p.submit(p.alpha, WRITE, off, data=pattern(i, BLK)) == 0
            await p.reconnect()
            await p.resynced()
            last = p.alpha.last_sync
            assert last["batched_runs"] == 0 and last["requests"] == 40, last
            for i, off in enumerate(offs):
                assert p.read(p.beta, off, BLK) == pattern(i, BLK), f"run {i}"
        finally:
            await p.close()
    run(main())


def test_application_write_into_a_batch_span_waits_for_its_ack(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            await p.cut()
            offs = _scattered(8)
            for i, off in enumerate(offs):
                assert await p.submit(p.alpha, WRITE, off, data=pattern(i, BLK)) == 0
            gate = p.beta.disk.hold("write", offs[0], BLK)  # the batch's first run on beta
            await p.reconnect()
            await wait_until(gate.entered.is_set, "batched resync data being written")
            assert p.alpha.resync_source.batches  # one batch in flight
            gap = offs[0] + BLK  # not dirty, but inside the batch's span
            app = p.submit(p.alpha, WRITE, gap, data=pattern(99, BLK))
            await settle()
            assert not app.done and len(p.alpha.replicator.waiting) == 1
            gate.release()
            assert await app == 0
            await p.resynced()
            for node in (p.alpha, p.beta):
                assert p.read(node, gap, BLK) == pattern(99, BLK)
                for i, off in enumerate(offs):
                    assert p.read(node, off, BLK) == pattern(i, BLK)
        finally:
            await p.close()
    run(main())


# -- the run table ------------------------------------------------------------------------------

def _payload(runs, data=None):
    buf = bytearray(proto.runs_table_size(len(runs)) + sum(n for _, n in runs))
    pos = proto.pack_runs_table(buf, runs)
    buf[pos:] = data if data is not None else bytes(len(buf) - pos)
    return bytes(buf)


def test_run_table_round_trip():
    runs = [(0, 4096), (8192, 512), (1 << 30, 4096)]
    got, base = proto.parse_runs(_payload(runs), 2 << 30)
    assert got == runs and base == 4 + 3 * 12


@pytest.mark.parametrize("payload,why", [
    (b"", "without a run table"),
    (b"\0\0\0\0", "bad run count 0"),
    ((proto.MAX_RUNS + 1).to_bytes(4, "big"), "bad run count"),
    (_payload([(0, 4096)])[:-1], "do not match the data"),
    (_payload([(0, 4096)]) + b"x", "do not match the data"),
    (_payload([(8192, 4096), (0, 4096)]), "out of order"),
    (_payload([(0, 8192), (4096, 4096)]), "out of order"),
    (_payload([(0, 0)]), "empty"),
    (_payload([(1 << 20, 4096)]), "past the end"),
])
def test_malformed_run_tables_are_protocol_errors(payload, why):
    with pytest.raises(proto.LinkProtocolError) as ei:
        proto.parse_runs(payload, 1 << 20)
    assert why in str(ei.value)


def test_checksum_mode_keeps_many_short_requests_in_flight(tmp_path):
    """Checksum mode sends every run alone: short runs are many requests, each waiting a
    round trip, so more of them than resync-window may be in flight (CSUM_WINDOW times);
    bytes in flight stay bounded by c-fill-target."""
    async def main():
        p = await Pair(tmp_path).start()
        try:
            p.alpha.cfg.csums_after_crash_only = False  # checksum mode for every resync
            await p.cut()
            offs = _scattered(300)
            for i, off in enumerate(offs):
                assert await p.submit(p.alpha, WRITE, off, data=pattern(i, BLK)) == 0
            await p.reconnect()
            await wait_until(lambda: p.alpha.resync_source is not None and
                             p.alpha.resync_source.inflight, "checksum resync running")
            src = p.alpha.resync_source
            assert src.csum
            p.link.tb.hold()  # beta's answers stay on the wire: the window fills
            window = p.alpha.cfg.resync_window
            await wait_until(lambda: len(src.inflight) >= min(300, 4 * window),
                             "more checksum requests in flight than resync-window")
            assert src.inflight_bytes <= src.fill_target()
            p.link.tb.release()
            await p.resynced()
            last = p.alpha.last_sync
            assert last["total_bytes"] == 300 * BLK and last["requests"] == 300, last
            for i, off in enumerate(offs):
                assert p.read(p.beta, off, BLK) == pattern(i, BLK), f"run {i}"
        finally:
            await p.close()
    run(main())
