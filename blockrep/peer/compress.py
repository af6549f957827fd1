"""Compression of data payloads on the peer link (sans-IO).

`compression = none | lz4 | zstd[:level]` in the resource section. Each node advertises in
its HELLO the algorithms it can decode (feature bits FEATURE_LZ4, FEATURE_ZSTD; none at all
when it is configured `none`), and compresses what it sends with its configured algorithm
only if the peer advertised that algorithm — a peer without compression, or configured
none, receives plain packets. Each direction decides for itself.

Per packet (P_DATA, P_RS_DATA, and P_READ_REPLY to a Primary that advertises
FEATURE_CODED_READS): a payload is sent compressed only where it pays — smaller
by at least 1/16 (MARGIN) — with the algorithm's flag bit in the header (F_LZ4 or F_ZSTD);
`size` stays the plain length, `paylen` is the compressed length. The header's `crc` is
the CRC32C of the *plain* data: checked after decompression, it covers the codec as well as
the wire (a damaged compressed payload fails decompression or the CRC, and the link drops
like for any damaged payload). An all-zero read reply goes as a zero marker instead
(F_ZERO, no payload: `is_zero`, sent by the link's `send_coded`), as all-zero resync data does,
whatever the compression.

Cost on the loop: compression runs inline where the packet is queued (the stream order is
the order of the queueing; see docs/operations.md "Distance" for the measured cost per MiB).
Must not: touch sockets or clocks.
"""

from __future__ import annotations

import lz4.block
import zstandard

from .proto import F_LZ4, F_ZSTD, MAX_PAYLOAD, LinkProtocolError

FEATURE_LZ4 = 1 << 0
FEATURE_ZSTD = 1 << 1
FEATURES_ALL = FEATURE_LZ4 | FEATURE_ZSTD
F_COMPRESSED = F_LZ4 | F_ZSTD
MIN_SIZE = 512  # smaller payloads go as they are
MARGIN = 16     # compressed is kept when it saves at least 1/MARGIN of the payload
ZSTD_DEFAULT_LEVEL = 3
_ZSTD_MAX_LEVEL = 22
_ZEROES = bytes(1 << 20)  # compared against, a MiB at a time (is_zero)


def parse(text: str) -> tuple[str, int]:
    """"none" | "lz4" | "zstd" | "zstd:LEVEL" -> (algorithm, level); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected none, lz4 or zstd[:level], got {text!r}")
    alg, sep, lvl = text.strip().lower().partition(":")
    if alg in ("none", "lz4") and not sep:
        return alg, 0
    if alg == "zstd":
        if not sep:
            return alg, ZSTD_DEFAULT_LEVEL
        try:
            level = int(lvl)
        except ValueError:
            raise ValueError(f"zstd level {lvl!r} is not a number") from None
        if not 1 <= level <= _ZSTD_MAX_LEVEL:
            raise ValueError(f"zstd level must be 1..{_ZSTD_MAX_LEVEL} (got {level})")
        return alg, level
    raise ValueError(f"expected none, lz4 or zstd[:level], got {text!r}")


def features(alg: str) -> int:
    """The HELLO feature bits of a node configured with `alg`: what it can decode."""
    return 0 if alg == "none" else FEATURES_ALL


def is_zero(data) -> bool:
    """True if every byte of `data` (any contiguous buffer, not copied) is zero: one memcmp
    per MiB (10-20 us), stopping at the first byte that is not."""
    mv = memoryview(data).cast("B")
    step = len(_ZEROES)
    for pos in range(0, len(mv), step):
        if not _ZEROES.startswith(mv[pos:pos + step]):
            return False
    return True


class Compressor:
    """The sending side of one established link: compresses with the configured algorithm
    when the peer can decode it; counts what it saved."""

    def __init__(self, alg: str, level: int = 0):
        self.alg = alg
        self.level = level
        if alg == "lz4":
            self.flag = F_LZ4
            self._fn = lambda d: lz4.block.compress(d, store_size=False)
        elif alg == "zstd":
            self.flag = F_ZSTD
            # one frame per payload, no checksum (the plain data's CRC32C covers it), the
            # content size in the frame so the receiver can bound and check it
            self._fn = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                                write_content_size=True).compress
        else:
            raise ValueError(f"no compressor for {alg!r}")
        self.packets = 0       # payloads offered
        self.compressed = 0    # of which sent compressed
        self.bytes_in = 0      # plain bytes offered
        self.bytes_out = 0     # bytes those payloads took on the wire

    @classmethod
    def for_peer(cls, alg: str, level: int, peer_features: int) -> Compressor | None:
        """The compressor for a link, or None when this node or its peer has it off."""
        want = {"lz4": FEATURE_LZ4, "zstd": FEATURE_ZSTD}.get(alg, 0)
        if not want or not peer_features & want:
            return None
        return cls(alg, level)

    def compress(self, data) -> tuple[int, bytes] | None:
        """-> (flag, compressed) when that pays, else None (send `data` as it is)."""
        n = len(data)
        self.packets += 1
        self.bytes_in += n
        if n >= MIN_SIZE:
            out = self._fn(data)
            if len(out) <= n - n // MARGIN:
                self.compressed += 1
                self.bytes_out += len(out)
                return self.flag, out
        self.bytes_out += n
        return None

    def as_dict(self) -> dict:
        return {"algorithm": self.alg if self.alg != "zstd" else f"zstd:{self.level}",
                "packets": self.packets, "compressed": self.compressed,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


_zstd_d = zstandard.ZstdDecompressor()


def decompress(flags: int, payload, size: int) -> bytes:
    """The plain `size` bytes of a compressed payload; LinkProtocolError when it does not
    decode to exactly that (damaged, or a peer breaking the protocol)."""
    if not 0 < size <= MAX_PAYLOAD:
        raise LinkProtocolError(f"compressed payload of {size} plain bytes")
    kind = flags & F_COMPRESSED
    try:
        if kind == F_LZ4:
            out = lz4.block.decompress(payload, uncompressed_size=size)
        elif kind == F_ZSTD:
            frame = zstandard.get_frame_parameters(payload)
            if frame.content_size != size:
                raise LinkProtocolError(f"zstd frame of {frame.content_size} bytes, "
                                        f"header says {size}")
            out = _zstd_d.decompress(payload, max_output_size=size)
        else:
            raise LinkProtocolError("payload flagged with both lz4 and zstd")
    except LinkProtocolError:
        raise
    except Exception as exc:  # lz4.block.LZ4BlockError, zstandard.ZstdError
        raise LinkProtocolError(f"undecodable compressed payload: {exc}") from None
    if len(out) != size:
        raise LinkProtocolError(f"compressed payload decoded to {len(out)} bytes, "
                                f"header says {size}")
    return out
