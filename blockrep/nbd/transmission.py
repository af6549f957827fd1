"""Sans-IO rules of the NBD transmission phase: which request is valid, which error it gets.

Owns: request validation (done once, at the boundary; the executors may assume it) and the
errno -> NBD error mapping. Must not: touch sockets, clocks or disks.
"""

from __future__ import annotations

import errno as _errno

from .constants import CmdFlag, NbdCmd, NbdErr, TransmissionFlag

# Commands whose request carries a payload of `length` bytes.
PAYLOAD_CMDS = frozenset({NbdCmd.WRITE})

_WRITE_LIKE = frozenset({int(NbdCmd.WRITE), int(NbdCmd.TRIM), int(NbdCmd.WRITE_ZEROES)})

_ERRNO_MAP = {
    _errno.EPERM: NbdErr.EPERM,
    _errno.EROFS: NbdErr.EPERM,
    _errno.EACCES: NbdErr.EPERM,
    _errno.EIO: NbdErr.EIO,
    _errno.ENOMEM: NbdErr.ENOMEM,
    _errno.EINVAL: NbdErr.EINVAL,
    _errno.ENOSPC: NbdErr.ENOSPC,
    _errno.EDQUOT: NbdErr.ENOSPC,
    _errno.EFBIG: NbdErr.ENOSPC,
    _errno.EOVERFLOW: NbdErr.EOVERFLOW,
    _errno.ENOTSUP: NbdErr.ENOTSUP,
    _errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}


def nbd_errno(err: int) -> int:
    """The NBD error for an errno reported by a target (EIO for anything unmapped)."""
    return _ERRNO_MAP.get(err, NbdErr.EIO)


def nbd_error(exc: BaseException) -> int:
    """The NBD error for an exception raised while executing a request (EIO by default)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, NbdErr.EIO)
    return NbdErr.EIO


class RequestRules:
    """Validation for one connection, precomputed from what was advertised/negotiated.

    `check(cmd, flags, offset, length)` returns 0 or an NbdErr. A request with a bad
    magic is not judged here: the connection ends (the stream cannot be trusted).
    """

    def __init__(self, size: int, tflags: int, structured: bool, meta: bool,
                 max_block: int):
        self.size = size
        self.max_block = max_block
        self.read_only = bool(tflags & TransmissionFlag.READ_ONLY)
        fua = CmdFlag.FUA if tflags & TransmissionFlag.SEND_FUA else 0
        df = CmdFlag.DF if (tflags & TransmissionFlag.SEND_DF and structured) else 0
        fast = CmdFlag.FAST_ZERO if tflags & TransmissionFlag.SEND_FAST_ZERO else 0
        allowed = {
            NbdCmd.READ: fua | df,
            NbdCmd.WRITE: fua,
            NbdCmd.DISC: fua,
            NbdCmd.FLUSH: fua,
            NbdCmd.TRIM: fua,
            NbdCmd.CACHE: fua,
            NbdCmd.WRITE_ZEROES: fua | CmdFlag.NO_HOLE | fast,
        }
        advertised = {
            NbdCmd.FLUSH: tflags & TransmissionFlag.SEND_FLUSH,
            NbdCmd.TRIM: tflags & TransmissionFlag.SEND_TRIM,
            NbdCmd.CACHE: tflags & TransmissionFlag.SEND_CACHE,
            NbdCmd.WRITE_ZEROES: tflags & TransmissionFlag.SEND_WRITE_ZEROES,
        }
        for cmd, ok in advertised.items():
            if not ok:
                del allowed[cmd]
        if meta:
            allowed[NbdCmd.BLOCK_STATUS] = fua | CmdFlag.REQ_ONE
        self.allowed = {int(cmd): int(v) for cmd, v in allowed.items()}  # plain ints: ~ is exact

    def check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        # plain ints throughout: this runs for every request
        allowed = self.allowed.get(cmd)
        if allowed is None:
            if self.read_only and cmd in _WRITE_LIKE:
                return _EPERM
            return _EINVAL
        if flags & ~allowed:
            return _EINVAL
        if cmd == _FLUSH or cmd == _DISC:
            return 0
        if length == 0:
            return _EINVAL
        if length > self.max_block and cmd <= _WRITE:  # READ or WRITE
            return _EINVAL
        if offset + length > self.size:
            if cmd == _WRITE or cmd == _WRITE_ZEROES:
                return _EPERM if self.read_only else _ENOSPC
            return _EINVAL
        if self.read_only and cmd in _WRITE_LIKE:
            return _EPERM
        return 0


_EPERM, _EINVAL, _ENOSPC = int(NbdErr.EPERM), int(NbdErr.EINVAL), int(NbdErr.ENOSPC)
_WRITE, _FLUSH, _DISC = int(NbdCmd.WRITE), int(NbdCmd.FLUSH), int(NbdCmd.DISC)
_WRITE_ZEROES = int(NbdCmd.WRITE_ZEROES)
