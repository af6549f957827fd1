"""What a node does when its disk fails: the `on-io-error` policy (DRBD's detach | pass-on).

Owns: the decision, for each local I/O error, between detaching the disk (`detach`, the
default: the disk goes Failed -> Diskless at once, the reason is logged, kept for status and
sent in the events; the peer is told) and passing the error on (`pass-on`: the caller
answers the error as before and the disk stays attached). A Primary detaches only while its
peer holds every block (shell/diskless.py `can_serve`); it then goes on as a Diskless
Primary, its I/O through the peer. Without such a peer detaching would leave no copy to
serve: the error is passed on and the disk stays attached (logged, in status). The
Primary's side of a peer that detached (everything from then on is out of sync: the
transfer log is marked as on link loss, writes stop going to the peer, a new data
generation begins).
`attach`: a detached disk (repaired or replaced at the configured path) comes back and
takes a full resync from the peer; on a Secondary only (a Diskless Primary is demoted
first: a resync *to* a Primary while it serves is not supported).
Must not: do the failing I/O itself or answer requests (the write and apply paths do).
"""

from __future__ import annotations

import fcntl
import logging
import os

from ..disk import Disk
from ..peer.proto import P
from ..state import NO_DISK, DiskState, Rv, Verdict
from .ratelog import RateLimitedLog

log = logging.getLogger("blockrep.disk")
iolog = RateLimitedLog(log)


class DiskFailure:
    def __init__(self, node):
        self.node = node
        self.reason = ""          # why the disk was detached ("" while attached)
        self.errors_seen = 0      # local I/O errors since start
        self.detached_at: float | None = None  # loop time of the detach
        self.kept = ""  # why a Primary's failing disk was not detached (latest), or ""

    @property
    def policy(self) -> str:
        return self.node.cfg.on_io_error

    @property
    def attached(self) -> bool:
        return self.node.disk_state not in NO_DISK

    def io_error(self, what: str, offset: int, length: int, exc) -> bool:
        """A local I/O error; True if the disk is (now) detached, so the caller must not
        use it again; False under pass-on (the caller passes the error on)."""
        self.errors_seen += 1
        if not self.attached:
            return True
        if self.policy != "detach":
            return False
        err = getattr(exc, "errno", None) or 5
        reason = f"I/O error on {what} at {offset}+{length} (errno {err}): {exc}"
        node = self.node
        if node.is_primary and not node.diskless.can_serve():
            # detaching would leave the clients no copy of the data: pass the error on
            self.kept = (f"{reason}; not detached: the peer {node.peer_cfg.name} does not "
                         f"hold every block (connection {node.conn.value}, replication "
                         f"{node.repl.value}, peer disk {node.peer_disk.value}, "
                         f"{node.bitmap.count_bytes()} bytes out of sync); the error goes "
                         f"to the client")
            node.last_error = self.kept
            iolog.error("disk kept", "disk %s: %s", node.me.disk, self.kept)
            return False
        self.detach(reason)
        return True

    def detach(self, reason: str) -> None:
        node = self.node
        self.reason = reason
        self.detached_at = node.loop.time()
        log.error("disk %s failed: %s; detaching it (on-io-error = detach)",
                  node.me.disk, reason)
        node.last_error = f"disk detached: {reason}"
        primary = node.is_primary
        how = {"io": f"through the peer {node.peer_cfg.name}"} if primary else {}
        node.set_disk(DiskState.FAILED, reason=reason)
        node.set_disk(DiskState.DISKLESS, reason=reason, **how)
        node.verifier.cancel("the disk was detached")
        if primary:
            node.diskless.start()  # before any later request: they go to the peer only
        try:
            node.persist()  # remembered as Failed where the metadata still can be written
        except OSError as exc:
            log.error("recording the failed disk in the metadata failed: %s", exc)
        node.send_state()  # the peer marks everything from now on out of sync

    def peer_disk_changed(self, old: DiskState) -> None:
        if old not in NO_DISK and self.node.peer_disk in NO_DISK:
            self.peer_detached()

    def peer_detached(self) -> None:
        """CONTROL state from the peer says its disk is gone: nothing it acknowledged but
        has not made durable (the transfer log) nor anything written from now on is on
        its disk; as the Primary, this node holds the only copy."""
        node = self.node
        if not node.is_primary:
            return
        node.replicator.link_lost()  # marks the transfer log, completes what waited
        if not self.attached:  # both disks gone: what was open failed (EIO), no new data
            log.error("peer %s detached its disk too: this Diskless Primary has no copy of "
                      "the data; every request fails (EIO)", node.peer_cfg.name)
            return
        node.gen.start_new_data()  # writes from now on are new data the peer lacks
        try:
            if node.store is not None:
                node.store.flush_bitmap()
            node.persist()
        except OSError as exc:
            log.error("metadata write after the peer detached failed: %s", exc)
        log.warning("peer %s detached its disk: this node holds the only copy; everything "
                    "written from now on is marked out of sync", node.peer_cfg.name)

    def check_attach(self) -> Verdict:
        node = self.node
        if self.attached:
            return Verdict(Rv.NOTHING_TO_DO, f"the disk is attached ({node.disk_state.value})")
        if node.is_primary:
            return Verdict(Rv.IS_PRIMARY, "this node is a Diskless Primary (its I/O goes "
                           "through the peer); attach on a Primary is not supported: stop "
                           "its NBD clients, 'blockrep secondary', then 'blockrep attach' "
                           "(or promote the peer first and move the clients there)")
        return Verdict(Rv.SUCCESS)

    def attach(self) -> str:
        """Reopen the configured disk in place of the failed one (the same descriptor
        number, so every holder of the Disk sees the new one), mark all of it out of sync
        and renegotiate: the peer, UpToDate, becomes the source of a full sync. Raises
        OSError / ValueError (the disk stays detached) if the disk cannot be opened or is
        too small."""
        node = self.node
        disk = node.disk
        need = node.size
        store = node.store
        if store is not None and store.fd == disk.fd:  # internal metadata: after the data
            need = max(need, store.md_offset + store.sb.md_size)
        fcntl.flock(disk.fd, fcntl.LOCK_UN)  # the new open takes the lock
        try:
            fresh = Disk(disk.path)
            try:
                if fresh.size < need:
                    raise ValueError(f"{disk.path}: {fresh.size} bytes, needs {need}")
                os.dup2(fresh.fd, disk.fd)  # closes the failed one; the lock goes along
                disk.dense = fresh.dense  # the new disk's holes, not the old one's
            finally:
                fresh.close()
        except (OSError, ValueError):
            try:
                fcntl.flock(disk.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
            raise
        log.warning("disk %s attached (was detached: %s); a full sync from the peer follows",
                    disk.path, self.reason)
        self.reason = ""
        self.kept = ""
        self.detached_at = None
        node.diskless.stop()
        node.gen.current = 0  # nothing on it is trusted: the peer's current wins, full sync
        node.gen.bitmap = 0
        node.bitmap.set_all()
        node.last_error = ""
        node.set_disk(DiskState.INCONSISTENT, reason="attached")
        node.persist()  # a fresh superblock on a replaced disk
        if store is not None:
            store.flush_bitmap()
        link = node.link
        if link is not None and not link.closed:
            link.send_control(P.CONTROL, {"op": "renegotiate"})
            link.close("renegotiating after attach")
        return node.disk_state.value

    def status(self) -> str:
        return self.reason
