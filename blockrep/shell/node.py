"""One node of a replicated resource: the process behind `blockrep up`.

Owns: the node's life cycle, its states and their setters (`set_role`, `set_connection`,
`set_replication`, `set_disk`: each logs `old -> new` once and emits one event), the peer
connection's life (dial, accept, handshake checks, timeouts, reconnect, link loss), the packet
table of an established link, the resync life cycle, the I/O thread pool.
Must not: parse wire formats (blockrep.peer / blockrep.nbd), decide sync direction or whether a
command may run (blockrep.state), apply the decision on connect (connect.py), serve the admin
socket or render status (admin.py); the write path is replication.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from .. import sdnotify
from .. import state as st
from ..bitmap import Bitmap
from ..config import ResourceConfig
from ..disk import Disk
from ..nbd.handshake import make_export
from ..peer import compress, messages, proto
from ..peer.handshake import HandshakeParams, Refused
from ..peer.proto import P
from ..state import NO_DISK, ConnState, DiskState, ReplState, Role
from . import connect, diskfail, diskless
from . import tls as tls_mod
from .admin import AdminServer
from .congestion import Congestion
from .fencing import Fencer
from .handlers import Handlers
from .link import PeerLink, Rejections
from .nbd_limits import NbdLimits, server_tls
from .nbd_server import NbdServer
from .bitmap_io import BitmapExchange, BitmapWriter
from .applier import Applier
from .replication import Replicator
from . import resync_source, resync_target
from .verify import Verifier

log = logging.getLogger("blockrep.node")


_LOCAL_ONLY = (ReplState.OFF, ReplState.AHEAD)  # nothing is shipped to the peer


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
        self.peer_role, self.peer_disk = Role.UNKNOWN, DiskState.DUNKNOWN
        self.was_primary_flag = bool(store and store.was_primary)
        self.decision: st.Decision | None = None
        self.last_error = ""
        self.skip_initial_sync = False
        self.discard_my_data = False
        self.link: PeerLink | None = None
        self.handshaking: set[PeerLink] = set()
        self.dials = self.name < self.peer_cfg.name  # one side dials, so links never cross
        self.link_params = HandshakeParams(
            resource=cfg.name, me=self.name, peer=self.peer_cfg.name, tls=cfg.tls,
            secret=cfg.shared_secret.encode(), size=self.size, timeout=cfg.handshake_timeout,
            csums_alg=cfg.csums_alg, verify_alg=cfg.verify_alg,
            features=proto.FEATURES | compress.features(cfg.compression))
        self._tls = tls_mod.link_contexts(self.me) if cfg.tls else None
        self.rejections = Rejections()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blockrep-io")
        self.diskfail = diskfail.DiskFailure(self)  # on-io-error
        self.diskless = diskless.Diskless(self)  # a Diskless Primary's I/O through the peer
        self.applier = Applier(self)
        self.replicator = Replicator(self)
        self.hooks = Handlers(self)  # [handlers] (shell/handlers.py)
        self.fencer = Fencer(self)
        self.congestion = Congestion(self)
        self.resync_source: resync_source.ResyncSource | None = None
        self.resync_target: resync_target.ResyncTarget | None = None
        self.resync_task: asyncio.Task | None = None
        self.bitmap_writer = BitmapWriter(self)
        self.bitmap_exchange: BitmapExchange | None = None
        self.last_sync: dict | None = None
        self.resync_differing_bytes = 0
        self.verifier = Verifier(self)
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.admin = AdminServer(self)
        self.nbd: NbdServer | None = None
        self.last_ping = 0.0
        self.handlers = {
            P.DATA: self.applier.on_data,
            P.TRIM: self.applier.on_trim,
            P.ZERO: self.applier.on_zero,
            P.BARRIER: self.applier.on_barrier,
            P.WRITE_ACK: self.replicator.on_write_ack,
            P.NEG_ACK: self.replicator.on_neg_ack,
            P.RECV_ACK: self.replicator.on_recv_ack,
            P.OUT_OF_SYNC: self.congestion.on_out_of_sync,
            P.BARRIER_ACK: self.replicator.on_barrier_ack,
            P.BITMAP: self._on_bitmap,
            P.RS_DATA: self._on_rs_data,
            P.RS_CSUM: self._on_rs_csum,
            P.RS_ACK: self._on_rs_ack,
            P.RS_REQUEST: self._on_rs_request,
            P.PING: self._on_ping,
            P.PING_ACK: lambda *a: None,
            P.CONTROL: self._on_control,
            P.REFUSE: self._on_refuse_established,
            P.OV_REQUEST: self.verifier.on_request,
            P.OV_REPLY: self.verifier.on_reply,
            P.READ_REQUEST: self.diskless.on_read_request,
            P.READ_REPLY: self.diskless.on_read_reply,
        }

    @property
    def is_primary(self) -> bool:
        return self.role == Role.PRIMARY

    def replicating_link(self) -> PeerLink | None:
        """The link writes go to, or None (degraded, or Ahead: writes only set bitmap bits)."""
        link = self.link
        return None if (link is None or link.closed or self.repl in _LOCAL_ONLY
                        or self.peer_disk in NO_DISK) else link  # detached peer: degraded

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.admin.start()  # first: it refuses an unsafe run directory
        host, port = self.me.address
        self.servers.append(await self.loop.create_server(
            lambda: PeerLink(self, outbound=False), host, port, reuse_address=True))
        export = make_export(self.me.export, self.size,
                             description=f"blockrep resource {self.cfg.name} on {self.name}")
        target = self.replicator  # its request core holds the answers while fencing
        self.nbd = NbdServer(self.disk, export, target=target, executor=self.executor,
                             limits=NbdLimits(handshake_timeout=self.cfg.nbd_handshake_timeout,
                                              busy_poll_us=self.cfg.busy_poll),
                             tls=server_tls(self.cfg.nbd_tls, self.me.nbd_tls_cert,
                                            self.me.nbd_tls_key, self.me.nbd_tls_ca or None,
                                            verify_client=bool(self.me.nbd_tls_ca)))
        self.nbd.refusal = self.nbd_refusal()
        self.nbd.read_error = self.diskless.read_failed  # detach: reads go on at the peer
        await self.nbd.listen_tcp(*self.me.nbd)
        self.tasks.append(self.loop.create_task(self._dialer()))
        self.tasks.append(self.loop.create_task(self._timer()))
        log.info("node %s of resource %s up: disk %s (%d bytes), %s, replication on %s:%d, "
                 "NBD on %s:%d, admin %s", self.name, self.cfg.name, self.me.disk, self.size,
                 self.disk_state.value, host, port, *self.me.nbd, self.admin.path)

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
        if self.is_primary:
            await self.replicator.settle(self.replicating_link(), self.cfg.timeout)
        for t in self.tasks:
            t.cancel()
        self.hooks.cancel()
        if self.resync_task is not None:
            self.resync_task.cancel()
        for link in list(self.handshaking) + ([self.link] if self.link else []):
            link.close("node going down")
        for srv in self.servers:
            srv.close()
        self.admin.close()
        await asyncio.sleep(0)
        try:
            self.disk.flush()
        except OSError as exc:
            log.error("final flush failed: %s", exc)
        if self.store is not None and self.diskfail.attached:  # a detached disk: untouched
            self.store.clean_shutdown(was_primary=self.is_primary)
        self.executor.shutdown(wait=True)
        self.disk.close()
        log.info("down")

    def run_io(self, fn, done) -> None:
        """Run fn() in the I/O threads; call done(exc or None) back on the loop."""
        fut = self.loop.run_in_executor(self.executor, fn)
        fut.add_done_callback(lambda f: done(f.exception()))

    # -- peer connection management ----------------------------------------------------------
    async def _dialer(self) -> None:
        while True:
            if (self.dials and self.conn != ConnState.STANDALONE and self.link is None
                    and not any(link.outbound for link in self.handshaking)):
                host, port = self.peer_cfg.address
                try:
                    await asyncio.wait_for(self.loop.create_connection(
                        lambda: PeerLink(self, outbound=True), host, port),
                        timeout=self.cfg.timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    log.debug("connect to %s:%d failed: %s", host, port, exc)
            await asyncio.sleep(self.cfg.connect_interval)

    async def _timer(self) -> None:
        cfg = self.cfg  # read each round: `adjust` retunes these in place
        last_barrier = self.loop.time()
        while True:
            await asyncio.sleep(min(cfg.ping_interval, cfg.barrier_interval) / 2)
            now = self.loop.time()
            for link in list(self.handshaking):
                link.check_time(now, cfg.timeout)
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
        """A new connection, before any byte is read: refuse it at once, or let it
        handshake (at most max-handshakes inbound ones at a time)."""
        if self.conn == ConnState.STANDALONE:
            link.abort("StandAlone: not accepting connections")
            return
        if not link.outbound:
            why = None
            if self.dials:
                why = (f"this node dials its peer {self.peer_cfg.name}; it accepts no link "
                       f"connections")
            elif sum(not h.outbound for h in self.handshaking) >= self.cfg.max_handshakes:
                why = f"{self.cfg.max_handshakes} link connections already in the handshake"
            if why:
                self.rejections.record(why, link.peer_addr, self.loop.time())
                link.abort(why)
                return
        self.handshaking.add(link)

    def tls_context(self, server_side: bool):
        return self._tls[0] if server_side else self._tls[1]

    def local_state(self) -> dict:
        return {"role": self.role.value, "disk": self.disk_state.value,
                "gen": self.gen.to_wire(),
                "was_primary": self.was_primary_flag or self.is_primary,
                "skip_initial_sync": self.skip_initial_sync,
                "discard_my_data": self.discard_my_data,
                "changes": self.bitmap.count(), "protocol": self.replicator.protocol}

    def on_link_refused(self, link: PeerLink, ev: Refused) -> None:
        if ev.authenticated:
            log.error("link to %s: %s", self.peer_cfg.name, ev.reason)
            self.last_error = ev.reason
            self.emit("connection-error", reason=ev.reason)
            if ev.standalone:  # the refusal needs the operator: stop reconnecting
                self.set_connection(ConnState.STANDALONE)
            return
        # before the peer proved itself: nothing changes but the record of refusals; while
        # no link is established the operator sees the latest reason as last_error too
        logged = self.rejections.record(ev.reason, link.peer_addr, self.loop.time())
        if self.link is None:
            self.last_error = ev.reason
            if logged:
                self.emit("connection-error", reason=ev.reason)

    def on_link_writable(self, link: PeerLink) -> None:
        self.congestion.resumed(link)
        if self.resync_source is not None:
            self.resync_source.wake.set()

    def on_link_established(self, link: PeerLink, body: dict) -> None:
        connect.established(self, link, body)

    def on_link_lost(self, link: PeerLink, reason: str) -> None:
        self.handshaking.discard(link)
        self.applier.link_lost(link)  # what it queued here is never applied
        if link is not self.link:
            return
        self.link = None
        was = self.repl
        fence = was != ReplState.OFF and self.fencer.must_fence()
        if fence:
            self.fencer.suspend()  # before the pending writes complete below
        self.set_replication(ReplState.OFF)
        if self.conn != ConnState.STANDALONE:
            self.set_connection(ConnState.CONNECTING)
        self.peer_role, self.peer_disk = Role.UNKNOWN, DiskState.DUNKNOWN
        if self.resync_source is not None:
            self.resync_source.cancel()
            self.resync_source = None
        if self.resync_task is not None:
            self.resync_task.cancel()  # a bitmap exchange or a resync waiting to start
            self.resync_task = None
        self.resync_target = None
        self.bitmap_exchange = None
        self.congestion.release()
        self.replicator.drain_waiting()  # held-back writes now go local-only
        self.verifier.cancel("connection lost")
        self.replicator.link_lost()
        self.diskless.link_lost()  # a Diskless Primary's reads fail: no other copy
        attached = self.diskfail.attached  # (a Diskless Primary wrote nothing without it)
        if self.is_primary and was != ReplState.OFF and attached:
            self.gen.start_new_data()
        try:
            if self.store is not None and attached:
                self.store.flush_bitmap()  # bits set for unacknowledged writes must survive
            self.persist()
        except OSError as exc:  # the bits stay set in memory; the activity log covers them
            log.error("metadata write after losing the peer failed: %s", exc)
        log.warning("lost peer %s: %s (out of sync: %d bytes)", self.peer_cfg.name, reason,
                    self.bitmap.count_bytes())
        self.emit("disconnected", reason=reason, out_of_sync_bytes=self.bitmap.count_bytes())
        if fence:
            self.fencer.fence()

    # -- established-link packet handlers ----------------------------------------------------
    def _on_ping(self, link, *a):
        link.send(proto.pack_header(P.PING_ACK))

    def _on_refuse_established(self, link, flags, pid, offset, size, crc, payload):
        body = proto.decode_control(payload)
        reason = f"peer refused: {body.get('reason', '')}"
        log.error("%s", reason)
        self.last_error = reason
        if body.get("standalone"):  # the refusal needs the operator: stop reconnecting
            self.set_connection(ConnState.STANDALONE)
        link.close(reason)

    def _on_rs_data(self, link, flags, pid, offset, size, crc, payload):
        if self.resync_target is None:
            raise proto.LinkProtocolError("resync data while not sync target")
        # after writes of an earlier link still landing here (the applier's order)
        self.applier.ordered(link, offset, size, payload, lambda p: self.resync_target
                             and self.resync_target.on_rs_data(link, flags, pid, offset, size,
                                                               crc, p))

    def _on_rs_csum(self, link, flags, pid, offset, size, crc, payload):
        if self.resync_target is None:
            raise proto.LinkProtocolError("resync checksums while not sync target")
        self.applier.ordered(link, offset, size, payload, lambda p: self.resync_target
                             and self.resync_target.on_rs_csum(link, flags, pid, offset, size,
                                                               crc, p))

    def _on_rs_ack(self, link, *a):
        if self.resync_source is not None:
            self.resync_source.on_rs_ack(link, *a)

    def _on_bitmap(self, link, *a):
        if self.bitmap_exchange is None:
            raise proto.LinkProtocolError("bitmap chunk outside a bitmap exchange")
        self.bitmap_exchange.on_chunk(link, *a)

    def _on_rs_request(self, link, *a):
        if self.resync_source is None:
            raise proto.LinkProtocolError("resync request while not sync source")
        self.resync_source.on_rs_request(link, *a)

    def _on_control(self, link, flags, pid, offset, size, crc, payload):
        body = proto.decode_control(payload)
        op = messages.control_op(body)
        handler = _CONTROL_OPS.get(op)
        if handler is None:
            raise proto.LinkProtocolError(f"unknown control operation {op!r}")
        handler(self, link, body)

    def _ctl_state(self, link, body):
        old, (self.peer_role, self.peer_disk) = self.peer_disk, messages.state_update(body)
        self.applier.peer_protocol = str(body.get("protocol", self.applier.peer_protocol))
        self.emit("peer-state", role=self.peer_role.value, disk=self.peer_disk.value)
        self.diskfail.peer_disk_changed(old)

    def _ctl_sync_start(self, link, body):
        if self.resync_target is None:
            raise proto.LinkProtocolError("sync-start while not sync target")
        self.resync_target.on_sync_start(body)

    def _ctl_sync_ready(self, link, body):
        src = self.resync_source
        if src is None or src.ready.done():
            raise proto.LinkProtocolError("sync-ready while no resync is starting")
        src.ready.set_result(None)

    def _ctl_sync_done(self, link, body):
        if self.resync_target is None:
            raise proto.LinkProtocolError("sync-done while not sync target")
        self.resync_target.on_sync_done(body)

    def _ctl_renegotiate(self, link, body):
        link.close("peer asked to renegotiate")

    # -- hooks from the write paths ----------------------------------------------------------
    def mark_out_of_sync(self, offset: int, length: int) -> None:
        # in memory only: on disk the activity log covers these blocks until their extent
        # leaves it (its bitmap words are written then), and link loss flushes the bitmap
        self.bitmap.set_range(offset, length)

    def bitmap_changed(self) -> None:
        """Bits were cleared (resync progress): persist them now and then, off the loop."""
        if self.store is not None and self.store.bitmap_flush_due():
            self.bitmap_writer.flush()

    # -- state setters: each logs the change once and emits one event -----------------------
    def set_role(self, new: Role) -> None:
        self._set("role", "role", new)

    def set_connection(self, new: ConnState) -> None:
        self._set("conn", "connection", new)

    def set_replication(self, new: ReplState) -> None:
        self._set("repl", "replication", new)

    def set_disk(self, new: DiskState, **why) -> None:
        self._set("disk_state", "disk", new, **why)

    def _set(self, attr: str, what: str, new, **why) -> None:
        old = getattr(self, attr)
        if new != old:
            setattr(self, attr, new)
            log.info("%s: %s -> %s", what, old.value, new.value)  # diskfail logs why
            self.emit(what, **{what: new.value, "old": old.value}, **why)

    def send_state(self) -> None:
        link = self.link
        if link is not None and not link.closed and link.established:
            link.send_control(P.CONTROL, {"op": "state", "role": self.role.value,
                                          "disk": self.disk_state.value,
                                          "protocol": self.replicator.protocol})

    def set_protocol(self, protocol: str) -> None:
        """Protocol A, B or C from the next write on (admin `protocol`, `adjust`)."""
        self.replicator.set_protocol(protocol)
        self.send_state()

    def persist(self) -> None:
        if self.store is not None:
            self.store.save_state(disk_state=self.disk_state, was_primary=self.is_primary)

    def nbd_refusal(self) -> str | None:
        if self.is_primary:
            return None
        return (f"resource {self.cfg.name} is Secondary on node {self.name}; promote it with "
                f"'blockrep primary'")

    @property
    def nbd_clients(self) -> int:
        return len(self.nbd.connections) if self.nbd else 0

    def facts(self) -> st.Facts:
        """The states the command preconditions (blockrep.state.check_*) look at."""
        return st.Facts(role=self.role, disk=self.disk_state, conn=self.conn, repl=self.repl,
                        peer_role=self.peer_role, peer_disk=self.peer_disk,
                        linked=self.link is not None, nbd_clients=self.nbd_clients,
                        verify_running=self.verifier.current is not None,
                        out_of_sync_bytes=self.bitmap.count_bytes())

    def emit(self, kind: str, **fields) -> None:
        sdnotify.state_changed(self)
        self.admin.emit(kind, **fields)


_CONTROL_OPS = {
    "ahead": lambda node, link, body: node.congestion.on_ahead(link, body),
    "state": Node._ctl_state,
    "sync-start": Node._ctl_sync_start,
    "sync-ready": Node._ctl_sync_ready,
    "sync-done": Node._ctl_sync_done,
    "renegotiate": Node._ctl_renegotiate,
    "verify": lambda node, link, body: node.verifier.on_control(link, body),
}

