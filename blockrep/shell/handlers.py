"""The `[handlers]` section: operator scripts run on events, with DRBD's names and contract.

| handler               | runs                                                    | exit code |
|-----------------------|---------------------------------------------------------|-----------|
| fence-peer            | a Primary lost its peer (fencing on; shell/fencing.py)  | 3/4/5/7 = fenced |
| unfence-peer          | the peer's disk is UpToDate again                        | ignored   |
| split-brain           | split brain detected and not resolved automatically      | ignored   |
| initial-split-brain   | split brain detected (resolved by an after-sb policy or not) | ignored |
| before-resync-target  | before this node becomes SyncTarget (no resync data yet) | non-zero: the connection is dropped, the resync is deferred to the next connect |
| after-resync-target   | this node finished a resync as SyncTarget                | ignored   |
| out-of-sync           | an online verify finished and found differing blocks     | ignored   |

Every handler runs with `/bin/sh -c COMMAND` in a subprocess (never blocking the event loop),
is killed after its timeout (`handler-timeout`, fence-peer: `fence-peer-timeout`) and gets
DRBD's environment with a BLOCKREP_ prefix: BLOCKREP_RESOURCE, BLOCKREP_NODE (DRBD's
my-node), BLOCKREP_PEER, BLOCKREP_PEER_ADDRESS, BLOCKREP_MY_ADDRESS, BLOCKREP_BACKING_DEV,
BLOCKREP_CONFIG (DRBD_CONF), BLOCKREP_HANDLER, plus DRBD_RESOURCE / DRBD_PEER / DRBD_CONF for
scripts written for DRBD, and per handler extras (BLOCKREP_OUT_OF_SYNC_BYTES, ...).

Owns: running handlers, their environment, the record of the last run (status, events).
Must not: decide what a handler's exit code means (its caller does).
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("blockrep.handlers")

NAMES = ("fence-peer", "unfence-peer", "split-brain", "initial-split-brain",
         "before-resync-target", "after-resync-target", "out-of-sync")


def _addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


class Handlers:
    def __init__(self, node):
        self.node = node
        self.last: dict | None = None  # the last handler run, for status
        self.runs = 0
        self.tasks: set[asyncio.Task] = set()

    def configured(self, name: str) -> bool:
        return bool(self.node.cfg.handlers.get(name))

    def environment(self, name: str, extra: dict | None = None) -> dict:
        node, cfg = self.node, self.node.cfg
        env = {"BLOCKREP_RESOURCE": cfg.name, "BLOCKREP_NODE": node.name,
               "BLOCKREP_PEER": node.peer_cfg.name,
               "BLOCKREP_PEER_ADDRESS": _addr(node.peer_cfg.address),
               "BLOCKREP_MY_ADDRESS": _addr(node.me.address),
               "BLOCKREP_BACKING_DEV": node.me.disk, "BLOCKREP_CONFIG": cfg.path,
               "BLOCKREP_HANDLER": name}
        env.update({f"BLOCKREP_{k}": str(v) for k, v in (extra or {}).items()})
        env.update({"DRBD_RESOURCE": cfg.name, "DRBD_PEER": node.peer_cfg.name,
                    "DRBD_CONF": cfg.path})
        return {**os.environ, **env}

    def fire(self, name: str, **extra) -> None:
        """Run a handler whose exit code changes nothing, in the background."""
        if not self.configured(name):
            return
        t = self.node.loop.create_task(self.run(name, **extra))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def run(self, name: str, timeout: float | None = None, **extra) -> int | None:
        """Run handler `name`; its exit code, or None (not configured, could not start,
        killed after the timeout)."""
        node, cfg = self.node, self.node.cfg
        cmd = cfg.handlers.get(name)
        if not cmd:
            return None
        timeout = cfg.handler_timeout if timeout is None else timeout
        t0 = node.loop.time()
        log.info("running %s handler: %s", name, cmd)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", cmd, env=self.environment(name, extra),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.error("%s handler could not run: %s", name, exc)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, 9)  # the shell and whatever it started
            except ProcessLookupError:
                pass
            await proc.wait()
            log.error("%s handler killed after %.0fs", name, timeout)
            rc, out = None, b""
        except asyncio.CancelledError:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            raise
        else:
            rc = proc.returncode
        text = out.decode(errors="replace").strip()
        self.runs += 1
        self.last = {"handler": name, "exit": rc, "seconds": round(node.loop.time() - t0, 3),
                     "output": text[-500:]}
        log.info("%s handler exited %s after %.2fs%s", name, rc, self.last["seconds"],
                 f": {text[-300:]}" if text else "")
        node.emit("handler", **self.last)
        return rc

    def cancel(self) -> None:
        for t in list(self.tasks):
            t.cancel()
