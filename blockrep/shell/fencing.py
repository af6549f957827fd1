"""Resource-level fencing (DRBD's `fencing resource-only`) and the fence/unfence handlers.

When a Primary that was replicating loses its peer, client I/O is suspended: writes,
trims, zeroes and flushes keep running locally, but none completes to its NBD client until the
`fence-peer` handler has returned, so no write is acknowledged before the peer is kept from
being promoted (e.g. by a Pacemaker constraint, contrib/pacemaker/crm-fence-peer). The
handler's exit code follows DRBD's contract: 3 (peer already Inconsistent/Outdated),
4 (peer outdated/fenced), 5 (peer down/unreachable), 7 (peer stonithed) mean the peer's disk
counts as Outdated; anything else is a failure (logged; I/O resumes, as with DRBD's
resource-only). Once the peer's disk is UpToDate again (a resync finished, or a connect
without one), `unfence-peer` runs. Handlers run with `/bin/sh -c` and get BLOCKREP_RESOURCE,
BLOCKREP_NODE, BLOCKREP_PEER, BLOCKREP_CONFIG (and DRBD_RESOURCE, DRBD_PEER) in the
environment.

Owns: the suspended state, the held completions (FencedTarget wraps the replicator's
Target, shell/target.py), running the handlers.
Must not: decide roles or sync direction (node.py does).
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import partial

from ..state import DiskState, Role

log = logging.getLogger("blockrep.fencing")

FENCED_CODES = {3: "peer already Inconsistent/Outdated", 4: "peer outdated",
                5: "peer down/unreachable", 7: "peer stonithed"}


class Fencer:
    def __init__(self, node):
        self.node = node
        self.cfg = node.cfg
        self.enabled = node.cfg.fencing == "resource-only"
        self.suspended = False
        self.held: list = []  # (callback, args) of completions held while suspended
        self.task: asyncio.Task | None = None
        self.last: dict | None = None  # the last handler run, for status

    # -- the client-completion gate --------------------------------------------------------
    def target(self, inner):
        """The Target the NBD server submits to: `inner` itself, or (fencing on) a
        FencedTarget that holds its completions while I/O is suspended."""
        return FencedTarget(self, inner) if self.enabled else inner

    def complete(self, cb, cookie, err) -> None:
        """A request's answer: passed on, or held while I/O is suspended."""
        if self.suspended:
            self.held.append((cb, (cookie, err)))
        else:
            cb(cookie, err)

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
            else:
                log.error("fence-peer failed (exit %s): the peer was NOT fenced; resuming "
                          "I/O (resource-only)", rc)
        finally:
            self.resume()

    def resume(self) -> None:
        if not self.suspended:
            return
        self.suspended = False
        held, self.held = self.held, []
        log.warning("client I/O resumed (%d held completion(s) released)", len(held))
        self.node.emit("io-resumed", released=len(held))
        for cb, args in held:
            cb(*args)

    def peer_up_to_date(self) -> None:
        """The peer's disk is UpToDate again: remove the fencing constraint."""
        if self.cfg.handlers.get("unfence-peer"):
            self.node.loop.create_task(self.run_handler("unfence-peer", 60.0))

    # -- handlers -----------------------------------------------------------------------------
    async def run_handler(self, name: str, timeout: float) -> int | None:
        cmd = self.cfg.handlers.get(name)
        if not cmd:
            return None
        node = self.node
        env = {**os.environ, "BLOCKREP_RESOURCE": self.cfg.name, "BLOCKREP_NODE": node.name,
               "BLOCKREP_PEER": node.peer_cfg.name, "BLOCKREP_CONFIG": self.cfg.path,
               "BLOCKREP_HANDLER": name, "DRBD_RESOURCE": self.cfg.name,
               "DRBD_PEER": node.peer_cfg.name}
        t0 = node.loop.time()
        log.info("running %s handler: %s", name, cmd)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            log.error("%s handler could not run: %s", name, exc)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("%s handler killed after %.0fs", name, timeout)
            rc, out = None, b""
        else:
            rc = proc.returncode
        text = out.decode(errors="replace").strip()
        self.last = {"handler": name, "exit": rc, "seconds": round(node.loop.time() - t0, 3),
                     "output": text[-500:]}
        log.info("%s handler exited %s after %.2fs%s", name, rc, self.last["seconds"],
                 f": {text[-300:]}" if text else "")
        node.emit("handler", **self.last)
        return rc

    def status(self) -> dict:
        return {"policy": self.cfg.fencing, "io_suspended": self.suspended,
                "held_completions": len(self.held), "last_handler": self.last}


class FencedTarget:
    """A Target (shell/target.py) delegating to the replicator's: requests run as usual,
    but write/trim/zero/flush answers are held while the Fencer has client I/O suspended."""

    def __init__(self, fencer: Fencer, inner):
        self.fencer = fencer
        self.inner = inner
        self.holds_data = inner.holds_data

    def submit(self, kind, offset, length, data, fua, may_trim, fast_zero, cb, cookie):
        fencer = self.fencer
        err = self.inner.submit(kind, offset, length, data, fua, may_trim, fast_zero,
                                partial(fencer.complete, cb), cookie)
        if err is None or not fencer.suspended:
            return err
        fencer.held.append((cb, (cookie, err)))  # completed inline while suspended: held
        return None
