"""Online verify, `resync` and `invalidate`.

Verify: the verify source walks the whole device in 1 MiB requests; for each it reads its
blocks, sends their CRC32C (P_OV_REQUEST), and the target compares them with its own and
answers with the indexes of the blocks that differ (P_OV_REPLY). Both sides set those blocks
in their bitmaps; a resync (`blockrep resync`, or any reconnect) then copies them.
The Primary drives a verify (if it is asked on the Secondary, it asks the Primary): the
Primary reads a range and queues the request in one loop step, ordered in the stream with
its application writes, so concurrent writes cause no false reports.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from ..bitmap import BLOCK
from ..peer import proto
from ..peer.proto import P
from ..state import DiskState, Generation, ReplState, Role
from .resync import Progress

log = logging.getLogger("blockrep.verify")

CHUNK = 1 << 20
WINDOW = 8
_HDR = proto.HEADER.pack



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
            pid = self.next_id
            self.next_id += 1
            self.inflight[pid] = (off, ln)
            sums = proto.native.crc32c_blocks(node.disk.read(off, ln), BLOCK)
            link.send(_HDR(proto.MAGIC, P.OV_REQUEST, 0, pid, off, ln, len(sums), 0), sums)
            off += ln
        while self.inflight and self.state == "running" and not link.closed:
            self.wake.clear()
            await self.wake.wait()
        if self.state == "running":
            self.state = "done"
        node.last_verify = self.status(node.loop.time())
        node.verify = None
        if node.repl in (ReplState.VERIFY_SOURCE,):
            node.repl = ReplState.ESTABLISHED
        node.persist()
        if node.store is not None:
            node.store.flush_bitmap()  # what verify found is not covered by the AL
        log.info("verify %s: %d out-of-sync block(s) found (%d bytes)", self.state,
                 self.found_blocks, self.found_blocks * BLOCK)
        node.emit("verify-finished", **node.last_verify)
        if link is node.link and not link.closed:
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
        if offset + size > node.size or len(payload) != 4 * (-(-size // BLOCK)):
            raise proto.LinkProtocolError("malformed verify request")
        mine = proto.native.crc32c_blocks(node.disk.read(offset, size), BLOCK)
        diff = []
        if mine != bytes(payload):
            for i in range(len(mine) // 4):
                if mine[4 * i:4 * i + 4] != payload[4 * i:4 * i + 4]:
                    diff.append(i)
                    node.mark_out_of_sync(offset + i * BLOCK, BLOCK)
        self.found_blocks += len(diff)
        self.progress.add(size, node.loop.time())
        body = struct.pack(f"<{len(diff)}I", *diff)
        link.send(_HDR(proto.MAGIC, P.OV_REPLY, 0, pid, offset, size, len(body), 0), body)


def _on_ov_request(node, link, *a):
    if not isinstance(node.verify, VerifyTarget):
        node.verify = VerifyTarget(node)
        node.repl = ReplState.VERIFY_TARGET
        node.emit("verify-started", role="VerifyT")
    node.verify.on_request(link, *a)


def _on_ov_reply(node, link, *a):
    if isinstance(node.verify, Verify):
        node.verify.on_reply(link, *a)


def install(node) -> None:
    node.handlers[P.OV_REQUEST] = lambda link, *a: _on_ov_request(node, link, *a)
    node.handlers[P.OV_REPLY] = lambda link, *a: _on_ov_reply(node, link, *a)


def start_verify(node) -> str:
    from .node import NodeError
    link = node.link
    if link is None or node.repl == ReplState.OFF:
        raise NodeError("verify refused: not connected to the peer")
    if node.repl != ReplState.ESTABLISHED:
        raise NodeError(f"verify refused: replication is {node.repl.value}, not Established")
    if node.verify is not None:
        raise NodeError("verify refused: a verify is already running")
    if DiskState.UP_TO_DATE != node.disk_state or DiskState.UP_TO_DATE != node.peer_disk:
        raise NodeError(f"verify refused: disks are {node.disk_state.value}/"
                        f"{node.peer_disk.value}, not both UpToDate")
    if not node.is_primary and node.peer_role == Role.PRIMARY:
        link.send_control(P.CONTROL, {"op": "verify", "action": "start"})
        return f"verify started on the Primary ({node.peer_cfg.name})"
    return _start_here(node, link)


def _start_here(node, link) -> str:
    v = node.verify = Verify(node, link)
    node.repl = ReplState.VERIFY_SOURCE
    node.emit("verify-started", role="VerifyS")
    log.info("online verify started (%d bytes)", node.size)
    node.loop.create_task(v.run())
    return "verify started"


def on_verify_control(node, link, body: dict) -> None:
    action = body.get("action")
    if action == "start":
        if node.verify is None and node.repl == ReplState.ESTABLISHED:
            _start_here(node, link)
    elif action == "done":
        if isinstance(node.verify, VerifyTarget):
            v = node.verify
            v.state = "done"
            node.last_verify = v.status(node.loop.time())
            node.verify = None
            node.repl = ReplState.ESTABLISHED
            node.persist()
            if node.store is not None:
                node.store.flush_bitmap()
            log.info("verify finished (target): %d out-of-sync block(s)", v.found_blocks)
            node.emit("verify-finished", **node.last_verify)
    else:
        raise proto.LinkProtocolError(f"unknown verify action {action!r}")


def resync(node) -> str:
    """Repair what verify (or anything else) marked: renegotiate, the rules pick the way."""
    from .node import NodeError
    if node.bitmap.count() == 0:
        return "nothing out of sync"
    link = node.link
    if link is None:
        raise NodeError("resync refused: not connected to the peer")
    if node.repl != ReplState.ESTABLISHED:
        raise NodeError(f"resync refused: replication is {node.repl.value}")
    link.send_control(P.CONTROL, {"op": "renegotiate"})
    link.close("renegotiating to resync out-of-sync blocks")
    return f"resync of {node.bitmap.count_bytes()} bytes requested"


def invalidate(node) -> str:
    """Throw away the local data: a full resync from the peer follows."""
    from .node import NodeError
    if node.is_primary:
        raise NodeError("invalidate refused: this node is Primary")
    if node.peer_disk not in (DiskState.UP_TO_DATE, DiskState.DUNKNOWN):
        raise NodeError(f"invalidate refused: the peer's disk is {node.peer_disk.value}")
    node.gen.__dict__.update(Generation().__dict__)
    node.bitmap.set_all()
    node.set_disk(DiskState.INCONSISTENT)
    node.persist()
    if node.link is not None:
        node.link.send_control(P.CONTROL, {"op": "renegotiate"})
        node.link.close("invalidated: renegotiating for a full resync")
    return "local data invalidated; a full resync from the peer follows"
