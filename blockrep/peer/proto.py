"""blockrep's peer link: framing and packet types (sans-IO).

Every packet is a fixed 40-byte header plus a payload:

    magic u32 | type u16 | flags u16 | id u64 | offset u64 | size u32 | paylen u32 | crc u32
    | hcrc u32

big-endian. `hcrc` is the CRC32C of the 36 bytes before it: a header damaged on the way is
refused (the link drops and resyncs) instead of steering a write to the wrong place or
leaving it unanswered. Data packets (P_DATA, P_RS_DATA, P_READ_REPLY) carry the block
payload as is, with its CRC32C in `crc` (compressed when F_LZ4/F_ZSTD is set, `size` then
the plain length and `crc` the plain data's, see blockrep.peer.compress); control packets
carry a msgpack map. See docs/wire-protocol.md; the handshake and its authentication live
in blockrep.peer.handshake.
Must not: touch sockets or clocks.
"""

from __future__ import annotations

import enum
import struct

import msgpack

from .. import native

MAGIC = 0x42524550  # "BREP"
VERSION = 3  # 2: bitmaps in P_BITMAP chunks, sync identifier and sync-ready;
           # connection-bound authentication, STARTTLS, size in STATE
           # 3: header checksum (hcrc)
FEATURE_RUNS = 1 << 8  # decodes batched resync data (F_RUNS); never sent to a peer without it
FEATURE_PEER_READS = 1 << 9  # answers P_READ_REQUEST (a Diskless Primary reads through it)
FEATURE_CODED_READS = 1 << 10  # decodes P_READ_REPLY with F_ZERO, F_LZ4 or F_ZSTD
# feature bits every node of this build has; per-node ones (compression:
# blockrep.peer.compress) in HandshakeParams
FEATURES = FEATURE_RUNS | FEATURE_PEER_READS | FEATURE_CODED_READS
HEADER = struct.Struct(">IHHQQIIII")
HEADER_SIZE = HEADER.size  # 40
MAX_PAYLOAD = 64 * 1024 * 1024 + 4096
MAX_CONTROL = 64 * 1024 * 1024  # bitmaps of very large devices travel as control


