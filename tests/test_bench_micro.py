"""Microbenchmarks of the hot paths (pytest-benchmark).

pytest.ini passes --benchmark-disable, so by default each benchmark body runs once and the
correctness assertions make these ordinary tests. Run the numbers with
    .venv/bin/python -m pytest tests/test_bench_micro.py --benchmark-enable
"""

from __future__ import annotations

import struct
import time

from blockrep import _native, native
from blockrep.nbd import proto
from blockrep.nbd.constants import REQUEST_MAGIC, CmdFlag, NbdCmd

MiB = 1 << 20


def _mean_seconds(benchmark, fallback: float) -> float:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        return stats.stats.mean
    return fallback


def _pattern(n: int) -> bytes:
    """Cheap, non-trivial data: every byte value, shifted per 256-byte block."""
    block = bytes(range(256)) + bytes(range(255, -1, -1)) + bytes(range(1, 256)) + b"\x07"
    return (block * (n // len(block) + 1))[:n]


def test_bench_native_crc32c_64mib(benchmark):
    data = _pattern(64 * MiB)
    t0 = time.perf_counter()
    result = benchmark(_native.crc32c, data)
    elapsed = time.perf_counter() - t0
    # Reference: the slicing-by-8 table path (checked against RFC 3720 in test_native) and
    # the continuation contract, so a broken hardware/3-stream path cannot pass.
    assert result == _native.crc32c_sw(data)
    half = len(data) // 2 + 3
    assert result == _native.crc32c(data[half:], _native.crc32c(data[:half]))
    mean = _mean_seconds(benchmark, elapsed)
    benchmark.extra_info["bytes"] = len(data)
    benchmark.extra_info["GB/s"] = round(len(data) / mean / 1e9, 3)
    benchmark.extra_info["hw_crc"] = _native.have_hw_crc()


def test_bench_fallback_crc32c_64kib(benchmark):
    data = _pattern(64 * 1024)
    result = benchmark(native.py_crc32c, data)
    assert result == _native.crc32c(data)
    assert native.py_crc32c(b"123456789") == 0xE3069283


def test_bench_crc32c_blocks_1mib_4k(benchmark):
    data = _pattern(MiB)
    out = benchmark(native.crc32c_blocks, data, 4096)
    assert len(out) == 256 * 4
    want = b"".join(struct.pack("<I", _native.crc32c_sw(data[i:i + 4096]))
                    for i in range(0, MiB, 4096))
    assert out == want
    # Spot-check against the pure-Python reference.
    vals = struct.unpack("<256I", out)
    for i in (0, 1, 255):
        assert vals[i] == native.py_crc32c(data[i * 4096:(i + 1) * 4096])


REQ = struct.pack(">IHHQQI", REQUEST_MAGIC, CmdFlag.FUA, NbdCmd.WRITE, 0xC0FFEE, 1 << 33,
                  65536)


def test_bench_unpack_request_from(benchmark):
    assert len(REQ) == 28
    buf = bytearray(b"\0" * 5 + REQ)
    result = benchmark(proto.unpack_request_from, buf, 5)
    assert result == (REQUEST_MAGIC, 1, 1, 0xC0FFEE, 1 << 33, 65536)


def test_bench_decode_request(benchmark):
    result = benchmark(proto.decode_request, REQ)
    assert result == (proto.Request(flags=1, cmd=1, cookie=0xC0FFEE, offset=1 << 33,
                                    length=65536), 28)
