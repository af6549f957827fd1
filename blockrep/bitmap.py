"""The out-of-sync bitmap: one bit per 4 KiB block, numpy uint64 words.

Owns: which blocks may differ between the nodes. A set bit means "may differ on the peer".
Bits are set before anything that may differ can be forgotten, and cleared only when a
block is known identical on both sides (resync landed, verify found it equal).
Also owns which 4 KiB pages of the word array changed since they were last persisted
(`dirty`, so only those are written), run finding with numpy in bounded windows (so a walk
over a huge fragmented bitmap never holds the event loop for long), and the chunked,
zlib-compressed form in which bitmaps travel on the link (`P_BITMAP`).
Must not: do I/O (persistence lives in blockrep.meta).
"""

from __future__ import annotations

import zlib

import numpy as np

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
PAGE_WORDS = 512  # one 4 KiB page of the on-disk bitmap
PAGE_SHIFT = 9
RUN_WINDOW = 1 << 12  # words examined per step while finding runs (1 GiB of data)
CHUNK_WORDS = 1 << 17  # words per P_BITMAP chunk before compression (1 MiB, 32 GiB of data)

if hasattr(np, "bitwise_count"):
    def _popcount(words) -> int:
        return int(np.bitwise_count(words).sum(dtype=np.int64))
else:  # numpy < 2.0
    def _popcount(words) -> int:
        return int(np.unpackbits(words.view(np.uint8)).sum(dtype=np.int64))


