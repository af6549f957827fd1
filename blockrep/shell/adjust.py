"""`blockrep adjust`: apply a changed configuration to a running node, without a restart.

The node re-reads its configuration file (or the one the command names), validates it as
`up` would, and compares it with the one it runs. Tunables are applied in place (every
reader looks them up in the node's ResourceConfig each time: the timer, the resync
controller, the fencer, the handlers, the dialer, the link handshake). Changes that need a
restart (addresses, disks, names, TLS setup, the run directory) refuse the whole adjust
with one message naming them; nothing is applied then.

Owns: which settings are live-tunable and which need a restart, and applying them.
Must not: validate configurations (blockrep.config does) or run commands' preconditions.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..config import ConfigError, load

log = logging.getLogger("blockrep.adjust")

# ResourceConfig attributes `adjust` changes on a running node
TUNABLE = ("ping_interval", "timeout", "connect_interval", "barrier_interval",
           "resync_rate", "resync_window", "c_min_rate", "c_max_rate", "c_fill_target",
           "after_sb_0pri", "after_sb_1pri", "fencing", "handlers", "fence_peer_timeout",
           "handler_timeout", "handshake_timeout", "max_handshakes", "nbd_handshake_timeout",
           "shared_secret", "protocol", "csums_after_crash_only")
# ... and those that need `blockrep down` + `blockrep up`
RESTART = ("name", "run_dir", "admin_group", "tls", "nbd_tls")
NODE_FIELDS = ("address", "disk", "nbd", "meta_disk", "export", "nbd_tls_cert",
               "nbd_tls_key", "nbd_tls_ca", "tls_cert", "tls_key", "tls_ca",
               "tls_fingerprint")


class AdjustRefused(Exception):
    """str() is the one-line reason; `code` names the class (admin.py maps it)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def plan(old, new) -> tuple[dict, list[str]]:
    """(tunables that changed: attr -> (old, new), what needs a restart)."""
    restart = [f"resource.{_key(a)}" for a in RESTART if getattr(old, a) != getattr(new, a)]
    if set(old.nodes) != set(new.nodes):
        restart.append(f"the node names ({', '.join(sorted(old.nodes))} -> "
                       f"{', '.join(sorted(new.nodes))})")
    else:
        for name, n in old.nodes.items():
            m = new.nodes[name]
            restart += [f"node.{name}.{_key(f)}" for f in NODE_FIELDS
                        if getattr(n, f) != getattr(m, f)]
    changed = {a: (getattr(old, a), getattr(new, a)) for a in TUNABLE
               if getattr(old, a) != getattr(new, a)}
    return changed, restart


def _show(attr: str, v) -> str:
    if attr == "shared_secret":
        return "***"
    return repr(v)


def adjust(node, path: str | None = None) -> dict:
    """Re-read the configuration and apply its tunables; raises AdjustRefused."""
    path = path or node.cfg.path
    try:
        new = load(path)
        new.node(node.name)
    except ConfigError as exc:
        raise AdjustRefused(f"adjust: {exc}", "config") from None
    changed, restart = plan(node.cfg, new)
    if restart:
        raise AdjustRefused(
            f"adjust refused: {', '.join(restart)} changed; that needs a restart "
            f"('blockrep down' then 'blockrep up'); nothing was applied", "needs-restart")
    cfg = node.cfg
    for attr, (_old, value) in changed.items():
        setattr(cfg, attr, value)
    cfg.raw = new.raw
    # the few values copied at start
    node.link_params = replace(node.link_params, timeout=cfg.handshake_timeout,
                               secret=cfg.shared_secret.encode())  # for new handshakes
    if node.nbd is not None:  # new NBD connections
        node.nbd.limits = replace(node.nbd.limits,
                                  handshake_timeout=cfg.nbd_handshake_timeout)
    if "protocol" in changed:
        node.set_protocol(cfg.protocol)  # from the next write on
    if "fencing" in changed and not node.fencer.enabled:
        node.fencer.resume()  # turned off: nothing is held any more
    lines = [f"{_key(a)}: {_show(a, o)} -> {_show(a, v)}" for a, (o, v) in changed.items()]
    for line in lines:
        log.info("adjust: %s", line)
    node.emit("adjusted", changes=[_key(a) for a in changed])
    return {"changed": lines} if lines else {"changed": [], "note": "nothing to change"}
