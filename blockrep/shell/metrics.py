"""The Prometheus endpoint of a node (`metrics = "HOST:PORT"`, off by default).

Owns: the metric names, labels and help texts (drbd-reactor's prometheus plugin's, `drbd_`
-> `blockrep_`, where one exists; listed in docs/metrics.md), turning a stats snapshot into
metric families (`NodeCollector`), and the small HTTP server on the node's own event loop
that answers `GET /metrics` with them (text format 0.0.4, or OpenMetrics when the scraper
asks for it).
Must not: block the loop (a scrape reads counters and renders a few KiB of text; requests
are bounded in size, time and number), touch the request path (shell/latency.py and the
counters it reads are all that runs per request).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..state import ConnState, DiskState, ReplState, Role
from .stats import snapshot

log = logging.getLogger("blockrep.metrics")

MAX_CLIENTS = 16  # scrapes served at once; more are closed at once
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line and headers
MAX_REQUEST = 8192  # bytes of request line and headers


def _gauge(name, doc, labels, value, extra=()):
    g = GaugeMetricFamily(name, doc, labels=[k for k, _ in labels] + list(extra))
    if value is not None:
        g.add_metric([v for _, v in labels], value)
    return g


def _enum(name, doc, labels, members, current):
    """drbd-reactor's `enums = true` form: one series per state, 1 for the current one,
    the state in a label named like the metric."""
    g = GaugeMetricFamily(name, doc, labels=[k for k, _ in labels] + [name])
    for m in members:
        g.add_metric([v for _, v in labels] + [m.value], 1 if m.value == current else 0)
    return g


def _counter(name, doc, labels, value):
    c = CounterMetricFamily(name, doc, labels=[k for k, _ in labels])
    c.add_metric([v for _, v in labels], value)
    return c


def _histogram(fam: HistogramMetricFamily, labels: list, hist) -> None:
    buckets, _count, total = hist.snapshot()
    fam.add_metric(labels, [(floatToGoString(b), c) for b, c in buckets], total)


class NodeCollector:
    """A prometheus_client collector: every metric of one node, from one snapshot."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        s = snapshot(self.node)
        res = [("name", s["resource"])]
        conn = res + [("conn_name", s["peer"]), ("peer_node_id", str(s["peer_node_id"]))]
        pdev = conn + [("volume", "0")]
        dev = res + [("volume", "0")]

        yield _gauge("blockrep_up", "Boolean indicating whether or not blockrep is running. "
                     "Always 1", [], 1)
        info = InfoMetricFamily("blockrep_version", "Version of blockrep")
        info.add_metric([], {"version": __version__})
        yield info
        yield _gauge("blockrep_resource_resources", "Number of resources", [], 1)
        # resource
        yield _enum("blockrep_resource_role", "Role of the resource", res,
                    (Role.PRIMARY, Role.SECONDARY), s["role"])
        yield _gauge("blockrep_resource_suspended", "Boolean whether the resource is "
                     "suspended (client I/O held while the fence-peer handler runs)", res,
                     int(s["suspended"]))
        yield _gauge("blockrep_resource_maypromote", "Boolean whether the resource may be "
                     "promoted to Primary", res, int(s["may_promote"]))
        yield _gauge("blockrep_resource_splitbrain", "Boolean whether the last connect found "
                     "a split brain (both nodes wrote while disconnected)", res,
                     int(s["split_brain"]))
        # connection
        yield _enum("blockrep_connection_state", "Connection state", conn, ConnState,
                    s["connection"])
        yield _enum("blockrep_connection_peerrole", "Role of the peer as this node knows "
                    "it", conn, Role, s["peer_role"])
        yield _gauge("blockrep_connection_congested", "Boolean whether the replication "
                     "link's send buffer is full (writing paused)", conn, int(s["congested"]))
        yield _gauge("blockrep_connection_apinflight_bytes", "Application writes sent to "
                     "the peer and not yet acknowledged", conn, s["ap_in_flight"])
        yield _gauge("blockrep_connection_rsinflight_bytes", "Resync requests in flight",
                     conn, s["rs_in_flight"])
        yield _counter("blockrep_connection_sent_bytes", "Bytes sent on the current "
                       "replication link (headers included; starts at 0 on every "
                       "connection)", conn, s["link_sent"])
        yield _counter("blockrep_connection_received_bytes", "Bytes received on the current "
                       "replication link (headers included; starts at 0 on every "
                       "connection)", conn, s["link_received"])
        # peer device
        yield _enum("blockrep_peerdevice_replicationstate", "Replication state towards the "
                    "peer", pdev, ReplState, s["replication"])
        yield _enum("blockrep_peerdevice_peerdiskstate", "Disk state of the peer as this "
                    "node knows it", pdev, DiskState, s["peer_disk"])
        yield _gauge("blockrep_peerdevice_outofsync_bytes", "Number of bytes currently out "
                     "of sync with this peer, according to the bitmap", pdev,
                     s["out_of_sync"])
        yield _counter("blockrep_peerdevice_sent_bytes", "Application data replicated to "
                       "this peer", pdev, s["sent"])
        yield _counter("blockrep_peerdevice_received_bytes", "Application data received "
                       "from this peer and applied", pdev, s["received"])
        yield _gauge("blockrep_peerdevice_pending", "Requests sent to the peer and not yet "
                     "answered", pdev, s["pending"])
        yield _gauge("blockrep_peerdevice_unacked", "Requests received from the peer and not "
                     "yet acknowledged", pdev, s["unacked"])
        yield from self._progress("resync", pdev, s["resync"])
        yield from self._progress("verify", pdev, s["verify"])
        yield _gauge("blockrep_peerdevice_verify_found_bytes", "Out-of-sync bytes the "
                     "running (or last) online verify found", pdev, s["verify_found"])
        yield _gauge("blockrep_peerdevice_diskless", "Boolean whether this Primary's disk "
                     "is detached and its I/O goes through this peer", pdev,
                     int(s["diskless"]))
        yield _counter("blockrep_peerdevice_diskless_read_bytes", "Data a Diskless Primary "
                       "read from this peer for its clients", pdev, s["peer_reads"])
        yield _counter("blockrep_peerdevice_diskless_written_bytes", "Data a Diskless "
                       "Primary wrote to this peer only (write-zeroes/trim count their "
                       "length)", pdev, s["peer_writes"])
        yield _counter("blockrep_peerdevice_served_read_bytes", "Data read from the local "
                       "disk for this peer (a Diskless Primary's clients)", pdev,
                       s["served_reads"])
        ack = HistogramMetricFamily("blockrep_peerdevice_ack_duration_seconds",
                                    "Time from sending a write to the peer to its "
                                    "acknowledgement (one write in 16 is timed)",
                                    labels=[k for k, _ in pdev])
        _histogram(ack, [v for _, v in pdev], s["ack_latency"])
        yield ack
        # device
        yield _enum("blockrep_device_state", "Disk state", dev, DiskState, s["disk"])
        yield _gauge("blockrep_device_unintentionaldiskless", "Boolean whether the device "
                     "lost its disk (Failed or Diskless)", dev,
                     int(s["disk"] in ("Failed", "Diskless")))
        yield _gauge("blockrep_device_size_bytes", "Device size in bytes", dev, s["size"])
        yield _counter("blockrep_device_read_bytes", "Net data read from the local disk "
                       "for NBD clients", dev, s["read"])
        yield _counter("blockrep_device_written_bytes", "Net data written on the local "
                       "disk (client writes as Primary, the peer's writes as Secondary)",
                       dev, s["written"])
        yield _counter("blockrep_device_alwrites", "Number of updates of the activity log "
                       "area of the meta data", dev, s["al_writes"])
        yield _counter("blockrep_device_bmwrites", "Number of updates of the bitmap area of "
                       "the meta data", dev, s["bm_writes"])
        yield _gauge("blockrep_device_upperpending", "NBD write-type requests handed to "
                     "blockrep and not yet answered", dev, s["upper_pending"])
        yield _gauge("blockrep_device_lowerpending", "Local writes running in the I/O "
                     "threads", dev, s["lower_pending"])
        yield _gauge("blockrep_nbd_clients", "Attached NBD clients", res, s["nbd_clients"])
        yield _gauge("blockrep_nbd_inflight_bytes", "Write payload bytes of NBD requests in "
                     "flight", res, s["nbd_inflight_bytes"])
        lat = HistogramMetricFamily("blockrep_nbd_request_duration_seconds",
                                    "Time from an NBD request's arrival to its answer "
                                    "(one request in 16 per operation is timed)",
                                    labels=["name", "op"])
        for op, hist in s["latency"].items():
            _histogram(lat, [s["resource"], op], hist)
        yield lat

    @staticmethod
    def _progress(what: str, labels, p):
        """Progress of the running resync or verify; no sample while none runs."""
        running = p is not None
        yield _gauge(f"blockrep_peerdevice_{what}_total_bytes", f"Bytes the running {what} "
                     f"covers", labels, p["total"] if running else None)
        yield _gauge(f"blockrep_peerdevice_{what}_done_bytes", f"Bytes the running {what} "
                     f"has done", labels, p["done"] if running else None)
        yield _gauge(f"blockrep_peerdevice_{what}_done_ratio", f"Part of the running {what} "
                     f"done (0..1)", labels,
                     (p["done"] / p["total"] if p["total"] else 1.0) if running else None)
        yield _gauge(f"blockrep_peerdevice_{what}_rate_bytes", f"Bytes per second of the "
                     f"running {what} (last 5 s)", labels, p["rate"] if running else 0)
        yield _gauge(f"blockrep_peerdevice_{what}_eta_seconds", f"Estimated seconds until "
                     f"the running {what} ends", labels,
                     p["eta"] if running and p["eta"] is not None else None)


class MetricsServer:
    """HTTP/1.0-style server for `GET /metrics` on the node's loop (one request per
    connection, then close: what Prometheus' scraper needs)."""

    def __init__(self, node, address: tuple[str, int]):
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU, fds
        self.server: asyncio.AbstractServer | None = None
        self.clients = 0
        self.scrapes = 0

    async def start(self) -> None:
        host, port = self.address
        try:
            self.server = await asyncio.start_server(self._client, host, port,
                                                     reuse_address=True, limit=MAX_REQUEST)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics address {host}:{port}: "
                          f"{exc.strerror or exc}") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            writer.close()
            return
        self.clients += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError):
                return
            status, ctype, body = self._answer(head)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + (b"" if head.startswith(b"HEAD ") else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self.clients -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if target == "/metrics":
            accept = next((ln.split(":", 1)[1].strip() for ln in lines[1:]
                           if ln.lower().startswith("accept:")), "")
            body, ctype = self.render(accept)
            self.scrapes += 1
            return "200 OK", ctype, body
        if target == "/":
            return "200 OK", "text/plain", b"blockrep metrics: /metrics\n"
        return "404 Not Found", "text/plain", b"not found\n"
