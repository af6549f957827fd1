"""Online verify: both sides of the block comparison.

Verify: the verify source walks the whole device in 1 MiB requests; for each it reads its
blocks, sends their digests (P_OV_REQUEST; `verify-alg`, blockrep.digest, agreed on in the
handshake), and the target compares them with its own and answers with the indexes of the
blocks that differ (P_OV_REPLY). Both sides set those blocks in their bitmaps; a resync
(`blockrep resync`, or any reconnect) then copies them.
The Primary drives a verify (if it is asked on the Secondary, it asks the Primary): the
Primary reads a range and queues the request in one loop step, ordered in the stream with
its application writes, so concurrent writes cause no false reports. Writes still landing
in the I/O threads are waited for on both sides: the source reads a range only when no
local write to it is running, and the target compares in the applier's order (after every
earlier write of the stream to that range has landed).

Owns: the verify source's walk and window, the target's comparison, and the node's verify
slot (`Verifier`: which verify runs, the last result, their start and end).
Must not: set node states except through the node's setters; node.py lists the verify
packets in its packet table; admin.py runs the command after blockrep.state's check.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from .. import digest
from ..bitmap import BLOCK
from ..peer import proto
from ..peer.proto import P
from ..state import ReplState
from .resync import Progress


CHUNK = 1 << 20
WINDOW = 8
_HDR = proto.frame
_crc = proto.native.crc32c

log = logging.getLogger("blockrep.verify")



class Verify:
    def __init__(self, node, link):
        self.node = node
        self.link = link
        self.progress = Progress(node.size, node.loop.time())
        self.inflight: dict[int, tuple[int, int]] = {}
        self.next_id = 1
        self.found_blocks = 0
        self.state = "running"
        self.wake = asyncio.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        if self.state == "running":
            self.state = "cancelled"
            self.reason = reason
        self.wake.set()

    def status(self, now: float) -> dict:
        d = self.progress.as_dict(now)
        return {"state": self.state, "percent": d["percent"], "done_bytes": d["done_bytes"],
                "total_bytes": d["total_bytes"], "rate_bytes_per_s": d["rate_bytes_per_s"],
                "eta_s": d["eta_s"], "found_blocks": self.found_blocks,
                "found_bytes": self.found_blocks * BLOCK, "reason": self.reason}

    async def run(self) -> None:
        node, link = self.node, self.link
        size = node.size
        off = 0
        while off < size and self.state == "running":
            while len(self.inflight) >= WINDOW or link.congested:
                self.wake.clear()
                await self.wake.wait()
                if self.state != "running":
                    break
            if self.state != "running" or link.closed:
                break
            ln = min(CHUNK, size - off)
            if node.replicator.landing(off, ln):
                await node.replicator.wait_landed(off, ln)
                if self.state != "running" or link.closed:
                    break
            pid = self.next_id
            self.next_id += 1
            self.inflight[pid] = (off, ln)
            sums = digest.block_digests(node.link_params.verify_alg, node.disk.read(off, ln))
            link.send(_HDR(P.OV_REQUEST, 0, pid, off, ln, len(sums), _crc(sums)), sums)
            off += ln
        while self.inflight and self.state == "running" and not link.closed:
            self.wake.clear()
            await self.wake.wait()
        if self.state == "running":
            self.state = "done"

    def tell_peer_done(self) -> None:
        link = self.link
        if link is self.node.link and not link.closed:
            link.send_control(P.CONTROL, {"op": "verify", "action": "done",
                                          "found_blocks": self.found_blocks})

    def on_reply(self, link, flags, pid, offset, size, crc, payload) -> None:
        rng = self.inflight.pop(pid, None)
        if rng is None:
            return
        n = len(payload) // 4
        for idx in struct.unpack(f"<{n}I", payload):
            self.node.mark_out_of_sync(rng[0] + idx * BLOCK, BLOCK)
        self.found_blocks += n
        self.progress.add(rng[1], self.node.loop.time())
        self.wake.set()


class VerifyTarget:
    """The peer's side: compare, mark, answer."""

    def __init__(self, node):
        self.node = node
        self.found_blocks = 0
        self.progress = Progress(node.size, node.loop.time())
        self.state = "running"
        self.reason = ""

    def cancel(self, reason: str) -> None:
        self.state = "cancelled"
        self.reason = reason

    def status(self, now: float) -> dict:
        d = self.progress.as_dict(now)
        return {"state": self.state, "role": "VerifyT", "percent": d["percent"],
                "found_blocks": self.found_blocks, "found_bytes": self.found_blocks * BLOCK,
                "reason": self.reason}

    def on_request(self, link, flags, pid, offset, size, crc, payload) -> None:
        node = self.node
        alg = node.link_params.verify_alg
        if offset + size > node.size or len(payload) != digest.count(alg, size):
            raise proto.LinkProtocolError("malformed verify request")
        diff = digest.differing(alg, digest.block_digests(alg, node.disk.read(offset, size)),
                                payload)
        for i in diff:
            node.mark_out_of_sync(offset + i * BLOCK, BLOCK)
        self.found_blocks += len(diff)
        self.progress.add(size, node.loop.time())
        body = struct.pack(f"<{len(diff)}I", *diff)
        link.send(_HDR(P.OV_REPLY, 0, pid, offset, size, len(body), _crc(body)), body)


