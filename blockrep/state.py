"""States in DRBD's names, generation identifiers, and the decisions made from them.

Owns: the state enums; the rule that picks a sync direction on connect (`decide`, returning
the strategy *and the rule that chose it*, as a typed `Rule`); the step after it that applies
the operator's choices and the after-split-brain policies (`resolve`); what may follow a
decision on the link (`check_established`); and the preconditions of every operator command
(`check_promote`, `check_demote`, `check_connect`, `check_down`, `check_verify`,
`check_resync`, `check_invalidate`), each returning a named `Verdict` (DRBD's SS_* results).
Must not: do I/O or keep time; callers log and apply the decisions.
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
    DISKLESS = "Diskless"


# no local disk to read or write: detached after an I/O error (on-io-error = detach)
NO_DISK = frozenset({DiskState.FAILED, DiskState.DISKLESS})


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
    AHEAD = "Ahead"    # Primary, send buffer congested (pull-ahead): writes stay local
    BEHIND = "Behind"  # its peer: told which ranges went out of sync, resync follows


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
        """[current, bitmap, [history...]] from the peer; ValueError unless every field
        is an unsigned 64-bit integer (what the superblock stores)."""
        if not isinstance(v, (list, tuple)) or len(v) != 3 or \
                not isinstance(v[2], (list, tuple)):
            raise ValueError(f"generation is not [current, bitmap, [history]]: {v!r:.80}")
        cur, bm, hist = v
        for x in (cur, bm, *hist):
            if type(x) is not int or not 0 <= x < 1 << 64:
                raise ValueError(f"generation field {x!r:.40} is not a 64-bit unsigned "
                                 f"integer")
        return cls(cur, bm, list(hist)[:HISTORY_LEN])

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


class Rule(str, enum.Enum):
    """The rule behind a Decision: one of decide()'s, or an override resolve() applied."""
    BOTH_CURRENT_ZERO = "both-current-zero"
    MY_CURRENT_ZERO = "my-current-zero"
    PEER_CURRENT_ZERO = "peer-current-zero"
    CURRENT_EQUAL = "current-equal"
    CURRENT_EQUAL_I_WAS_PRIMARY = "current-equal-i-was-primary"
    CURRENT_EQUAL_PEER_WAS_PRIMARY = "current-equal-peer-was-primary"
    CURRENT_EQUAL_BITS_SET = "current-equal-bits-set"
    CURRENT_EQUAL_BITS_SET_TIE = "current-equal-bits-set-tie"
    MY_BITMAP_EQUALS_PEER_CURRENT = "my-bitmap-equals-peer-current"
    PEER_BITMAP_EQUALS_MY_CURRENT = "peer-bitmap-equals-my-current"
    BITMAPS_EQUAL_CURRENTS_DIFFER = "bitmaps-equal-currents-differ"
    BOTH_CHANGED_SINCE_COMMON_ANCESTOR = "both-changed-since-common-ancestor"
    PEER_CURRENT_IN_MY_HISTORY = "peer-current-in-my-history"
    MY_CURRENT_IN_PEER_HISTORY = "my-current-in-peer-history"
    NO_COMMON_ANCESTOR = "no-common-ancestor"
    # overrides (resolve): `Decision.base` holds the rule they replaced
    INITIAL_SYNC_SKIPPED = "initial-sync-skipped"
    INITIAL_SYNC_SKIPPED_BY_PEER = "initial-sync-skipped-by-peer"
    DISCARD_MY_DATA = "discard-my-data"
    PEER_DISCARDS_ITS_DATA = "peer-discards-its-data"
    AFTER_SB_POLICY = "after-split-brain-policy"


# same data generation, bits set: a connected Primary crashed (its activity-log extents)
_AFTER_CRASH = frozenset({Rule.CURRENT_EQUAL_I_WAS_PRIMARY, Rule.CURRENT_EQUAL_PEER_WAS_PRIMARY,
                          Rule.CURRENT_EQUAL_BITS_SET, Rule.CURRENT_EQUAL_BITS_SET_TIE})


@dataclass(frozen=True)
class Decision:
    strategy: Strategy
    rule: Rule
    base: Rule | None = None  # for an override: the rule of the decision it replaced
    policy: "SbPolicy | None" = None  # for AFTER_SB_POLICY: which one
    detail: str = ""          # for AFTER_SB_POLICY: what it weighed

    @property
    def checksum_resync(self) -> bool:
        """Resync by checksums: after a connected Primary crashed, the activity-log extents
        marked on both sides are mostly equal, so only blocks whose checksum differs need
        to travel."""
        return self.rule in _AFTER_CRASH

    def describe(self) -> str:
        """The rule as the operator reads it, e.g. "discard-my-data (no-common-ancestor)"."""
        if self.base is None or self.rule in (Rule.INITIAL_SYNC_SKIPPED,
                                               Rule.INITIAL_SYNC_SKIPPED_BY_PEER):
            return self.rule.value
        if self.rule == Rule.AFTER_SB_POLICY:
            return f"after-split-brain policy {self.policy.value} ({self.base.value}; " \
                   f"{self.detail})"
        return f"{self.rule.value} ({self.base.value})"

    def __str__(self) -> str:
        return f"{self.strategy.value} (rule: {self.describe()})"


