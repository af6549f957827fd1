"""Link compression (blockrep.peer.compress): round trips for both algorithms, the fallback
for incompressible and tiny data, negotiation by feature bits, refusal of damaged or lying
payloads, and the framing through proto/link helpers."""

from __future__ import annotations

import os

import pytest

from blockrep.peer import compress, proto
from blockrep.peer.compress import (F_COMPRESSED, FEATURE_LZ4, FEATURE_ZSTD, Compressor,
                                    decompress)
from blockrep.peer.proto import LinkProtocolError

TEXT = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(20000))[:1 << 20]


@pytest.mark.parametrize("alg,level", [("lz4", 0), ("zstd", 1), ("zstd", 3), ("zstd", 19)])
@pytest.mark.parametrize("n", [512, 4096, 65536, 1 << 20])
def test_round_trip_compressible(alg, level, n):
    c = Compressor(alg, level)
    data = TEXT[:n]
    got = c.compress(data)
    assert got is not None
    flag, out = got
    assert flag & F_COMPRESSED and len(out) < n
    assert decompress(flag, out, n) == data
    assert c.compressed == 1 and c.bytes_in == n and c.bytes_out == len(out)


@pytest.mark.parametrize("alg", ["lz4", "zstd"])
def test_incompressible_and_tiny_payloads_go_plain(alg):
    c = Compressor(alg, 3)
    assert c.compress(os.urandom(65536)) is None
    assert c.compress(b"a" * 100) is None  # below MIN_SIZE
    assert c.compressed == 0 and c.bytes_out == c.bytes_in == 65536 + 100


def test_margin_keeps_only_what_pays():
    c = Compressor("lz4")
    # mostly random, a little compressible: saves less than 1/16
    data = os.urandom(4096 - 128) + b"\0" * 128
    assert c.compress(data) is None


def test_parse():
    assert compress.parse("none") == ("none", 0)
    assert compress.parse("lz4") == ("lz4", 0)
    assert compress.parse("zstd") == ("zstd", compress.ZSTD_DEFAULT_LEVEL)
    assert compress.parse("zstd:9") == ("zstd", 9)
    for bad in ("gzip", "zstd:0", "zstd:23", "zstd:x", "lz4:1", 3):
        with pytest.raises(ValueError):
            compress.parse(bad)


def test_negotiation_by_feature_bits():
    assert compress.features("none") == 0
    assert compress.features("lz4") & FEATURE_LZ4 and compress.features("zstd") & FEATURE_ZSTD
    assert Compressor.for_peer("lz4", 0, 0) is None            # peer without it / none
    assert Compressor.for_peer("none", 0, FEATURE_LZ4 | FEATURE_ZSTD) is None
    assert Compressor.for_peer("zstd", 3, FEATURE_LZ4) is None  # peer can't decode zstd
    assert Compressor.for_peer("lz4", 0, FEATURE_LZ4).alg == "lz4"
    assert Compressor.for_peer("zstd", 5, FEATURE_ZSTD).level == 5


@pytest.mark.parametrize("alg", ["lz4", "zstd"])
def test_damaged_or_lying_payloads_are_refused(alg):
    n = 65536
    flag, out = Compressor(alg, 3).compress(TEXT[:n])
    with pytest.raises(LinkProtocolError):
        decompress(flag, out, n + 4096)  # header claims a different plain size
    with pytest.raises(LinkProtocolError):
        decompress(flag, out, n - 1)
    with pytest.raises(LinkProtocolError):
        decompress(flag, out[: len(out) // 2], n)
    with pytest.raises(LinkProtocolError):
        decompress(flag, out, proto.MAX_PAYLOAD + 1)  # bomb bound
    with pytest.raises(LinkProtocolError):
        decompress(F_COMPRESSED, out, n)
    damaged = bytearray(out)
    damaged[len(damaged) // 2] ^= 0xFF
    try:
        plain = decompress(flag, bytes(damaged), n)
    except LinkProtocolError:
        return
    # a flip the codec cannot see: the plain data's CRC (what the header carries) does
    assert not proto.check_crc(plain, proto.native.crc32c(TEXT[:n]))


def test_flags_do_not_clash_with_other_packet_flags():
    others = (proto.F_FUA | proto.F_NO_HOLE | proto.F_FLUSH | proto.F_ZERO | proto.F_PART
              | proto.F_LAST)
    assert not others & F_COMPRESSED and proto.F_LZ4 != proto.F_ZSTD


def test_is_zero():
    step = 1 << 20
    for n in (1, 4096, step - 1, step, step + 1, 3 * step + 17):
        assert compress.is_zero(bytes(n)), n
        for at in (0, n // 2, n - 1):
            data = bytearray(n)
            data[at] = 1
            assert not compress.is_zero(bytes(data)), (n, at)
    assert compress.is_zero(memoryview(bytes(4096)))  # other buffers too
    assert not compress.is_zero(bytearray(b"\0\0\x01"))
