"""States in DRBD's names, generation identifiers, and the decisions made from them.

Owns: the state enums, the rule that picks a sync direction on connect (returning the
strategy *and the rule that chose it*), and the checks that refuse role changes (returning
a reason). Must not: do I/O or keep time; callers log and apply the decisions.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

HISTORY_LEN = 4


class Role(str, enum.Enum):
    PRIMARY = "Primary"
    SECONDARY = "Secondary"
    UNKNOWN = "Unknown"


class DiskState(str, enum.Enum):
    UP_TO_DATE = "UpToDate"
    INCONSISTENT = "Inconsistent"
    OUTDATED = "Outdated"
    DUNKNOWN = "DUnknown"
    FAILED = "Failed"


class ConnState(str, enum.Enum):
    STANDALONE = "StandAlone"
    CONNECTING = "Connecting"
    CONNECTED = "Connected"


class ReplState(str, enum.Enum):
    OFF = "Off"
    ESTABLISHED = "Established"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    VERIFY_SOURCE = "VerifyS"
    VERIFY_TARGET = "VerifyT"


def new_uuid() -> int:
    """A random non-zero 64-bit generation identifier (bit 0 clear, as DRBD does)."""
    while True:
        v = struct.unpack("<Q", os.urandom(8))[0] & ~1
        if v:
            return v


@dataclass
class Generation:
    current: int = 0
    bitmap: int = 0
    history: list[int] = field(default_factory=list)

    def to_wire(self) -> list:
        return [self.current, self.bitmap, list(self.history)]

    @classmethod
    def from_wire(cls, v) -> "Generation":
        cur, bm, hist = v
        return cls(int(cur), int(bm), [int(h) for h in hist][:HISTORY_LEN])

    def start_new_data(self) -> None:
        """A primary writes without its peer: keep `current` as the bitmap's base."""
        if self.bitmap == 0:
            self.bitmap = self.current
        else:
            self._push(self.current)
        self.current = new_uuid()

    def sync_finished_as_source(self) -> None:
        if self.bitmap:
            self._push(self.bitmap)
        self.bitmap = 0

    def adopt(self, source: "Generation") -> None:
        """Sync target at the end of a resync: take the source's identity."""
        self.current = source.current
        self.bitmap = 0
        self.history = list(source.history)[:HISTORY_LEN]

    def _push(self, uuid: int) -> None:
        if uuid and uuid not in self.history:
            self.history.insert(0, uuid)
            del self.history[HISTORY_LEN:]

    def short(self) -> str:
        return (f"{self.current:016X}:{self.bitmap:016X}:"
                + ":".join(f"{h:016X}" for h in self.history))


class Strategy(str, enum.Enum):
    NO_SYNC = "no-sync"
    SOURCE = "sync-source"            # bitmap-based, this node sends
    TARGET = "sync-target"            # bitmap-based, this node receives
    SOURCE_FULL = "full-sync-source"
    TARGET_FULL = "full-sync-target"
    SPLIT_BRAIN = "split-brain"
    UNRELATED = "unrelated-data"
    BOTH_NEW = "both-new"             # neither side has been made UpToDate yet


@dataclass(frozen=True)
class Decision:
    strategy: Strategy
    rule: str

    def __str__(self) -> str:
        return f"{self.strategy.value} (rule: {self.rule})"


def decide(me: Generation, peer: Generation, *, my_bits: bool, peer_bits: bool,
           i_was_primary: bool, peer_was_primary: bool,
           i_win_ties: bool = True) -> Decision:
    """Which way to sync on connect. First matching rule wins (DRBD's uuid comparison).

    `i_win_ties` must be True on exactly one of the two nodes (the node with the lower
    name): it breaks the one tie the data cannot (same generation, both sides changed
    blocks, neither or both were Primary), so both sides reach mirrored decisions."""
    if me.current == 0 and peer.current == 0:
        return Decision(Strategy.BOTH_NEW, "both-current-zero")
    if me.current == 0:
        return Decision(Strategy.TARGET_FULL, "my-current-zero")
    if peer.current == 0:
        return Decision(Strategy.SOURCE_FULL, "peer-current-zero")
    if me.current == peer.current:
        if not (my_bits or peer_bits):
            return Decision(Strategy.NO_SYNC, "current-equal")
        # same data generation but bits set (a crash of a connected primary): the node
        # that was primary holds the newest writes
        if i_was_primary and not peer_was_primary:
            return Decision(Strategy.SOURCE, "current-equal-i-was-primary")
        if peer_was_primary and not i_was_primary:
            return Decision(Strategy.TARGET, "current-equal-peer-was-primary")
        if my_bits != peer_bits:
            return Decision(Strategy.SOURCE if my_bits else Strategy.TARGET,
                            "current-equal-bits-set")
        return Decision(Strategy.SOURCE if i_win_ties else Strategy.TARGET,
                        "current-equal-bits-set-tie")
    if me.bitmap and me.bitmap == peer.current:
        return Decision(Strategy.SOURCE, "my-bitmap-equals-peer-current")
    if peer.bitmap and peer.bitmap == me.current:
        return Decision(Strategy.TARGET, "peer-bitmap-equals-my-current")
    if me.bitmap and me.bitmap == peer.bitmap:
        return Decision(Strategy.SPLIT_BRAIN, "bitmaps-equal-currents-differ")
    if (me.bitmap and me.bitmap in peer.history) or (peer.bitmap and peer.bitmap in me.history):
        return Decision(Strategy.SPLIT_BRAIN, "both-changed-since-common-ancestor")
    if peer.current in me.history or (me.bitmap and peer.current == me.bitmap):
        return Decision(Strategy.SOURCE_FULL, "peer-current-in-my-history")
    if me.current in peer.history:
        return Decision(Strategy.TARGET_FULL, "my-current-in-peer-history")
    return Decision(Strategy.UNRELATED, "no-common-ancestor")


def check_promote(*, role: Role, disk: DiskState, peer_role: Role, connected: bool,
                  force: bool) -> str | None:
    """None if `primary` may proceed, else the reason it is refused."""
    if role == Role.PRIMARY:
        return None
    if connected and peer_role == Role.PRIMARY:
        return "the peer is Primary (single-primary mode); demote it first"
    if disk == DiskState.FAILED:
        return "the local disk has failed"
    if disk != DiskState.UP_TO_DATE and not force:
        return f"the local disk is {disk.value}, not UpToDate (use --force to override)"
    return None


def check_demote(*, role: Role, nbd_clients: int) -> str | None:
    if role == Role.SECONDARY:
        return None
    if nbd_clients:
        return f"{nbd_clients} NBD client(s) attached; disconnect them first"
    return None
