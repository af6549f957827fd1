"""A Diskless Primary's reads through its peer on a compressing link: the peer's
P_READ_REPLY payloads are compressed like P_DATA / P_RS_DATA (same negotiation, only where
it pays, counted in the peer's link `compression`), all-zero ones go as a zero marker
(F_ZERO, no payload) like resync data; the Primary gets the right bytes. A peer configured
`none`, or a Primary of an older build (no FEATURE_CODED_READS in its HELLO), still gets
plain replies."""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest

from blockrep.peer import compress, proto
from blockrep.peer.proto import P
from blockrep.peer.requests import WRITE
from blockrep.shell import admin

from support.inprocess import pattern, run, settle, wait_until
from .test_diskless_primary import MiB, Reads, _detached_pair
from .test_write_path import SMALL

BIG = MiB  # read in beta's I/O threads (diskless.READ_INLINE is 256 KiB)
RANDOM = os.urandom(SMALL)


async def _write_mix(p) -> None:
    """Compressible data small and large, an incompressible block; 8 MiB+ is never
    written (reads as zeroes)."""
    assert await p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(3, SMALL)) == 0
    assert await p.submit(p.alpha, WRITE, 4 * MiB, data=pattern(4, BIG)) == 0
    assert await p.submit(p.alpha, WRITE, 3 * MiB, data=RANDOM) == 0


async def _read(p, reads, offset, length) -> tuple[bytes, int]:
    """-> (data, bytes beta sent for it) of one read through the peer."""
    before = p.beta.link.bytes_sent
    err, data = await reads.get(offset, length)
    assert err == 0
    return data, p.beta.link.bytes_sent - before


@pytest.mark.parametrize("setting", ["lz4", "zstd:3"])
def test_read_replies_go_compressed_where_it_pays(tmp_path, setting):
    async def main():
        p = await _detached_pair(tmp_path, compression=setting)
        try:
            await _write_mix(p)
            reads = Reads(p.alpha)
            comp = p.beta.link.compressor
            assert comp is not None and comp.packets == 0  # beta sent no data yet
            data, sent = await _read(p, reads, 2 * MiB, SMALL)  # inline on beta
            assert data == pattern(3, SMALL)
            assert sent < SMALL // 4, f"{sent} bytes on the wire for a compressible 4 KiB"
            data, sent = await _read(p, reads, 4 * MiB, BIG)  # in beta's I/O threads
            assert data == pattern(4, BIG)
            assert sent < BIG // 16, f"{sent} bytes on the wire for a compressible 1 MiB"
            assert comp.compressed == 2 and comp.bytes_in == SMALL + BIG
            data, sent = await _read(p, reads, 3 * MiB, SMALL)  # does not pay: plain
            assert data == RANDOM and sent >= SMALL
            assert comp.packets == 3 and comp.compressed == 2
            data, sent = await _read(p, reads, 8 * MiB, BIG)  # zeroes: a marker
            assert data == bytes(BIG) and sent < 256, sent
            # the part before the detach (written at 0 and 1 MiB by _detached_pair)
            data, _ = await _read(p, reads, 0, SMALL)
            assert data == pattern(1, SMALL)
            s = admin.status(p.beta)
            assert s["compression"]["compressed"] == 3, s["compression"]
            assert s["diskless"]["served_reads_bytes"] == 3 * SMALL + 2 * BIG
            assert admin.status(p.alpha)["diskless"]["peer_reads_bytes"] == 3 * SMALL + 2 * BIG
        finally:
            await p.close()
    run(main())


@pytest.mark.parametrize("compression", [{"alpha": "lz4", "beta": "none"},
                                         {"alpha": "none", "beta": "zstd"}],
                         ids=["peer-none", "primary-none"])
def test_compression_off_on_either_side_gets_plain_replies(tmp_path, compression):
    async def main():
        p = await _detached_pair(tmp_path, compression=compression)
        try:
            await _write_mix(p)
            assert p.beta.link.compressor is None  # beta's sends are not compressed
            reads = Reads(p.alpha)
            data, sent = await _read(p, reads, 4 * MiB, BIG)
            assert data == pattern(4, BIG) and sent >= BIG
            data, sent = await _read(p, reads, 2 * MiB, SMALL)
            assert data == pattern(3, SMALL) and sent >= SMALL
            data, _ = await _read(p, reads, 3 * MiB, SMALL)
            assert data == RANDOM
            # the zero marker is no compression: it needs only the feature bit
            data, sent = await _read(p, reads, 8 * MiB, BIG)
            assert data == bytes(BIG) and sent < 256, sent
            assert admin.status(p.beta)["compression"] is None
        finally:
            await p.close()
    run(main())


def test_primary_of_an_older_build_gets_plain_replies(tmp_path):
    """A Primary without FEATURE_CODED_READS decodes compressed P_DATA but takes a
    P_READ_REPLY payload as it is: its replies go plain, zeroes too."""
    async def main():
        p = await _detached_pair(tmp_path, compression="lz4")
        try:
            await _write_mix(p)
            await p.cut()
            p.alpha.link_params = dataclasses.replace(
                p.alpha.link_params,
                features=p.alpha.link_params.features & ~proto.FEATURE_CODED_READS)
            await p.reconnect()
            assert p.beta.link.compressor is not None and not p.beta.link.coded_reads
            reads = Reads(p.alpha)
            data, sent = await _read(p, reads, 4 * MiB, BIG)
            assert data == pattern(4, BIG) and sent >= BIG
            data, sent = await _read(p, reads, 8 * MiB, SMALL)
            assert data == bytes(SMALL) and sent >= SMALL
            assert p.beta.link.compressor.packets == 0
        finally:
            await p.close()
    run(main())


def test_reply_not_decoding_to_its_crc_ends_the_link(tmp_path):
    """`crc` of a compressed reply is the plain data's, checked after decompression: a
    reply that decodes to other data ends the link; the read fails (no other copy)."""
    async def main():
        p = await _detached_pair(tmp_path, compression="lz4")
        try:
            p.link.ta.hold()  # the request stays on the wire: beta answers by hand
            r = Reads(p.alpha).start(4 * MiB, BIG)
            await settle()
            (pid,) = p.alpha.diskless.reads
            flag, packed = compress.Compressor("lz4").compress(pattern(4, BIG))
            p.beta.link.send(proto.pack_header(P.READ_REPLY, flag, pid, 4 * MiB, BIG,
                                               len(packed), proto.native.crc32c(
                                                   pattern(5, BIG))), packed)
            assert (await r)[0] == errno.EIO
            await wait_until(lambda: p.alpha.link is None, "alpha dropped the link")
            assert "CRC32C mismatch in a READ_REPLY payload" in p.alpha.last_error
        finally:
            await p.close()
    run(main())