class P(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    REFUSE = 3
    STATE = 4
    STARTTLS = 5
    DATA = 10
    TRIM = 11
    ZERO = 12
    WRITE_ACK = 13
    NEG_ACK = 14
    BARRIER = 15
    BARRIER_ACK = 16
    BITMAP = 17
    RECV_ACK = 18  # protocol B: the packet `id` has been received (not yet written)
    OUT_OF_SYNC = 19  # Ahead: offset+size was written on the Primary and not shipped
    RS_REQUEST = 20
    RS_DATA = 21
    RS_ACK = 22
    RS_CSUM = 23
    RS_IN_SYNC = 24
    OV_REQUEST = 25
    OV_REPLY = 26
    READ_REQUEST = 27  # Diskless Primary -> peer: read offset+size for a client
    READ_REPLY = 28    # the data (or F_ERR, size = errno) for READ_REQUEST `id`
    PING = 30
    PING_ACK = 31
    CONTROL = 40


# packet flags
F_FUA = 1 << 0
F_NO_HOLE = 1 << 1
F_FLUSH = 1 << 2  # on BARRIER: flush the disk before acking
F_ZERO = 1 << 3   # on RS_DATA, READ_REPLY: the block range is all zeroes, no payload
F_PART = 1 << 4   # on RS_DATA: part of a checksum-mode request (answers an RS_REQUEST)
F_LAST = 1 << 5   # on BITMAP: the sender's bitmap is complete (no payload)
F_LZ4 = 1 << 6    # on DATA/RS_DATA/READ_REPLY: payload lz4-compressed (blockrep.peer.compress)
F_ZSTD = 1 << 7   # on DATA/RS_DATA/READ_REPLY: payload zstd-compressed
F_RECV = 1 << 8   # on DATA/TRIM/ZERO: answer P_RECV_ACK on receipt (protocol B)
F_ERR = 1 << 9    # on READ_REPLY: the peer's read failed (size = errno, no payload)
F_RUNS = 1 << 10  # on RS_DATA: many small runs in one packet (run table, then their data)

CONTROL_TYPES = frozenset({P.HELLO, P.AUTH, P.REFUSE, P.STATE, P.CONTROL})
DATA_TYPES = frozenset({P.DATA, P.RS_DATA})
# payloads that may arrive compressed (F_LZ4 / F_ZSTD): the link decompresses them before
# their CRC is checked (by check_payload, or by the handler for SELF_CHECKED ones)
COMPRESSED_TYPES = DATA_TYPES | {P.READ_REPLY}


class LinkProtocolError(Exception):
    """The peer sent something that breaks the link protocol."""


# -- batched resync data (F_RUNS): u32 count, count x (u64 offset, u32 length), then the runs'
# data back to back; the runs ascend and do not overlap. One packet, one CRC, one ack for
# up to MAX_RUNS small runs (a resync of scattered 4 KiB blocks is otherwise a packet each)
MAX_RUNS = 1024
_COUNT = struct.Struct(">I")
_RUN = struct.Struct(">QI")


def runs_table_size(n: int) -> int:
    return _COUNT.size + n * _RUN.size


def pack_runs_table(buf, runs) -> int:
    """Write the run table for `runs` at the start of buf; returns where the data goes."""
    _COUNT.pack_into(buf, 0, len(runs))
    pos = _COUNT.size
    for off, ln in runs:
        _RUN.pack_into(buf, pos, off, ln)
        pos += _RUN.size
    return pos


def parse_runs(payload, disk_size: int) -> tuple[list[tuple[int, int]], int]:
    """An F_RUNS payload -> (runs, offset of their data in it); LinkProtocolError for a
    table that is malformed, out of order, outside the disk or not matching the data."""
    if len(payload) < _COUNT.size:
        raise LinkProtocolError("batched resync data without a run table")
    (n,) = _COUNT.unpack_from(payload, 0)
    base = runs_table_size(n)
    if not 1 <= n <= MAX_RUNS or len(payload) < base:
        raise LinkProtocolError(f"batched resync data: bad run count {n}")
    runs = list(_RUN.iter_unpack(payload[_COUNT.size:base]))
    end = total = 0
    for off, ln in runs:
        if ln == 0 or off < end or off + ln > disk_size:
            raise LinkProtocolError("batched resync data: runs empty, out of order or "
                                    "past the end of the disk")
        end = off + ln
        total += ln
    if total != len(payload) - base:
        raise LinkProtocolError("batched resync data: the runs do not match the data")
    return runs, base


# The 40-byte header of one packet, its checksum included, built (frame: the hot-path
# spelling) and checked (_parse: None for a bad magic or checksum) in one call each, by the
# C core or its twin in blockrep.native (which keeps this layout and MAGIC in step)
frame = native.frame
_parse = native.parse_header


def pack_header(ptype: int, flags: int = 0, pid: int = 0, offset: int = 0, size: int = 0,
                paylen: int = 0, crc: int = 0) -> bytes:
    return frame(ptype, flags, pid, offset, size, paylen, crc)


def _bad_header(buf, pos: int) -> LinkProtocolError:
    """Why native.parse_header refused the header at `pos`: its magic or its checksum."""
    magic = HEADER.unpack_from(buf, pos)[0]
    if magic != MAGIC:
        return LinkProtocolError(f"bad packet magic {magic:#x}")
    return LinkProtocolError("bad packet header checksum (damaged on the link)")


def check_header(buf, pos: int = 0) -> tuple[int, int, int, int, int, int, int, int]:
    """-> (magic, type, flags, id, offset, size, paylen, crc) of a header whose checksum
    holds; raises LinkProtocolError for a bad magic or a damaged header."""
    fields = _parse(buf, pos)
    if fields is None:
        raise _bad_header(buf, pos)
    return (MAGIC, *fields)


def unpack_header(buf, pos: int = 0) -> tuple[int, int, int, int, int, int, int]:
    """-> (type, flags, id, offset, size, paylen, crc); checks magic, header checksum and
    payload length."""
    fields = _parse(buf, pos)
    if fields is None:
        raise _bad_header(buf, pos)
    paylen = fields[5]
    if paylen > MAX_CONTROL:  # MAX_CONTROL < MAX_PAYLOAD: one comparison when it is fine
        if fields[0] in CONTROL_TYPES:
            raise LinkProtocolError(f"control packet of {paylen} bytes is too large")
        if paylen > MAX_PAYLOAD:
            raise LinkProtocolError(f"data packet of {paylen} bytes is too large")
    return fields


def encode_control(ptype: int, body: dict) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return pack_header(ptype, paylen=len(payload), crc=native.crc32c(payload)) + payload


# packets whose handler checks `crc` against the payload itself (data may be checked in a
# thread, a bitmap chunk after reassembly); every other payload is checked by check_payload
SELF_CHECKED = frozenset({P.DATA, P.RS_DATA, P.BITMAP})


def check_payload(ptype: int, crc: int, payload) -> None:
    """Every payload carries its CRC32C in the header's `crc`: a control map, a checksum
    list or a verify reply damaged on the way ends the connection like a damaged header."""
    if payload and ptype not in SELF_CHECKED and native.crc32c(payload) != crc:
        name = P(ptype).name if ptype in P._value2member_map_ else str(ptype)
        raise LinkProtocolError(f"CRC32C mismatch in a {name} payload (damaged on the link)")


def decode_control(payload) -> dict:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise LinkProtocolError(f"undecodable control message: {exc}") from None
    if not isinstance(body, dict):
        raise LinkProtocolError("control message is not a map")
    return body


def data_header(ptype: int, pid: int, offset: int, payload, flags: int = 0) -> bytes:
    n = len(payload)
    return pack_header(ptype, flags, pid, offset, n, n, native.crc32c(payload))


def read_reply_error(flags: int, size: int) -> int:
    """The errno of a P_READ_REPLY: 0 for data, else the peer's errno (EIO if it sent
    none or one out of range)."""
    if not flags & F_ERR:
        return 0
    return size if 0 < size < 4096 else 5


def check_crc(payload, crc: int) -> bool:
    return native.crc32c(payload) == crc


def need(body: dict, key: str, typ):
    v = body.get(key)
    if not isinstance(v, typ):
        raise LinkProtocolError(f"control message lacks a valid {key!r}")
    return v
