"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram of
newline-separated VAR=value assignments to the unix socket named by $NOTIFY_SOCKET (a path,
or "@name" for the abstract namespace). Without $NOTIFY_SOCKET every call is a no-op.

Owns: the datagram and the STATUS= line of a node (role, disk, connection, replication).
Must not: block or raise (a missing or full socket is logged at debug level and ignored).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("blockrep.sdnotify")

_last_status: dict[int, str] = {}  # id(node) -> last STATUS= sent (only changes are sent)


def notify(*assignments: str) -> bool:
    """Send READY=1 / STATUS=... / STOPPING=1 ...; True if a datagram went out."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not assignments:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto("\n".join(assignments).encode(), addr)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", addr, exc)
        return False
    return True


def status_line(node) -> str:
    peer = node.peer_cfg.name
    return (f"STATUS={node.role.value} disk:{node.disk_state.value} "
            f"{peer}:{node.conn.value} replication:{node.repl.value} "
            f"peer-disk:{node.peer_disk.value}")


def ready(node) -> bool:
    """The node has attached its disk and listens (link, NBD, admin socket)."""
    line = status_line(node)
    _last_status[id(node)] = line
    return notify("READY=1", line, f"MAINPID={os.getpid()}")


def state_changed(node) -> bool:
    """A state changed: send the new STATUS= line if it differs from the last one."""
    if not os.environ.get("NOTIFY_SOCKET") or id(node) not in _last_status:
        return False
    line = status_line(node)
    if _last_status[id(node)] == line:
        return False
    _last_status[id(node)] = line
    return notify(line)


def stopping(node) -> bool:
    _last_status.pop(id(node), None)
    return notify("STOPPING=1", "STATUS=going down")
