"""blockrep's replication through the link proxy (blockrep/faults/proxy.py): a blackhole makes
the Primary declare its peer lost after `timeout` while clients keep being served, and a byte
flipped on the wire is caught by the data CRC32C (the link drops, reconnects, resyncs, and
both disks end identical with what the client wrote)."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from blockrep.peer.proto import HEADER_SIZE
from support.faulttools import route_through_proxy
from support.helpers import require_tool
from support.nbd_testlib import RawClient
from support.repltools import MiB, cmp_data, read_at


def established(s) -> bool:
    return s["connection"] == "Connected" and s["replication"] == "Established"


def test_blackhole_peer_declared_lost_after_timeout_then_resyncs(cluster, tmp_path):
    require_tool("cmp")
    c = cluster(size="64M")  # timeout 3 s, ping-interval 0.5 s
    with route_through_proxy(c, seed=8) as proxy:
        c.up_pair()
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            assert nbd.write(0, b"\x11" * MiB) == 0
            proxy.blackhole(True)
            t0 = time.monotonic()
            # a write during the blackhole is acknowledged once the peer is declared lost
            assert nbd.write(MiB, b"\x22" * MiB) == 0
            write_done = time.monotonic() - t0
            a = c.wait_status("alpha", lambda s: s["connection"] != "Connected" or
                              s["replication"] == "Off", 30, "peer declared lost", fast=True)
            lost_after = time.monotonic() - t0
            assert a["role"] == "Primary" and a["out_of_sync_bytes"] >= MiB, a
            assert "timed out" in c.log("alpha") and "declaring it lost" in c.log("alpha")
            print(f"\nblackhole: write acknowledged after {write_done:.2f} s, peer lost "
                  f"seen after {lost_after:.2f} s (timeout 3.0 s)")
            assert write_done >= 3.0 * 0.9  # not before the timeout: the peer may be alive
            assert proxy.stats()["connections"] <= 1
            assert nbd.write(2 * MiB, b"\x33" * MiB) == 0  # degraded: served locally
            proxy.blackhole(False)
            c.wait_status("alpha", lambda s: established(s) and s["out_of_sync_bytes"] == 0,
                          60, "reconnected and resynced", fast=True)
            c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate",
                          30, "beta UpToDate", fast=True)
            nbd.disconnect()
        assert proxy.stats()["counts"]["blackholes"] == 1
    cmp_data(c, a["size_bytes"])
    assert read_at(c.disk("beta"), 2 * MiB, MiB) == b"\x33" * MiB


def test_flipped_byte_is_caught_by_crc_link_drops_and_data_ends_identical(cluster, tmp_path):
    require_tool("cmp")
    c = cluster(size="64M")
    with route_through_proxy(c, seed=8) as proxy:
        c.up_pair()
        data = os.urandom(4 * MiB)
        # the middle byte of the next ≥ 64 KiB chunk toward beta: inside a P_DATA payload
        proxy.flip(direction="fwd", count=1, min_chunk=64 * 1024)
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            for off in range(0, len(data), MiB):
                assert nbd.write(off, data[off:off + MiB]) == 0  # the client sees no error
            c.wait_status("beta", lambda s: "CRC32C mismatch" in (s["last_error"] or "")
                          or "CRC32C mismatch" in c.log("beta"), 30, "CRC mismatch seen",
                          fast=True)
            c.wait_status("alpha", lambda s: established(s) and s["out_of_sync_bytes"] == 0
                          and s["counters"]["writes_pending_peer"] == 0, 60,
                          "reconnected and resynced", fast=True)
            b = c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate",
                              30, "beta UpToDate", fast=True)
            nbd.disconnect()
        st = proxy.stats()
    assert len(st["flipped"]) == 1, st
    assert st["counts"]["accepted"] >= 2, st  # the link was re-made after the drop
    assert re.search(r"CRC32C mismatch in write at \d+", c.log("beta")), c.log("beta")[-2000:]
    cmp_data(c, b["size_bytes"])
    assert read_at(c.disk("beta"), 0, len(data)) == data



# -- damaged packet headers ------------------------------------------------------------------
# The CRC32C of P_DATA covers the payload only. Before headers carried their own checksum
# (hcrc), a byte flipped in the header's offset field made the Secondary write the block
# elsewhere and acknowledge it (silent divergence, the acknowledged data missing on the
# Secondary); flipped in the id field, the Secondary acked an id the Primary did not know
# and the client's write was never answered while the link stayed Established. Now either
# flip fails the header check: the link drops, reconnects and resyncs, and the write is
# answered. Header layout (docs/wire-protocol.md): magic 0-3, type 4-5, flags 6-7, id 8-15,
# offset 16-23, size 24-27, paylen 28-31, crc 32-35, hcrc 36-39, big-endian.


def _pair_with_armed_header_flip(c, proxy, at: int) -> RawClient:
    c.up_pair()
    nbd = RawClient(c.nbd_port("alpha"), timeout=10)
    nbd.handshake()
    assert nbd.write(0, b"\x00" * 4096) == 0
    # the next chunk toward beta that is one whole 4 KiB P_DATA packet (QD1: one per read)
    proxy.flip(direction="fwd", count=1, min_chunk=HEADER_SIZE + 4096, at=at)
    return nbd


def test_flipped_byte_in_data_header_offset_is_detected(cluster, tmp_path):
    c = cluster(size="64M")
    with route_through_proxy(c, seed=8) as proxy:
        block = os.urandom(4096)
        with _pair_with_armed_header_flip(c, proxy, at=21) as nbd:
            assert nbd.write(0, block) == 0
            a = c.wait_status("alpha", lambda s: established(s) and
                              s["out_of_sync_bytes"] == 0 and
                              s["counters"]["writes_pending_peer"] == 0, 60,
                              "in sync", fast=True)
            c.wait_status("beta", lambda s: established(s) and s["disk"] == "UpToDate",
                          30, "beta UpToDate", fast=True)
            nbd.disconnect()
        assert len(proxy.stats()["flipped"]) == 1
    assert read_at(c.disk("beta"), 0, 4096) == block, "acknowledged write missing on beta"
    cmp_data(c, a["size_bytes"])


def test_flipped_byte_in_data_header_id_does_not_hang_the_write(cluster, tmp_path):
    c = cluster(size="64M")
    with route_through_proxy(c, seed=8) as proxy:
        with _pair_with_armed_header_flip(c, proxy, at=15) as nbd:
            try:
                err = nbd.write(0, os.urandom(4096))
            except socket.timeout:
                a = c.admin("alpha")
                raise AssertionError(
                    f"write unanswered after 10 s; alpha {a['connection']}/"
                    f"{a['replication']}, {a['counters']['writes_pending_peer']} pending "
                    f"for the peer") from None
            assert err == 0
        assert len(proxy.stats()["flipped"]) == 1
