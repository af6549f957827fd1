"""Backing store: a regular file or a block device, addressed by byte offset.

Owns: every system call on the backing disk (pread/pwrite, fdatasync, punch hole,
zero range, BLKDISCARD/BLKZEROOUT, SEEK_DATA/SEEK_HOLE, O_DIRECT bounce buffers).
Must not: know about NBD, replication or the event loop. Errors are OSError with errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from . import native

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
DIRECT_ALIGN = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode={mode:#x}): {os.strerror(e)}")


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '10GiB' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * mult if t.isdigit() else int(float(t) * mult)
    except (ValueError, OverflowError):
        raise ValueError(f"not a size: {text!r}") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


class DiskError(OSError):
    """The backing disk (or metadata file) cannot be used; str() is one clear line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _open_error(what: str, path: str, exc: OSError) -> DiskError:
    if exc.errno == errno.ENOENT:
        msg = f"{what} {path} does not exist"
    elif exc.errno == errno.EISDIR:
        msg = f"{what} {path} is a directory, not a disk image or block device"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"{what} {path}: permission denied ({exc.strerror})"
    else:
        msg = f"{what} {path} cannot be opened: {exc.strerror}"
    return DiskError(exc.errno, msg)


def open_exclusive(path: str, flags: int, what: str = "disk", mode: int = 0o644) -> int:
    """os.open + a lock on the open file (flock: shared when read-only, else exclusive),
    taken before anything is read or written: a second user of the same file or device
    (another node, resource or serve, or another path to it) is refused with EBUSY."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise _open_error(what, path, exc) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskError(errno.EINVAL, f"{what} {path} is not a regular file or block "
                                          f"device")
        shared = (flags & os.O_ACCMODE) == os.O_RDONLY
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DiskError(errno.EBUSY, f"{what} {path} is in use by another blockrep "
                                         f"process (a running node or serve); refusing to "
                                         f"open it") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Disk:
    """A backing disk. Offsets and lengths are validated by the caller.

    Opening it locks it (see open_exclusive): nothing else opens the same disk through
    blockrep until it is closed.
    """

    def __init__(self, path: str, *, size: int | None = None, create: bool = False,
                 read_only: bool = False, direct: bool = False):
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create and not read_only:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        self.fd = open_exclusive(path, flags)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if self.is_block:
                buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                self.size = struct.unpack("Q", buf)[0]
            else:
                if size is not None and create and st.st_size == 0:
                    os.ftruncate(self.fd, size)
                self.size = os.fstat(self.fd).st_size
            if size is not None and size != self.size:
                raise ValueError(f"{path}: size is {self.size} bytes, expected {size}")
            if self.size == 0:
                raise ValueError(f"{path}: disk is empty (use --size with --create)")
            if direct and self.size % DIRECT_ALIGN:
                raise ValueError(f"{path}: O_DIRECT needs a size that is a multiple of "
                                 f"{DIRECT_ALIGN}")
            # no holes anywhere (a block device, or a file with every block allocated): the
            # hole probes below answer without a system call until something punches one
            self.dense = self.is_block or os.fstat(self.fd).st_blocks * 512 >= self.size
        except BaseException:
            os.close(self.fd)
            raise
        self._bounce = threading.local()
        self._bounces: list[mmap.mmap] = []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buf in self._bounces:
            try:
                buf.close()
            except BufferError:  # a view is still alive somewhere; the GC frees it
                pass
        self._bounces.clear()

    # -- data --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if self.direct:
            return bytes(self._direct_read(offset, length))
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a short read can only be a racing truncate; pad honestly
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf) -> None:
        if self.direct:
            mv = memoryview(buf)
            mv[:] = self._direct_read(offset, len(mv))
            return
        n = native.preadv(self.fd, [(offset, buf)])
        if n < len(buf):
            memoryview(buf)[n:] = bytes(len(buf) - n)

    def write(self, offset: int, data, fua: bool = False) -> None:
        if self.direct:
            self._direct_write(offset, data)
        elif fua:
            mv = memoryview(data)
            done = 0
            while done < len(mv):
                done += os.pwritev(self.fd, [mv[done:]], offset + done, os.RWF_DSYNC)
            return
        else:
            n = os.pwrite(self.fd, data, offset)
            if n < len(data):
                native.pwritev(self.fd, [(offset + n, memoryview(data)[n:])])
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: contents of the range become unspecified (zero, here)."""
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
        else:
            try:
                self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                # Trim is advisory: a file system that cannot punch holes keeps the data.
        if fua:
            os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        """Make the range read as zeroes. `fast`: fail with ENOTSUP rather than write zeroes."""
        modes = []
        if may_trim:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                self._fallocate(mode, offset, length)
                break
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                    raise
        else:
            if self.is_block and not fast:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            elif fast:
                raise OSError(errno.ENOTSUP, "no fast way to zero this range")
            else:
                self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        self.dense = False  # a punched or zeroed range may be a hole from now on
        fallocate(self.fd, mode, offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(chunk))
            self.write(offset, memoryview(chunk)[:n])
            offset += n
            length -= n

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- allocation map ----------------------------------------------------------------------
    def extents(self, offset: int, length: int, max_extents: int = 1 << 16):
        """[(offset, length, is_hole)] covering [offset, offset+length), from SEEK_DATA/HOLE.

        A dense disk (a block device, a file with every block allocated) and file systems
        without SEEK_DATA report all data.
        """
        end = offset + length
        if self.dense:
            return [(offset, length, False)]
        out = []
        pos = offset
        fd = self.fd
        while pos < end and len(out) < max_extents:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to EOF
                    data = end
                elif e.errno == errno.EINVAL:  # no SEEK_DATA support
                    out.append((pos, end - pos, False))
                    break
                else:
                    raise
            if data > pos:
                hole_end = min(data, end)
                out.append((pos, hole_end - pos, True))
                pos = hole_end
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, False))
            pos = hole
        return out  # shorter than `length` only when max_extents was reached

    def starts_with_data(self, offset: int) -> bool:
        """Cheap probe: is the byte at offset allocated? (one lseek, none on a dense disk)"""
        if self.dense:
            return True
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) == offset
        except OSError:
            return False

    # -- O_DIRECT ----------------------------------------------------------------------------
    def _bounce_buf(self, n: int) -> mmap.mmap:
        """A page-aligned staging buffer of this thread (requests run in several)."""
        local = self._bounce
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < n:
            buf = local.buf = mmap.mmap(-1, max(n, 1 << 20))
            self._bounces.append(buf)
        return buf

    def _direct_read(self, offset: int, length: int) -> memoryview:
        a0 = offset - offset % DIRECT_ALIGN
        a1 = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = self._bounce_buf(a1 - a0)
        mv = memoryview(buf)[:a1 - a0]
        n = native.preadv(self.fd, [(a0, mv)])
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)
        return mv[offset - a0:offset - a0 + length]

    def _direct_write(self, offset: int, data) -> None:
        data = memoryview(data).cast("B")
        length = len(data)
        a0 = offset - offset % DIRECT_ALIGN
        a1 = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = self._bounce_buf(a1 - a0)
        mv = memoryview(buf)[:a1 - a0]
        if a0 != offset:
            native.preadv(self.fd, [(a0, mv[:DIRECT_ALIGN])])
        if a1 != offset + length and (a1 - DIRECT_ALIGN >= a0 + DIRECT_ALIGN or a0 == offset):
            native.preadv(self.fd, [(a1 - DIRECT_ALIGN, mv[-DIRECT_ALIGN:])])
        mv[offset - a0:offset - a0 + length] = data
        native.pwritev(self.fd, [(a0, mv)])