def decide(me: Generation, peer: Generation, *, my_bits: bool, peer_bits: bool,
           i_was_primary: bool, peer_was_primary: bool,
           i_win_ties: bool = True) -> Decision:
    """Which way to sync on connect. First matching rule wins (DRBD's uuid comparison).

    `i_win_ties` must be True on exactly one of the two nodes (the node with the lower
    name): it breaks the one tie the data cannot (same generation, both sides changed
    blocks, neither or both were Primary), so both sides reach mirrored decisions."""
    R = Rule
    if me.current == 0 and peer.current == 0:
        return Decision(Strategy.BOTH_NEW, R.BOTH_CURRENT_ZERO)
    if me.current == 0:
        return Decision(Strategy.TARGET_FULL, R.MY_CURRENT_ZERO)
    if peer.current == 0:
        return Decision(Strategy.SOURCE_FULL, R.PEER_CURRENT_ZERO)
    if me.current == peer.current:
        if not (my_bits or peer_bits):
            return Decision(Strategy.NO_SYNC, R.CURRENT_EQUAL)
        # same data generation but bits set (a crash of a connected primary): the node
        # that was primary holds the newest writes
        if i_was_primary and not peer_was_primary:
            return Decision(Strategy.SOURCE, R.CURRENT_EQUAL_I_WAS_PRIMARY)
        if peer_was_primary and not i_was_primary:
            return Decision(Strategy.TARGET, R.CURRENT_EQUAL_PEER_WAS_PRIMARY)
        if my_bits != peer_bits:
            return Decision(Strategy.SOURCE if my_bits else Strategy.TARGET,
                            R.CURRENT_EQUAL_BITS_SET)
        return Decision(Strategy.SOURCE if i_win_ties else Strategy.TARGET,
                        R.CURRENT_EQUAL_BITS_SET_TIE)
    if me.bitmap and me.bitmap == peer.current:
        return Decision(Strategy.SOURCE, R.MY_BITMAP_EQUALS_PEER_CURRENT)
    if peer.bitmap and peer.bitmap == me.current:
        return Decision(Strategy.TARGET, R.PEER_BITMAP_EQUALS_MY_CURRENT)
    if me.bitmap and me.bitmap == peer.bitmap:
        return Decision(Strategy.SPLIT_BRAIN, R.BITMAPS_EQUAL_CURRENTS_DIFFER)
    if (me.bitmap and me.bitmap in peer.history) or (peer.bitmap and peer.bitmap in me.history):
        return Decision(Strategy.SPLIT_BRAIN, R.BOTH_CHANGED_SINCE_COMMON_ANCESTOR)
    if peer.current in me.history or (me.bitmap and peer.current == me.bitmap):
        return Decision(Strategy.SOURCE_FULL, R.PEER_CURRENT_IN_MY_HISTORY)
    if me.current in peer.history:
        return Decision(Strategy.TARGET_FULL, R.MY_CURRENT_IN_PEER_HISTORY)
    return Decision(Strategy.UNRELATED, R.NO_COMMON_ANCESTOR)


# -- the step after decide: operator choices and after-split-brain policies ----------------------

class SbPolicy(str, enum.Enum):
    """after-sb-0pri / after-sb-1pri (DRBD's names)."""
    DISCONNECT = "disconnect"
    DISCARD_ZERO_CHANGES = "discard-zero-changes"
    DISCARD_LEAST_CHANGES = "discard-least-changes"
    DISCARD_YOUNGER_PRIMARY = "discard-younger-primary"
    DISCARD_SECONDARY = "discard-secondary"


@dataclass(frozen=True)
class Side:
    """What one node brings to resolve(): its role, its changes, the operator's choices."""
    primary: bool = False
    changes: int = 0              # bitmap bits set
    skip_initial_sync: bool = False
    discard_my_data: bool = False


