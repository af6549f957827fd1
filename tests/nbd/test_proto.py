"""blockrep.nbd.proto: every encode_x/decode_x pair against hand-built bytes (NBD proto.md).

Expected bytes are assembled with struct and the constants module, never with the encoder.
Decoders must raise Truncated on every strict prefix of a self-delimiting structure and
nothing but NbdProtocolError on arbitrary input.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep.nbd import proto
from blockrep.nbd.constants import (
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_HEADER_SIZE,
    STRUCTURED_REPLY_MAGIC,
    CmdFlag,
    HandshakeFlag,
    NbdCmd,
    NbdErr,
    NbdInfo,
    NbdOpt,
    NbdRep,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)
from blockrep.nbd.proto import NbdProtocolError, Truncated

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
# Short strings keep the meta-request count below the prefix length (see the xfail below).
names = st.text(max_size=40)

SETTINGS = settings(max_examples=150, deadline=None)


def assert_prefixes_truncated(decode, buf: bytes, *args):
    """Feed `buf` one byte at a time: every strict prefix is Truncated, the whole decodes."""
    for i in range(len(buf)):
        with pytest.raises(Truncated):
            decode(buf[:i], *args)
    value, n = decode(buf, *args)
    assert n == len(buf)
    # Trailing bytes belong to the next structure and are not consumed.
    value2, n2 = decode(buf + b"\x99" * 7, *args)
    assert (value2, n2) == (value, n)
    # Any buffer type works.
    assert decode(bytearray(buf), *args) == (value, n)
    assert decode(memoryview(buf), *args) == (value, n)
    return value


def test_truncated_is_a_protocol_error():
    assert issubclass(Truncated, NbdProtocolError)


def test_magic_constants_spell_the_spec():
    assert struct.pack(">Q", NBDMAGIC) == b"NBDMAGIC"
    assert struct.pack(">Q", IHAVEOPT) == b"IHAVEOPT"
    assert REPLY_MAGIC == 0x0003E889045565A9
    assert (REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC) == (
        0x25609513, 0x67446698, 0x668E33EF)
    assert EXTENDED_REQUEST_MAGIC == 0x21E41C71
    assert (REQUEST_SIZE, SIMPLE_REPLY_SIZE, STRUCTURED_REPLY_HEADER_SIZE) == (28, 16, 20)


# -- server greeting ---------------------------------------------------------------------------

def test_server_greeting_known_answer():
    flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    expected = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert proto.encode_server_greeting(flags) == expected
    assert assert_prefixes_truncated(proto.decode_server_greeting, expected) == 3


@given(u16)
@SETTINGS
def test_server_greeting_round_trip(flags):
    buf = proto.encode_server_greeting(flags)
    assert len(buf) == 18
    assert proto.decode_server_greeting(buf) == (flags, 18)


@pytest.mark.parametrize("bad", [b"NBDMAGIX" + b"IHAVEOPT\0\x01",
                                 b"NBDMAGIC" + b"\x00\x00\x42\x02\x81\x86\x12\x53\0\x01"])
def test_server_greeting_bad_magic(bad):
    """The second is an old-style greeting (cliserv magic), not fixed newstyle."""
    with pytest.raises(NbdProtocolError) as ei:
        proto.decode_server_greeting(bad)
    assert not isinstance(ei.value, Truncated)


# -- client flags ------------------------------------------------------------------------------

def test_client_flags_known_answer():
    expected = struct.pack(">I", 3)
    assert expected == b"\0\0\0\x03"
    assert proto.encode_client_flags(3) == expected
    assert assert_prefixes_truncated(proto.decode_client_flags, expected) == 3


@given(u32)
@SETTINGS
def test_client_flags_round_trip(flags):
    assert proto.decode_client_flags(proto.encode_client_flags(flags)) == (flags, 4)


# -- option header -----------------------------------------------------------------------------

def test_option_header_known_answer():
    payload = b"\0\0\0\x04disk\0\0"
    expected = b"IHAVEOPT" + struct.pack(">II", NbdOpt.GO, len(payload))
    assert expected[8:] == b"\0\0\0\x07\0\0\0\x0a"
    assert proto.encode_option_header(NbdOpt.GO, len(payload)) == expected
    assert proto.encode_option(NbdOpt.GO, payload) == expected + payload
    assert proto.encode_option(NbdOpt.ABORT) == b"IHAVEOPT\0\0\0\x02\0\0\0\0"
    value = assert_prefixes_truncated(proto.decode_option_header, expected)
    assert value == (NbdOpt.GO, 10)
    # The payload is not part of the header.
    assert proto.decode_option_header(expected + payload) == ((NbdOpt.GO, 10), 16)


@given(u32, u32)
@SETTINGS
def test_option_header_round_trip(option, length):
    buf = proto.encode_option_header(option, length)
    assert proto.decode_option_header(buf) == ((option, length), 16)


@given(u32, st.binary(max_size=64))
@SETTINGS
def test_option_round_trip(option, data):
    buf = proto.encode_option(option, data)
    (opt, length), n = proto.decode_option_header(buf)
    assert (opt, length, buf[n:]) == (option, len(data), data)


def test_option_header_bad_magic():
    with pytest.raises(NbdProtocolError):
        proto.decode_option_header(b"IHAVEOPS" + bytes(8))
    # An NBD_OPT_EXPORT_NAME-era client that skips the magic entirely.
    with pytest.raises(NbdProtocolError):
        proto.decode_option_header(struct.pack(">QII", 0, NbdOpt.LIST, 0))


# -- option reply ------------------------------------------------------------------------------

def test_option_reply_known_answer():
    data = b"\0\0\0\x04diskA description"
    expected = (b"\x00\x03\xe8\x89\x04\x55\x65\xa9"
                + struct.pack(">III", NbdOpt.LIST, NbdRep.SERVER, len(data)) + data)
    assert proto.encode_option_reply(NbdOpt.LIST, NbdRep.SERVER, data) == expected
    value = assert_prefixes_truncated(proto.decode_option_reply, expected)
    assert value == (NbdOpt.LIST, NbdRep.SERVER, data)


def test_option_reply_error_type_known_answer():
    expected = struct.pack(">QIII", REPLY_MAGIC, NbdOpt.STARTTLS, 0x80000001, 0)
    assert proto.encode_option_reply(NbdOpt.STARTTLS, NbdRep.ERR_UNSUP) == expected
    assert proto.decode_option_reply(expected) == ((5, NbdRep.ERR_UNSUP, b""), 20)


@given(u32, u32, st.binary(max_size=100))
@SETTINGS
def test_option_reply_round_trip(option, rtype, data):
    buf = proto.encode_option_reply(option, rtype, data)
    assert proto.decode_option_reply(buf) == ((option, rtype, data), 20 + len(data))
    value, n = proto.decode_option_reply(buf + b"trailing")
    assert n == 20 + len(data)


def test_option_reply_bad_magic():
    bad = struct.pack(">QIII", REPLY_MAGIC ^ 1, 1, 1, 0)
    with pytest.raises(NbdProtocolError) as ei:
        proto.decode_option_reply(bad)
    assert not isinstance(ei.value, Truncated)


def test_option_reply_declared_length_longer_than_buffer_is_truncated():
    buf = struct.pack(">QIII", REPLY_MAGIC, 1, 1, 0xFFFFFFFF) + b"abc"
    with pytest.raises(Truncated):
        proto.decode_option_reply(buf)


# -- NBD_OPT_EXPORT_NAME reply -----------------------------------------------------------------

@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_known_answer(no_zeroes):
    size, flags = 0x0102030405060708, TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    expected = b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00\x05"
    if not no_zeroes:
        expected += b"\0" * 124
    assert len(expected) == (10 if no_zeroes else 134)
    assert proto.encode_export_name_reply(size, flags, no_zeroes) == expected
    value = assert_prefixes_truncated(proto.decode_export_name_reply, expected, no_zeroes)
    assert value == (size, flags)


@given(u64, u16, st.booleans())
@SETTINGS
def test_export_name_reply_round_trip(size, flags, no_zeroes):
    buf = proto.encode_export_name_reply(size, flags, no_zeroes)
    assert proto.decode_export_name_reply(buf, no_zeroes) == ((size, flags), len(buf))


# -- NBD_OPT_INFO / NBD_OPT_GO payload ---------------------------------------------------------

def test_info_request_known_answer():
    expected = (struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2)
                + struct.pack(">HH", NbdInfo.NAME, NbdInfo.BLOCK_SIZE))
    assert expected == b"\0\0\0\x04disk\0\x02\0\x01\0\x03"
    assert proto.encode_info_request("disk", [NbdInfo.NAME, NbdInfo.BLOCK_SIZE]) == expected
    value = assert_prefixes_truncated(proto.decode_info_request, expected)
    assert value == ("disk", [1, 3])


def test_info_request_empty_name_no_infos():
    expected = b"\0\0\0\0\0\0"
    assert proto.encode_info_request("", []) == expected
    assert assert_prefixes_truncated(proto.decode_info_request, expected) == ("", [])


def test_info_request_utf8_name():
    name = "dísk-ü"
    raw = name.encode()
    expected = struct.pack(">I", len(raw)) + raw + b"\0\0"
    assert proto.encode_info_request(name, []) == expected
    assert proto.decode_info_request(expected) == ((name, []), len(expected))


def test_info_request_invalid_utf8():
    bad = b"\0\0\0\x02\xff\xfe\0\0"
    with pytest.raises(NbdProtocolError) as ei:
        proto.decode_info_request(bad)
    assert not isinstance(ei.value, Truncated)


@given(names, st.lists(u16, max_size=10))
@SETTINGS
def test_info_request_round_trip(name, infos):
    buf = proto.encode_info_request(name, infos)
    assert proto.decode_info_request(buf) == ((name, infos), len(buf))
    assert_prefixes_truncated(proto.decode_info_request, buf)


# -- NBD_OPT_{LIST,SET}_META_CONTEXT payload --------------------------------------------------

def test_meta_request_known_answer():
    expected = (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 2)
                + struct.pack(">I", 15) + b"base:allocation" + struct.pack(">I", 5) + b"base:")
    assert proto.encode_meta_request("disk", ["base:allocation", "base:"]) == expected
    value = assert_prefixes_truncated(proto.decode_meta_request, expected)
    assert value == ("disk", ["base:allocation", "base:"])


def test_meta_request_no_queries():
    expected = b"\0\0\0\0" + b"\0\0\0\0"
    assert proto.encode_meta_request("", []) == expected
    assert assert_prefixes_truncated(proto.decode_meta_request, expected) == ("", [])


def test_meta_request_absurd_count_is_rejected():
    bad = b"\0\0\0\0" + struct.pack(">I", 0xFFFFFFFF)
    with pytest.raises(NbdProtocolError):
        proto.decode_meta_request(bad)


@given(names, st.lists(names, max_size=4))
@SETTINGS
def test_meta_request_round_trip(name, queries):
    buf = proto.encode_meta_request(name, queries)
    assert proto.decode_meta_request(buf) == ((name, queries), len(buf))
    assert_prefixes_truncated(proto.decode_meta_request, buf)


def test_meta_request_prefix_with_many_queries_is_truncated():
    buf = proto.encode_meta_request("", [""] * 10)
    assert proto.decode_meta_request(buf) == (("", [""] * 10), len(buf))
    assert_prefixes_truncated(proto.decode_meta_request, buf)


# -- NBD_REP_SERVER payload (whole payload, framed by the option reply) -----------------------

def test_rep_server_known_answer():
    expected = struct.pack(">I", 4) + b"disk" + b"my disk"
    assert proto.encode_rep_server("disk", "my disk") == expected
    assert proto.decode_rep_server(expected) == (("disk", "my disk"), len(expected))
    assert proto.encode_rep_server("disk") == b"\0\0\0\x04disk"
    assert proto.decode_rep_server(b"\0\0\0\x04disk") == (("disk", ""), 8)


def test_rep_server_prefixes():
    buf = struct.pack(">I", 4) + b"disk" + b"desc"
    for i in range(8):  # the name is not complete yet
        with pytest.raises(Truncated):
            proto.decode_rep_server(buf[:i])
    # past the name, the rest of the payload is the description
    assert proto.decode_rep_server(buf[:10]) == (("disk", "de"), 10)


@given(names, names)
@SETTINGS
def test_rep_server_round_trip(name, desc):
    buf = proto.encode_rep_server(name, desc)
    assert proto.decode_rep_server(buf) == ((name, desc), len(buf))


# -- NBD_REP_META_CONTEXT payload --------------------------------------------------------------

def test_rep_meta_context_known_answer():
    expected = b"\0\0\0\x01" + b"base:allocation"
    assert proto.encode_rep_meta_context(1, "base:allocation") == expected
    assert proto.decode_rep_meta_context(expected) == ((1, "base:allocation"), 19)
    for i in range(4):
        with pytest.raises(Truncated):
            proto.decode_rep_meta_context(expected[:i])


@given(u32, names)
@SETTINGS
def test_rep_meta_context_round_trip(cid, name):
    buf = proto.encode_rep_meta_context(cid, name)
    assert proto.decode_rep_meta_context(buf) == ((cid, name), len(buf))


# -- NBD_REP_INFO payloads ---------------------------------------------------------------------

def test_info_export_known_answer():
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_DF
    expected = b"\0\0" + struct.pack(">Q", 1 << 30) + struct.pack(">H", 0x83)
    assert proto.encode_info_export(1 << 30, flags) == expected
    value = assert_prefixes_truncated(proto.decode_info, expected)
    assert value == (NbdInfo.EXPORT, (1 << 30, 0x83))


def test_info_block_size_known_answer():
    expected = b"\0\x03" + struct.pack(">III", 1, 4096, 32 << 20)
    assert proto.encode_info_block_size(1, 4096, 32 << 20) == expected
    kind, (mn, pref, mx) = assert_prefixes_truncated(proto.decode_info, expected)
    assert (kind, mn, pref, mx) == (NbdInfo.BLOCK_SIZE, 1, 4096, 32 << 20)


def test_info_name_and_description_known_answer():
    assert proto.encode_info_name("disk") == b"\0\x01disk"
    assert proto.encode_info_description("a disk") == b"\0\x02a disk"
    assert proto.decode_info(b"\0\x01disk") == ((NbdInfo.NAME, "disk"), 6)
    assert proto.decode_info(b"\0\x02a disk") == ((NbdInfo.DESCRIPTION, "a disk"), 8)
    assert proto.decode_info(b"\0\x01") == ((NbdInfo.NAME, ""), 2)
    for short in (b"", b"\0"):
        with pytest.raises(Truncated):
            proto.decode_info(short)
    with pytest.raises(NbdProtocolError):
        proto.decode_info(b"\0\x01\xff")


def test_info_unknown_type_is_returned_raw():
    assert proto.decode_info(b"\x12\x34xyz") == ((0x1234, b"xyz"), 5)


@given(u64, u16)
@SETTINGS
def test_info_export_round_trip(size, flags):
    buf = proto.encode_info_export(size, flags)
    assert proto.decode_info(buf) == ((NbdInfo.EXPORT, (size, flags)), 12)


@given(u32, u32, u32)
@SETTINGS
def test_info_block_size_round_trip(a, b, c):
    buf = proto.encode_info_block_size(a, b, c)
    assert proto.decode_info(buf) == ((NbdInfo.BLOCK_SIZE, (a, b, c)), 14)


@given(names)
@SETTINGS
def test_info_strings_round_trip(text):
    for enc, kind in ((proto.encode_info_name, NbdInfo.NAME),
                      (proto.encode_info_description, NbdInfo.DESCRIPTION)):
        buf = enc(text)
        assert proto.decode_info(buf) == ((kind, text), len(buf))


# -- request -----------------------------------------------------------------------------------

def test_request_known_answer():
    cookie, offset, length = 0x1122334455667788, 0x0000000100000000, 0x00010000
    flags = CmdFlag.FUA
    expected = (b"\x25\x60\x95\x13" + b"\x00\x01" + b"\x00\x01"
                + struct.pack(">QQI", cookie, offset, length))
    assert len(expected) == REQUEST_SIZE
    assert proto.encode_request(NbdCmd.WRITE, flags, cookie, offset, length) == expected
    req = assert_prefixes_truncated(proto.decode_request, expected)
    assert req == proto.Request(flags=1, cmd=NbdCmd.WRITE, cookie=cookie, offset=offset,
                                length=length)
    assert proto.unpack_request_from(expected) == (REQUEST_MAGIC, 1, 1, cookie, offset, length)


def test_request_flags_and_type_are_not_swapped():
    """Spec order: 16-bit command flags, then 16-bit type."""
    buf = proto.encode_request(NbdCmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 0, 512)
    assert buf[4:8] == b"\x00\x08\x00\x07"
    req, _ = proto.decode_request(buf)
    assert (req.cmd, req.flags) == (7, 8)


@given(u16, u16, u64, u64, u32)
@SETTINGS
def test_request_round_trip(cmd, flags, cookie, offset, length):
    buf = proto.encode_request(cmd, flags, cookie, offset, length)
    assert proto.decode_request(buf) == (proto.Request(flags, cmd, cookie, offset, length), 28)
    assert proto.unpack_request_from(buf) == (REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@pytest.mark.parametrize("magic", [0, SIMPLE_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC,
                                   REQUEST_MAGIC ^ 0x80000000])
def test_request_bad_magic(magic):
    buf = struct.pack(">IHHQQI", magic, 0, NbdCmd.READ, 1, 0, 512)
    with pytest.raises(NbdProtocolError) as ei:
        proto.decode_request(buf)
    assert not isinstance(ei.value, Truncated)


# -- simple reply ------------------------------------------------------------------------------

def test_simple_reply_known_answer():
    expected = b"\x67\x44\x66\x98" + b"\0\0\0\x1c" + b"\xde\xad\xbe\xef\0\0\0\x01"
    assert proto.encode_simple_reply(NbdErr.ENOSPC, 0xDEADBEEF00000001) == expected
    assert proto.pack_simple_reply(SIMPLE_REPLY_MAGIC, 28, 0xDEADBEEF00000001) == expected
    value = assert_prefixes_truncated(proto.decode_simple_reply, expected)
    assert value == (NbdErr.ENOSPC, 0xDEADBEEF00000001)


@given(u32, u64)
@SETTINGS
def test_simple_reply_round_trip(error, cookie):
    buf = proto.encode_simple_reply(error, cookie)
    assert proto.decode_simple_reply(buf) == ((error, cookie), 16)


def test_simple_reply_bad_magic():
    with pytest.raises(NbdProtocolError):
        proto.decode_simple_reply(struct.pack(">IIQ", STRUCTURED_REPLY_MAGIC, 0, 1))


# -- structured reply header -------------------------------------------------------------------

def test_structured_header_known_answer():
    expected = (b"\x66\x8e\x33\xef" + b"\0\x01" + b"\0\x01"
                + struct.pack(">Q", 42) + struct.pack(">I", 8 + 4096))
    assert proto.encode_structured_header(1, ReplyType.OFFSET_DATA, 42, 4104) == expected
    assert proto.pack_structured_header(STRUCTURED_REPLY_MAGIC, 1, 1, 42, 4104) == expected
    value = assert_prefixes_truncated(proto.decode_structured_header, expected)
    assert value == (1, ReplyType.OFFSET_DATA, 42, 4104)


@given(u16, u16, u64, u32)
@SETTINGS
def test_structured_header_round_trip(flags, rtype, cookie, length):
    buf = proto.encode_structured_header(flags, rtype, cookie, length)
    assert proto.decode_structured_header(buf) == ((flags, rtype, cookie, length), 20)


def test_structured_header_bad_magic():
    with pytest.raises(NbdProtocolError):
        proto.decode_structured_header(struct.pack(">IHHQI", SIMPLE_REPLY_MAGIC, 1, 0, 1, 0))


# -- NBD_REPLY_TYPE_ERROR payload --------------------------------------------------------------

def test_error_payload_known_answer():
    expected = struct.pack(">I", NbdErr.EIO) + b"\0\x04oops"
    assert proto.encode_error_payload(NbdErr.EIO, "oops") == expected
    value = assert_prefixes_truncated(proto.decode_error_payload, expected)
    assert value == (NbdErr.EIO, "oops")
    assert proto.encode_error_payload(NbdErr.EINVAL) == b"\0\0\0\x16\0\0"


def test_error_payload_message_is_capped_at_4096_bytes():
    buf = proto.encode_error_payload(NbdErr.EIO, "x" * 5000)
    assert len(buf) == 6 + 4096
    assert buf[4:6] == b"\x10\x00"
    assert proto.decode_error_payload(buf) == ((NbdErr.EIO, "x" * 4096), len(buf))


def test_error_payload_cap_keeps_valid_utf8():
    message = "a" + "é" * 3000  # 6001 bytes; byte 4096 is in the middle of an "é"
    buf = proto.encode_error_payload(NbdErr.EIO, message)
    (err, text), n = proto.decode_error_payload(buf)
    assert err == NbdErr.EIO and message.startswith(text) and len(text.encode()) <= 4096


@given(u32, st.text(max_size=300))
@SETTINGS
def test_error_payload_round_trip(error, message):
    buf = proto.encode_error_payload(error, message)
    assert proto.decode_error_payload(buf) == ((error, message), len(buf))
    assert_prefixes_truncated(proto.decode_error_payload, buf)


# -- NBD_REPLY_TYPE_BLOCK_STATUS payload -------------------------------------------------------

def test_block_status_payload_known_answer():
    extents = [(4096, 0), (8192, StateFlag.HOLE | StateFlag.ZERO)]
    expected = struct.pack(">I", 1) + struct.pack(">II", 4096, 0) + struct.pack(">II", 8192, 3)
    assert proto.encode_block_status_payload(1, extents) == expected
    assert proto.decode_block_status_payload(expected) == ((1, extents), 20)
    assert proto.encode_block_status_payload(7, []) == b"\0\0\0\x07"
    assert proto.decode_block_status_payload(b"\0\0\0\x07") == ((7, []), 4)


def test_block_status_payload_prefixes():
    buf = proto.encode_block_status_payload(1, [(4096, 0), (512, 1)])
    for i in range(len(buf)):
        if i < 4:
            with pytest.raises(Truncated):
                proto.decode_block_status_payload(buf[:i])
        elif (i - 4) % 8:
            with pytest.raises(NbdProtocolError):
                proto.decode_block_status_payload(buf[:i])
        else:  # whole descriptors: the payload is framed by the reply header
            assert proto.decode_block_status_payload(buf[:i])[1] == i


@given(u32, st.lists(st.tuples(u32, u32), max_size=20))
@SETTINGS
def test_block_status_payload_round_trip(cid, extents):
    buf = proto.encode_block_status_payload(cid, extents)
    assert proto.decode_block_status_payload(buf) == ((cid, extents), len(buf))


# -- NBD_REPLY_TYPE_OFFSET_HOLE payload --------------------------------------------------------

def test_offset_hole_payload_known_answer():
    expected = struct.pack(">Q", 1 << 40) + struct.pack(">I", 65536)
    assert proto.encode_offset_hole_payload(1 << 40, 65536) == expected
    value = assert_prefixes_truncated(proto.decode_offset_hole_payload, expected)
    assert tuple(value) == (1 << 40, 65536)


@given(u64, u32)
@SETTINGS
def test_offset_hole_payload_round_trip(offset, length):
    buf = proto.encode_offset_hole_payload(offset, length)
    value, n = proto.decode_offset_hole_payload(buf)
    assert (tuple(value), n) == ((offset, length), 12)


# -- arbitrary input: only NbdProtocolError escapes -------------------------------------------

DECODERS = [
    proto.decode_server_greeting,
    proto.decode_client_flags,
    proto.decode_option_header,
    proto.decode_option_reply,
    lambda b: proto.decode_export_name_reply(b, True),
    lambda b: proto.decode_export_name_reply(b, False),
    proto.decode_info_request,
    proto.decode_meta_request,
    proto.decode_rep_server,
    proto.decode_rep_meta_context,
    proto.decode_info,
    proto.decode_request,
    proto.decode_simple_reply,
    proto.decode_structured_header,
    proto.decode_error_payload,
    proto.decode_block_status_payload,
    proto.decode_offset_hole_payload,
]


def _garbage():
    """Plain random bytes, plus bytes that start like a real structure."""
    prefixes = st.sampled_from([b"", b"NBDMAGICIHAVEOPT", b"IHAVEOPT",
                                struct.pack(">Q", REPLY_MAGIC),
                                struct.pack(">I", REQUEST_MAGIC),
                                struct.pack(">I", SIMPLE_REPLY_MAGIC),
                                struct.pack(">I", STRUCTURED_REPLY_MAGIC),
                                b"\0\0\0\x01", b"\0\0\0\0\0\0\0\x20", b"\0\x01", b"\0\x03"])
    return st.builds(lambda p, b: p + b, prefixes, st.binary(max_size=80))


@given(data=_garbage())
@settings(max_examples=400, deadline=None)
def test_decoders_raise_only_protocol_errors(data):
    for decode in DECODERS:
        for buf in (data, bytearray(data), memoryview(data)):
            try:
                value, n = decode(buf)
            except NbdProtocolError:
                continue
            assert 0 <= n <= len(data)


def test_all_pairs_are_covered():
    """A new encode_x/decode_x pair in proto.py must get tests here."""
    encoders = {n[len("encode_"):] for n in dir(proto) if n.startswith("encode_")}
    decoders = {n[len("decode_"):] for n in dir(proto) if n.startswith("decode_")}
    known_decoders = {"server_greeting", "client_flags", "option_header", "option_reply",
                      "export_name_reply", "info_request", "meta_request", "rep_server",
                      "rep_meta_context", "info", "request", "simple_reply",
                      "structured_header", "error_payload", "block_status_payload",
                      "offset_hole_payload"}
    known_encoders = (known_decoders - {"info"}) | {"option", "info_export", "info_name",
                                                    "info_description", "info_block_size"}
    assert decoders == known_decoders
    assert encoders == known_encoders
