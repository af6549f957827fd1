"""Resync: the sync source copies every block set in the bitmap to the sync target.

Owns: walking the bitmap, a window of requests in flight, rate limiting and backing off
while application writes wait, clearing bits as the target confirms blocks, progress.
Application writes during a resync stay correct without range locks: the source reads a
block and queues it on the link in one loop step, and an application write to that block is
also written locally and queued in one step, so both disks see the two in the same order.
Checksum mode (`csum=True`): the source sends only CRC32C per block first; the target
compares with its own and asks for the data only where they differ.
"""

from __future__ import annotations

import asyncio
import logging

from ..bitmap import BLOCK
from ..peer import proto
from ..peer.proto import P
from .buffers import BufferPool

log = logging.getLogger("blockrep.resync")

CHUNK = 1 << 20  # bytes per resync request
APP_BUSY = 16  # application writes in flight to the peer that count as "busy"
ASYNC_MIN = 256 * 1024  # requests this large are read/written in the I/O threads
_HDR = proto.HEADER.pack
_MAGIC = proto.MAGIC
_ZEROES = memoryview(bytes(CHUNK))


class Progress:
    def __init__(self, total: int, now: float):
        self.total = total
        self.done = 0
        self.started = now
        self.sent_bytes = 0  # payload bytes actually put on the wire
        self.samples: list[tuple[float, int]] = [(now, 0)]

    def add(self, n: int, now: float) -> None:
        self.done += n
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.pop(0)

    def rate(self, now: float) -> float:
        t0, d0 = self.samples[0]
        return (self.done - d0) / (now - t0) if now > t0 else 0.0

    def as_dict(self, now: float) -> dict:
        rate = self.rate(now)
        left = max(self.total - self.done, 0)
        return {"total_bytes": self.total, "done_bytes": self.done,
                "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
                "rate_bytes_per_s": int(rate),
                "eta_s": round(left / rate, 1) if rate > 0 else None,
                "elapsed_s": round(now - self.started, 2), "sent_bytes": self.sent_bytes}


class ResyncSource:
    def __init__(self, node, link, *, csum: bool):
        self.node = node
        self.link = link
        self.csum = csum
        self.bitmap = node.bitmap
        self.disk = node.disk
        self.window = node.cfg.resync_window
        self.cur_window = self.window
        self._adjusted = 0.0
        self.inflight: dict[int, tuple[int, int]] = {}
        self.next_id = 1
        self.wake = asyncio.Event()
        self.progress = Progress(self.bitmap.count_bytes(), node.loop.time())
        self.cancelled = False
        self.pool = BufferPool()

    def cancel(self):
        self.cancelled = True
        self.wake.set()

    async def run(self) -> bool:
        """Copy until the bitmap is clean; False if the link went away first."""
        node, link = self.node, self.link
        rate = node.cfg.resync_rate
        t_start = node.loop.time()
        budget_start = t_start
        sent_for_rate = 0
        while True:
            busy = False
            for off, ln in list(self.bitmap.byte_runs(CHUNK)):
                while not self.cancelled and not link.closed and (
                        len(self.inflight) >= self._window() or link.congested):
                    self.wake.clear()
                    await self.wake.wait()
                if self.cancelled or link.closed:
                    return False
                if rate:
                    due = budget_start + sent_for_rate / rate
                    delay = due - node.loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if self.cancelled or link.closed:
                        return False
                    sent_for_rate += ln
                if node.replicator.local_busy and node.replicator.local_overlaps(off, ln):
                    busy = True  # an application write is landing there: next pass
                    continue
                self._send_one(off, ln)
            while self.inflight and not self.cancelled and not link.closed:
                self.wake.clear()
                await self.wake.wait()
            if self.cancelled or link.closed:
                return False
            if self.bitmap.count() == 0:
                return True
            # bits remain (skipped busy ranges, a failed block): go round again
            await asyncio.sleep(0.001 if busy else 0)

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
        return self.cur_window

    def overlaps(self, offset: int, length: int) -> bool:
        end = offset + length
        for off, ln in self.inflight.values():
            if off < end and offset < off + ln:
                return True
        return False

    def _send_one(self, off: int, ln: int) -> None:
        pid = self.next_id
        self.next_id += 1
        self.inflight[pid] = (off, ln)  # from now on writes to this range wait for the ack
        if ln < ASYNC_MIN:
            self._send_data(pid, off, ln, self.disk.read(off, ln))
            return
        view = self.pool.get(ln)
        self.node.run_io(lambda: self.disk.readinto(off, view),
                         lambda exc: self._read_done(pid, off, ln, view, exc))

    def _read_done(self, pid, off, ln, view, exc) -> None:
        if self.cancelled or self.link.closed:
            return
        if exc is not None:
            log.error("resync read at %d+%d failed: %s", off, ln, exc)
            self.link.abort(f"resync read failed: {exc}")
            return
        self._send_data(pid, off, ln, view)

    def _send_data(self, pid, off, ln, data) -> None:
        if self.csum:
            sums = proto.native.crc32c_blocks(data, BLOCK)
            self.link.send(_HDR(_MAGIC, P.RS_CSUM, 0, pid, off, ln, len(sums), 0), sums)
            self.progress.sent_bytes += len(sums)
        elif data == _ZEROES[:ln]:
            self.link.send(_HDR(_MAGIC, P.RS_DATA, proto.F_ZERO, pid, off, ln, 0, 0))
        else:
            self.link.send(proto.data_header(P.RS_DATA, pid, off, data), data)
            self.progress.sent_bytes += ln

    # -- answers from the target -------------------------------------------------------------
    def on_rs_ack(self, link, flags, pid, offset, size, crc, payload):
        rng = self.inflight.pop(pid, None)
        if rng is None:
            return
        self.bitmap.clear_range(*rng)
        self.node.bitmap_changed()
        self.progress.add(rng[1], self.node.loop.time())
        self.wake.set()
        if self.node.replicator.waiting:
            self.node.replicator.drain_waiting()

    def on_rs_request(self, link, flags, pid, offset, size, crc, payload):
        """Checksum mode: the target wants the data of these blocks after all."""
        rng = self.inflight.get(pid)
        if rng is None or not (rng[0] <= offset and offset + size <= rng[0] + rng[1]):
            raise proto.LinkProtocolError("resync data request outside an open request")
        data = self.disk.read(offset, size)
        self.link.send(proto.data_header(P.RS_DATA, pid, offset, data, proto.F_PART), data)
        self.progress.sent_bytes += size


