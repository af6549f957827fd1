"""The bodies of the link's control messages, checked at the boundary (sans-IO).

Owns: turning a decoded control map (`proto.decode_control`) into typed values for the node:
the peer's state at connect (P_STATE), state updates and the CONTROL operations. Every
malformed body raises `LinkProtocolError` (one line); nothing else escapes.
Must not: touch sockets, disks or the node.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..state import DiskState, Generation, Role
from .proto import LinkProtocolError


@dataclass
class PeerState:
    role: Role
    disk: DiskState
    gen: Generation
    changes: int  # bits set in the peer's bitmap (the bitmap itself travels in P_BITMAP)


def peer_state(body: dict, size: int) -> PeerState:
    """P_STATE at connect: role, disk state, generation and how many bits are set."""
    try:
        changes = body["changes"]
        nbits = -(-size // 4096)
        if type(changes) is not int or not 0 <= changes <= nbits:
            raise ValueError(f"bad bit count {changes!r:.40} (the device has {nbits} blocks)")
        return PeerState(Role(body["role"]), DiskState(body["disk"]),
                         Generation.from_wire(body["gen"]), changes)
    except KeyError as exc:
        raise LinkProtocolError(f"malformed state from the peer: no {exc}") from None
    except ValueError as exc:
        raise LinkProtocolError(f"malformed state from the peer: {exc}") from None


def state_update(body: dict) -> tuple[Role, DiskState]:
    """CONTROL op=state: the peer's new role and disk state."""
    try:
        return Role(body["role"]), DiskState(body["disk"])
    except (KeyError, ValueError) as exc:
        raise LinkProtocolError(f"bad state update: {exc}") from None


def control_op(body: dict) -> str:
    """CONTROL: the operation's name."""
    op = body.get("op")
    if not isinstance(op, str):
        raise LinkProtocolError(f"control message without an operation name: {op!r:.40}")
    return op


def sync_start(body: dict) -> tuple[int, bool, int]:
    """CONTROL op=sync-start: bytes to copy, checksum mode, the sync identifier."""
    total = body.get("total", 0)
    if type(total) is not int or not 0 <= total < 1 << 64:
        raise LinkProtocolError(f"sync-start: bad total {total!r:.40}")
    uuid = body.get("uuid")
    if type(uuid) is not int or not 0 < uuid < 1 << 64:
        raise LinkProtocolError(f"sync-start: bad sync identifier {uuid!r:.40}")
    return total, bool(body.get("csum")), uuid


def sync_done(body: dict) -> Generation:
    """CONTROL op=sync-done: the generation the target adopts."""
    if "gen" not in body:
        raise LinkProtocolError("sync-done without a generation")
    try:
        return Generation.from_wire(body["gen"])
    except ValueError as exc:
        raise LinkProtocolError(f"sync-done: {exc}") from None