def resolve(d: Decision, me: Side, peer: Side, *, after_sb_0pri: str = "disconnect",
            after_sb_1pri: str = "disconnect", i_win_ties: bool = True) -> Decision:
    """Apply operator choices and opt-in policies to decide()'s plain decision.

    Mirrored on both nodes (each passes itself as `me`; `i_win_ties` as for decide)."""
    s = d.strategy
    if s == Strategy.SOURCE_FULL and d.rule == Rule.PEER_CURRENT_ZERO and me.skip_initial_sync:
        return Decision(Strategy.NO_SYNC, Rule.INITIAL_SYNC_SKIPPED, d.rule)
    if s == Strategy.TARGET_FULL and d.rule == Rule.MY_CURRENT_ZERO and peer.skip_initial_sync:
        return Decision(Strategy.NO_SYNC, Rule.INITIAL_SYNC_SKIPPED_BY_PEER, d.rule)
    if s not in (Strategy.SPLIT_BRAIN, Strategy.UNRELATED):
        return d
    full = s == Strategy.UNRELATED
    if me.discard_my_data and not me.primary:
        return Decision(Strategy.TARGET_FULL if full else Strategy.TARGET,
                        Rule.DISCARD_MY_DATA, d.rule)
    if peer.discard_my_data and not peer.primary:
        return Decision(Strategy.SOURCE_FULL if full else Strategy.SOURCE,
                        Rule.PEER_DISCARDS_ITS_DATA, d.rule)
    if full:
        return d
    policy = SbPolicy(after_sb_1pri if (me.primary or peer.primary) else after_sb_0pri)
    lose = _sb_loser(policy, me, peer, i_win_ties)
    if lose == "me" and me.primary:
        lose = None  # never throw away a running primary's data automatically
    if lose is None:
        return d
    return Decision(Strategy.TARGET if lose == "me" else Strategy.SOURCE, Rule.AFTER_SB_POLICY,
                    d.rule, policy, f"changes: mine {me.changes}, peer {peer.changes}")


def _sb_loser(policy: SbPolicy, me: Side, peer: Side, i_win_ties: bool) -> str | None:
    """Whose changes a policy discards: "me", "peer", or None (it cannot tell)."""
    mine, theirs = me.changes, peer.changes
    if policy == SbPolicy.DISCARD_ZERO_CHANGES:
        if mine == 0 and theirs > 0:
            return "me"
        if theirs == 0 and mine > 0:
            return "peer"
    elif policy == SbPolicy.DISCARD_LEAST_CHANGES:
        if mine != theirs:
            return "me" if mine < theirs else "peer"
        return "peer" if i_win_ties else "me"  # tie: deterministic on both sides
    elif policy == SbPolicy.DISCARD_SECONDARY:
        if me.primary != peer.primary:
            return "peer" if me.primary else "me"
    return None


# -- named results ------------------------------------------------------------------------------

class Rv(str, enum.Enum):
    """What a state change request comes to (DRBD's enum drbd_state_rv, SS_*)."""
    SUCCESS = "success"
    NOTHING_TO_DO = "nothing-to-do"
    PEER_PRIMARY = "peer-primary"
    DISK_FAILED = "disk-failed"
    NO_UP_TO_DATE_DISK = "no-up-to-date-disk"
    RESYNC_RUNNING = "resync-running"
    NBD_CLIENTS_ATTACHED = "nbd-clients-attached"
    IS_PRIMARY = "is-primary"
    NOT_CONNECTED = "not-connected"
    NOT_ESTABLISHED = "not-established"
    VERIFY_RUNNING = "verify-running"
    DISKS_NOT_UP_TO_DATE = "disks-not-up-to-date"
    PEER_DISK_NOT_USABLE = "peer-disk-not-usable"
    # after decide, on the link
    BOTH_PRIMARY = "both-primary"
    SPLIT_BRAIN = "split-brain"
    UNRELATED_DATA = "unrelated-data"
    PRIMARY_WOULD_BE_TARGET = "primary-would-be-sync-target"


@dataclass(frozen=True)
class Verdict:
    rv: Rv
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.rv not in (Rv.SUCCESS, Rv.NOTHING_TO_DO)


OK = Verdict(Rv.SUCCESS)


@dataclass(frozen=True)
class Facts:
    """What the preconditions look at: one node's states at the moment of a request."""
    role: Role = Role.SECONDARY
    disk: DiskState = DiskState.UP_TO_DATE
    conn: ConnState = ConnState.CONNECTED
    repl: ReplState = ReplState.ESTABLISHED
    peer_role: Role = Role.SECONDARY
    peer_disk: DiskState = DiskState.UP_TO_DATE
    linked: bool = True           # a link to the peer is established
    nbd_clients: int = 0          # attached NBD clients
    verify_running: bool = False
    out_of_sync_bytes: int = 0


