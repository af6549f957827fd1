"""The numbers an observer reads from a running node, gathered in one place.

Owns: `snapshot(node)`, the one reading of a node's states, counters, in-flight work,
resync/verify progress and latency histograms that the Prometheus endpoint
(shell/metrics.py) and `status --drbd` (`drbdsetup_status`, drbdsetup's JSON shape) are
both built from; node ids (a node's position in the sorted node names).
Must not: change anything on the node; cost anything on the request path (everything here
runs when someone asks, on the node's loop).
"""

from __future__ import annotations

from .. import state as st
from ..state import Strategy
from .latency import IoStats

SECTOR = 512


def node_id(cfg, name: str) -> int:
    """drbdsetup's node-id for a node: its index among the sorted node names."""
    return sorted(cfg.nodes).index(name)


def _progress(p, now: float) -> dict:
    rate = p.rate(now)
    left = max(p.total - p.done, 0)
    return {"total": p.total, "done": p.done, "left": left, "rate": rate,
            "started": p.started, "window_start": p.samples[0][0],
            "window_done": p.done - p.samples[0][1],
            "eta": left / rate if rate > 0 else None}


def split_brain(node) -> bool:
    """The last connect found a split brain (what `monitor` of the OCF agent reports)."""
    d = node.decision
    return (d is not None and d.strategy == Strategy.SPLIT_BRAIN) or \
        "split brain" in (node.last_error or "")


def snapshot(node) -> dict:
    """Every number of the node, now (sizes in bytes, times in seconds)."""
    now = node.loop.time()
    r, a, link, nbd = node.replicator, node.applier, node.link, node.nbd
    io = nbd.stats if nbd is not None else IoStats()
    rs, rt = node.resync_source, node.resync_target
    sync = rs.progress if rs is not None else rt.progress if rt is not None else None
    v = node.verifier.current
    last_verify = node.verifier.status(now) or {}
    store = node.store
    facts = node.facts()
    return {
        "resource": node.cfg.name, "node": node.name, "node_id": node_id(node.cfg, node.name),
        "peer": node.peer_cfg.name, "peer_node_id": node_id(node.cfg, node.peer_cfg.name),
        "address": node.me.address, "peer_address": node.peer_cfg.address,
        "role": node.role.value, "disk": node.disk_state.value,
        "connection": node.conn.value, "replication": node.repl.value,
        "peer_role": node.peer_role.value, "peer_disk": node.peer_disk.value,
        "established": link is not None and link.established and not link.closed,
        "tls": bool(link is not None and link.tls_version),
        "congested": bool(link is not None and link.congested),
        "suspended": node.fencer.suspended,
        "may_promote": node.role != st.Role.PRIMARY and not st.check_promote(facts).refused,
        "split_brain": split_brain(node),
        "size": node.size, "out_of_sync": node.bitmap.count_bytes(),
        "read": io.read_bytes,
        "written": io.written_bytes + a.bytes_applied,
        "al_writes": store.al_writes if store is not None else 0,
        "bm_writes": store.bitmap_writes if store is not None else 0,
        "upper_pending": nbd.requests_inflight if nbd is not None else 0,
        "lower_pending": len(r.local_busy) + len(a.busy),
        "ap_in_flight": sum(q.length for q in r.pending.values()),
        "rs_in_flight": rs.inflight_bytes if rs is not None else 0,
        "pending": len(r.pending) + (len(rs.inflight) if rs is not None else 0),
        "unacked": len(a.queue) + len(a.busy),
        "sent": r.bytes_replicated, "received": a.bytes_applied,
        "link_sent": link.bytes_sent if link is not None else 0,
        "link_received": link.bytes_received if link is not None else 0,
        "nbd_clients": node.nbd_clients, "nbd_inflight_bytes":
            nbd.inflight_bytes if nbd is not None else 0,
        "resync": _progress(sync, now) if sync is not None else None,
        "verify": _progress(v.progress, now) if v is not None else None,
        "verify_found": last_verify.get("found_bytes", 0),
        "diskless": node.diskless.active,
        "peer_reads": node.diskless.peer_reads_bytes,
        "peer_writes": node.diskless.peer_writes_bytes,
        "served_reads": node.diskless.served_reads_bytes,
        "latency": io.latency, "ack_latency": r.ack_latency,
        "now": now,
    }


# -- drbdsetup status --json --------------------------------------------------------------------

