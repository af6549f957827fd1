"""blockrep.peer.proto: header framing against hand-built bytes, control messages, data CRCs
(docs/wire-protocol.md). The handshake and its proofs: tests/peer/test_handshake.py.

Expected bytes are assembled with struct and MAGIC, never with the encoder. Decoders must
raise nothing but LinkProtocolError on arbitrary input.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep import native
from blockrep.peer import proto
from blockrep.peer.proto import (
    CONTROL_TYPES,
    DATA_TYPES,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL,
    MAX_PAYLOAD,
    LinkProtocolError,
    P,
    check_crc,
    data_header,
    decode_control,
    encode_control,
    need,
    pack_header,
    unpack_header,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
SETTINGS = settings(max_examples=200, deadline=None)


def hand_header(ptype, flags=0, pid=0, offset=0, size=0, paylen=0, crc=0, magic=MAGIC,
                hcrc=None):
    head = (struct.pack(">I", magic) + struct.pack(">H", ptype) + struct.pack(">H", flags)
            + struct.pack(">Q", pid) + struct.pack(">Q", offset) + struct.pack(">I", size)
            + struct.pack(">I", paylen) + struct.pack(">I", crc))
    # the header checksum by the table-driven twin, not the C core that proto.frame uses
    return head + struct.pack(">I", native.py_crc32c(head) if hcrc is None else hcrc)


# -- constants ---------------------------------------------------------------------------------

def test_constants():
    assert struct.pack(">I", MAGIC) == b"BREP"
    assert HEADER_SIZE == 40
    assert proto.VERSION == 3
    assert CONTROL_TYPES == {P.HELLO, P.AUTH, P.REFUSE, P.STATE, P.CONTROL}
    assert DATA_TYPES == {P.DATA, P.RS_DATA}
    assert not CONTROL_TYPES & DATA_TYPES
    assert proto.COMPRESSED_TYPES == {P.DATA, P.RS_DATA, P.READ_REPLY}


# -- header ------------------------------------------------------------------------------------

def test_pack_header_known_answer():
    got = pack_header(P.DATA, flags=proto.F_FUA, pid=0x0102030405060708,
                      offset=0x1122334455667788, size=4096, paylen=4096, crc=0xCAFEBABE)
    assert got == (b"BREP" + b"\x00\x0a" + b"\x00\x01"
                   + bytes.fromhex("0102030405060708") + bytes.fromhex("1122334455667788")
                   + b"\x00\x00\x10\x00" + b"\x00\x00\x10\x00" + b"\xca\xfe\xba\xbe"
                   + bytes.fromhex("4f03d1f2"))  # hcrc: CRC32C of the 36 bytes before it
    assert len(got) == HEADER_SIZE


def test_pack_header_defaults():
    assert pack_header(P.PING) == b"BREP" + b"\x00\x1e" + bytes(30) + bytes.fromhex("3a989fc1")


@pytest.mark.parametrize("pos", range(4, 40))
@pytest.mark.parametrize("bit", [0, 7])
def test_any_flipped_header_bit_is_refused(pos, bit):
    # a damaged id, offset or size must not reach a handler (it would steer a write to the
    # wrong place, or ack an id nobody sent); the magic's own bytes fail the magic check
    buf = bytearray(pack_header(P.DATA, 0, 77, 1 << 20, 4096, 4096, 0x12345678))
    buf[pos] ^= 1 << bit
    with pytest.raises(LinkProtocolError, match="header checksum"):
        unpack_header(buf)


def test_header_checksum_mismatch_is_refused_and_said():
    good = hand_header(P.RS_ACK, 0, 5, 4096, 4096)
    assert unpack_header(good)[2] == 5
    with pytest.raises(LinkProtocolError, match="bad packet header checksum"):
        unpack_header(hand_header(P.RS_ACK, 0, 5, 4096, 4096, hcrc=0))


@pytest.mark.parametrize("ptype", list(P))
def test_unpack_known_answer(ptype):
    buf = hand_header(ptype, 3, 7, 8192, 512, 12, 0xFFFFFFFF)
    assert unpack_header(buf) == (ptype, 3, 7, 8192, 512, 12, 0xFFFFFFFF)


def test_unpack_at_position_and_from_buffers():
    h = hand_header(P.RS_ACK, 0, 99, 4096, 4096, 0, 0)
    buf = b"\xee" * 5 + h + b"\xdd" * 3
    assert unpack_header(buf, 5) == (P.RS_ACK, 0, 99, 4096, 4096, 0, 0)
    assert unpack_header(bytearray(buf), 5)[2] == 99
    assert unpack_header(memoryview(buf), 5)[2] == 99


@SETTINGS
@given(u16, u16, u64, u64, u32, st.integers(0, MAX_CONTROL), u32)
def test_header_round_trip(ptype, flags, pid, offset, size, paylen, crc):
    buf = pack_header(ptype, flags, pid, offset, size, paylen, crc)
    assert buf == hand_header(ptype, flags, pid, offset, size, paylen, crc)
    assert unpack_header(buf) == (ptype, flags, pid, offset, size, paylen, crc)


@pytest.mark.parametrize("magic", [0, 0x42524551, 0x50455242, 0xFFFFFFFF])
def test_bad_magic(magic):
    with pytest.raises(LinkProtocolError, match="magic"):
        unpack_header(hand_header(P.PING, magic=magic))


@pytest.mark.parametrize("ptype", sorted(CONTROL_TYPES))
def test_control_paylen_limit(ptype):
    assert unpack_header(hand_header(ptype, paylen=MAX_CONTROL))[5] == MAX_CONTROL
    with pytest.raises(LinkProtocolError, match="too large"):
        unpack_header(hand_header(ptype, paylen=MAX_CONTROL + 1))
    with pytest.raises(LinkProtocolError, match="too large"):
        unpack_header(hand_header(ptype, paylen=0xFFFFFFFF))


@pytest.mark.parametrize("ptype", [P.DATA, P.RS_DATA, P.OV_REPLY, P.PING, 999])
def test_data_paylen_limit(ptype):
    assert unpack_header(hand_header(ptype, paylen=MAX_PAYLOAD))[5] == MAX_PAYLOAD
    with pytest.raises(LinkProtocolError, match="too large"):
        unpack_header(hand_header(ptype, paylen=MAX_PAYLOAD + 1))
    with pytest.raises(LinkProtocolError, match="too large"):
        unpack_header(hand_header(ptype, paylen=0xFFFFFFFF))


def test_limits_are_sane():
    assert MAX_PAYLOAD >= 32 * 1024 * 1024  # a full NBD write fits one packet
    assert MAX_CONTROL < 0xFFFFFFFF


# -- control messages --------------------------------------------------------------------------

BODIES = [
    {},
    {"op": "state", "role": "Primary", "disk": "UpToDate"},
    {"gen": [1, 2, [3, 4]], "bitmap": [0, 10, 100, 5], "was_primary": True},
    {"challenge": b"\x00" * 32, "nested": {"a": [None, 1.5, -7]}},
    {1: "int keys", "big": 2**64 - 1, "neg": -(2**63)},
]


@pytest.mark.parametrize("body", BODIES)
def test_encode_control_known_bytes(body):
    buf = encode_control(P.HELLO, body)
    payload = msgpack.packb(body, use_bin_type=True)
    assert buf == hand_header(P.HELLO, paylen=len(payload),
                              crc=native.py_crc32c(payload)) + payload
    hdr = unpack_header(buf)
    assert hdr[0] == P.HELLO and hdr[5] == len(buf) - HEADER_SIZE
    assert decode_control(buf[HEADER_SIZE:]) == body


def test_decode_control_memoryview():
    buf = encode_control(P.CONTROL, {"op": "x"})
    assert decode_control(memoryview(buf)[HEADER_SIZE:]) == {"op": "x"}


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=40) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_like, max_size=6))
def test_control_round_trip(body):
    buf = encode_control(P.STATE, body)
    assert decode_control(buf[HEADER_SIZE:]) == body


@pytest.mark.parametrize("value", [[], [1, 2], "map", 5, None, b"bytes", 1.5, True])
def test_non_map_control(value):
    with pytest.raises(LinkProtocolError, match="not a map"):
        decode_control(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("payload", [
    b"",                        # nothing
    b"\x81",                    # map of one, truncated
    b"\x81\xa1a",               # key without value
    b"\xc1",                    # never-used code
    b"\x80\x80",                # trailing data
    b"\x81\x91\x01\x02",        # a list as a map key (unhashable)
    b"\xdd\xff\xff\xff\xff",    # array32 claiming 4 billion items
    b"\xdf\xff\xff\xff\xff",    # map32 claiming 4 billion entries
    b"\xdb\xff\xff\xff\xff",    # str32 claiming 4 GiB
    b"\x81\xa1k\xa2\xff\xfe",   # invalid UTF-8 in a str
    b"\x91" * 5000 + b"\xc0",   # deep nesting
])
def test_garbage_control(payload):
    with pytest.raises(LinkProtocolError):
        decode_control(payload)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_control_arbitrary_bytes(data):
    try:
        body = decode_control(data)
    except LinkProtocolError:
        return
    assert isinstance(body, dict)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(max_size=5), json_like, min_size=1, max_size=4),
       st.data())
def test_decode_control_mutated(body, data):
    buf = bytearray(msgpack.packb(body, use_bin_type=True))
    i = data.draw(st.integers(0, len(buf) - 1))
    buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        out = decode_control(bytes(buf[:cut]))
    except LinkProtocolError:
        return
    assert isinstance(out, dict)


# -- data packets ------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"a", b"123456789", bytes(4096), bytes(range(256)) * 16])
def test_data_header(payload):
    h = data_header(P.DATA, 42, 8192, payload, flags=proto.F_FUA)
    crc = native.crc32c(payload)
    assert h == hand_header(P.DATA, proto.F_FUA, 42, 8192, len(payload), len(payload), crc)
    assert check_crc(payload, crc)
    assert not check_crc(payload + b"x", crc)


def test_crc32c_check_value():
    # the standard CRC-32C check value: the header CRC really is Castagnoli
    h = data_header(P.RS_DATA, 1, 0, b"123456789")
    assert unpack_header(h)[6] == 0xE3069283
    assert native.py_crc32c(b"123456789") == 0xE3069283


@SETTINGS
@given(st.binary(max_size=3000), u64, u64)
def test_data_header_crc_matches_python_crc32c(payload, pid, offset):
    h = data_header(P.DATA, pid, offset, memoryview(payload))
    ptype, flags, pid2, off2, size, paylen, crc = unpack_header(h)
    assert (ptype, flags, pid2, off2, size, paylen) == (P.DATA, 0, pid, offset, len(payload),
                                                        len(payload))
    assert crc == native.py_crc32c(payload)


def test_check_crc_single_bit_flip():
    payload = bytearray(b"x" * 4096)
    crc = native.crc32c(payload)
    for i in (0, 100, 4095):
        payload[i] ^= 1
        assert not check_crc(payload, crc)
        payload[i] ^= 1
    assert check_crc(payload, crc)


# -- need() ------------------------------------------------------------------------------------

def test_need_returns_value():
    body = {"challenge": b"x" * 32, "size": 10, "name": "a", "gen": [1, 2, []]}
    assert need(body, "challenge", bytes) == b"x" * 32
    assert need(body, "size", int) == 10
    assert need(body, "name", str) == "a"
    assert need(body, "gen", (list, tuple)) == [1, 2, []]


@pytest.mark.parametrize("body", [{}, {"challenge": None}, {"challenge": "text"},
                                  {"challenge": 5}, {"other": b"x"}])
def test_need_missing_or_wrong_type(body):
    with pytest.raises(LinkProtocolError, match="'challenge'"):
        need(body, "challenge", bytes)


def test_every_payload_but_the_self_checked_carries_its_crc():
    # a control map damaged on the way (a flipped generation, role or size in P_STATE)
    # must end the connection like a damaged header, not be believed
    pkt = bytearray(encode_control(P.STATE, {"role": "Primary", "gen": [7, 0, []]}))
    ptype, _f, _i, _o, _s, paylen, crc = unpack_header(pkt)
    proto.check_payload(ptype, crc, pkt[HEADER_SIZE:])
    pkt[HEADER_SIZE + 3] ^= 0x01
    with pytest.raises(LinkProtocolError, match="CRC32C mismatch in a STATE payload"):
        proto.check_payload(ptype, crc, pkt[HEADER_SIZE:])
    for ptype in (P.RS_CSUM, P.OV_REQUEST, P.OV_REPLY, P.CONTROL, 999):
        with pytest.raises(LinkProtocolError, match="CRC32C mismatch"):
            proto.check_payload(ptype, 0, b"\x01\x02")
        proto.check_payload(ptype, native.crc32c(b"\x01\x02"), b"\x01\x02")
    for ptype in proto.SELF_CHECKED:  # checked by their handlers (threads, reassembly)
        proto.check_payload(ptype, 0, b"\x01\x02")
    proto.check_payload(P.PING, 0, b"")


def test_packet_flags_are_distinct_bits_and_read_reply_errors_decode():
    flags = {k: v for k, v in vars(proto).items() if k.startswith("F_") and k != "F_COMPRESSED"}
    assert all(v and v & (v - 1) == 0 for v in flags.values()), flags
    assert len(set(flags.values())) == len(flags), flags
    assert proto.F_ERR == 1 << 9 and proto.FEATURES & proto.FEATURE_PEER_READS
    assert proto.FEATURE_CODED_READS == 1 << 10 and proto.FEATURES & proto.FEATURE_CODED_READS
    assert proto.read_reply_error(0, 4096) == 0  # data: size is its length
    assert proto.read_reply_error(proto.F_ERR, 5) == 5
    assert proto.read_reply_error(proto.F_ERR, 0) == 5  # no errno, or one out of range: EIO
    assert proto.read_reply_error(proto.F_ERR, 1 << 20) == 5