class Verifier:
    """The node's verify slot: the verify running here (as source or target) and the last
    result; starts and ends them (the replication state through the node's setter)."""

    def __init__(self, node):
        self.node = node
        self.current: Verify | VerifyTarget | None = None
        self.last: dict | None = None

    def status(self, now: float) -> dict | None:
        return self.current.status(now) if self.current is not None else self.last

    def start(self, link) -> None:
        """Run a verify as its source (the Primary, or either node when both are Secondary)."""
        node = self.node
        v = self.current = Verify(node, link)
        node.set_replication(ReplState.VERIFY_SOURCE)
        node.emit("verify-started", role="VerifyS")
        log.info("online verify started (%d bytes)", node.size)
        node.tasks.append(node.loop.create_task(self._run(v)))

    async def _run(self, v: Verify) -> None:
        await v.run()
        self._finished(v)
        v.tell_peer_done()

    def cancel(self, reason: str) -> None:
        if self.current is not None:
            self.current.cancel(reason)

    def on_request(self, link, flags, pid, offset, size, crc, payload) -> None:  # P_OV_REQUEST
        if not isinstance(self.current, VerifyTarget):
            self.current = VerifyTarget(self.node)
            self.node.set_replication(ReplState.VERIFY_TARGET)
            self.node.emit("verify-started", role="VerifyT")
        v = self.current
        # compare only once the stream's earlier writes to this range have landed
        self.node.applier.ordered(link, offset, size, payload,
                                  lambda p: v.on_request(link, flags, pid, offset, size, crc, p))

    def on_reply(self, link, *a) -> None:  # P_OV_REPLY
        if isinstance(self.current, Verify):
            self.current.on_reply(link, *a)

    def on_control(self, link, body: dict) -> None:
        action = body.get("action")
        if action == "start":  # the Secondary's operator asked for a verify
            if self.current is None and self.node.repl == ReplState.ESTABLISHED:
                self.start(link)
        elif action == "done":
            if isinstance(self.current, VerifyTarget):
                self.current.state = "done"
                self._finished(self.current)
        else:
            raise proto.LinkProtocolError(f"unknown verify action {action!r}")

    def _finished(self, v: Verify | VerifyTarget) -> None:
        node = self.node
        self.last = v.status(node.loop.time())
        self.current = None
        if node.repl in (ReplState.VERIFY_SOURCE, ReplState.VERIFY_TARGET):
            node.set_replication(ReplState.ESTABLISHED)
        node.persist()
        if node.store is not None:
            node.store.flush_bitmap()  # what verify found is not covered by the AL
        log.info("verify %s: %d out-of-sync block(s) found (%d bytes)", v.state,
                 v.found_blocks, v.found_blocks * BLOCK)
        node.emit("verify-finished", **self.last)
        if v.found_blocks:
            node.hooks.fire("out-of-sync", OUT_OF_SYNC_BYTES=v.found_blocks * BLOCK,
                            OUT_OF_SYNC_BLOCKS=v.found_blocks)
