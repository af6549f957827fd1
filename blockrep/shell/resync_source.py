"""The sync source's side of a resync (shell/resync.py tells the whole story).

Owns: walking the bitmap, a window of requests in flight, rate limiting and backing off
while application writes wait (c-min-rate), batched requests for short runs, clearing bits
as the target confirms blocks, and the source's life cycle from the bitmap exchange to
"sync-done".
Must not: write the peer's data or decide the direction (connect.py and state.decide do).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .. import digest
from .. import state as st
from ..peer import proto
from ..peer.proto import P
from ..peer.requests import RangeSet
from ..state import DiskState, ReplState
from .bitmap_io import BitmapExchange
from .buffers import BufferPool
from .resync import (APP_BUSY, APP_BUSY_BYTES, ASYNC_MIN, BATCH_RUN, BATCH_RUNS, BATCH_SPAN,
                     CHUNK, CSUM_WINDOW, Progress, finished)

log = logging.getLogger("blockrep.resync")

_HDR = proto.frame
_crc = proto.native.crc32c


class ResyncSource:
    def __init__(self, node, link, *, csum: bool):
        self.node = node
        self.link = link
        self.csum = csum
        self.bitmap = node.bitmap
        self.disk = node.disk
        self.cur_window = node.cfg.resync_window
        self.inflight_bytes = 0
        self._sent: deque[tuple[float, int]] = deque()  # (time, bytes) of the last second
        self._sent_sum = 0
        self._app_mark = (node.loop.time(), node.replicator.bytes_replicated)
        # busy until the first 100 ms sample says otherwise: a resync must not start with an
        # unthrottled burst (at full speed 100 ms is tens of MiB) beneath a writing application
        self._app_busy_now = True
        self.throttled = 0  # times c-min-rate held the resync back
        self._adjusted = 0.0
        self.inflight = RangeSet()  # pid -> (offset, length) sent, not yet acknowledged
        self.batches: dict[int, list[tuple[int, int]]] = {}  # pid -> its runs (F_RUNS)
        self.batched_runs = 0  # runs that travelled in F_RUNS requests
        self.next_id = 1  # of the next request; next_id - 1 were sent
        self.wake = asyncio.Event()
        self.progress = Progress(self.bitmap.count_bytes(), node.loop.time())
        self.cancelled = False
        self.pool = BufferPool()
        self.ready = node.loop.create_future()  # the target persisted its record

    def cancel(self):
        self.cancelled = True
        self.wake.set()

    async def run(self) -> bool:
        """Copy until the bitmap is clean; False if the link went away first."""
        node, link = self.node, self.link
        rate = self.cap()
        budget_start = node.loop.time()
        sent_for_rate = 0
        while True:
            busy = False
            per = CSUM_WINDOW if self.csum else 1  # requests per window slot
            for runs, ln in self._requests():  # found window by window
                while not self.cancelled and not link.closed and (
                        len(self.inflight) >= self._window() * per or link.congested
                        or self.inflight_bytes >= self.fill_target()):
                    self.wake.clear()
                    await self.wake.wait()
                if not await self._throttle():
                    return False
                if rate != self.cap():  # retuned by `adjust`: a new budget from now
                    rate, budget_start, sent_for_rate = self.cap(), node.loop.time(), 0
                if rate:
                    due = budget_start + sent_for_rate / rate
                    delay = due - node.loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if self.cancelled or link.closed:
                        return False
                    sent_for_rate += ln
                landing = node.replicator.landing
                todo = [r for r in runs if not landing(*r)]
                if len(todo) < len(runs):
                    busy = True  # an application write is landing there: next pass
                if len(todo) == 1:
                    self._send_one(*todo[0])
                elif todo:
                    self._send_runs(todo)
            while self.inflight and not self.cancelled and not link.closed:
                self.wake.clear()
                await self.wake.wait()
            if self.cancelled or link.closed:
                return False
            if self.bitmap.count() == 0:
                return True
            # bits remain (skipped busy ranges, a failed block): go round again
            await asyncio.sleep(0.001 if busy else 0)

    # -- rate control (DRBD's c-min-rate, c-max-rate, c-fill-target; read from the
    # configuration each time, so `blockrep adjust` retunes a running resync) -------------
    @property
    def window(self) -> int:
        return self.node.cfg.resync_window

    def cap(self) -> int:
        """The resync ceiling in bytes/s (resync-rate, c-max-rate: the lower set one)."""
        cfg = self.node.cfg
        return min([r for r in (cfg.resync_rate, cfg.c_max_rate) if r], default=0)

    def fill_target(self) -> int:
        return self.node.cfg.c_fill_target or self.window * CHUNK

    def _app_busy(self, now: float) -> bool:
        """Did the application write more than APP_BUSY_BYTES in the last ~100 ms?"""
        if now - self._app_mark[0] >= 0.1:
            written = self.node.replicator.bytes_replicated
            self._app_busy_now = written - self._app_mark[1] > APP_BUSY_BYTES
            self._app_mark = (now, written)
        return self._app_busy_now

    def recent_rate(self, now: float) -> float:
        """Resync bytes sent in the last second."""
        sent = self._sent
        while sent and now - sent[0][0] > 1.0:
            self._sent_sum -= sent.popleft()[1]
        return float(self._sent_sum)

    async def _throttle(self) -> bool:
        """c-min-rate: while the application writes, resync goes no faster than the floor
        (it never goes slower: below the floor it is not held back). False when the resync
        was cancelled or the link closed meanwhile."""
        floor = self.node.cfg.c_min_rate
        held = False
        while not self.cancelled and not self.link.closed:
            now = self.node.loop.time()
            if not floor or not self._app_busy(now) or self.recent_rate(now) < floor:
                return True
            if not held:
                held = True
                self.throttled += 1
            await asyncio.sleep(0.005)
        return False

    def control_status(self) -> dict:
        cfg, now = self.node.cfg, self.node.loop.time()
        return {"c_min_rate": cfg.c_min_rate, "c_max_rate": cfg.c_max_rate,
                "resync_rate": cfg.resync_rate, "c_fill_target": self.fill_target(),
                "inflight_bytes": self.inflight_bytes, "app_busy": self._app_busy(now),
                "throttled": self.throttled, "recent_rate_bytes_per_s": int(
                    self.recent_rate(now))}

    def _window(self) -> int:
        """AIMD: while application writes wait for the peer, halve the resync window (at
        most every 20 ms); while they do not, grow it by one up to resync-window. The
        application keeps its share of the link and of the peer's disk."""
        now = self.node.loop.time()
        if now - self._adjusted >= 0.02:
            self._adjusted = now
            r = self.node.replicator
            if len(r.pending) + len(r.waiting) > APP_BUSY:
                self.cur_window = max(1, self.cur_window // 2)
            elif self.cur_window < self.window:
                self.cur_window += 1
            self.cur_window = min(self.cur_window, self.window)  # adjust may lower it
        return self.cur_window

    def _requests(self):
        """The bitmap's runs as requests -> (runs, bytes): a run of BATCH_RUN or more alone
        (at most CHUNK), shorter ones gathered (up to BATCH_RUNS runs, CHUNK bytes of data,
        BATCH_SPAN of the disk); checksum mode, and a peer that did not advertise
        FEATURE_RUNS, get every run alone."""
        runs: list[tuple[int, int]] = []
        size = start = 0
        alone = self.csum or not self.link.batch_resync
        for off, ln in self.bitmap.byte_runs(CHUNK):
            if ln >= BATCH_RUN or alone:
                if runs:
                    yield runs, size
                    runs = []
                yield [(off, ln)], ln
                continue
            if runs and (len(runs) >= BATCH_RUNS or size + ln > CHUNK
                         or off + ln - start > BATCH_SPAN):
                yield runs, size
                runs = []
            if not runs:
                start, size = off, 0
            runs.append((off, ln))
            size += ln
        if runs:
            yield runs, size

    def _send_runs(self, runs: list[tuple[int, int]]) -> None:
        """Small runs in one F_RUNS packet: read in an I/O thread, acknowledged as one.
        Application writes to the batch's span (first run to last) wait for the ack, as
        for a single request's range (DRBD's resync extents: a coarser lock, one entry)."""
        first, (last, last_ln) = runs[0][0], runs[-1]
        size = sum(n for _, n in runs)
        pid = self._register(first, last + last_ln - first, size)
        self.batches[pid] = runs
        self.batched_runs += len(runs)
        view = self.pool.get(proto.runs_table_size(len(runs)) + size)
        disk = self.disk

        def read():
            pos = proto.pack_runs_table(view, runs)
            for off, ln in runs:
                disk.readinto(off, view[pos:pos + ln])
                pos += ln

        self.node.run_io(read, lambda exc: self._read_done(pid, first, size, view, exc, True))

    def _register(self, off: int, span: int, size: int) -> int:
        """A new request for `size` bytes within [off, off+span): its id. From now on
        application writes to that range wait for its ack."""
        pid = self.next_id
        self.next_id += 1
        self.inflight[pid] = (off, span)
        self.inflight_bytes += size
        self._sent.append((self.node.loop.time(), size))
        self._sent_sum += size
        return pid

    def _send_one(self, off: int, ln: int) -> None:
        pid = self._register(off, ln, ln)
        if ln < ASYNC_MIN:
            self._send_data(pid, off, ln, self.disk.read(off, ln))
            return
        view = self.pool.get(ln)
        self.node.run_io(lambda: self.disk.readinto(off, view),
                         lambda exc: self._read_done(pid, off, ln, view, exc))

    def _read_done(self, pid, off, ln, view, exc, batched: bool = False) -> None:
        """A read in an I/O thread is done: send its data (ln bytes; for a batch, of its
        runs from `off`, after the run table in `view`)."""
        if self.cancelled or self.link.closed:
            return
        if exc is not None:
            log.error("resync read at %d+%d%s failed: %s", off, ln,
                      " (batched runs)" if batched else "", exc)
            self.link.abort(f"resync read failed: {exc}")
            return
        if batched:
            self.link.send_data(P.RS_DATA, proto.F_RUNS, pid, off, view)
            self.progress.sent_bytes += ln
        else:
            self._send_data(pid, off, ln, view)

    def _send_data(self, pid, off, ln, data) -> None:
        if self.csum:
            sums = digest.block_digests(self.node.link_params.csums_alg, data)
            self.link.send(_HDR(P.RS_CSUM, 0, pid, off, ln, len(sums), _crc(sums)), sums)
            self.progress.sent_bytes += len(sums)
        elif not self.link.send_coded(P.RS_DATA, pid, off, data):  # zeroes: a marker
            self.progress.sent_bytes += ln

    # -- answers from the target -------------------------------------------------------------
    def on_rs_ack(self, link, flags, pid, offset, size, crc, payload):
        rng = self.inflight.pop(pid, None)
        if rng is None:
            return
        done = 0
        for off, ln in self.batches.pop(pid, None) or (rng,):
            self.bitmap.clear_range(off, ln)
            done += ln
        self.inflight_bytes -= done
        self.node.bitmap_changed()
        self.progress.add(done, self.node.loop.time())
        self.wake.set()
        if self.node.replicator.waiting:
            self.node.replicator.drain_waiting()

    def on_rs_request(self, link, flags, pid, offset, size, crc, payload):
        """Checksum mode: the target wants the data of these blocks after all."""
        rng = self.inflight.get(pid)
        if rng is None or not (rng[0] <= offset and offset + size <= rng[0] + rng[1]):
            raise proto.LinkProtocolError("resync data request outside an open request")
        data = self.disk.read(offset, size)
        self.link.send_data(P.RS_DATA, proto.F_PART, pid, offset, data)
        self.progress.sent_bytes += size


# -- the resync's life on each side ------------------------------------------------------------

def start_source(node, link, *, full: bool, csum: bool, peer_gen) -> None:
    node.set_replication(ReplState.SYNC_SOURCE)
    node.peer_disk = DiskState.INCONSISTENT
    ex = None
    if full:
        node.bitmap.set_all()
    else:  # before any packet after P_STATE is handled: the peer's chunks may follow it
        ex = node.bitmap_exchange = BitmapExchange(node, link)
    node.resync_task = node.loop.create_task(_run_source(node, link, ex, csum, peer_gen))


async def _run_source(node, link, ex, csum: bool, peer_gen) -> None:
    try:
        if ex is not None:
            if not await ex.run():
                return
            node.bitmap_exchange = None
        gen = node.gen
        if not gen.bitmap or gen.bitmap != peer_gen.current:
            # name this resync: the target adopts the identifier as its current, so after
            # a restart of either side the same direction is chosen and the bits resume
            if gen.bitmap:
                gen.history = [gen.bitmap] + [h for h in gen.history if h != gen.bitmap]
                del gen.history[st.HISTORY_LEN:]
            gen.bitmap = st.new_uuid()
        await node.bitmap_writer.flushed()  # the bits it names are on disk first
        if link.closed:
            return
        node.persist()
        src = node.resync_source = ResyncSource(node, link, csum=csum)
        link.send_control(P.CONTROL, {"op": "sync-start", "total": src.progress.total,
                                      "csum": csum, "uuid": gen.bitmap})
        log.info("resync started as source: %d bytes to copy%s", src.progress.total,
                 " (checksum mode)" if csum else "")
        node.emit("resync-started", total_bytes=src.progress.total, csum=csum)
        await src.ready
        ok = await src.run()
    except asyncio.CancelledError:
        return
    except Exception:
        log.exception("resync failed")
        link.abort("resync failed")
        return
    if not ok or link.closed or node.resync_source is not src:
        return
    node.resync_source = None
    node.replicator.drain_waiting()
    node.gen.sync_finished_as_source()
    node.set_replication(ReplState.ESTABLISHED)
    node.peer_disk = DiskState.UP_TO_DATE
    if node.disk_state == DiskState.OUTDATED:
        # restarted as a Secondary (Outdated until a peer confirms), then connected and
        # copied our data to the peer: both now hold the same, newest data
        node.set_disk(DiskState.UP_TO_DATE)
    link.send_control(P.CONTROL, {"op": "sync-done", "gen": node.gen.to_wire()})
    finished(node, "source", src.progress, requests=src.next_id - 1,
             batched_runs=src.batched_runs)