def check_promote(f: Facts, *, force: bool = False) -> Verdict:
    if f.role == Role.PRIMARY:
        return Verdict(Rv.NOTHING_TO_DO, "already Primary")
    if f.linked and f.peer_role == Role.PRIMARY:
        return Verdict(Rv.PEER_PRIMARY,
                       "the peer is Primary (single-primary mode); demote it first")
    if f.disk in NO_DISK:
        # never, not even forced: the data on a detached disk is older than what clients
        # were told is written (everything after the I/O error went to the peer only)
        return Verdict(Rv.DISK_FAILED, f"the local disk has failed ({f.disk.value}: "
                       f"detached after an I/O error); replace it and 'blockrep attach' it first")
    if f.disk != DiskState.UP_TO_DATE and not force:
        return Verdict(Rv.NO_UP_TO_DATE_DISK, f"the local disk is {f.disk.value}, not "
                       f"UpToDate (use --force to override)")
    if f.repl == ReplState.SYNC_TARGET and not force:
        return Verdict(Rv.RESYNC_RUNNING, "a resync to this node is running")
    return OK


def check_demote(f: Facts) -> Verdict:
    if f.role != Role.PRIMARY:
        return Verdict(Rv.NOTHING_TO_DO, "already Secondary")
    if f.nbd_clients:
        return Verdict(Rv.NBD_CLIENTS_ATTACHED, f"{f.nbd_clients} NBD client(s) attached; "
                       f"disconnect them first")
    return OK


def check_connect(f: Facts, *, discard_my_data: bool = False) -> Verdict:
    if discard_my_data and f.role == Role.PRIMARY:
        return Verdict(Rv.IS_PRIMARY, "this node is Primary")
    return OK


def check_down(f: Facts) -> Verdict:
    if f.nbd_clients:
        return Verdict(Rv.NBD_CLIENTS_ATTACHED, f"{f.nbd_clients} NBD client(s) attached")
    return OK


def check_verify(f: Facts) -> Verdict:
    if not f.linked or f.repl == ReplState.OFF:
        return Verdict(Rv.NOT_CONNECTED, "not connected to the peer")
    if f.repl != ReplState.ESTABLISHED:
        return Verdict(Rv.NOT_ESTABLISHED,
                       f"replication is {f.repl.value}, not Established")
    if f.verify_running:
        return Verdict(Rv.VERIFY_RUNNING, "a verify is already running")
    if f.disk != DiskState.UP_TO_DATE or f.peer_disk != DiskState.UP_TO_DATE:
        return Verdict(Rv.DISKS_NOT_UP_TO_DATE, f"disks are {f.disk.value}/"
                       f"{f.peer_disk.value}, not both UpToDate")
    return OK


def check_resync(f: Facts) -> Verdict:
    if f.out_of_sync_bytes == 0:
        return Verdict(Rv.NOTHING_TO_DO, "nothing out of sync")
    if f.disk in NO_DISK or f.peer_disk in NO_DISK:
        return Verdict(Rv.DISK_FAILED, f"disks are {f.disk.value}/{f.peer_disk.value}: a "
                       f"detached disk takes no resync ('blockrep attach' it first)")
    if not f.linked:
        return Verdict(Rv.NOT_CONNECTED, "not connected to the peer")
    if f.repl != ReplState.ESTABLISHED:
        return Verdict(Rv.NOT_ESTABLISHED, f"replication is {f.repl.value}")
    return OK


def check_invalidate(f: Facts) -> Verdict:
    if f.role == Role.PRIMARY:
        return Verdict(Rv.IS_PRIMARY, "this node is Primary")
    if f.peer_disk not in (DiskState.UP_TO_DATE, DiskState.DUNKNOWN):
        return Verdict(Rv.PEER_DISK_NOT_USABLE, f"the peer's disk is {f.peer_disk.value}")
    return OK


def check_established(d: Decision, *, i_am_primary: bool, peer_primary: bool) -> Verdict:
    """May the link go on after decision `d`? A refusal here needs the operator (the node
    goes StandAlone). Data first (a split brain is reported as such), then roles."""
    s = d.strategy
    if s in (Strategy.SPLIT_BRAIN, Strategy.UNRELATED):
        what = "split brain detected" if s == Strategy.SPLIT_BRAIN else "unrelated data"
        return Verdict(Rv.SPLIT_BRAIN if s == Strategy.SPLIT_BRAIN else Rv.UNRELATED_DATA,
                       f"{what} (rule: {d.describe()}); both nodes keep their data. Resolve "
                       f"with 'blockrep connect --discard-my-data' on the node whose "
                       f"changes are to be thrown away")
    if i_am_primary and peer_primary:
        return Verdict(Rv.BOTH_PRIMARY, "both nodes are Primary (single-primary mode); "
                       "demote one of them, then 'blockrep connect'")
    if s in (Strategy.TARGET, Strategy.TARGET_FULL) and i_am_primary:
        return Verdict(Rv.PRIMARY_WOULD_BE_TARGET, f"this node is Primary but would have to "
                       f"become sync target ({d}); demote it first")
    return OK
