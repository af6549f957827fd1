"""One node of a replicated resource: the process behind `blockrep up`.

Owns: the node's states (role, disk, connection, replication), the peer connection's life
(dial, accept, handshake checks, timeouts, reconnect), what happens on connect (the sync
decision and its rule), role changes, the NBD frontend while Primary, and the admin socket.
Must not: parse wire formats (blockrep.peer / blockrep.nbd do), or decide sync direction
itself (blockrep.state.decide does); the write path lives in replication.py, resync in
resync.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from .. import sdnotify
from .. import state as st
from ..bitmap import Bitmap
from ..config import ResourceConfig
from ..disk import Disk
from ..nbd.constants import TransmissionFlag as TF
from ..nbd.handshake import Export
from ..peer import proto
from ..peer.proto import P
from ..state import ConnState, DiskState, ReplState, Role, Strategy
from .link import PeerLink
from .nbd_server import NbdServer
from .replication import Applier, Replicator
from . import verify as verify_mod
from .resync import ResyncSource, ResyncTarget

log = logging.getLogger("blockrep.node")

NBD_FLAGS = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
             | TF.SEND_DF | TF.SEND_CACHE | TF.SEND_FAST_ZERO | TF.CAN_MULTI_CONN)


class NodeError(Exception):
    """An operator request was refused; str() says why."""


class Node:
    def __init__(self, cfg: ResourceConfig, name: str, *, store=None):
        self.cfg = cfg
        self.me = cfg.node(name)
        self.name = self.me.name
        self.peer_cfg = cfg.peer_of(self.name)
        self.loop = asyncio.get_event_loop()
        self.store = store  # persistent metadata (blockrep.meta), or None: memory only
        if store is not None:
            self.disk = store.disk
            self.size = store.data_size
            self.gen = store.gen
            self.bitmap = store.bitmap
            self.disk_state = store.initial_disk_state()
        else:
            self.disk = Disk(self.me.disk)
            self.size = self.disk.size
            self.gen = st.Generation()
            self.bitmap = Bitmap(self.size)
            self.disk_state = DiskState.INCONSISTENT
        self.disk.size = self.size
        self.role = Role.SECONDARY
        self.conn = ConnState.CONNECTING
        self.repl = ReplState.OFF
        self.peer_role = Role.UNKNOWN
        self.peer_disk = DiskState.DUNKNOWN
        self.was_primary_flag = bool(store and store.was_primary)
        self.decision: st.Decision | None = None
        self.last_error = ""
        self.skip_initial_sync = False
        self.discard_my_data = False
        self.link: PeerLink | None = None
        self.handshaking: set[PeerLink] = set()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blockrep-io")
        self.replicator = Replicator(self)
        self.applier = Applier(self)
        self.resync_source: ResyncSource | None = None
        self.resync_target: ResyncTarget | None = None
        self.resync_task: asyncio.Task | None = None
        self.last_sync: dict | None = None
        self.resync_differing_bytes = 0
        self.verify = None  # set by blockrep.shell.verify while a verify runs
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.subscribers: list[asyncio.StreamWriter] = []
        self.nbd: NbdServer | None = None
        self.last_ping = 0.0
        self.handlers = {
            P.DATA: self.applier.on_data,
            P.TRIM: self.applier.on_trim,
            P.ZERO: self.applier.on_zero,
            P.BARRIER: self.applier.on_barrier,
            P.WRITE_ACK: self.replicator.on_write_ack,
            P.NEG_ACK: self.replicator.on_neg_ack,
            P.BARRIER_ACK: self.replicator.on_barrier_ack,
            P.RS_DATA: self._on_rs_data,
            P.RS_CSUM: self._on_rs_csum,
            P.RS_ACK: self._on_rs_ack,
            P.RS_REQUEST: self._on_rs_request,
            P.PING: self._on_ping,
            P.PING_ACK: lambda *a: None,
            P.CONTROL: self._on_control,
            P.REFUSE: self._on_refuse_established,
        }
        verify_mod.install(self)
        self.last_verify: dict | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_primary(self) -> bool:
        return self.role == Role.PRIMARY

    def replicating_link(self) -> PeerLink | None:
        """The link writes go to, or None (degraded: writes only set bitmap bits)."""
        link = self.link
        if link is None or link.closed or self.repl == ReplState.OFF:
            return None
        return link

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        host, port = self.me.address
        self.servers.append(await self.loop.create_server(
            lambda: PeerLink(self, outbound=False), host, port, reuse_address=True))
        export = Export(name=self.me.export, size=self.size, flags=NBD_FLAGS,
                        description=f"blockrep resource {self.cfg.name} on {self.name}")
        self.nbd = NbdServer(self.disk, export, submit=self.replicator.submit)
        self.nbd.refusal = self._nbd_refusal()
        await self.nbd.listen_tcp(*self.me.nbd)
        sock = self.cfg.admin_socket(self.name)
        if os.path.exists(sock):
            os.unlink(sock)
        self.servers.append(await asyncio.start_unix_server(self._admin_client, sock))
        self.tasks.append(self.loop.create_task(self._dialer()))
        self.tasks.append(self.loop.create_task(self._timer()))
        log.info("node %s of resource %s up: disk %s (%d bytes), %s, replication on %s:%d, "
                 "NBD on %s:%d, admin %s", self.name, self.cfg.name, self.me.disk, self.size,
                 self.disk_state.value, host, port, *self.me.nbd, sock)

    async def run(self) -> None:
        await self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.stop_event.set)
        sdnotify.ready(self)  # systemd Type=notify: attached and listening
        await self.stop_event.wait()
        sdnotify.stopping(self)
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting down")
        if self.nbd is not None:
            await self.nbd.close()
        for t in self.tasks:
            t.cancel()
        if self.resync_task is not None:
            self.resync_task.cancel()
        for link in list(self.handshaking) + ([self.link] if self.link else []):
            link.close("node going down")
        for srv in self.servers:
            srv.close()
        for w in self.subscribers:
            w.close()
        await asyncio.sleep(0)
        try:
            self.disk.flush()
        except OSError as exc:
            log.error("final flush failed: %s", exc)
        if self.store is not None:
            self.store.clean_shutdown(was_primary=self.is_primary)
        self.executor.shutdown(wait=True)
        self.disk.close()
        sock = self.cfg.admin_socket(self.name)
        if os.path.exists(sock):
            os.unlink(sock)
        log.info("down")

    def run_io(self, fn, done) -> None:
        """Run fn() in the I/O threads; call done(exc or None) back on the loop."""
        fut = self.loop.run_in_executor(self.executor, fn)
        fut.add_done_callback(lambda f: done(f.exception()))

    # -- peer connection management ----------------------------------------------------------
    async def _dialer(self) -> None:
        dials = self.name < self.peer_cfg.name  # one side dials, so links never cross
        while True:
            if (dials and self.conn != ConnState.STANDALONE and self.link is None
                    and not self.handshaking):
                host, port = self.peer_cfg.address
                try:
                    await asyncio.wait_for(self.loop.create_connection(
                        lambda: PeerLink(self, outbound=True), host, port),
                        timeout=self.cfg.timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    log.debug("connect to %s:%d failed: %s", host, port, exc)
            await asyncio.sleep(self.cfg.connect_interval)

    async def _timer(self) -> None:
        cfg = self.cfg
        tick = min(cfg.ping_interval, cfg.barrier_interval) / 2
        last_barrier = self.loop.time()
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for link in list(self.handshaking):
                if now - link.last_rx > cfg.timeout:
                    link.abort("handshake timed out")
            link = self.link
            if link is None or link.closed:
                continue
            if now - link.last_rx > cfg.timeout:
                log.error("peer %s: nothing received for %.1fs; declaring it lost",
                          self.peer_cfg.name, now - link.last_rx)
                link.abort(f"peer timed out after {cfg.timeout}s")
                continue
            if now - self.last_ping >= cfg.ping_interval:
                self.last_ping = now
                link.send(proto.pack_header(P.PING))
            if self.is_primary and now - last_barrier >= cfg.barrier_interval:
                last_barrier = now
                if self.repl != ReplState.OFF:
                    self.replicator.periodic_barrier(link)

    def on_link_made(self, link: PeerLink) -> None:
        if self.conn == ConnState.STANDALONE:
            link.abort("StandAlone: not accepting connections")
            return
        self.handshaking.add(link)

    def hello(self) -> dict:
        return {"version": proto.VERSION, "features": proto.FEATURES,
                "resource": self.cfg.name, "node": self.name, "size": self.size}

    def check_hello(self, body: dict) -> str | None:
        v = body.get("version")
        if v != proto.VERSION:
            return f"link protocol version {v!r} is not supported (this node speaks " \
                   f"{proto.VERSION})"
        if body.get("resource") != self.cfg.name:
            return (f"resource name differs: this node serves {self.cfg.name!r}, the peer "
                    f"offered {body.get('resource')!r}")
        if body.get("node") != self.peer_cfg.name:
            return (f"unexpected peer node {body.get('node')!r} (the configuration names "
                    f"{self.peer_cfg.name!r})")
        return None

    def auth_response(self, challenge: bytes) -> bytes:
        return proto.auth_response(self.cfg.shared_secret, challenge, self.name, self.cfg.name)

    def auth_ok(self, my_challenge: bytes, response: bytes) -> bool:
        return proto.auth_ok(self.cfg.shared_secret, my_challenge, self.peer_cfg.name,
                             self.cfg.name, response)

    def check_peer_after_auth(self, hello: dict) -> str | None:
        size = hello.get("size")
        if size != self.size:
            return (f"disk sizes differ: this node ({self.name}) has {self.size} bytes, "
                    f"the peer ({self.peer_cfg.name}) has {size} bytes")
        return None

    def local_state(self) -> dict:
        return {"role": self.role.value, "disk": self.disk_state.value,
                "gen": self.gen.to_wire(), "bitmap": self.bitmap.to_rle(),
                "was_primary": self.was_primary_flag or self.is_primary,
                "skip_initial_sync": self.skip_initial_sync,
                "discard_my_data": self.discard_my_data,
                "changes": self.bitmap.count()}

    def on_link_error(self, link: PeerLink, reason: str, refused_by_me: bool) -> None:
        self.last_error = reason
        self.emit("connection-error", reason=reason)

    def on_link_writable(self, link: PeerLink) -> None:
        if self.resync_source is not None:
            self.resync_source.wake.set()

    def on_link_established(self, link: PeerLink, body: dict) -> None:
        self.handshaking.discard(link)
        if self.link is not None and not self.link.closed:
            log.warning("a new connection from the peer replaces the old one")
            old = self.link
            old.abort("replaced by a new connection")
            self.on_link_lost(old, "replaced by a new connection")
        try:
            peer_role = Role(body["role"])
            peer_disk = DiskState(body["disk"])
            peer_gen = st.Generation.from_wire(body["gen"])
            peer_bits = Bitmap.from_rle(self.size, body.get("bitmap", []))
        except (KeyError, ValueError, TypeError) as exc:
            link.refuse(f"malformed state from the peer: {exc}")
            return
        self.link = link
        self.conn = ConnState.CONNECTED
        self.peer_role, self.peer_disk = peer_role, peer_disk
        self.last_error = ""
        d = st.decide(self.gen, peer_gen, my_bits=self.bitmap.count() > 0,
                      peer_bits=peer_bits.count() > 0,
                      i_was_primary=self.was_primary_flag or self.is_primary,
                      peer_was_primary=bool(body.get("was_primary")) or
                      peer_role == Role.PRIMARY,
                      i_win_ties=self.name < self.peer_cfg.name)
        d = self._apply_overrides(d, body, peer_bits)
        self.decision = d
        log.info("connected to %s (%s, %s, gen %s); my gen %s; decision: %s",
                 self.peer_cfg.name, peer_role.value, peer_disk.value, peer_gen.short(),
                 self.gen.short(), d)
        self.emit("connected", peer=self.peer_cfg.name, decision=d.strategy.value,
                  rule=d.rule)
        s = d.strategy
        both_primary = self.is_primary and peer_role == Role.PRIMARY
        if both_primary and s not in (Strategy.SPLIT_BRAIN, Strategy.UNRELATED):
            # data first (a split brain is reported as such), then the role conflict
            self._refuse_connection(link, "both nodes are Primary (single-primary mode); "
                                          "demote one of them, then 'blockrep connect'",
                                    standalone=True)
            return
        if s in (Strategy.SPLIT_BRAIN, Strategy.UNRELATED):
            what = "split brain detected" if s == Strategy.SPLIT_BRAIN else "unrelated data"
            msg = (f"{what} (rule: {d.rule}); both nodes keep their data. Resolve with "
                   f"'blockrep connect --discard-my-data' on the node whose changes are to "
                   f"be thrown away")
            log.error("%s", msg)
            self._refuse_connection(link, msg, standalone=True, tell_peer=False)
            return
        if s in (Strategy.TARGET, Strategy.TARGET_FULL) and self.is_primary:
            self._refuse_connection(link, f"this node is Primary but would have to become "
                                          f"sync target ({d}); demote it first",
                                    standalone=True)
            return
        if s == Strategy.NO_SYNC:
            self.repl = ReplState.ESTABLISHED
            same = self.gen.current == peer_gen.current
            if same and DiskState.INCONSISTENT not in (self.disk_state, peer_disk):
                # nobody wrote without the other (that would have made a new current
                # identifier): the two disks hold the same, newest data
                self.set_disk(DiskState.UP_TO_DATE)
                peer_disk = self.peer_disk = DiskState.UP_TO_DATE
            if d.rule == "initial-sync-skipped":
                self.gen.sync_finished_as_source()
            if d.rule == "initial-sync-skipped-by-peer":
                self.gen.adopt(peer_gen)
                self.bitmap.clear_all()
                self.set_disk(DiskState.UP_TO_DATE)
            if self.disk_state == DiskState.UP_TO_DATE and peer_disk != DiskState.UP_TO_DATE \
                    and self.gen.current == peer_gen.current:
                self.peer_disk = DiskState.UP_TO_DATE
            self.skip_initial_sync = False
        elif s in (Strategy.SOURCE, Strategy.SOURCE_FULL):
            if s == Strategy.SOURCE_FULL:
                self.bitmap.set_all()
            else:
                self.bitmap |= peer_bits
            self.bitmap_changed()
            self._start_resync_source(link, csum=self._csum_mode(d))
        elif s in (Strategy.TARGET, Strategy.TARGET_FULL):
            self.repl = ReplState.SYNC_TARGET
            self.set_disk(DiskState.INCONSISTENT)
            total = self.size if s == Strategy.TARGET_FULL else \
                (Bitmap(self.size, self.bitmap.words.copy()).__ior__(peer_bits)).count_bytes()
            self.resync_target = ResyncTarget(self, total, csum=False)
        else:  # BOTH_NEW
            self.repl = ReplState.ESTABLISHED
        self.discard_my_data = False
        self.persist()
        self.send_state()

    def _apply_overrides(self, d: st.Decision, body: dict, peer_bits: Bitmap) -> st.Decision:
        """Operator choices and opt-in policies that change the plain decision."""
        if d.strategy == Strategy.SOURCE_FULL and d.rule == "peer-current-zero" and \
                self.skip_initial_sync:
            return st.Decision(Strategy.NO_SYNC, "initial-sync-skipped")
        if d.strategy == Strategy.TARGET_FULL and d.rule == "my-current-zero" and \
                body.get("skip_initial_sync"):
            return st.Decision(Strategy.NO_SYNC, "initial-sync-skipped-by-peer")
        if d.strategy in (Strategy.SPLIT_BRAIN, Strategy.UNRELATED):
            if self.discard_my_data and not self.is_primary:
                return st.Decision(Strategy.TARGET_FULL if d.strategy == Strategy.UNRELATED
                                   else Strategy.TARGET, f"discard-my-data ({d.rule})")
            if body.get("discard_my_data") and body.get("role") != Role.PRIMARY.value:
                return st.Decision(Strategy.SOURCE_FULL if d.strategy == Strategy.UNRELATED
                                   else Strategy.SOURCE, f"peer-discards-its-data ({d.rule})")
            if d.strategy == Strategy.SPLIT_BRAIN:
                return self._split_brain_policy(d, body, peer_bits)
        return d

    def _split_brain_policy(self, d: st.Decision, body: dict, peer_bits: Bitmap):
        peer_primary = body.get("role") == Role.PRIMARY.value
        policy = self.cfg.after_sb_1pri if (self.is_primary or peer_primary) else \
            self.cfg.after_sb_0pri
        mine, theirs = self.bitmap.count(), peer_bits.count()
        lose = None  # "me" or "peer": whose changes are discarded
        if policy == "discard-zero-changes":
            if mine == 0 and theirs > 0:
                lose = "me"
            elif theirs == 0 and mine > 0:
                lose = "peer"
        elif policy == "discard-least-changes":
            if mine != theirs:
                lose = "me" if mine < theirs else "peer"
            else:  # tie: the lower node name keeps its data, deterministically on both sides
                lose = "peer" if self.name < self.peer_cfg.name else "me"
        elif policy == "discard-secondary":
            if self.is_primary != peer_primary:
                lose = "peer" if self.is_primary else "me"
        if lose == "me" and self.is_primary:
            lose = None  # never throw away a running primary's data automatically
        if lose is None:
            return d
        rule = f"after-split-brain policy {policy} ({d.rule}; changes: mine {mine}, " \
               f"peer {theirs})"
        log.warning("split brain auto-recovery: discarding %s changes by %s",
                    "this node's" if lose == "me" else "the peer's", rule)
        return st.Decision(Strategy.TARGET if lose == "me" else Strategy.SOURCE, rule)

    def _csum_mode(self, d: st.Decision) -> bool:
        """Checksum-based resync after a primary crash: the activity-log extents are
        mostly equal on both sides, so only blocks whose CRC32C differs travel."""
        return d.rule.startswith("current-equal")

    def _refuse_connection(self, link: PeerLink, msg: str, *, standalone: bool,
                           tell_peer: bool = True) -> None:
        self.last_error = msg
        self.emit("connection-refused", reason=msg)
        if tell_peer:
            link.send_control(P.REFUSE, {"reason": msg, "standalone": standalone})
        link.close(msg)
        if standalone:
            self.conn = ConnState.STANDALONE

    def on_link_lost(self, link: PeerLink, reason: str) -> None:
        self.handshaking.discard(link)
        if link is not self.link:
            return
        self.link = None
        was = self.repl
        self.repl = ReplState.OFF
        if self.conn != ConnState.STANDALONE:
            self.conn = ConnState.CONNECTING
        self.peer_role, self.peer_disk = Role.UNKNOWN, DiskState.DUNKNOWN
        if self.resync_source is not None:
            self.resync_source.cancel()
            self.resync_source = None
        self.resync_target = None
        self.replicator.drain_waiting()  # held-back writes now go local-only
        if self.verify is not None:
            self.verify.cancel("connection lost")
        self.replicator.link_lost()
        if self.is_primary and was != ReplState.OFF:
            self.gen.start_new_data()
        if self.store is not None:
            self.store.flush_bitmap()  # bits set for unacknowledged writes must survive
        self.persist()
        log.warning("lost peer %s: %s (out of sync: %d bytes)", self.peer_cfg.name, reason,
                    self.bitmap.count_bytes())
        self.emit("disconnected", reason=reason, out_of_sync_bytes=self.bitmap.count_bytes())

    # -- established-link packet handlers ----------------------------------------------------
    def _on_ping(self, link, *a):
        link.send(proto.pack_header(P.PING_ACK))

    def _on_refuse_established(self, link, flags, pid, offset, size, crc, payload):
        body = proto.decode_control(payload)
        reason = f"peer refused: {body.get('reason', '')}"
        log.error("%s", reason)
        self.last_error = reason
        if body.get("standalone"):  # the refusal needs the operator: stop reconnecting
            self.conn = ConnState.STANDALONE
        link.close(reason)

    def _on_rs_data(self, link, *a):
        if self.resync_target is None:
            raise proto.LinkProtocolError("resync data while not sync target")
        self.resync_target.on_rs_data(link, *a)

    def _on_rs_csum(self, link, *a):
        if self.resync_target is None:
            raise proto.LinkProtocolError("resync checksums while not sync target")
        self.resync_target.on_rs_csum(link, *a)

    def _on_rs_ack(self, link, *a):
        if self.resync_source is not None:
            self.resync_source.on_rs_ack(link, *a)

    def _on_rs_request(self, link, *a):
        if self.resync_source is None:
            raise proto.LinkProtocolError("resync request while not sync source")
        self.resync_source.on_rs_request(link, *a)

    def _on_control(self, link, flags, pid, offset, size, crc, payload):
        body = proto.decode_control(payload)
        op = body.get("op")
        handler = _CONTROL_OPS.get(op)
        if handler is None:
            raise proto.LinkProtocolError(f"unknown control operation {op!r}")
        handler(self, link, body)

    def _ctl_state(self, link, body):
        try:
            self.peer_role = Role(body["role"])
            self.peer_disk = DiskState(body["disk"])
        except (KeyError, ValueError) as exc:
            raise proto.LinkProtocolError(f"bad state update: {exc}") from None
        self.emit("peer-state", role=self.peer_role.value, disk=self.peer_disk.value)

    def _ctl_sync_start(self, link, body):
        if self.resync_target is not None:
            self.resync_target.progress.total = int(body.get("total", 0))
            self.resync_target.csum = bool(body.get("csum"))

    def _ctl_sync_done(self, link, body):
        if self.resync_target is None:
            raise proto.LinkProtocolError("sync-done while not sync target")
        progress = self.resync_target.progress
        self.gen.adopt(st.Generation.from_wire(body["gen"]))
        self.bitmap.clear_all()
        self.resync_target = None
        self.repl = ReplState.ESTABLISHED
        self.set_disk(DiskState.UP_TO_DATE)
        self.last_sync = {"role": "SyncTarget", **progress.as_dict(self.loop.time())}
        log.info("resync finished as target: %s", self.last_sync)
        self.emit("resync-finished", **self.last_sync)
        self.persist()
        self.send_state()

    def _ctl_renegotiate(self, link, body):
        link.close("peer asked to renegotiate")

    def _ctl_verify(self, link, body):
        verify_mod.on_verify_control(self, link, body)

    # -- resync ------------------------------------------------------------------------------
    def _start_resync_source(self, link: PeerLink, csum: bool) -> None:
        self.repl = ReplState.SYNC_SOURCE
        self.peer_disk = DiskState.INCONSISTENT
        src = self.resync_source = ResyncSource(self, link, csum=csum)
        link.send_control(P.CONTROL, {"op": "sync-start", "total": src.progress.total,
                                      "csum": csum})
        log.info("resync started as source: %d bytes to copy%s", src.progress.total,
                 " (checksum mode)" if csum else "")
        self.emit("resync-started", total_bytes=src.progress.total, csum=csum)
        self.resync_task = self.loop.create_task(self._run_resync(src, link))

    async def _run_resync(self, src: ResyncSource, link: PeerLink) -> None:
        try:
            ok = await src.run()
        except Exception:
            log.exception("resync failed")
            link.abort("resync failed")
            return
        if not ok or link.closed or self.resync_source is not src:
            return
        self.resync_source = None
        self.replicator.drain_waiting()
        self.gen.sync_finished_as_source()
        self.repl = ReplState.ESTABLISHED
        self.peer_disk = DiskState.UP_TO_DATE
        link.send_control(P.CONTROL, {"op": "sync-done", "gen": self.gen.to_wire()})
        self.last_sync = {"role": "SyncSource", **src.progress.as_dict(self.loop.time())}
        log.info("resync finished as source: %s", self.last_sync)
        self.emit("resync-finished", **self.last_sync)
        self.persist()

    # -- hooks from the write paths ----------------------------------------------------------
    def mark_out_of_sync(self, offset: int, length: int) -> None:
        # in memory only: on disk the activity log covers these blocks until their extent
        # leaves it (its bitmap words are written then), and link loss flushes the bitmap
        self.bitmap.set_range(offset, length)

    def bitmap_changed(self) -> None:
        if self.store is not None:
            self.store.bitmap_changed()

    def note_local_write(self, offset: int, length: int) -> None:
        """Before a local write as Primary: the activity log must cover its extents."""
        if self.store is not None:
            r = self.replicator
            if r.tl:
                oldest = min(r.tl)
            else:
                oldest = r.epoch if self.replicating_link() is not None else 1 << 62
            self.store.activity(offset, length, r.epoch, oldest)

    # -- state helpers -----------------------------------------------------------------------
    def set_disk(self, new: DiskState) -> None:
        if new != self.disk_state:
            log.info("disk: %s -> %s", self.disk_state.value, new.value)
            self.disk_state = new
            self.emit("disk", disk=new.value)

    def send_state(self) -> None:
        link = self.link
        if link is not None and not link.closed and link.phase == "established":
            link.send_control(P.CONTROL, {"op": "state", "role": self.role.value,
                                          "disk": self.disk_state.value})

    def persist(self) -> None:
        if self.store is not None:
            self.store.save_state(disk_state=self.disk_state, was_primary=self.is_primary)

    def _nbd_refusal(self) -> str | None:
        if self.is_primary:
            return None
        return (f"resource {self.cfg.name} is Secondary on node {self.name}; promote it with "
                f"'blockrep primary'")

    @property
    def nbd_clients(self) -> int:
        return len(self.nbd.connections) if self.nbd else 0

    # -- operator commands -------------------------------------------------------------------
    def cmd_primary(self, force: bool = False, skip_initial_sync: bool = False) -> str:
        if self.is_primary:
            return "already Primary"
        connected = self.link is not None and self.repl != ReplState.OFF
        reason = st.check_promote(role=self.role, disk=self.disk_state,
                                  peer_role=self.peer_role, connected=self.link is not None,
                                  force=force)
        if reason:
            raise NodeError(f"primary refused: {reason}")
        if self.repl == ReplState.SYNC_TARGET and not force:
            raise NodeError("primary refused: a resync to this node is running")
        renegotiate = False
        if self.disk_state != DiskState.UP_TO_DATE:  # --force
            log.warning("forced promotion: declaring the local data UpToDate")
            if self.gen.current == 0:
                self.gen.current = st.new_uuid()
            else:
                self.gen.start_new_data()
            self.bitmap.clear_all()
            self.set_disk(DiskState.UP_TO_DATE)
            self.skip_initial_sync = skip_initial_sync
            renegotiate = self.link is not None
        elif not connected:
            self.gen.start_new_data()  # writes from now on are new data the peer lacks
        self.role = Role.PRIMARY
        self.was_primary_flag = True
        self.persist()  # the "primary" flag is on disk before any write is served
        self.nbd.refusal = None
        self.emit("role", role=self.role.value)
        log.info("role: Secondary -> Primary")
        if renegotiate:
            self.link.send_control(P.CONTROL, {"op": "renegotiate"})
            self.link.close("renegotiating after forced promotion")
        else:
            self.send_state()
        return "Primary"

    def cmd_secondary(self) -> str:
        reason = st.check_demote(role=self.role, nbd_clients=self.nbd_clients)
        if reason:
            raise NodeError(f"secondary refused: {reason}")
        if not self.is_primary:
            return "already Secondary"
        self.role = Role.SECONDARY
        self.nbd.refusal = self._nbd_refusal()
        link = self.replicating_link()
        if link is not None:
            self.replicator.close_epoch(link, flush=True)
        self.was_primary_flag = False
        self.persist()
        self.emit("role", role=self.role.value)
        log.info("role: Primary -> Secondary")
        self.send_state()
        return "Secondary"

    def cmd_connect(self, discard_my_data: bool = False) -> str:
        if discard_my_data:
            if self.is_primary:
                raise NodeError("connect --discard-my-data refused: this node is Primary")
            self.discard_my_data = True
        if self.conn == ConnState.STANDALONE:
            self.conn = ConnState.CONNECTING
            self.emit("connection", connection=self.conn.value)
        return self.conn.value

    def cmd_disconnect(self) -> str:
        self.conn = ConnState.STANDALONE
        for link in list(self.handshaking):
            link.close("disconnected by the operator")
        if self.link is not None:
            self.link.close("disconnected by the operator")
        self.emit("connection", connection=self.conn.value)
        return self.conn.value

    def cmd_down(self) -> str:
        if self.nbd_clients:
            raise NodeError(f"down refused: {self.nbd_clients} NBD client(s) attached")
        self.stop_event.set()
        return "going down"

    def status(self) -> dict:
        now = self.loop.time()
        sync = None
        if self.resync_source is not None:
            sync = self.resync_source.progress.as_dict(now)
            sync["window"] = self.resync_source.cur_window
        elif self.resync_target is not None:
            sync = self.resync_target.progress.as_dict(now)
        r, a = self.replicator, self.applier
        link = self.link
        return {
            "resource": self.cfg.name,
            "node": self.name,
            "role": self.role.value,
            "disk": self.disk_state.value,
            "connection": self.conn.value,
            "replication": self.repl.value,
            "peer": {"name": self.peer_cfg.name, "role": self.peer_role.value,
                     "disk": self.peer_disk.value},
            "out_of_sync_bytes": self.bitmap.count_bytes(),
            "size_bytes": self.size,
            "decision": ({"strategy": self.decision.strategy.value, "rule": self.decision.rule}
                         if self.decision else None),
            "last_error": self.last_error,
            "generation": {"current": f"{self.gen.current:016X}",
                           "bitmap": f"{self.gen.bitmap:016X}",
                           "history": [f"{h:016X}" for h in self.gen.history]},
            "sync": sync,
            "last_sync": self.last_sync,
            "verify": self.verify.status(now) if self.verify is not None else
            self.last_verify,
            "nbd": {"address": f"{self.me.nbd[0]}:{self.me.nbd[1]}",
                    "export": self.me.export, "clients": self.nbd_clients,
                    "serving": self.is_primary},
            "counters": {
                "writes_replicated": r.writes_replicated,
                "bytes_replicated": r.bytes_replicated,
                "writes_local_only": r.writes_local_only,
                "writes_pending_peer": len(r.pending),
                "writes_applied": a.writes_applied,
                "bytes_applied": a.bytes_applied,
                "link_bytes_sent": link.bytes_sent if link else 0,
                "link_bytes_received": link.bytes_received if link else 0,
                "resync_differing_bytes": self.resync_differing_bytes,
            },
            "metadata": self.store.describe() if self.store is not None else None,
        }

    # -- events ------------------------------------------------------------------------------
    def emit(self, kind: str, **fields) -> None:
        sdnotify.state_changed(self)
        if not self.subscribers:
            return
        line = (json.dumps({"event": kind, "time": round(self.loop.time(), 3),
                            "node": self.name, **fields}) + "\n").encode()
        for w in list(self.subscribers):
            if w.is_closing():
                self.subscribers.remove(w)
            else:
                w.write(line)

    # -- admin socket ------------------------------------------------------------------------
    async def _admin_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    cmd = req.get("cmd")
                    if cmd == "events":
                        writer.write((json.dumps({"ok": True, "result": self.status()})
                                      + "\n").encode())
                        self.subscribers.append(writer)
                        continue
                    fn = _ADMIN.get(cmd)
                    if fn is None:
                        raise NodeError(f"unknown command {cmd!r}")
                    result = fn(self, **req.get("args", {}))
                    if asyncio.iscoroutine(result):
                        result = await result
                    reply = {"ok": True, "result": result}
                except NodeError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except (ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer in self.subscribers:
                self.subscribers.remove(writer)
            writer.close()


_CONTROL_OPS = {
    "state": Node._ctl_state,
    "sync-start": Node._ctl_sync_start,
    "sync-done": Node._ctl_sync_done,
    "renegotiate": Node._ctl_renegotiate,
    "verify": Node._ctl_verify,
}


_ADMIN = {
    "status": Node.status,
    "primary": Node.cmd_primary,
    "secondary": Node.cmd_secondary,
    "connect": Node.cmd_connect,
    "disconnect": Node.cmd_disconnect,
    "down": Node.cmd_down,
    "verify": verify_mod.start_verify,
    "invalidate": verify_mod.invalidate,
    "resync": verify_mod.resync,
}
