"""What an established link leads to: the peer's state in, the sync decision
(blockrep.state: decide, resolve, check_established), a refusal (the node goes StandAlone),
or replication: no sync, or a resync as source or target.

Owns: taking over an established link (replacing an older one), applying a decision to the
node (through its setters) and refusing a connection.
Must not: decide (blockrep.state does), move resync data (resync_source.py, resync_target.py do) or bytes
(link.py does); node.py calls in here from `on_link_established`.
"""

from __future__ import annotations

import logging

from .. import state as st
from ..peer import messages, proto
from ..peer.proto import P
from ..state import ConnState, DiskState, ReplState, Role, Strategy
from .resync_source import start_source
from .resync_target import start_target

log = logging.getLogger("blockrep.node")


def established(node, link, body: dict) -> None:
    """An authenticated link handed over the peer's state: decide, refuse or apply."""
    node.handshaking.discard(link)
    if node.link is not None and not node.link.closed:
        log.warning("a new connection from the peer replaces the old one")
        old = node.link
        old.abort("replaced by a new connection")
        node.on_link_lost(old, "replaced by a new connection")
    try:
        ps = messages.peer_state(body, node.size)
    except proto.LinkProtocolError as exc:
        link.refuse(str(exc))
        return
    peer_role, peer_disk, peer_gen = ps.role, ps.disk, ps.gen
    peer_bits = ps.changes  # how many bits; the bitmap itself follows if a resync needs it
    node.link = link
    node.set_connection(ConnState.CONNECTED)
    node.peer_role, node.peer_disk = peer_role, peer_disk
    node.applier.peer_protocol = str(body.get("protocol", "C"))
    node.congestion.configure(link)
    if node.disk_state in st.NO_DISK or peer_disk in st.NO_DISK:
        # a detached disk takes part in no resync and decides nothing: the link carries
        # state only; a Primary marks every write out of sync (replicating_link is None),
        # a Diskless Primary's I/O goes through an UpToDate peer holding its data again
        why = node.diskless.check_reconnect(peer_role, peer_disk, peer_gen)
        if why:
            log.error("%s", why)
            refuse(node, link, why, standalone=True)
            return
        log.info("connected to %s (%s, %s); disks %s/%s: no resync while detached",
                 node.peer_cfg.name, peer_role.value, peer_disk.value,
                 node.disk_state.value, peer_disk.value)
        node.emit("connected", peer=node.peer_cfg.name, decision="none", rule="diskless")
        node.set_replication(ReplState.ESTABLISHED)
        node.send_state()
        return
    node.last_error = ""
    d = st.decide(node.gen, peer_gen, my_bits=node.bitmap.count() > 0,
                  peer_bits=peer_bits > 0,
                  i_was_primary=node.was_primary_flag or node.is_primary,
                  peer_was_primary=bool(body.get("was_primary")) or
                  peer_role == Role.PRIMARY,
                  i_win_ties=node.name < node.peer_cfg.name)
    d = st.resolve(d, st.Side(primary=node.is_primary, changes=node.bitmap.count(),
                              skip_initial_sync=node.skip_initial_sync,
                              discard_my_data=node.discard_my_data),
                   st.Side(primary=peer_role == Role.PRIMARY, changes=peer_bits,
                           skip_initial_sync=bool(body.get("skip_initial_sync")),
                           discard_my_data=bool(body.get("discard_my_data"))),
                   after_sb_0pri=node.cfg.after_sb_0pri,
                   after_sb_1pri=node.cfg.after_sb_1pri,
                   i_win_ties=node.name < node.peer_cfg.name)
    node.decision = d
    log.info("connected to %s (%s, %s, gen %s); my gen %s; decision: %s",
             node.peer_cfg.name, peer_role.value, peer_disk.value, peer_gen.short(),
             node.gen.short(), d)
    if d.rule == st.Rule.AFTER_SB_POLICY:
        log.warning("split brain auto-recovery: %s", d)
        node.hooks.fire("initial-split-brain")
    node.emit("connected", peer=node.peer_cfg.name, decision=d.strategy.value,
              rule=d.describe())
    v = st.check_established(d, i_am_primary=node.is_primary,
                             peer_primary=peer_role == Role.PRIMARY)
    if v.refused:
        # on a split brain both sides see it: nobody needs to be told
        quiet = v.rv in (st.Rv.SPLIT_BRAIN, st.Rv.UNRELATED_DATA)
        if quiet:
            log.error("%s", v.reason)
        if v.rv == st.Rv.SPLIT_BRAIN:
            node.hooks.fire("initial-split-brain")
            node.hooks.fire("split-brain")
        refuse(node, link, v.reason, standalone=True, tell_peer=not quiet)
        return
    node.fencer.peer_connected()
    s = d.strategy
    if s == Strategy.NO_SYNC:
        node.set_replication(ReplState.ESTABLISHED)
        same = node.gen.current == peer_gen.current
        if same and DiskState.INCONSISTENT not in (node.disk_state, peer_disk):
            # nobody wrote without the other (that would have made a new current
            # identifier): the two disks hold the same, newest data
            node.set_disk(DiskState.UP_TO_DATE)
            peer_disk = node.peer_disk = DiskState.UP_TO_DATE
        if d.rule == st.Rule.INITIAL_SYNC_SKIPPED:
            node.gen.sync_finished_as_source()
        if d.rule == st.Rule.INITIAL_SYNC_SKIPPED_BY_PEER:
            node.gen.adopt(peer_gen)
            node.bitmap.clear_all()
            node.set_disk(DiskState.UP_TO_DATE)
        if node.disk_state == DiskState.UP_TO_DATE and peer_disk != DiskState.UP_TO_DATE \
                and node.gen.current == peer_gen.current:
            node.peer_disk = DiskState.UP_TO_DATE
        node.skip_initial_sync = False
        if node.disk_state == node.peer_disk == DiskState.UP_TO_DATE:
            node.fencer.peer_up_to_date()
    elif s in (Strategy.SOURCE, Strategy.SOURCE_FULL):
        # checksum mode after a Primary crash (mostly equal extents), or for every resync
        # when csums-after-crash-only = false (rewritten or copied data)
        start_source(node, link, full=s == Strategy.SOURCE_FULL,
                     csum=d.checksum_resync or not node.cfg.csums_after_crash_only,
                     peer_gen=peer_gen)
    elif s in (Strategy.TARGET, Strategy.TARGET_FULL):
        start_target(node, link, full=s == Strategy.TARGET_FULL,
                     total=node.size if s == Strategy.TARGET_FULL else 0)
    else:  # BOTH_NEW
        node.set_replication(ReplState.ESTABLISHED)
    node.discard_my_data = False
    node.persist()
    node.send_state()


def refuse(node, link, msg: str, *, standalone: bool,
           tell_peer: bool = True) -> None:
    node.last_error = msg
    node.emit("connection-refused", reason=msg)
    if tell_peer:
        link.send_control(P.REFUSE, {"reason": msg, "standalone": standalone})
    link.close(msg)
    if standalone:
        node.set_connection(ConnState.STANDALONE)
