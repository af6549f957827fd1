"""Resync: the sync source copies every block set in the bitmap to the sync target.

Owns: what both sides share: request sizes and batching bounds, the check of resync data
against its header, and `Progress` (bytes done, rate, ETA). The source's side (walking the
bitmap, the request window, throttling, clearing bits as blocks are confirmed) is
shell/resync_source.py; the target's (writing, flushing before acknowledging, its own record
of what remains) is shell/resync_target.py.
Application writes during a resync stay correct without range locks: the source reads a
block and queues it on the link in one loop step, and an application write to that block is
also written locally and queued in one step, so both disks see the two in the same order.
Checksum mode (`csum=True`): the source sends only a digest per block first (`csums-alg`,
blockrep.digest; both nodes agreed on it in the handshake); the target compares with its
own and asks for the data only where they differ.

Crash safety (both sides keep a persistent record of what remains, so a kill of either
resumes where it was): a bitmap-based resync starts with the bitmap exchange (both sides
end with the union); a full sync is a bitmap with every bit set. The source then names the
resync with a sync identifier (its generation's `bitmap` slot, DRBD's P_SYNC_UUID) after its
bits are on disk; the target adopts it as its `current`, persists its own bits and says
"sync-ready". After a restart of either side the rule "my bitmap equals the peer's
current" picks the same direction, and the union of both persisted bitmaps is what is
left. The target acknowledges a block only after the data disk was flushed (acks go in
batches behind one fdatasync), clears its own bits only then, and persists UpToDate and
the source's generation only after a final flush.
"""

from __future__ import annotations

import logging
from collections import deque

from ..peer import proto

CHUNK = 1 << 20  # bytes per resync request
BATCH_RUN = 64 * 1024  # runs shorter than this travel batched (F_RUNS) ...
BATCH_RUNS = 256  # ... up to this many in one request ...
BATCH_SPAN = 4 << 20  # ... within this many bytes of the disk (the range writes wait on)
APP_BUSY = 16  # application writes in flight to the peer that count as "busy"
APP_BUSY_BYTES = 32 * 1024  # application bytes per 100 ms that make c-min-rate apply
ASYNC_MIN = 256 * 1024  # requests this large are read/written in the I/O threads
# checksum mode sends every run alone, most of them a few blocks of digests: this many
# times resync-window such requests may be in flight (bytes stay bounded by c-fill-target),
# so a long round trip is not paid per short run
CSUM_WINDOW = 16
_crc = proto.native.crc32c
log = logging.getLogger("blockrep.resync")


def _check_data(payload, size: int, crc: int, offset: int) -> None:
    """Resync data as the header describes it (length, CRC32C of the plain bytes)."""
    if len(payload) != size or _crc(payload) != crc:
        raise proto.LinkProtocolError(f"CRC32C mismatch in resync data at {offset}")


class Progress:
    def __init__(self, total: int, now: float):
        self.total = total
        self.done = 0
        self.started = now
        self.sent_bytes = 0  # payload bytes actually put on the wire
        self.samples: deque[tuple[float, int]] = deque([(now, 0)])

    def add(self, n: int, now: float) -> None:
        self.done += n
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.popleft()  # O(1): thousands of acks a second land here

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


def finished(node, side: str, progress: Progress, **extra) -> None:
    """The end both sides share once the resync is done (`side`: "source" or "target"):
    the record for status, the log line and the event, the metadata, the new state to the
    peer, and fencing told that the peer is UpToDate."""
    node.last_sync = {"role": f"Sync{side.capitalize()}",
                      **progress.as_dict(node.loop.time()), **extra}
    log.info("resync finished as %s: %s", side, node.last_sync)
    node.emit("resync-finished", **node.last_sync)
    node.persist()
    node.send_state()
    node.fencer.peer_up_to_date()
