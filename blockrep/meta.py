"""Persistent metadata: the one home of blockrep's on-disk format (docs/on-disk-format.md).

Layout of the metadata area (internal: the last `md_size` bytes of the disk, the exported size
shrinks; external: a separate file), all integers little-endian:

    0        superblock copy A (4 KiB block; the record lives in its first 512 bytes)
    4096     superblock copy B
    8192     activity log: AL_SLOTS slots of 4 KiB, a ring of transactions
    8192+AL  bitmap: one bit per 4 KiB block of the data area, uint64 words, 4 KiB aligned

Superblock updates write copy B, fdatasync, then copy A, fdatasync: after a crash at most one
copy is older, and a record fits in one 512-byte sector so it is never torn. A copy whose
CRC32C fails is corruption, and `open_store` refuses to start (never re-initializes).
An AL transaction is a full snapshot of the hot extents with a sequence number and CRC32C;
the newest valid one wins (a torn transaction was never acted upon: data writes wait for
its fdatasync). Bitmap bits set in memory reach the disk when an extent leaves the AL, on
link loss, before a resync starts, periodically during resync and on clean shutdown (only
the 4 KiB pages that changed); after a crash every AL extent
counts as dirty, so the on-disk bitmap may lag safely.
Must not: decide replication states (the node does); it only stores them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import OrderedDict

import numpy as np

from . import native
from .bitmap import BLOCK, Bitmap
from .disk import Disk, open_exclusive
from .state import DiskState, Generation

log = logging.getLogger("blockrep.meta")

MAGIC = b"BREPMETA"
FORMAT_VERSION = 1
SB_SIZE = 4096
AL_SLOT = 4096
AL_SLOTS = 32
AL_MAGIC = 0x414C5452  # "ALTR"
AL_EXTENT = 4 << 20  # 4 MiB
AL_EXTENTS_DEFAULT = 256
AL_MAX_PER_SLOT = (AL_SLOT - 24) // 4

F_CLEAN = 1 << 0        # shut down cleanly; the on-disk bitmap is complete
F_PRIMARY = 1 << 1      # was Primary when last written (set while Primary)
F_BITMAP_CRC = 1 << 2   # bitmap_crc is valid (written at clean shutdown)

_DISK_STATES = [DiskState.INCONSISTENT, DiskState.OUTDATED, DiskState.UP_TO_DATE,
                DiskState.FAILED]

# magic 8s | version I | flags I | seq Q | data_size Q | md_size Q | block I | al_extent I |
# al_slots I | al_extents I | disk_state I | bitmap_crc I | gen current Q | gen bitmap Q |
# history 4Q | resource 64s | node 64s
_SB = struct.Struct("<8sIIQQQIIIIIIQQ4Q64s64s")
_SB_CRC = struct.Struct("<I")
SB_CRC_AT = 508  # CRC32C of bytes 0..507 (record + zero padding) sits in the sector's end
_AL_HDR = struct.Struct("<IQII")  # magic, seq, count, reserved; then count u32; crc at end


class MetaError(Exception):
    """Metadata is missing, corrupt, foreign or inconsistent; str() is one clear line."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(disk_size: int, internal: bool) -> tuple[int, int, int]:
    """-> (data_size, md_offset, md_size) for a disk of disk_size bytes."""
    bm_bytes = _round_up(_round_up(-(-disk_size // BLOCK), 64) // 8, 4096)
    md_size = 2 * SB_SIZE + AL_SLOTS * AL_SLOT + bm_bytes
    if not internal:
        return disk_size, 0, md_size
    data_size = (disk_size - md_size) // BLOCK * BLOCK
    if data_size <= 0:
        raise MetaError(f"disk of {disk_size} bytes is too small for internal metadata")
    return data_size, data_size, md_size


class Superblock:
    def __init__(self, **kw):
        self.version = FORMAT_VERSION
        self.flags = 0
        self.seq = 0
        self.data_size = 0
        self.md_size = 0
        self.al_extents = AL_EXTENTS_DEFAULT
        self.disk_state = DiskState.INCONSISTENT
        self.bitmap_crc = 0
        self.gen = Generation()
        self.resource = ""
        self.node = ""
        self.__dict__.update(kw)

    def encode(self) -> bytes:
        hist = (list(self.gen.history) + [0, 0, 0, 0])[:4]
        rec = _SB.pack(MAGIC, self.version, self.flags, self.seq, self.data_size,
                       self.md_size, BLOCK, AL_EXTENT, AL_SLOTS, self.al_extents,
                       _DISK_STATES.index(self.disk_state), self.bitmap_crc,
                       self.gen.current, self.gen.bitmap, *hist, self.resource.encode(),
                       self.node.encode())
        rec = rec + bytes(SB_CRC_AT - len(rec))  # the whole sector is checksummed
        rec += _SB_CRC.pack(native.crc32c(rec))
        return rec + bytes(SB_SIZE - len(rec))

    @classmethod
    def decode(cls, buf: bytes, where: str) -> "Superblock | None":
        """None if no metadata is there at all; MetaError if it is corrupt."""
        if buf[:8] != MAGIC:
            if any(buf[:512]):
                raise MetaError(f"metadata on {where} is corrupt (superblock magic damaged); "
                                f"refusing to start")
            return None
        (crc,) = _SB_CRC.unpack_from(buf, SB_CRC_AT)
        if native.crc32c(buf[:SB_CRC_AT]) != crc:
            raise MetaError(f"metadata on {where} is corrupt (superblock checksum mismatch); "
                            f"refusing to start. Inspect with 'blockrep dump-md'; recreate "
                            f"with 'blockrep create-md --force' only if the data is expendable")
        (_, version, flags, seq, data_size, md_size, block, al_extent, al_slots, al_extents,
         dstate, bm_crc, cur, bmu, h0, h1, h2, h3, res, node) = _SB.unpack_from(buf)
        if version != FORMAT_VERSION:
            raise MetaError(f"metadata on {where} has format version {version}; this "
                            f"blockrep reads version {FORMAT_VERSION}")
        if block != BLOCK or al_extent != AL_EXTENT or al_slots != AL_SLOTS or \
                dstate >= len(_DISK_STATES):
            raise MetaError(f"metadata on {where} has impossible geometry (corrupt?)")
        return cls(version=version, flags=flags, seq=seq, data_size=data_size,
                   md_size=md_size, al_extents=al_extents, disk_state=_DISK_STATES[dstate],
                   bitmap_crc=bm_crc,
                   gen=Generation(cur, bmu, [h for h in (h0, h1, h2, h3) if h]),
                   resource=res.rstrip(b"\0").decode(errors="replace"),
                   node=node.rstrip(b"\0").decode(errors="replace"))


def decode_al(raw: bytes) -> tuple[int, list[int]]:
    """The activity-log area -> (seq, extents) of its newest valid transaction (0, [] if
    none); slots that are torn, foreign or short are skipped."""
    best_seq, best = 0, []
    for i in range(AL_SLOTS):
        slot = raw[i * AL_SLOT:(i + 1) * AL_SLOT]
        if len(slot) < AL_SLOT:
            break
        magic, seq, count, _ = _AL_HDR.unpack_from(slot)
        if magic != AL_MAGIC or count > AL_MAX_PER_SLOT:
            continue
        end = _AL_HDR.size + 4 * count
        (crc,) = struct.unpack_from("<I", slot, AL_SLOT - 4)
        if native.crc32c(slot[:end]) != crc:
            continue  # torn transaction: it never committed
        if seq > best_seq:
            best_seq = seq
            best = list(struct.unpack_from(f"<{count}I", slot, _AL_HDR.size))
    return best_seq, best


def _md_target(cfg, node):
    """-> (disk, md_fd, md_offset, data_size, md_size, where, owns_fd)."""
    internal = node.meta_disk == "internal"
    disk = Disk(node.disk)
    try:
        data_size, md_offset, md_size = layout(disk.size, internal)
        if internal:
            return disk, disk.fd, md_offset, data_size, md_size, f"{node.disk} (internal)", False
        fd = open_exclusive(node.meta_disk, os.O_RDWR | os.O_CREAT, "metadata file", 0o600)
        return disk, fd, 0, data_size, md_size, node.meta_disk, True
    except BaseException:
        disk.close()
        raise


def _read_superblocks(fd: int, md_offset: int, where: str) -> list:
    out = []
    for i in (0, 1):
        buf = os.pread(fd, SB_SIZE, md_offset + i * SB_SIZE)
        out.append(Superblock.decode(buf.ljust(SB_SIZE, b"\0"), f"{where} copy {'AB'[i]}"))
    return out


def create_md(cfg, node, force: bool = False) -> str:
    disk, fd, md_offset, data_size, md_size, where, owns = _md_target(cfg, node)
    try:
        if not force:
            try:
                sbs = _read_superblocks(fd, md_offset, where)
            except MetaError:
                raise MetaError(f"{where} holds corrupt metadata; use --force to overwrite "
                                f"it") from None
            if any(sbs):
                raise MetaError(f"{where} already holds metadata (resource "
                                f"{sbs[0].resource if sbs[0] else sbs[1].resource!r}); use "
                                f"--force to overwrite it")
        sb = Superblock(data_size=data_size, md_size=md_size, resource=cfg.name,
                        node=node.name, flags=F_CLEAN | F_BITMAP_CRC)
        zero_bm = bytes(md_size - 2 * SB_SIZE - AL_SLOTS * AL_SLOT)
        sb.bitmap_crc = native.crc32c(zero_bm)
        if owns:
            os.ftruncate(fd, md_size)
        native.pwritev(fd, [(md_offset + 2 * SB_SIZE, bytes(AL_SLOTS * AL_SLOT) + zero_bm)])
        os.fdatasync(fd)
        rec = sb.encode()
        for i in (1, 0):
            native.pwritev(fd, [(md_offset + i * SB_SIZE, rec)])
            os.fdatasync(fd)
        return (f"created metadata for {cfg.name}/{node.name} on {where}: data size "
                f"{data_size} bytes, metadata {md_size} bytes")
    finally:
        if owns:
            os.close(fd)
        disk.close()


def dump_md(cfg, node) -> str:
    store = open_store(cfg, node, read_only=True)
    try:
        import json
        d = store.describe()
        d["al_active_extents"] = sorted(store.al_recovered)
        d["bitmap_set_bits"] = store.bitmap.count()
        return json.dumps(d, indent=1)
    finally:
        store.close()


def open_store(cfg, node, read_only: bool = False) -> "MetaStore":
    disk, fd, md_offset, data_size, md_size, where, owns = _md_target(cfg, node)
    try:
        sbs = _read_superblocks(fd, md_offset, where)
        valid = [s for s in sbs if s is not None]
        if not valid:
            raise MetaError(f"no blockrep metadata on {where}; run 'blockrep create-md "
                            f"{cfg.path} --node {node.name}' first")
        if len(valid) == 1:
            raise MetaError(f"metadata on {where} has only one superblock copy (the other "
                            f"was overwritten); refusing to start")
        sb = max(valid, key=lambda s: s.seq)
        if sb.resource != cfg.name or sb.node != node.name:
            raise MetaError(f"metadata on {where} belongs to resource {sb.resource!r} node "
                            f"{sb.node!r}, not {cfg.name!r} node {node.name!r}")
        if sb.data_size != data_size or sb.md_size != md_size:
            raise MetaError(f"metadata on {where} was created for a data size of "
                            f"{sb.data_size} bytes; this disk gives {data_size}")
        return MetaStore(cfg, node, disk, fd, md_offset, sb, where, owns, read_only)
    except BaseException:
        if owns:
            os.close(fd)
        disk.close()
        raise


class MetaStore:
    """Open metadata of a running node: superblock, activity log and bitmap."""

    def __init__(self, cfg, node, disk, fd, md_offset, sb: Superblock, where, owns_fd,
                 read_only=False):
        self.disk = disk
        self.fd = fd
        self.md_offset = md_offset
        self.sb = sb
        self.where = where
        self.owns_fd = owns_fd
        self.read_only = read_only
        self.data_size = sb.data_size
        self.gen = sb.gen
        self.al_off = md_offset + 2 * SB_SIZE
        self.bm_off = self.al_off + AL_SLOTS * AL_SLOT
        words = np.frombuffer(bytearray(os.pread(fd, sb.md_size - 2 * SB_SIZE -
                                                 AL_SLOTS * AL_SLOT, self.bm_off)),
                              dtype="<u8")
        self.bitmap = Bitmap(self.data_size, words[:(Bitmap(self.data_size).words.size)].copy())
        self.bitmap.dirty[:] = False  # what is on disk
        self.clean = bool(sb.flags & F_CLEAN)
        self.was_primary = bool(sb.flags & F_PRIMARY)
        self.crashed_primary = self.was_primary and not self.clean
        if self.clean and sb.flags & F_BITMAP_CRC:
            raw = os.pread(fd, sb.md_size - 2 * SB_SIZE - AL_SLOTS * AL_SLOT, self.bm_off)
            if native.crc32c(raw) != sb.bitmap_crc:
                raise MetaError(f"bitmap on {where} is corrupt (checksum mismatch after a "
                                f"clean shutdown); refusing to start")
        self.al_seq, self.al_recovered = self._read_al()
        self.al: OrderedDict[int, int] = OrderedDict()  # extent -> epoch of its last write
        self.al_limit = min(sb.al_extents, AL_MAX_PER_SLOT)
        self.al_writes = 0
        self.bitmap_writes = 0
        self._last_saved: tuple | None = None  # what save_state wrote last (skip repeats)
        self._last_bitmap_flush = time.monotonic()
        self._bm_lock = threading.Lock()
        if read_only:
            return
        if not self.clean:
            n = len(self.al_recovered)
            for ext in self.al_recovered:
                self.bitmap.set_range(ext * AL_EXTENT, AL_EXTENT)
            log.warning("metadata says the last shutdown was not clean%s: %d activity-log "
                        "extent(s) (%d MiB) marked out of sync",
                        " (this node was Primary)" if self.was_primary else "", n,
                        n * AL_EXTENT >> 20)
        # from now on we are running: not clean until shut down properly
        self.sb.flags &= ~(F_CLEAN | F_BITMAP_CRC)
        self._write_sb()
        self.flush_bitmap()
        for ext in self.al_recovered:  # they stay hot until their bits are persisted
            self.al[ext] = 0

    # -- superblock --------------------------------------------------------------------------
    def _write_sb(self) -> None:
        self.sb.seq += 1
        rec = self.sb.encode()
        for i in (1, 0):
            native.pwritev(self.fd, [(self.md_offset + i * SB_SIZE, rec)])
            os.fdatasync(self.fd)

    def initial_disk_state(self) -> DiskState:
        """UpToDate survives a restart only on a node that was Primary (it had the newest
        data); a Secondary comes back Outdated until its peer confirms (or --force)."""
        s = self.sb.disk_state
        if s == DiskState.UP_TO_DATE and self.gen.current == 0:
            return DiskState.INCONSISTENT
        if s == DiskState.UP_TO_DATE and not self.was_primary:
            return DiskState.OUTDATED
        return s

    def save_state(self, *, disk_state: DiskState, was_primary: bool) -> None:
        if self.read_only:
            return
        stored = disk_state if disk_state != DiskState.DUNKNOWN else self.sb.disk_state
        if stored == DiskState.DISKLESS:  # detached: the disk is remembered as Failed
            stored = DiskState.FAILED
        flags = (self.sb.flags & ~F_PRIMARY) | (F_PRIMARY if was_primary else 0)
        key = (stored, flags, self.gen.current, self.gen.bitmap, tuple(self.gen.history))
        if key == self._last_saved:
            return
        self.sb.disk_state = stored
        self.sb.flags = flags
        self.sb.gen = self.gen
        self._write_sb()
        self._last_saved = key

    def clean_shutdown(self, was_primary: bool) -> None:
        if self.read_only:
            return
        self.flush_bitmap()
        bm_area = self.sb.md_size - 2 * SB_SIZE - AL_SLOTS * AL_SLOT
        raw = self.bitmap.words.astype("<u8", copy=False).tobytes()
        self.sb.bitmap_crc = native.crc32c(raw + bytes(bm_area - len(raw)))
        self.sb.flags = (self.sb.flags | F_CLEAN | F_BITMAP_CRC) & ~F_PRIMARY
        if was_primary:
            self.sb.flags |= F_PRIMARY
        self.sb.gen = self.gen
        self._write_sb()
        self.al.clear()
        self._write_al()

    # -- activity log ------------------------------------------------------------------------
    def _read_al(self) -> tuple[int, list[int]]:
        return decode_al(os.pread(self.fd, AL_SLOTS * AL_SLOT, self.al_off))

    def _write_al(self) -> None:
        exts = list(self.al.keys())[:AL_MAX_PER_SLOT]
        self.al_seq += 1
        body = _AL_HDR.pack(AL_MAGIC, self.al_seq, len(exts), 0) + \
            struct.pack(f"<{len(exts)}I", *exts)
        slot = body + bytes(AL_SLOT - 4 - len(body)) + struct.pack("<I", native.crc32c(body))
        native.pwritev(self.fd, [(self.al_off + (self.al_seq % AL_SLOTS) * AL_SLOT, slot)])
        os.fdatasync(self.fd)
        self.al_writes += 1

    def activity(self, offset: int, length: int, epoch: int, oldest_unacked,
                 in_flight=None) -> None:
        """Called before a local write: its extents must be in the on-disk AL first.
        `oldest_unacked()` is the oldest epoch the peer may lack (extents used in it or
        later stay), asked only when an extent is added: a write to hot extents (nearly
        every write) costs a dict update. `in_flight` (a RangeSet of local writes still
        running) keeps their extents in the log. If the transaction cannot be written
        (OSError, re-raised) the in-memory log is left as it was, never ahead of the disk."""
        first = offset // AL_EXTENT
        last = (offset + length - 1) // AL_EXTENT
        al = self.al
        if first == last and first in al:  # the common case: one extent, already hot
            al[first] = epoch
            al.move_to_end(first)
            return
        added = []
        for ext in range(first, last + 1):
            if ext in al:
                al[ext] = epoch
                al.move_to_end(ext)
            else:
                al[ext] = epoch
                added.append(ext)
        if not added:
            return
        try:
            self._make_room(first, last, oldest_unacked(), in_flight)
            self._write_al()
        except OSError:
            for ext in added:  # they never reached the disk
                al.pop(ext, None)
            raise

    def _make_room(self, first: int, last: int, oldest_unacked: int, in_flight) -> None:
        al = self.al
        # evict cold extents whose writes the peer has durably acknowledged and whose local
        # writes have all completed
        while len(al) > self.al_limit:
            victim = next((e for e, ep in al.items()
                           if ep < oldest_unacked and not first <= e <= last and
                           not (in_flight and in_flight.overlaps(e * AL_EXTENT, AL_EXTENT))),
                          None)
            if victim is None:
                break  # soft limit: everything is busy
            self._flush_bitmap_range(victim * AL_EXTENT, AL_EXTENT)
            del al[victim]
        # hard limit: one transaction must describe the whole AL. Past it, the oldest
        # extents leave anyway, marked out of sync (a later resync copies them needlessly,
        # but nothing that may differ is forgotten)
        while len(al) > AL_MAX_PER_SLOT:
            victim = next(iter(al))
            log.warning("activity log full of unacknowledged extents: extent %d marked out "
                        "of sync", victim)
            self.bitmap.set_range(victim * AL_EXTENT, AL_EXTENT)
            self._flush_bitmap_range(victim * AL_EXTENT, AL_EXTENT)
            del al[victim]

    # -- bitmap ------------------------------------------------------------------------------
    # Only pages that changed are written (Bitmap.dirty). Writes to the bitmap area are
    # serialized by _bm_lock, so a page written from the loop never races an older copy of
    # it written from an I/O thread.
    def _flush_bitmap_range(self, offset: int, length: int) -> None:
        """Persist the bitmap pages that cover [offset, offset+length) now (AL eviction)."""
        w0 = (offset // BLOCK) // 64
        w1 = -(-((offset + length) // BLOCK) // 64)
        p0 = (w0 * 8) // 4096 * 4096
        p1 = min(_round_up(w1 * 8, 4096), self.bitmap.words.size * 8)
        raw = self.bitmap.words[p0 // 8:p1 // 8].astype("<u8", copy=False).tobytes()
        if raw:
            with self._bm_lock:
                native.pwritev(self.fd, [(self.bm_off + p0, raw)])
                os.fdatasync(self.fd)
            self.bitmap_writes += 1

    def take_bitmap_pages(self) -> list[tuple[int, bytes]]:
        """On the loop: snapshot the changed bitmap pages for write_bitmap_pages."""
        self._last_bitmap_flush = time.monotonic()
        return self.bitmap.take_dirty_pages()

    def write_bitmap_pages(self, pages: list[tuple[int, bytes]]) -> None:
        """Anywhere (an I/O thread): write a snapshot from take_bitmap_pages, fdatasync."""
        if not pages or self.read_only:
            return
        with self._bm_lock:
            native.pwritev(self.fd, [(self.bm_off + off, raw) for off, raw in pages])
            os.fdatasync(self.fd)
        self.bitmap_writes += 1

    def flush_bitmap(self) -> None:
        """Persist every changed bitmap page now (on the caller's thread)."""
        self.write_bitmap_pages(self.take_bitmap_pages())

    def bitmap_flush_due(self) -> bool:
        """Bits were cleared (resync progress): persist them now and then, lazily."""
        return time.monotonic() - self._last_bitmap_flush > 0.5 and self.bitmap.dirty.any()

    # -- misc --------------------------------------------------------------------------------
    def describe(self) -> dict:
        sb = self.sb
        return {"location": self.where, "format_version": sb.version, "seq": sb.seq,
                "data_size": sb.data_size, "md_size": sb.md_size,
                "flags": [n for f, n in ((F_CLEAN, "clean"), (F_PRIMARY, "primary"),
                                         (F_BITMAP_CRC, "bitmap-crc")) if sb.flags & f],
                "disk_state": sb.disk_state.value, "resource": sb.resource, "node": sb.node,
                "generation": self.gen.short(), "al_extents_limit": self.al_limit,
                "al_writes": self.al_writes, "bitmap_writes": self.bitmap_writes,
                "crashed_primary_at_start": self.crashed_primary}

    def close(self) -> None:
        if self.owns_fd:
            os.close(self.fd)
        self.disk.close()
