"""The out-of-sync bitmap: one bit per 4 KiB block, numpy uint64 words.

Owns: which blocks may differ between the nodes. A set bit means "may differ on the peer".
Bits are set before anything that may differ can be forgotten, and cleared only when a
block is known identical on both sides (resync landed, verify found it equal).
Must not: do I/O (persistence lives in blockrep.meta).
"""

from __future__ import annotations

import numpy as np

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)

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
        self.generation += 1
        return self

    # -- runs --------------------------------------------------------------------------------
    def runs(self, start_bit: int = 0, end_bit: int | None = None):
        """Yield (first_bit, nbits) for every run of set bits within [start_bit, end_bit)."""
        end_bit = self.nbits if end_bit is None else min(end_bit, self.nbits)
        if start_bit >= end_bit:
            return
        w0, w1 = start_bit >> 6, ((end_bit - 1) >> 6) + 1
        nz = np.flatnonzero(self.words[w0:w1]) + w0
        if len(nz) == 0:
            return
        # group consecutive non-zero words, unpack each group once
        breaks = np.flatnonzero(np.diff(nz) != 1) + 1
        run_start = None
        run_end = None
        for group in np.split(nz, breaks):
            g0 = int(group[0])
            bits = np.unpackbits(self.words[g0:int(group[-1]) + 1].view(np.uint8),
                                 bitorder="little")
            idx = np.flatnonzero(bits) + (g0 << 6)
            idx = idx[(idx >= start_bit) & (idx < end_bit)]
            if len(idx) == 0:
                continue
            gaps = np.flatnonzero(np.diff(idx) != 1)
            starts = np.concatenate(([idx[0]], idx[gaps + 1]))
            ends = np.concatenate((idx[gaps] + 1, [idx[-1] + 1]))
            for s, e in zip(starts.tolist(), ends.tolist()):
                if run_end == s:  # continues the previous group's run
                    run_end = e
                    continue
                if run_start is not None:
                    yield run_start, run_end - run_start
                run_start, run_end = s, e
        if run_start is not None:
            yield run_start, run_end - run_start

    def byte_runs(self, max_len: int | None = None):
        """Yield (offset, length) byte ranges of dirty blocks, split at max_len."""
        for s, n in self.runs():
            off = s << BLOCK_SHIFT
            end = min((s + n) << BLOCK_SHIFT, self.size)
            while off < end:
                ln = end - off if max_len is None else min(end - off, max_len)
                yield off, ln
                off += ln

    # -- compact form for the wire -----------------------------------------------------------
    def to_rle(self) -> list[int]:
        """Flat [start, count, start, count, ...] of set runs (msgpack-friendly)."""
        out: list[int] = []
        for s, n in self.runs():
            out += (s, n)
        return out

    @classmethod
    def from_rle(cls, size_bytes: int, rle: list[int]) -> "Bitmap":
        """ValueError for anything but a flat list of (start, count) integer pairs
        inside the bitmap (the list comes from the peer)."""
        bm = cls(size_bytes)
        if not isinstance(rle, (list, tuple)):
            raise ValueError(f"bitmap run list is a {type(rle).__name__}, not a list")
        if len(rle) % 2:
            raise ValueError("bitmap run list has an odd length")
        for i in range(0, len(rle), 2):
            s, n = rle[i], rle[i + 1]
            if type(s) is not int or type(n) is not int:
                raise ValueError(f"bitmap run {s!r:.20}+{n!r:.20} is not a pair of integers")
            if s < 0 or n <= 0 or s + n > bm.nbits:
                raise ValueError(f"bitmap run {s}+{n} outside {bm.nbits} bits")
            bm._apply(s, s + n, True)
        return bm
