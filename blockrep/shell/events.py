"""`blockrep events2`: the event stream in the shape of `drbdsetup events2 --now --statistics
--timestamps`.

    2026-12-02T12:00:00.123456+00:00 exists resource name:r0 role:Primary suspended:no may_promote:no
    ... exists connection name:r0 conn-name:beta connection:Connected role:Secondary
    ... exists device name:r0 volume:0 disk:UpToDate client:yes size:65536 ...
    ... exists peer-device name:r0 conn-name:beta volume:0 replication:Established peer-disk:UpToDate ...
    ... exists -
    ... change peer-device name:r0 conn-name:beta volume:0 replication:Established->SyncSource
    ... change peer-device name:r0 conn-name:beta volume:0 done:42.1 eta:3.2 rate:250.1M
    ... response helper name:r0 conn-name:beta helper:fence-peer status:4

A `change` line names what changed as `key:old->new` (the renderer keeps the last known
value of every key, starting from the `exists` dump). With statistics the node sends a
`progress` event every second while a resync or verify runs.

Owns: the events2 rendering (client side, from the admin socket's JSON events) and the
progress ticker (server side: subscribers that asked for statistics).
Must not: change node state; the JSON `events` stream stays as it is (admin.py).
"""

from __future__ import annotations

import asyncio
import datetime
import json

TICK = 1.0  # seconds between progress events


class ProgressTicker:
    """Every TICK seconds while a resync or verify runs: one `progress` event to the
    subscribers that asked for statistics."""

    def __init__(self, node, status):
        self.node = node
        self.status = status  # () -> the node's status dict (admin.py's)
        self.writers: list[asyncio.StreamWriter] = []
        self.task: asyncio.Task | None = None

    def add(self, writer) -> None:
        self.writers.append(writer)
        if self.task is None or self.task.done():
            self.task = self.node.loop.create_task(self._run())

    def discard(self, writer) -> None:
        if writer in self.writers:
            self.writers.remove(writer)

    async def _run(self) -> None:
        node = self.node
        while self.writers:
            await asyncio.sleep(TICK)
            self.writers = [w for w in self.writers if not w.is_closing()]
            if not (node.resync_source or node.resync_target or node.verifier.current):
                continue
            s = self.status()
            fields = {"replication": s["replication"], "out_of_sync_bytes":
                      s["out_of_sync_bytes"]}
            for what in ("sync", "verify"):
                if s.get(what) and (what == "sync" or s[what].get("state") == "running"):
                    fields[what] = {k: s[what].get(k) for k in
                                    ("percent", "done_bytes", "total_bytes",
                                     "rate_bytes_per_s", "eta_s")}
            line = (json.dumps({"event": "progress", "time": round(node.loop.time(), 3),
                                "wallclock": round(datetime.datetime.now().timestamp(), 6),
                                "node": node.name, **fields}) + "\n").encode()
            for w in self.writers:
                w.write(line)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


# -- the client side: JSON events -> events2 lines -------------------------------------------

def _yn(v) -> str:
    return "yes" if v else "no"


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


