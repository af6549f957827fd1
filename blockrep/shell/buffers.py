"""Reusable buffers shared by the NBD and peer-link shells."""

from __future__ import annotations

import sys


class BufferPool(list):
    """Reusable read buffers. A buffer handed to the transport is in use while any view of
    it is alive (uvloop may keep the view, or a slice of it, queued until sent); every view
    holds a reference to the bytearray, so a refcount check tells when it is free again.
    The pool is the list of its buffers (`len(pool)` is asked on every receive: C speed)."""

    __slots__ = ()

    def trim(self, keep_bytes: int) -> int:
        """Give back free buffers beyond `keep_bytes` of free ones (buffers in use stay);
        returns the bytes released."""
        getrefcount = sys.getrefcount
        kept = released = 0
        entries = []
        for ba in self:
            # references: the pool, the loop variable, getrefcount's argument
            if getrefcount(ba) == 3:
                if kept + len(ba) > keep_bytes:
                    released += len(ba)
                    continue
                kept += len(ba)
            entries.append(ba)
        self[:] = entries
        return released

    def get(self, n: int) -> memoryview:
        getrefcount = sys.getrefcount
        for ba in self:
            # references: the pool, the loop variable, getrefcount's argument
            if len(ba) >= n and getrefcount(ba) == 3:
                return memoryview(ba)[:n]
        ba = bytearray(max(n, 1 << 20))
        self.append(ba)
        return memoryview(ba)[:n]