class Bitmap:
    def __init__(self, size_bytes: int, words: np.ndarray | None = None):
        self.size = size_bytes
        self.nbits = (size_bytes + BLOCK - 1) >> BLOCK_SHIFT
        nwords = (self.nbits + 63) >> 6
        if words is None:
            self.words = np.zeros(nwords, dtype=np.uint64)
        else:
            if len(words) != nwords:
                raise ValueError(f"bitmap has {len(words)} words, expected {nwords}")
            self.words = words.astype(np.uint64, copy=False)
        self.generation = 0  # bumped on every change; lets writers know what to persist
        # pages of `words` changed since meta last wrote them (all: nothing written yet)
        self.dirty = np.ones((nwords + PAGE_WORDS - 1) >> PAGE_SHIFT, dtype=bool)

    # -- bits --------------------------------------------------------------------------------
    def _apply(self, s: int, e: int, value: bool) -> None:
        """Set or clear bits [s, e)."""
        if s >= e:
            return
        words = self.words
        w0, w1 = s >> 6, (e - 1) >> 6
        lo = (0xFFFFFFFFFFFFFFFF << (s & 63)) & 0xFFFFFFFFFFFFFFFF
        hi = (1 << (((e - 1) & 63) + 1)) - 1
        if w0 == w1:
            m = np.uint64(lo & hi)
            if value:
                words[w0] |= m
            else:
                words[w0] &= ~m
        else:
            if value:
                words[w0] |= np.uint64(lo)
                words[w0 + 1:w1] = _ALL
                words[w1] |= np.uint64(hi)
            else:
                words[w0] &= ~np.uint64(lo)
                words[w0 + 1:w1] = 0
                words[w1] &= ~np.uint64(hi)
        p0, p1 = w0 >> PAGE_SHIFT, w1 >> PAGE_SHIFT
        if p0 == p1:
            self.dirty[p0] = True
        else:
            self.dirty[p0:p1 + 1] = True
        self.generation += 1

    def set_range(self, offset: int, length: int) -> None:
        """Mark every block touched by [offset, offset+length)."""
        if length > 0:
            self._apply(offset >> BLOCK_SHIFT,
                        min(((offset + length - 1) >> BLOCK_SHIFT) + 1, self.nbits), True)

    def clear_range(self, offset: int, length: int) -> None:
        """Clear the blocks wholly inside [offset, offset+length) (and a last partial
        block when the range reaches the end of the device)."""
        s = (offset + BLOCK - 1) >> BLOCK_SHIFT
        end = offset + length
        e = self.nbits if end >= self.size else end >> BLOCK_SHIFT
        self._apply(s, e, False)

    def set_all(self) -> None:
        self._apply(0, self.nbits, True)

    def clear_all(self) -> None:
        self.words[:] = 0
        self.dirty[:] = True
        self.generation += 1

    def test(self, offset: int) -> bool:
        bit = offset >> BLOCK_SHIFT
        return bool((int(self.words[bit >> 6]) >> (bit & 63)) & 1)

    def count(self) -> int:
        return _popcount(self.words)

    def count_bytes(self) -> int:
        n = self.count()
        if n and self.size % BLOCK and self.test(self.size - 1):
            return n * BLOCK - (BLOCK - self.size % BLOCK)
        return n * BLOCK

    def __ior__(self, other: "Bitmap") -> "Bitmap":
        np.bitwise_or(self.words, other.words, out=self.words)
        self.dirty[:] = True
        self.generation += 1
        return self

    def take_dirty_pages(self) -> list[tuple[int, bytes]]:
        """-> [(byte offset in the bitmap area, page bytes)] of every changed page, and
        forget that they changed (the caller persists them). Consecutive pages come as one
        piece. Words are stored little-endian."""
        pages = np.flatnonzero(self.dirty)
        if len(pages) == 0:
            return []
        self.dirty[pages] = False
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        out = []
        raw = self.words.astype("<u8", copy=False)
        for group in np.split(pages, breaks):
            w0 = int(group[0]) << PAGE_SHIFT
            w1 = min((int(group[-1]) + 1) << PAGE_SHIFT, len(raw))
            out.append((w0 * 8, raw[w0:w1].tobytes()))
        return out

    # -- runs ----------------------------------------------------------------------------------
    def runs(self, start_bit: int = 0, end_bit: int | None = None,
             max_bits: int | None = None):
        """Yield (first_bit, nbits) for every run of set bits within [start_bit, end_bit),
        in order; with max_bits, runs longer than that come in pieces of max_bits. Each
        step looks at RUN_WINDOW words with numpy, so a caller that yields to the event
        loop between items never waits long for the next one."""
        end_bit = self.nbits if end_bit is None else min(end_bit, self.nbits)
        if start_bit >= end_bit:
            return
        words = self.words
        w, wend = start_bit >> 6, ((end_bit - 1) >> 6) + 1
        run_s = run_e = -1
        while w < wend:
            w1 = min(w + RUN_WINDOW, wend)
            seg = words[w:w1]
            nz = np.flatnonzero(seg)
            w0 = w
            w = w1
            if len(nz) == 0:
                continue
            bits = np.unpackbits(seg[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
            row, col = np.nonzero(bits)
            idx = ((nz[row] + w0) << 6) + col
            if idx[0] < start_bit or idx[-1] >= end_bit:
                idx = idx[(idx >= start_bit) & (idx < end_bit)]
                if len(idx) == 0:
                    continue
            gaps = np.flatnonzero(np.diff(idx) != 1)
            starts = np.concatenate((idx[:1], idx[gaps + 1])).tolist()
            ends = np.concatenate((idx[gaps] + 1, idx[-1:] + 1)).tolist()
            for s, e in zip(starts, ends):
                if run_e != s:  # not a continuation of the previous window's last run
                    if run_s >= 0:
                        yield run_s, run_e - run_s
                    run_s = s
                run_e = e
                if max_bits:
                    while run_e - run_s > max_bits:
                        yield run_s, max_bits
                        run_s += max_bits
        if run_s >= 0:
            yield run_s, run_e - run_s

    def byte_runs(self, max_len: int | None = None):
        """Yield (offset, length) byte ranges of dirty blocks, split at max_len."""
        max_bits = max_len // BLOCK if max_len and max_len % BLOCK == 0 else None
        for s, n in self.runs(max_bits=max_bits):
            off = s << BLOCK_SHIFT
            end = min((s + n) << BLOCK_SHIFT, self.size)
            while off < end:
                ln = end - off if max_len is None else min(end - off, max_len)
                yield off, ln
                off += ln

    # -- chunked, compressed form for the wire (P_BITMAP) -----------------------------------
    def encode_chunks(self, level: int = 1):
        """Yield (first word, word count, zlib-compressed little-endian words) for every
        CHUNK_WORDS-word chunk that has a bit set (clean chunks are not sent). Safe to run
        in a thread while the loop changes bits: a chunk is a snapshot of its words."""
        words = self.words
        for w0 in range(0, len(words), CHUNK_WORDS):
            seg = words[w0:w0 + CHUNK_WORDS]
            if not seg.any():
                continue
            yield w0, len(seg), zlib.compress(seg.astype("<u8", copy=False).tobytes(), level)

    def or_chunk(self, w0: int, nwords: int, payload) -> int:
        """Merge one received chunk (from encode_chunks) into this bitmap; -> how many bits
        it set. ValueError if it does not fit this bitmap or does not decompress to exactly
        nwords words."""
        if w0 < 0 or nwords <= 0 or nwords > CHUNK_WORDS or w0 + nwords > len(self.words):
            raise ValueError(f"bitmap chunk {w0}+{nwords} outside {len(self.words)} words")
        d = zlib.decompressobj()
        try:
            raw = d.decompress(payload, nwords * 8)
            if d.unconsumed_tail or d.unused_data or len(raw) != nwords * 8 or not d.eof:
                raise ValueError("bitmap chunk does not hold exactly its word count")
        except zlib.error as exc:
            raise ValueError(f"bitmap chunk does not decompress: {exc}") from None
        seg = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        if w0 + nwords == len(self.words) and self.nbits & 63:
            seg[-1] &= np.uint64((1 << (self.nbits & 63)) - 1)  # no bits past the end
        mine = self.words[w0:w0 + nwords]
        before = _popcount(mine)
        np.bitwise_or(mine, seg, out=mine)
        self.dirty[w0 >> PAGE_SHIFT:((w0 + nwords - 1) >> PAGE_SHIFT) + 1] = True
        self.generation += 1
        return _popcount(mine) - before