class ResyncTarget:
    """Applies resync data in stream order; in checksum mode asks only for what differs."""

    def __init__(self, node, total: int, csum: bool):
        self.node = node
        self.disk = node.disk
        self.csum = csum
        self.progress = Progress(total, node.loop.time())
        self.partial: dict[int, int] = {}  # pid -> bytes still expected (checksum mode)
        self.partial_range: dict[int, tuple[int, int]] = {}  # pid -> the whole request

    def on_rs_data(self, link, flags, pid, offset, size, crc, payload):
        if offset + size > self.disk.size:
            raise proto.LinkProtocolError("resync data past the end of the disk")
        if flags & proto.F_ZERO:
            self.disk.zero(offset, size, may_trim=True)
        else:
            if len(payload) != size or proto.native.crc32c(payload) != crc:
                raise proto.LinkProtocolError(f"CRC32C mismatch in resync data at {offset}")
            if size >= ASYNC_MIN and not flags & proto.F_PART:
                # the source holds back application writes to this range until our ack,
                # so writing it in a thread cannot reorder it against one
                if link.owns(payload):  # a view of the receive ring, reused soon: copy
                    payload = bytes(payload)
                self.node.run_io(lambda: self.disk.write(offset, payload),
                                 lambda exc: self._written(link, pid, offset, size, exc))
                return
            self.disk.write(offset, payload)
        if flags & proto.F_PART:  # part of a checksum-mode request
            left = self.partial.get(pid, 0) - size
            if left > 0:
                self.partial[pid] = left
                return
            self.partial.pop(pid, None)
            offset, size = self.partial_range.pop(pid)
        self._ack(link, pid, offset, size)

    def on_rs_csum(self, link, flags, pid, offset, size, crc, payload):
        if offset + size > self.disk.size or len(payload) != 4 * (-(-size // BLOCK)):
            raise proto.LinkProtocolError("malformed resync checksum request")
        mine = proto.native.crc32c_blocks(self.disk.read(offset, size), BLOCK)
        if mine == bytes(payload):
            self._ack(link, pid, offset, size)
            return
        # ask for each differing run of blocks
        want = 0
        runs = []
        n = len(mine) // 4
        i = 0
        while i < n:
            if mine[4 * i:4 * i + 4] != payload[4 * i:4 * i + 4]:
                j = i
                while j < n and mine[4 * j:4 * j + 4] != payload[4 * j:4 * j + 4]:
                    j += 1
                o = offset + i * BLOCK
                ln = min(offset + size, offset + j * BLOCK) - o
                runs.append((o, ln))
                want += ln
                i = j
            else:
                i += 1
        self.partial[pid] = want
        self.partial_range[pid] = (offset, size)
        for o, ln in runs:
            link.send(_HDR(_MAGIC, P.RS_REQUEST, 0, pid, o, ln, 0, 0))
        self.node.resync_differing_bytes += want

    def _written(self, link, pid, offset, size, exc):
        if exc is not None:
            log.error("resync write at %d+%d failed: %s", offset, size, exc)
            link.abort(f"resync write failed: {exc}")
            return
        if not link.closed:
            self._ack(link, pid, offset, size)

    def _ack(self, link, pid, offset, size):
        link.send(_HDR(_MAGIC, P.RS_ACK, 0, pid, offset, size, 0, 0))
        self.progress.add(size, self.node.loop.time())