def _kib(n: int) -> int:
    return n // 1024


def _sync_details(s: dict) -> dict:
    """drbdsetup's resync (or verify) fields of a peer device, in its units: sectors,
    milliseconds, MiB/s."""
    verify = s["verify"] is not None
    p = s["verify"] if verify else s["resync"]
    now = s["now"]
    dt_start = (now - p["started"]) * 1000
    dt0 = (now - p["window_start"]) * 1000
    db0 = p["window_done"] // SECTOR
    mib_s = (db0 / (dt0 or 1)) * 1000 / 2048
    out = {"rs-total": p["total"] // SECTOR, "rs-dt-start-ms": int(dt_start),
           "rs-paused-ms": 0, "rs-dt0-ms": int(dt0), "rs-db0-sectors": db0,
           "rs-dt1-ms": int(dt0), "rs-db1-sectors": db0}
    if verify:
        out.update({"ov-start-sector": 0, "ov-stop-sector": s["size"] // SECTOR,
                    "ov-position": p["done"] // SECTOR, "ov-left": p["left"] // SECTOR,
                    "ov-skipped": 0})
    else:
        out.update({"rs-failed": 0, "rs-same-csum": 0})
    out.update({
        "want": 0.0,
        "db0/dt0 [MiB/s]": round(mib_s, 2),
        "db1/dt1 [MiB/s]": round(mib_s, 2),
        "estimated-seconds-to-finish": round(p["eta"]) if p["eta"] is not None else 987654321,
        "db/dt [MiB/s]": round(p["done"] / SECTOR / (dt_start or 1) * 1000 / 2048, 2),
        "percent-resync-done": round(100.0 * p["done"] / p["total"], 2) if p["total"] else 0.0,
    })
    return out


def drbdsetup_status(node) -> list:
    """This node's resource as `drbdsetup status --json` prints it (one resource, one
    volume, one connection): the field names, order and units of drbd-utils (sizes in
    KiB, in-flight amounts in sectors), so tools written for DRBD read it unchanged."""
    s = snapshot(node)
    size = s["size"]
    peer_device = {
        "volume": 0,
        "replication-state": s["replication"],
        "peer-disk-state": s["peer_disk"],
        "peer-client": False,
        "resync-suspended": "no",
        "received": _kib(s["received"]),
        "sent": _kib(s["sent"]),
        "out-of-sync": _kib(s["out_of_sync"]),
        "pending": s["pending"],
        "unacked": s["unacked"],
        "has-sync-details": s["resync"] is not None or s["verify"] is not None,
        "has-online-verify-details": s["verify"] is not None,
        "percent-in-sync": round(100 * (1 - s["out_of_sync"] / size), 2) if size else 0,
    }
    if peer_device["has-sync-details"]:
        peer_device.update(_sync_details(s))
    host, port = s["address"]
    phost, pport = s["peer_address"]
    return [{
        "name": s["resource"],
        "node-id": s["node_id"],
        "role": s["role"],
        "suspended": s["suspended"],
        "suspended-user": False,
        "suspended-no-data": False,
        "suspended-fencing": s["suspended"],
        "suspended-quorum": False,
        "force-io-failures": False,
        "write-ordering": "flush",
        "devices": [{
            "volume": 0,
            "minor": 0,
            "disk-state": s["disk"],
            "client": False,
            "open": s["nbd_clients"] > 0,
            "quorum": True,
            "size": _kib(size),
            "read": _kib(s["read"]),
            "written": _kib(s["written"]),
            "al-writes": s["al_writes"],
            "bm-writes": s["bm_writes"],
            "upper-pending": s["upper_pending"],
            "lower-pending": s["lower_pending"],
        }],
        "connections": [{
            "peer-node-id": s["peer_node_id"],
            "name": s["peer"],
            "connection-state": s["connection"],
            "congested": s["congested"],
            "peer-role": s["peer_role"],
            "tls": s["tls"],
            "ap-in-flight": s["ap_in_flight"] // SECTOR,
            "rs-in-flight": s["rs_in_flight"] // SECTOR,
            "paths": [{
                "this_host": {"address": host, "port": port,
                              "family": "ipv6" if ":" in host else "ipv4"},
                "remote_host": {"address": phost, "port": pport,
                                "family": "ipv6" if ":" in phost else "ipv4"},
                "established": s["established"],
            }],
            "peer_devices": [peer_device],
        }],
    }]

