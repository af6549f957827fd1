"""The read side of an NBD connection: READ (simple and structured replies, data and hole
chunks for sparse ranges, a Diskless Primary's reads through its peer), CACHE and
BLOCK_STATUS. nbd_server.NbdConnection mixes it in; it shares that connection's state (the
reply list, the buffer pool, the backend).

Owns: building read replies so that a failed read never leaves part of a reply on the wire
(the data is read before any chunk header is queued), the timed reads (latency.py), and the
switch of READ between the local disk and the peer (`_route_reads`).
Must not: parse requests or validate them (nbd_server.py and blockrep.nbd do).
"""

from __future__ import annotations

import os
from time import perf_counter as _now

from ..nbd import proto
from ..nbd.constants import (
    BASE_ALLOCATION_ID,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    CmdFlag,
    NbdCmd,
    ReplyType,
    StateFlag,
)
from ..nbd.transmission import nbd_errno

MAX_BLOCK_STATUS_EXTENTS = 2048
SPARSE_READ_MIN = 64 * 1024  # reads this large are split into data/hole chunks

_pack_simple = proto.pack_simple_reply
_pack_chunk = proto.pack_structured_header
_U64 = proto.U64.pack
_DF = int(CmdFlag.DF)  # plain ints on the hot path: IntFlag operations are slow
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DONE = int(REPLY_FLAG_DONE)
_DATA = int(ReplyType.OFFSET_DATA)
_HOLE = int(ReplyType.OFFSET_HOLE)


class NbdReads:
    """READ, CACHE and BLOCK_STATUS of one connection (a mixin of NbdConnection)."""

    def _cmd_read_remote(self, flags, cookie, offset, length):
        """READ on a Diskless Primary: the peer reads (see NbdServer.set_remote_read)."""
        self._stats.read_bytes -= length  # not from the local disk (_process counts it)
        self._read_remote(cookie, offset, length)

    def _route_reads(self) -> None:
        """READ to the local disk, or to the peer while the server has a remote_read."""
        if self.server.remote_read is None:
            self._dispatch[NbdCmd.READ] = self._cmd_read
            self._dispatch_timed[NbdCmd.READ] = self._cmd_read_timed
        else:
            self._dispatch[NbdCmd.READ] = self._dispatch_timed[NbdCmd.READ] = \
                self._cmd_read_remote

    def _cmd_read_timed(self, flags, cookie, offset, length):
        t0 = _now()
        try:
            self._cmd_read(flags, cookie, offset, length)
        finally:
            self._stats.read_latency.observe(_now() - t0)

    def _cmd_read(self, flags, cookie, offset, length):
        backend = self.backend
        out = self._out
        if not self.structured:
            data = self._read_data(offset, length)
            out.append(_pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie))
            out.append(data)
            return
        if length >= SPARSE_READ_MIN or not backend.starts_with_data(offset):
            extents = backend.extents(offset, length)
            if len(extents) != 1 or not extents[0][2]:
                if flags & _DF or len(extents) == 1:
                    extents = None  # one data chunk
            else:  # one hole
                out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, _DONE, _HOLE, cookie, 12))
                out.append(proto.encode_offset_hole_payload(offset, length))
                return
            if extents is not None:
                self._read_sparse(cookie, offset, length, extents)
                return
        data = self._read_data(offset, length)  # a failure raises before any chunk is out
        out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, _DONE, _DATA, cookie, length + 8))
        out.append(_U64(offset))
        out.append(data)

    def _read_elsewhere(self, cookie, offset, length, exc) -> bool:
        """A local read failed: has the disk been detached (on-io-error), so that the read
        goes to the peer? (nothing of this reply is out yet)"""
        hook = self.server.read_error
        if hook is None or not hook(offset, length, exc) or self.server.remote_read is None:
            return False
        self._read_remote(cookie, offset, length)
        return True

    def _read_remote(self, cookie, offset, length):
        self._inflight += 1
        self.server.remote_read(offset, length, self._read_done, (cookie, offset))
        if self._inflight >= self._max_reqs:
            self._hold()

    def _read_done(self, key, err, data):
        """The peer's answer to a read (a Diskless Primary): one data chunk or an error."""
        self._inflight -= 1
        cookie, offset = key
        if err:
            self._reply_err(cookie, nbd_errno(err), NbdCmd.READ, os.strerror(err))
        elif self.structured:
            self._out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, _DONE, _DATA, cookie,
                                         len(data) + 8))
            self._out.append(_U64(offset))
            self._out.append(data)
        else:
            self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie))
            self._out.append(data)
        if not self._complete_scheduled:
            self._complete_scheduled = True
            self._loop.call_soon(self._flush_completed)
        if self._idle is not None:
            self._wake_idle()

    def _read_data(self, offset, length):
        if length < SPARSE_READ_MIN:
            return self.backend.read(offset, length)
        view = self._pool.get(length)
        self.backend.readinto(offset, view)
        return view

    def _read_sparse(self, cookie, offset, length, extents):
        out = self._out
        covered = sum(e[1] for e in extents)
        if covered < length:  # extent list was cut short: the rest goes as data
            extents = extents + [(offset + covered, length - covered, False)]
        last = len(extents) - 1
        mark = len(out)
        try:
            for i, (off, n, hole) in enumerate(extents):
                fl = _DONE if i == last else 0
                if hole:
                    out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, fl, _HOLE, cookie, 12))
                    out.append(proto.encode_offset_hole_payload(off, n))
                else:
                    data = self._read_data(off, n)
                    out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, fl, _DATA, cookie, n + 8))
                    out.append(_U64(off))
                    out.append(data)
        except BaseException:
            del out[mark:]  # nothing of this reply goes out: the caller sends the error
            raise

    def _cmd_cache(self, flags, cookie, offset, length):
        if self.server.remote_read is None:  # (a Diskless Primary has nothing to cache)
            self.backend.cache(offset, length)
        self._out.append(_pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie))

    def _cmd_block_status(self, flags, cookie, offset, length):
        limit = 1 if flags & _REQ_ONE else MAX_BLOCK_STATUS_EXTENTS
        if self.server.remote_read is None:
            extents = self.backend.extents(offset, length, limit)
        else:  # Diskless Primary: the detached disk's holes say nothing; all is data
            extents = [(offset, length, False)]
        descs = [(n, (StateFlag.HOLE | StateFlag.ZERO) if hole else 0)
                 for _, n, hole in extents]
        payload = proto.encode_block_status_payload(BASE_ALLOCATION_ID, descs)
        self._out.append(_pack_chunk(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.BLOCK_STATUS,
                                     cookie, len(payload)))
        self._out.append(payload)
