"""Bitmap work that must not hold the event loop: persisting changed pages, and the
exchange of bitmaps with the peer in P_BITMAP packets.

Owns: one bitmap write in flight at a time in the I/O threads (callers waiting for "my
changes are on disk" are answered by the write that started after they asked), and the
bitmap exchange before a bitmap-based resync: this node's bitmap is compressed in a thread
and sent in chunks (blockrep.bitmap.encode_chunks), the peer's chunks are merged into
ours by OR as they arrive. Both sides end with the union: the blocks to copy.
Must not: decide anything about the resync (blockrep.shell.resync does).
"""

from __future__ import annotations

import asyncio
import logging

from ..peer import proto
from ..peer.proto import P

log = logging.getLogger("blockrep.bitmap")

_HDR = proto.frame


class BitmapWriter:
    """Persists the bitmap's changed pages off the loop, one write at a time."""

    def __init__(self, node):
        self.node = node
        self.running = False
        self.waiters: list = []  # callbacks(exc) for the write that starts next

    def flush(self, done=None) -> None:
        """Start writing what changed so far (or after the write that is running); call
        done(exc or None) once it is on disk."""
        store = self.node.store
        if store is None:
            if done is not None:
                done(None)
            return
        if done is not None:
            self.waiters.append(done)
        if self.running:
            return
        pages = store.take_bitmap_pages()
        waiters, self.waiters = self.waiters, []
        self.running = True
        self.node.run_io(lambda: store.write_bitmap_pages(pages),
                         lambda exc: self._written(exc, waiters))

    def _written(self, exc, waiters) -> None:
        self.running = False
        if exc is not None:
            log.error("bitmap write failed: %s", exc)
        for cb in waiters:
            cb(exc)
        if self.waiters:
            self.flush()

    async def flushed(self) -> None:
        """Wait until everything changed so far is on disk (OSError if the write failed)."""
        fut = self.node.loop.create_future()

        def done(exc):
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)
        self.flush(done)
        await fut


class BitmapExchange:
    """Send this node's bitmap to the peer and merge the peer's into it."""

    def __init__(self, node, link):
        self.node = node
        self.link = link
        self.received = asyncio.Event()
        self.chunks_in = 0
        self.bits_in = 0
        self.bytes_out = 0

    async def run(self) -> bool:
        """-> True once ours is sent and the peer's is merged; False if the link went."""
        node, link = self.node, self.link
        t0 = node.loop.time()
        bm = node.bitmap
        chunks = await node.loop.run_in_executor(node.executor,
                                                 lambda: list(bm.encode_chunks()))
        if link.closed:
            return False
        for w0, n, payload in chunks:
            link.send(_HDR(P.BITMAP, 0, w0, 0, n, len(payload),
                           proto.native.crc32c(payload)), payload)
            self.bytes_out += len(payload)
        link.send(_HDR(P.BITMAP, proto.F_LAST, 0, 0, 0, 0, 0))
        await self.received.wait()  # the node cancels this task when the link goes
        if link.closed:
            return False
        log.info("bitmaps exchanged in %.2fs: sent %d chunk(s), %d bytes; received %d "
                 "chunk(s) setting %d more bit(s)", node.loop.time() - t0, len(chunks),
                 self.bytes_out, self.chunks_in, self.bits_in)
        return True

    def on_chunk(self, link, flags, w0, offset, size, crc, payload) -> None:
        if self.received.is_set():
            raise proto.LinkProtocolError("bitmap chunk after the last one")
        if flags & proto.F_LAST:
            self.received.set()
            return
        if proto.native.crc32c(payload) != crc:
            raise proto.LinkProtocolError(f"CRC32C mismatch in bitmap chunk at word {w0}")
        try:
            self.bits_in += self.node.bitmap.or_chunk(w0, size, payload)
        except ValueError as exc:
            raise proto.LinkProtocolError(str(exc)) from None
        self.chunks_in += 1
