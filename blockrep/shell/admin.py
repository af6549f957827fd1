"""The operator's side of a node: the admin socket, the commands, status and events.

Owns: the admin socket (its run directory and modes, the SO_PEERCRED check: state changes
for root or the node's own user, read-only requests also for an `admin-group`), its JSON-lines
protocol, the operator commands (each one: its precondition from blockrep.state, then its
effect through the node's setters), the status dict and its text rendering, and the event
stream to subscribers; it starts and stops the node's metrics endpoint (shell/metrics.py)
with the socket.
Must not: touch the link's packets or the write path; decide whether a command may run
(blockrep.state does).
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time

from .. import state as st
from ..peer.proto import P
from ..state import DiskState, Generation, ReplState, Rv, Verdict
from .events import ProgressTicker
from .stats import drbdsetup_status

log = logging.getLogger("blockrep.admin")

READ_ONLY = frozenset({"status", "events", "drbd-status"})  # what admin-group may ask


class AdminError(Exception):
    """A request was refused; str() says why, `code` names the class (docs/operations.md)."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class CommandRefused(AdminError):
    """A command's precondition (blockrep.state) refused it."""

    def __init__(self, cmd: str, verdict: Verdict):
        super().__init__(f"{cmd} refused: {verdict.reason}", verdict.rv.value)
        self.rv = verdict.rv


def _check(cmd: str, verdict: Verdict) -> str | None:
    """Raise on a refusal; the message when there is nothing to do; None to go on."""
    if verdict.refused:
        raise CommandRefused(cmd, verdict)
    return verdict.reason if verdict.rv == Rv.NOTHING_TO_DO else None


# -- the run directory and the socket -----------------------------------------------------------

def check_run_dir(path: str, *, uid: int | None = None) -> str | None:
    """None if `path` is a directory only `uid` (default: this process) or root controls,
    else why the admin socket must not live (or be trusted) there."""
    uid = os.geteuid() if uid is None else uid
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return f"run directory {path} does not exist"
    if not stat.S_ISDIR(s.st_mode):
        return f"run directory {path} is not a directory"
    if s.st_uid not in (uid, 0):
        owner = _user(s.st_uid)
        return (f"run directory {path} is owned by {owner}, not by {_user(uid)} or root; "
                f"refusing to use it (remove it or set another run-dir)")
    if s.st_mode & 0o022:
        return (f"run directory {path} is writable by group or others (mode "
                f"{stat.S_IMODE(s.st_mode):04o}); refusing to use it (chmod 0700 it)")
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def prepare_run_dir(path: str, group: int | None) -> None:
    """Create the run directory 0700 (0710 with an admin group), or check an existing one."""
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    why = check_run_dir(path)
    if why:
        raise AdminError(why, "unsafe-run-dir")
    if os.lstat(path).st_uid == os.geteuid():
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o710 if group is not None else 0o700)