class Events2:
    """Renders one node's JSON event stream as events2 lines."""

    def __init__(self, *, statistics: bool = False, timestamps: bool = False):
        self.statistics = statistics
        self.timestamps = timestamps
        self.res = ""
        self.peer = ""
        self.state: dict[str, dict[str, str]] = {}  # object -> key -> last value

    def _prefix(self, wallclock: float | None) -> str:
        if not self.timestamps:
            return ""
        t = datetime.datetime.fromtimestamp(wallclock or datetime.datetime.now().timestamp(),
                                            datetime.timezone.utc).astimezone()
        return t.isoformat(timespec="microseconds") + " "

    def _ids(self, obj: str) -> str:
        ids = f"name:{self.res}"
        if obj in ("connection", "peer-device"):
            ids += f" conn-name:{self.peer}"
        if obj in ("device", "peer-device"):
            ids += " volume:0"
        return ids

    def exists(self, s: dict, wallclock: float | None = None) -> list[str]:
        """The `exists` dump of a status snapshot, ending with `exists -`."""
        self.res, self.peer = s["resource"], s["peer"]["name"]
        fencing = s.get("fencing") or {}
        c = s.get("counters") or {}
        self.state = {
            "resource": {"role": s["role"],
                         "suspended": "fencing" if fencing.get("io_suspended") else "no",
                         "may_promote": _yn(s.get("may_promote"))},
            "connection": {"connection": s["connection"], "role": s["peer"]["role"]},
            "device": {"disk": s["disk"], "client": _yn(s["nbd"]["clients"])},
            "peer-device": {"replication": s["replication"], "peer-disk": s["peer"]["disk"]},
        }
        stats = {
            "device": {"size": str(s["size_bytes"] // 1024),
                       "written": str((c.get("bytes_replicated", 0) +
                                       c.get("bytes_applied", 0)) // 1024)},
            "peer-device": {"sent": str(c.get("link_bytes_sent", 0) // 1024),
                            "received": str(c.get("link_bytes_received", 0) // 1024),
                            "out-of-sync": str(s["out_of_sync_bytes"] // 1024),
                            "pending": str(c.get("writes_pending_peer", 0))},
        }
        if s.get("sync"):
            stats["peer-device"]["done"] = f"{s['sync']['percent']:.1f}"
        p = self._prefix(wallclock)
        out = []
        for obj, keys in self.state.items():
            kv = " ".join(f"{k}:{v}" for k, v in keys.items())
            if self.statistics and obj in stats:
                kv += " " + " ".join(f"{k}:{v}" for k, v in stats[obj].items())
            out.append(f"{p}exists {obj} {self._ids(obj)} {kv}")
        out.append(f"{p}exists -")
        return out

    def _change(self, obj: str, changes: dict, wallclock) -> str | None:
        parts = []
        known = self.state.setdefault(obj, {})
        for k, v in changes.items():
            old = known.get(k)
            if old == v:
                continue
            known[k] = v
            parts.append(f"{k}:{old}->{v}" if old is not None else f"{k}:{v}")
        if not parts:
            return None
        return f"{self._prefix(wallclock)}change {obj} {self._ids(obj)} {' '.join(parts)}"

    def event(self, ev: dict) -> list[str]:
        """The events2 line(s) for one JSON event (possibly none: nothing changed)."""
        kind, wc = ev.get("event"), ev.get("wallclock")
        lines: list[str | None] = []
        if kind == "role":
            lines.append(self._change("resource", {"role": ev["role"]}, wc))
        elif kind == "connection":
            lines.append(self._change("connection", {"connection": ev["connection"]}, wc))
        elif kind == "replication":
            lines.append(self._change("peer-device", {"replication": ev["replication"]}, wc))
        elif kind == "disk":
            lines.append(self._change("device", {"disk": ev["disk"]}, wc))
        elif kind == "peer-state":
            lines.append(self._change("connection", {"role": ev["role"]}, wc))
            lines.append(self._change("peer-device", {"peer-disk": ev["disk"]}, wc))
        elif kind == "may-promote":
            lines.append(self._change("resource", {"may_promote": _yn(ev["may_promote"])},
                                      wc))
        elif kind in ("io-suspended", "io-resumed"):
            lines.append(self._change("resource", {"suspended": "fencing" if kind ==
                                                   "io-suspended" else "no"}, wc))
        elif kind == "progress":
            if self.statistics:
                d = {"out-of-sync": str(ev.get("out_of_sync_bytes", 0) // 1024)}
                for what, key in (("sync", "done"), ("verify", "verify-done")):
                    p = ev.get(what)
                    if p:
                        d[key] = f"{p['percent']:.1f}"
                        d["rate"] = _size(p.get("rate_bytes_per_s")) + "/s"
                        if p.get("eta_s") is not None:
                            d["eta"] = f"{p['eta_s']}s"
                lines.append(self._change("peer-device", d, wc))
        elif kind == "handler":
            lines.append(f"{self._prefix(wc)}response helper {self._ids('connection')} "
                         f"helper:{ev['handler']} status:{ev['exit']}")
        else:  # connected, disconnected, resync-*, verify-*, ...: DRBD has no line for it
            extra = " ".join(f"{k}:{v}" for k, v in ev.items() if k not in
                             ("event", "time", "wallclock", "node", "old")
                             and not isinstance(v, (dict, list)))
            lines.append(f"{self._prefix(wc)}event {kind} {self._ids('resource')}"
                         + (f" {extra}" if extra else ""))
        return [line for line in lines if line]
