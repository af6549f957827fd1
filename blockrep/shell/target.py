"""The Target boundary: where a front end's write-type requests go.

A front end (the NBD server) converts each request once into a neutral form and calls

    target.submit(kind, offset, length, data, fua, may_trim, fast_zero, cb, cookie)

`kind` is one of blockrep.peer.requests' WRITE / TRIM / ZERO / FLUSH; the flags are plain
truth values. The call returns an errno (0 = done) when the request completed inline, or
None when `cb(cookie, errno)` will be called later. `holds_data` says whether the target
keeps `data` after submit returns (then the front end must not hand it a view of a buffer
it reuses). A target that answers every WRITE inline may also offer
`write(offset, data, fua)`, raising OSError on failure (`writes_inline = True`): the front
end then calls it directly, the short path of `blockrep serve`. Two targets: `LocalTarget` (the disk itself, for `blockrep serve`) and the
replicator of a replicated resource (blockrep.shell.replication.Replicator).

Must not: know NBD (no NBD constants or flag bits here or in any target).
"""

from __future__ import annotations

import asyncio
import errno
from functools import partial

from ..peer.requests import FLUSH, TRIM, WRITE, ZERO

__all__ = ["LocalTarget", "WRITE", "TRIM", "ZERO", "FLUSH"]


class LocalTarget:
    """Writes go straight to the disk, inline (page-cache I/O: a memcpy, measured faster
    than a hand-off to a thread even at 1 MiB); FLUSH runs in the I/O threads."""

    holds_data = False
    writes_inline = True

    def __init__(self, disk, executor):
        self.disk = disk
        self.executor = executor
        # write(offset, data, fua), inline; raises OSError (a backend that cannot write:
        # EROFS for every WRITE)
        self.write = getattr(disk, "write", None) or _read_only

    def submit(self, kind, offset, length, data, fua, may_trim, fast_zero, cb, cookie):
        disk = self.disk
        try:
            if kind == WRITE:
                self.write(offset, data, fua)  # the short path's own call (EROFS without one)
            elif kind == FLUSH:
                fut = asyncio.get_running_loop().run_in_executor(self.executor, disk.flush)
                fut.add_done_callback(partial(_flushed, cb, cookie))
                return None
            elif kind == ZERO:
                disk.zero(offset, length, may_trim=may_trim, fast=fast_zero, fua=fua)
            elif kind == TRIM:
                disk.trim(offset, length, fua)
            else:
                raise ValueError(f"unknown request kind {kind}")
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0


def _read_only(offset, data, fua) -> None:
    raise OSError(errno.EROFS, "the backend cannot write")


def _flushed(cb, cookie, fut) -> None:
    exc = fut.exception()
    cb(cookie, (getattr(exc, "errno", None) or errno.EIO) if exc is not None else 0)
