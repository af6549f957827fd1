"""Resource-level fencing (DRBD's `fencing resource-only` and `resource-and-stonith`) and the
fence/unfence handlers.

When a Primary that was replicating loses its peer, client I/O is suspended: writes,
trims, zeroes and flushes keep running locally, but none completes to its NBD client until the
`fence-peer` handler has returned, so no write is acknowledged before the peer is kept from
being promoted (e.g. by a Pacemaker constraint, contrib/pacemaker/crm-fence-peer). The
handler's exit code follows DRBD's contract: 3 (peer already Inconsistent/Outdated),
4 (peer outdated/fenced), 5 (peer down/unreachable), 7 (peer stonithed) mean the peer's disk
counts as Outdated; anything else (or a timeout) is a failure. The two policies differ only
there: with `resource-only` a failure is logged and I/O resumes (DRBD's resource-only); with
`resource-and-stonith` I/O stays suspended after a failure until the peer is connected again
or the operator runs `blockrep resume-io` (DRBD's `drbdadm resume-io`): a Primary that could
not make sure its peer will not be promoted acknowledges nothing. Once the peer's disk is
UpToDate again (a resync finished, or a connect without one), `unfence-peer` runs. Handlers
run through shell/handlers.py (environment, timeout).

Owns: the suspended state (when client I/O is suspended and resumed), the fence-peer
exit-code contract. The held answers themselves are the request core's
(`TransferLog.hold` / `release`, blockrep.peer.requests): every write-type request completes
there, so nothing needs wrapping and an unsuspended write pays nothing for fencing.
Must not: decide roles or sync direction (node.py does).
"""

from __future__ import annotations

import asyncio
import logging

from ..state import DiskState, Role

log = logging.getLogger("blockrep.fencing")

FENCED_CODES = {3: "peer already Inconsistent/Outdated", 4: "peer outdated",
                5: "peer down/unreachable", 7: "peer stonithed"}


class Fencer:
    def __init__(self, node):
        self.node = node
        self.cfg = node.cfg
        self.suspended = False
        self.tl = node.replicator.log  # holds the answers while I/O is suspended
        self.task: asyncio.Task | None = None
        self.last: dict | None = None  # the last fence/unfence handler run, for status
        self.failed = False  # resource-and-stonith: the handler failed, I/O stays suspended

    @property
    def enabled(self) -> bool:  # read each time: `adjust` may change the policy
        return self.cfg.fencing in ("resource-only", "resource-and-stonith")

    # -- peer loss / peer back ----------------------------------------------------------------
    def must_fence(self) -> bool:
        """Called on link loss, before the pending requests complete: does this loss need
        the peer fenced? (Primary, and the peer's disk was usable.)"""
        node = self.node
        return (self.enabled and node.role == Role.PRIMARY and
                node.peer_disk in (DiskState.UP_TO_DATE, DiskState.DUNKNOWN)
                and node.disk_state == DiskState.UP_TO_DATE)

    def suspend(self) -> None:
        if not self.suspended:
            self.suspended = True
            self.tl.hold()
            log.warning("peer lost while Primary: client I/O suspended until the "
                        "fence-peer handler returns")
            self.node.emit("io-suspended", reason="fencing")

    def fence(self) -> None:
        self.suspend()
        if self.task is None or self.task.done():
            self.task = self.node.loop.create_task(self._fence())

    async def _fence(self) -> None:
        node = self.node
        try:
            rc = await self.run_handler("fence-peer", self.cfg.fence_peer_timeout)
            if rc in FENCED_CODES:
                log.info("fence-peer: %s (exit %d); the peer's disk counts as Outdated",
                         FENCED_CODES[rc], rc)
                if node.link is None:
                    node.peer_disk = DiskState.OUTDATED
            elif self.cfg.fencing == "resource-and-stonith":
                log.error("fence-peer failed (exit %s): the peer was NOT fenced; client I/O "
                          "stays suspended (resource-and-stonith) until the peer is back "
                          "or 'blockrep resume-io'", rc)
                self.failed = True
                node.emit("fence-failed", exit=rc, io_suspended=True)
                return
            else:
                log.error("fence-peer failed (exit %s): the peer was NOT fenced; resuming "
                          "I/O (resource-only)", rc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fence-peer handler failed")
        self.resume()

    def peer_connected(self) -> None:
        """The peer is connected again: the fencing question is settled (its writes
        replicate); I/O suspended after a failed handler resumes."""
        if self.suspended and (self.task is None or self.task.done()):
            log.warning("peer connected again: resuming the suspended client I/O")
            self.resume()

    def resume(self) -> None:
        if not self.suspended:
            return
        self.suspended = False
        self.failed = False
        n = len(self.tl.held or ())
        log.warning("client I/O resumed (%d held completion(s) released)", n)
        self.node.emit("io-resumed", released=n)
        self.tl.release()

    def peer_up_to_date(self) -> None:
        """The peer's disk is UpToDate again: remove the fencing constraint."""
        if self.cfg.handlers.get("unfence-peer"):
            self.node.loop.create_task(self.run_handler("unfence-peer", self.cfg.handler_timeout))

    # -- handlers -----------------------------------------------------------------------------
    async def run_handler(self, name: str, timeout: float) -> int | None:
        hooks = self.node.hooks
        rc = await hooks.run(name, timeout)
        if hooks.last is not None and hooks.last["handler"] == name:
            self.last = hooks.last
        return rc

    def status(self) -> dict:
        d = {"policy": self.cfg.fencing, "io_suspended": self.suspended,
             "held_completions": len(self.tl.held or ()), "last_handler": self.last}
        if self.failed:
            d["fence_failed"] = True
        return d