def admin_gid(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AdminError(f"admin-group {name!r}: no such group", "config") from None


def peer_cred(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


# -- the server ---------------------------------------------------------------------------------

class AdminServer:
    def __init__(self, node):
        self.node = node
        self.path = node.cfg.admin_socket(node.name)
        self.subscribers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.gid = admin_gid(node.cfg.admin_group)
        self.ticker = ProgressTicker(node, lambda: status(node))  # `events` with statistics: progress each second
        self.may_promote: bool | None = None
        self.metrics = None  # shell/metrics.MetricsServer with `metrics = "HOST:PORT"`

    async def start(self) -> None:
        prepare_run_dir(os.path.dirname(self.path) or ".", self.gid)
        if self.node.me.metrics is not None:  # listening before the socket shows "up"
            from .metrics import MetricsServer
            self.metrics = MetricsServer(self.node, self.node.me.metrics)
            await self.metrics.start()
        if os.path.lexists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window with a wider mode
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
            os.chmod(self.path, 0o660)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.ticker.close()
        if self.metrics is not None:
            self.metrics.close()
        for w in self.subscribers:
            w.close()
        if os.path.lexists(self.path):
            os.unlink(self.path)

    def emit(self, kind: str, **fields) -> None:
        if not self.subscribers:
            self.may_promote = None
            return
        line = (json.dumps({"event": kind, "time": round(self.node.loop.time(), 3),
                            "wallclock": round(time.time(), 6),
                            "node": self.node.name, **fields}) + "\n").encode()
        for w in list(self.subscribers):
            if w.is_closing():
                self.subscribers.remove(w)
            else:
                w.write(line)
        if kind in ("role", "disk", "connection", "replication", "peer-state"):
            may, old = may_promote(self.node), self.may_promote
            if old is not None and may != old:
                self.may_promote = may
                self.emit("may-promote", may_promote=may, old=old)
            self.may_promote = may

    def allowed(self, cred: tuple[int, int, int], cmd: str) -> str | None:
        """None if the peer may run `cmd`, else why not."""
        _pid, uid, gid = cred
        if uid in (0, os.geteuid()):
            return None
        who = _user(uid)
        if self.gid is not None and cmd in READ_ONLY and self._in_group(uid, gid):
            return None
        if self.gid is not None and self._in_group(uid, gid):
            return (f"permission denied: {who} is in admin-group {self.node.cfg.admin_group}, "
                    f"which may only read status and events; {cmd!r} needs root or "
                    f"{_user(os.geteuid())}")
        return f"permission denied: {cmd!r} needs root or {_user(os.geteuid())}, not {who}"

    def _in_group(self, uid: int, gid: int) -> bool:
        if gid == self.gid:
            return True
        try:
            return self.gid in os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        except KeyError:
            return False

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        node = self.node
        try:
            cred = peer_cred(writer)
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                    cmd = req.get("cmd")
                    why = self.allowed(cred, str(cmd))
                    if why:
                        log.warning("admin: %s (pid %d)", why, cred[0])
                        raise AdminError(why, "permission-denied")
                    if cmd == "events":
                        s = status(node)
                        self.may_promote = s["may_promote"]
                        writer.write((json.dumps({"ok": True, "result": s,
                                                  "wallclock": round(time.time(), 6)})
                                      + "\n").encode())
                        self.subscribers.append(writer)
                        if (req.get("args") or {}).get("statistics"):
                            self.ticker.add(writer)
                        continue
                    fn = COMMANDS.get(cmd)
                    if fn is None:
                        raise AdminError(f"unknown command {cmd!r}", "usage")
                    result = fn(node, **req.get("args", {}))
                    if asyncio.iscoroutine(result):  # a command that waits for something
                        result = await result
                    reply = {"ok": True, "result": result}
                except AdminError as exc:
                    reply = {"ok": False, "error": str(exc), "code": exc.code}
                except (ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}", "code": "usage"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer in self.subscribers:
                self.subscribers.remove(writer)
            self.ticker.discard(writer)
            writer.close()


# -- operator commands --------------------------------------------------------------------------

def cmd_primary(node, force: bool = False, skip_initial_sync: bool = False):
    done = _check("primary", st.check_promote(node.facts(), force=bool(force)))
    if done:
        return done
    if not node.applier.idle:  # writes of a gone link still landing here: let them first
        return _primary_when_idle(node, force, skip_initial_sync)
    renegotiate = False
    if node.disk_state != DiskState.UP_TO_DATE:  # --force
        log.warning("forced promotion: declaring the local data UpToDate")
        if node.gen.current == 0:
            node.gen.current = st.new_uuid()
        else:
            node.gen.start_new_data()
        node.bitmap.clear_all()
        node.set_disk(DiskState.UP_TO_DATE)
        node.skip_initial_sync = bool(skip_initial_sync)
        renegotiate = node.link is not None
    elif node.link is None or node.repl == ReplState.OFF:
        node.gen.start_new_data()  # writes from now on are new data the peer lacks
        _log_failover_gap(node)
    node.set_role(st.Role.PRIMARY)
    node.was_primary_flag = True
    node.persist()  # the "primary" flag is on disk before any write is served
    node.nbd.refusal = None
    if renegotiate:
        node.link.send_control(P.CONTROL, {"op": "renegotiate"})
        node.link.close("renegotiating after forced promotion")
    else:
        node.send_state()
    return "Primary"


def _log_failover_gap(node) -> None:
    """Promoted without the peer: say what this node may lack, as far as it can know."""
    a = node.applier
    proto_ = a.peer_protocol
    ago = (f"{node.loop.time() - a.lost_at:.1f} s ago" if a.lost_at is not None
           else "before this node started")
    if proto_ == "C":
        what = ("none it acknowledged to its clients (protocol C), only writes still in "
                "flight")
    else:
        what = (f"the writes it acknowledged to its clients but this node had not "
                f"{'received' if proto_ == 'B' else 'received and written'} when the link "
                f"was lost (protocol {proto_}); its status showed that gap as "
                f"data_gap.bytes_not_on_peer_disk")
    log.warning("promoted without the peer (link lost %s, %d queued request(s) of it "
                "dropped here): this node may lack %s", ago, a.dropped, what)


async def _primary_when_idle(node, force, skip_initial_sync) -> str:
    await node.applier.wait_idle()
    return cmd_primary(node, force=force, skip_initial_sync=skip_initial_sync)


def cmd_secondary(node) -> str:
    done = _check("secondary", st.check_demote(node.facts()))
    if done:
        return done
    node.set_role(st.Role.SECONDARY)
    node.nbd.refusal = node.nbd_refusal()
    link = node.replicating_link()
    if link is not None:
        node.replicator.close_epoch(link, flush=True)
    node.was_primary_flag = False
    node.persist()
    node.send_state()
    return "Secondary"


def cmd_connect(node, discard_my_data: bool = False) -> str:
    _check("connect --discard-my-data" if discard_my_data else "connect",
           st.check_connect(node.facts(), discard_my_data=bool(discard_my_data)))
    if discard_my_data:
        node.discard_my_data = True
    if node.conn == st.ConnState.STANDALONE:
        node.set_connection(st.ConnState.CONNECTING)
    return node.conn.value


def cmd_disconnect(node) -> str:
    node.set_connection(st.ConnState.STANDALONE)
    for link in list(node.handshaking):
        link.close("disconnected by the operator")
    if node.link is not None:
        node.link.close("disconnected by the operator")
    return node.conn.value


def cmd_protocol(node, protocol: str) -> str:
    """Switch replication protocol A, B or C on the running resource."""
    try:
        node.set_protocol(str(protocol))
    except ValueError as exc:
        raise AdminError(str(exc), "usage") from None
    log.info("protocol %s", protocol)
    node.emit("protocol", protocol=protocol)
    return f"protocol {protocol}"


def cmd_down(node) -> str:
    _check("down", st.check_down(node.facts()))
    node.stop_event.set()
    return "going down"


def cmd_verify(node) -> str:
    _check("verify", st.check_verify(node.facts()))
    if not node.is_primary and node.peer_role == st.Role.PRIMARY:
        node.link.send_control(P.CONTROL, {"op": "verify", "action": "start"})
        return f"verify started on the Primary ({node.peer_cfg.name})"
    node.verifier.start(node.link)
    return "verify started"


def cmd_resync(node) -> str:
    """Repair what verify (or anything else) marked: renegotiate, the rules pick the way."""
    done = _check("resync", st.check_resync(node.facts()))
    if done:
        return done
    node.link.send_control(P.CONTROL, {"op": "renegotiate"})
    node.link.close("renegotiating to resync out-of-sync blocks")
    return f"resync of {node.bitmap.count_bytes()} bytes requested"


def cmd_invalidate(node) -> str:
    """Throw away the local data: a full resync from the peer follows."""
    _check("invalidate", st.check_invalidate(node.facts()))
    node.gen.__dict__.update(Generation().__dict__)
    node.bitmap.set_all()
    node.set_disk(DiskState.INCONSISTENT)
    node.persist()
    if node.link is not None:
        node.link.send_control(P.CONTROL, {"op": "renegotiate"})
        node.link.close("invalidated: renegotiating for a full resync")
    return "local data invalidated; a full resync from the peer follows"


def cmd_adjust(node, path: str | None = None) -> dict:
    """Re-read the configuration, apply its tunables (shell/adjust.py)."""
    from .adjust import AdjustRefused, adjust
    try:
        return adjust(node, path)
    except AdjustRefused as exc:
        raise AdminError(str(exc), exc.code) from None


def cmd_resume_io(node) -> str:
    """Release I/O suspended by fencing (DRBD's resume-io), e.g. after the operator made
    sure by other means that the peer cannot be promoted."""
    f = node.fencer
    if not f.suspended:
        return "client I/O is not suspended"
    if f.task is not None and not f.task.done():
        raise AdminError("resume-io refused: the fence-peer handler is still running",
                         "refused")
    log.warning("resume-io by the operator")
    f.resume()
    return "client I/O resumed"


def may_promote(node) -> bool:
    """Would `primary` (without --force) succeed now? (events2's may_promote)"""
    return not node.is_primary and not st.check_promote(node.facts(), force=False).refused


# -- status -------------------------------------------------------------------------------------

def cmd_attach(node) -> str:
    done = _check("attach", node.diskfail.check_attach())
    if done:
        return done
    try:
        return node.diskfail.attach()
    except (OSError, ValueError) as exc:
        raise CommandRefused("attach", Verdict(Rv.DISK_FAILED, f"cannot open the disk: {exc}"))


def status(node) -> dict:
    now = node.loop.time()
    sync = None
    if node.resync_source is not None:
        sync = node.resync_source.progress.as_dict(now)
        sync["window"] = node.resync_source.cur_window
        sync["control"] = node.resync_source.control_status()
    elif node.resync_target is not None:
        sync = node.resync_target.progress.as_dict(now)
        sync["remaining_bytes"] = node.bitmap.count_bytes()  # the target's own record
    r, a = node.replicator, node.applier
    link = node.link
    d = node.decision
    return {
        "resource": node.cfg.name,
        "node": node.name,
        "role": node.role.value,
        "may_promote": may_promote(node),
        "disk": node.disk_state.value,
        "connection": node.conn.value,
        "replication": node.repl.value,
        "peer": {"name": node.peer_cfg.name, "role": node.peer_role.value,
                 "disk": node.peer_disk.value},
        "out_of_sync_bytes": node.bitmap.count_bytes(),
        "data_gap": r.gap(),
        "congestion": node.congestion.status(),
        "size_bytes": node.size,
        "decision": {"strategy": d.strategy.value, "rule": d.describe()} if d else None,
        "last_error": node.last_error,
        "disk_failure": node.diskfail.status(),  # why the disk was detached, or ""
        "disk_kept": node.diskfail.kept,  # why a failing Primary disk was not detached
        "diskless": node.diskless.status(),  # a Diskless Primary's I/O through the peer
        "link_rejections": node.rejections.as_dict(),
        "generation": {"current": f"{node.gen.current:016X}",
                       "bitmap": f"{node.gen.bitmap:016X}",
                       "history": [f"{h:016X}" for h in node.gen.history]},
        "sync": sync,
        "last_sync": node.last_sync,
        "verify": node.verifier.status(now),
        "nbd": {"address": f"{node.me.nbd[0]}:{node.me.nbd[1]}",
                "export": node.me.export, "clients": node.nbd_clients,
                "serving": node.is_primary},
        "counters": {
            "writes_replicated": r.writes_replicated,
            "bytes_replicated": r.bytes_replicated,
            "writes_local_only": r.writes_local_only,
            "writes_pending_peer": len(r.pending),
            "writes_applied": a.writes_applied,
            "bytes_applied": a.bytes_applied,
            "link_bytes_sent": link.bytes_sent if link else 0,
            "link_bytes_received": link.bytes_received if link else 0,
            "resync_differing_bytes": node.resync_differing_bytes,
        },
        "metadata": node.store.describe() if node.store is not None else None,
        "fencing": node.fencer.status(),
        # what this node's sends on the link saved (None: not compressed in this direction)
        "compression": link.compressor.as_dict() if link and link.compressor else None,
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(s: dict) -> str:
    lines = [f"{s['resource']} node:{s['node']} role:{s['role']}",
             f"  disk:{s['disk']} size:{human(s['size_bytes'])}",
             f"  {s['peer']['name']} connection:{s['connection']} role:{s['peer']['role']}",
             f"    replication:{s['replication']} peer-disk:{s['peer']['disk']} "
             f"out-of-sync:{human(s['out_of_sync_bytes'])}"]
    if s.get("sync"):
        sy = s["sync"]
        eta = f" eta:{sy['eta_s']}s" if sy.get("eta_s") is not None else ""
        lines.append(f"    sync: {sy['percent']}% ({human(sy['done_bytes'])} of "
                     f"{human(sy['total_bytes'])}) rate:{human(sy['rate_bytes_per_s'])}/s{eta}"
                     + (f" left to copy:{human(sy['remaining_bytes'])}"
                        if "remaining_bytes" in sy else ""))
        if sy.get("control"):
            k = sy["control"]
            lines.append(f"    rate control: c-min-rate:{human(k['c_min_rate'])}/s "
                         f"c-max-rate:{human(k['c_max_rate'])}/s "
                         f"c-fill-target:{human(k['c_fill_target'])} "
                         f"app-busy:{'yes' if k['app_busy'] else 'no'} "
                         f"throttled:{k['throttled']}")
    if s.get("decision"):
        lines.append(f"    last decision: {s['decision']['strategy']} "
                     f"(rule: {s['decision']['rule']})")
    if s.get("verify"):
        v = s["verify"]
        lines.append(f"    verify: {v.get('state')} {v.get('percent', '')}% "
                     f"out-of-sync found: {human(v.get('found_bytes', 0))}")
    g = s.get("data_gap")
    if g:
        lines.append(f"    protocol:{g['protocol']} gap: not received:"
                     f"{human(g['bytes_not_received'])} not on peer disk:"
                     f"{human(g['bytes_not_on_peer_disk'])} out-of-sync:"
                     f"{human(g['out_of_sync_bytes'])} oldest:{g['oldest_s']}s")
    if s.get("disk_failure"):
        lines.append(f"    disk detached: {s['disk_failure']}")
    d = s.get("diskless") or {}
    if d.get("active"):
        lines.append(f"    diskless primary: I/O through the peer "
                     f"{'(serving)' if d['serving'] else '(no UpToDate peer: EIO)'} read:"
                     f"{human(d['peer_reads_bytes'])} written:{human(d['peer_writes_bytes'])}"
                     f" failed reads:{d['peer_reads_failed']}")
    if s.get("last_error"):
        lines.append(f"    last error: {s['last_error']}")
    c = s["counters"]
    lines.append(f"  writes replicated:{c['writes_replicated']} "
                 f"({human(c['bytes_replicated'])}) applied:{c['writes_applied']} "
                 f"local-only:{c['writes_local_only']}")
    n = s["nbd"]
    lines.append(f"  nbd: nbd://{n['address']}/{n['export']} "
                 f"{'serving' if n['serving'] else 'refusing (Secondary)'} "
                 f"clients:{n['clients']}")
    return "\n".join(lines)


COMMANDS = {
    "status": status,
    "drbd-status": drbdsetup_status,
    "primary": cmd_primary,
    "secondary": cmd_secondary,
    "connect": cmd_connect,
    "disconnect": cmd_disconnect,
    "down": cmd_down,
    "protocol": cmd_protocol,
    "verify": cmd_verify,
    "invalidate": cmd_invalidate,
    "resync": cmd_resync,
    "adjust": cmd_adjust,
    "resume-io": cmd_resume_io,
    "attach": cmd_attach,
}
