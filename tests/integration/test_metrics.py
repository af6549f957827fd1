"""Observability of a running replicated pair: the Prometheus endpoint (`metrics =
"HOST:PORT"`) scraped over HTTP and parsed with prometheus_client's own parser while the
pair writes, loses its peer and resyncs; `status --drbd` in `drbdsetup status --json`'s
shape through the same phases; the endpoint's answers to other requests and to a client
that sends nothing."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.helpers import free_port, require_tool, wait_for
from support.repltools import qemu_io

KiB = 1024
MiB = 1 << 20


def fetch(port: int, path: str = "/metrics", accept: str | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


class Scrape:
    """One scrape: every sample by name, looked up by a subset of its labels."""

    def __init__(self, port: int):
        status, ctype, self.text = fetch(port)
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, metric: str, /, **labels) -> float:
        found = [s.value for s in self.samples if s.name == metric and
                 all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, f"{metric}{labels}: {len(found)} samples\n{self.text}"
        return found[0]

    def state(self, metric: str) -> str:
        """The state an enum metric (drbd-reactor's enums form) has at 1."""
        on = [s.labels[metric] for s in self.samples if s.name == metric and s.value == 1]
        assert len(on) == 1, f"{metric}: {on}"
        return on[0]

    def hist_count(self, name: str, /, **labels) -> float:
        count = self.get(f"{name}_count", **labels)
        assert self.get(f"{name}_bucket", le="+Inf", **labels) == count
        return count


def drbd(c, node: str) -> dict:
    out = json.loads(c.cli(node, "status", "--drbd").stdout)
    assert isinstance(out, list) and len(out) == 1, out
    return out[0]


def test_metrics_and_drbd_status_follow_writes_disconnect_and_resync(cluster):
    require_tool("qemu-io")
    ports = {"alpha": free_port(), "beta": free_port()}
    c = cluster(size="64M", node_keys={n: {"metrics": f"127.0.0.1:{p}"}
                                       for n, p in ports.items()})
    c.up_pair()
    a, b = Scrape(ports["alpha"]), Scrape(ports["beta"])
    size = c.status("alpha")["size_bytes"]  # the data area (internal metadata at its end)
    assert a.get("blockrep_up") == 1 and a.get("blockrep_resource_resources") == 1
    assert a.state("blockrep_resource_role") == "Primary"
    assert b.state("blockrep_resource_role") == "Secondary"
    for s in (a, b):
        assert s.state("blockrep_connection_state") == "Connected"
        assert s.state("blockrep_peerdevice_replicationstate") == "Established"
        assert s.state("blockrep_device_state") == "UpToDate"
        assert s.state("blockrep_peerdevice_peerdiskstate") == "UpToDate"
        assert s.get("blockrep_device_size_bytes", name="r0", volume="0") == size
        assert s.get("blockrep_peerdevice_outofsync_bytes", conn_name=s is a and "beta"
                     or "alpha") == 0
        assert s.get("blockrep_resource_suspended") == 0
        assert s.get("blockrep_resource_splitbrain") == 0
        assert s.get("process_resident_memory_bytes") > 0
    assert a.get("blockrep_connection_peerrole", blockrep_connection_peerrole="Secondary") == 1
    assert a.get("blockrep_resource_maypromote") == 0  # already Primary
    assert b.get("blockrep_resource_maypromote") == 0  # the peer is Primary
    assert a.families["blockrep_device_written_bytes"].type == "counter"
    assert a.families["blockrep_nbd_request_duration_seconds"].type == "histogram"

    # 64 writes of 4 KiB and 32 reads: counters and both latency histograms move
    uri = c.uri("alpha")
    qemu_io(uri, *[f"write -P 0x5a {i * 4 * KiB} 4k" for i in range(64)],
            *[f"read -P 0x5a {i * 4 * KiB} 4k" for i in range(32)])
    a2, b2 = Scrape(ports["alpha"]), Scrape(ports["beta"])
    print("\n/metrics of the Primary after 64 writes and 32 reads (excerpt: no buckets, "
          "no HELP/TYPE):\n" + "\n".join(
              line for line in a2.text.splitlines()
              if line.startswith("blockrep_") and "_bucket{" not in line)[:6000])
    wrote = 64 * 4 * KiB
    assert a2.get("blockrep_device_written_bytes_total") - \
        a.get("blockrep_device_written_bytes_total") >= wrote
    assert a2.get("blockrep_peerdevice_sent_bytes_total") - \
        a.get("blockrep_peerdevice_sent_bytes_total") >= wrote
    assert a2.get("blockrep_device_read_bytes_total") - \
        a.get("blockrep_device_read_bytes_total") >= 32 * 4 * KiB
    assert b2.get("blockrep_peerdevice_received_bytes_total") - \
        b.get("blockrep_peerdevice_received_bytes_total") >= wrote
    assert b2.get("blockrep_device_written_bytes_total") - \
        b.get("blockrep_device_written_bytes_total") >= wrote
    assert a2.get("blockrep_connection_sent_bytes_total") > \
        a.get("blockrep_connection_sent_bytes_total")
    # one in 16 is timed: 64 writes give at least 3 write and 3 ack samples, 32 reads 2
    assert a2.hist_count("blockrep_nbd_request_duration_seconds", op="write") >= 3
    assert a2.hist_count("blockrep_nbd_request_duration_seconds", op="read") >= 2
    assert a2.hist_count("blockrep_peerdevice_ack_duration_seconds") >= 3
    assert a2.get("blockrep_peerdevice_ack_duration_seconds_sum") > 0
    assert a2.get("blockrep_device_bmwrites_total") >= 0
    assert a2.get("blockrep_device_alwrites_total") >= 1  # the written extents entered it
    d = drbd(c, "alpha")
    dev, conn = d["devices"][0], d["connections"][0]
    pd = conn["peer_devices"][0]
    assert (d["name"], d["role"], d["suspended"]) == ("r0", "Primary", False)
    assert (dev["disk-state"], dev["size"]) == ("UpToDate", size // KiB)
    assert dev["written"] >= wrote // KiB and dev["al-writes"] >= 1
    assert (conn["name"], conn["connection-state"], conn["peer-role"]) == \
        ("beta", "Connected", "Secondary")
    assert (pd["replication-state"], pd["peer-disk-state"], pd["out-of-sync"],
            pd["percent-in-sync"], pd["has-sync-details"]) == \
        ("Established", "UpToDate", 0, 100.0, False)
    assert pd["sent"] >= wrote // KiB
    assert (d["node-id"], conn["peer-node-id"]) == (0, 1)  # sorted names: alpha, beta

    # the peer goes away; writes are only local: out of sync grows, states change
    c.cli("beta", "disconnect")
    wait_for(lambda: Scrape(ports["alpha"]).state("blockrep_connection_state") ==
             "Connecting", 20, what="alpha Connecting")
    qemu_io(uri, f"write -P 0x77 {8 * MiB} 1M")
    a3, b3 = Scrape(ports["alpha"]), Scrape(ports["beta"])
    assert a3.state("blockrep_peerdevice_replicationstate") == "Off"
    assert a3.state("blockrep_peerdevice_peerdiskstate") == "DUnknown"
    assert b3.state("blockrep_connection_state") == "StandAlone"
    assert a3.get("blockrep_peerdevice_outofsync_bytes") >= MiB
    assert a3.get("blockrep_peerdevice_sent_bytes_total") == \
        a2.get("blockrep_peerdevice_sent_bytes_total")  # nothing went to the peer
    assert a3.get("blockrep_device_written_bytes_total") - \
        a2.get("blockrep_device_written_bytes_total") >= MiB
    assert b3.get("blockrep_resource_maypromote") == 1  # UpToDate, peer gone
    pd = drbd(c, "alpha")["connections"][0]["peer_devices"][0]
    assert pd["replication-state"] == "Off" and pd["out-of-sync"] >= 1024
    assert pd["percent-in-sync"] < 100.0

    # back: the resync clears the bits on both sides
    c.cli("beta", "connect")
    wait_for(lambda: (lambda s: s.get("blockrep_peerdevice_outofsync_bytes") == 0 and
                      s.state("blockrep_peerdevice_replicationstate") == "Established")(
        Scrape(ports["alpha"])), 30, what="alpha in sync again")
    c.wait_status("beta", lambda s: s["disk"] == "UpToDate" and
                  s["replication"] == "Established", 30, "beta UpToDate", fast=True)
    a4 = Scrape(ports["alpha"])
    assert a4.state("blockrep_connection_state") == "Connected"
    assert a4.get("blockrep_peerdevice_resync_rate_bytes") == 0  # no resync runs
    assert "blockrep_peerdevice_resync_done_ratio{" not in a4.text  # no sample while idle
    pd = drbd(c, "beta")["connections"][0]["peer_devices"][0]
    assert (pd["replication-state"], pd["percent-in-sync"]) == ("Established", 100.0)


def test_metrics_endpoint_answers_other_requests_and_survives_a_silent_client(cluster):
    port = free_port()
    c = cluster(size="16M", node_keys={"alpha": {"metrics": f"127.0.0.1:{port}"}})
    c.start("alpha")
    with socket.create_connection(("127.0.0.1", port)) as silent:  # sends nothing
        status, ctype, text = fetch(port)  # still served meanwhile
        assert status == 200 and "blockrep_resource_role" in text
        status, ctype, text = fetch(port, accept="application/openmetrics-text; "
                                                 "version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and \
            text.rstrip().endswith("# EOF")
        with pytest.raises(urllib.error.HTTPError) as e:
            fetch(port, "/nope")
        assert e.value.code == 404
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x",
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
        silent.settimeout(15)
        assert silent.recv(1) == b""  # closed after the request timeout
    assert c.status("alpha")["role"] == "Secondary"
