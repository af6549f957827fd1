"""HandshakeServer (sans-IO fixed-newstyle negotiation) driven with bytes from proto encoders."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep.nbd import proto
from blockrep.nbd.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    NbdCmd,
    NbdInfo,
    NbdOpt,
    NbdRep,
    TransmissionFlag as TF,
)
from blockrep.nbd.handshake import (
    MAX_OPTION_LEN,
    MAX_OPTIONS,
    Closed,
    Export,
    HandshakeServer,
    HsState,
    Negotiated,
)

DISK_FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_DF
FLAGS_OK = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


def make_exports():
    return {
        "disk": Export("disk", 1 << 30, DISK_FLAGS, description="the test disk",
                       min_block=1, pref_block=4096, max_block=32 << 20),
        "ro": Export("ro", 8192, TF.HAS_FLAGS | TF.READ_ONLY),
    }


def server(**kw) -> HandshakeServer:
    return HandshakeServer(make_exports(), **kw)


def started(flags: int = FLAGS_OK) -> HandshakeServer:
    """A server past the greeting and the client flags."""
    hs = server()
    hs.data_to_send()
    assert hs.receive_data(proto.encode_client_flags(flags)) == []
    assert hs.state is HsState.OPTION
    return hs


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into option replies; every byte must belong to one."""
    res, pos = [], 0
    while pos < len(out):
        value, n = proto.decode_option_reply(out[pos:])
        res.append(value)
        pos += n
    return res


def opt(option: int, data: bytes = b"") -> bytes:
    return proto.encode_option(option, data)


def info_payload(name: str = "disk", infos=()) -> bytes:
    return proto.encode_info_request(name, list(infos))


def send(hs: HandshakeServer, data: bytes):
    events = hs.receive_data(data)
    return events, replies(hs.data_to_send())


def list_ok(rs, start=0):
    """The replies to one NBD_OPT_LIST for make_exports()."""
    assert rs[start:] == [
        (NbdOpt.LIST, NbdRep.SERVER, b"\0\0\0\x04disk" + b"the test disk"),
        (NbdOpt.LIST, NbdRep.SERVER, b"\0\0\0\x02ro"),
        (NbdOpt.LIST, NbdRep.ACK, b""),
    ]


# -- greeting and client flags -----------------------------------------------------------------

def test_greeting_bytes():
    hs = server()
    assert hs.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0b11)
    assert hs.data_to_send() == b""  # sent once


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags):
    hs = started(flags)
    assert hs.no_zeroes is bool(flags & 2)
    assert hs.fixed is bool(flags & 1)


@pytest.mark.parametrize("flags", [4, 1 | 4, 3 | 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_close_with_error(flags):
    hs = server()
    hs.data_to_send()
    events = hs.receive_data(proto.encode_client_flags(flags) + opt(NbdOpt.LIST))
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].error
    assert hs.state is HsState.CLOSED
    assert hs.data_to_send() == b""
    assert hs.receive_data(opt(NbdOpt.LIST)) == []


def test_bad_option_magic_closes_with_error():
    hs = started()
    events = hs.receive_data(struct.pack(">QII", NBDMAGIC, NbdOpt.LIST, 0))
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].error
    assert hs.data_to_send() == b""


# -- NBD_OPT_LIST ------------------------------------------------------------------------------

def test_list():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.LIST))
    assert events == []
    list_ok(rs)
    assert proto.decode_rep_server(rs[0][2]) == (("disk", "the test disk"), 21)


def test_list_with_payload_is_invalid():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.LIST, b"junk"))
    assert events == []
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.LIST, NbdRep.ERR_INVALID)]


# -- unsupported options -----------------------------------------------------------------------

@pytest.mark.parametrize("option", [NbdOpt.STARTTLS, NbdOpt.EXTENDED_HEADERS,
                                    NbdOpt.PEEK_EXPORT, 0, 12, 999, 0xFFFFFFFF])
def test_unsupported_options(option):
    hs = started()
    events, rs = send(hs, opt(option))
    assert events == []
    assert len(rs) == 1
    assert rs[0][:2] == (option, NbdRep.ERR_UNSUP)
    rs[0][2].decode()  # the error text is UTF-8
    # Still negotiating.
    events, rs = send(hs, opt(NbdOpt.LIST))
    list_ok(rs)


# -- NBD_OPT_INFO / NBD_OPT_GO -----------------------------------------------------------------

def expected_infos(export: Export, flags: int, name: bool, description: bool):
    out = [(NbdRep.INFO, struct.pack(">HQH", NbdInfo.EXPORT, export.size, flags))]
    if name:
        out.append((NbdRep.INFO, struct.pack(">H", NbdInfo.NAME) + export.name.encode()))
    if description:
        out.append((NbdRep.INFO,
                    struct.pack(">H", NbdInfo.DESCRIPTION) + export.description.encode()))
    out.append((NbdRep.INFO, struct.pack(">HIII", NbdInfo.BLOCK_SIZE, export.min_block,
                                         export.pref_block, export.max_block)))
    out.append((NbdRep.ACK, b""))
    return out


@pytest.mark.parametrize("infos", [(), (NbdInfo.NAME,), (NbdInfo.DESCRIPTION,),
                                   (NbdInfo.NAME, NbdInfo.DESCRIPTION, NbdInfo.BLOCK_SIZE),
                                   (NbdInfo.BLOCK_SIZE, 77)])
def test_info_then_go_same_data(infos):
    hs = started()
    exp = make_exports()["disk"]
    events, rs_info = send(hs, opt(NbdOpt.INFO, info_payload("disk", infos)))
    assert events == []
    assert all(o == NbdOpt.INFO for o, _, _ in rs_info)
    no_df = int(DISK_FLAGS & ~TF.SEND_DF)
    want = expected_infos(exp, no_df, NbdInfo.NAME in infos, NbdInfo.DESCRIPTION in infos)
    assert [(t, d) for _, t, d in rs_info] == want
    assert hs.state is HsState.OPTION

    events, rs_go = send(hs, opt(NbdOpt.GO, info_payload("disk", infos)))
    assert all(o == NbdOpt.GO for o, _, _ in rs_go)
    assert [(t, d) for _, t, d in rs_go] == want
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, Negotiated)
    assert ev.export.name == "disk" and ev.export.size == 1 << 30
    assert ev.structured is False and ev.flags == no_df and ev.meta_contexts == {}
    assert hs.state is HsState.DONE


def test_info_decodes_with_proto():
    hs = started()
    _, rs = send(hs, opt(NbdOpt.INFO, info_payload("ro", [NbdInfo.NAME])))
    decoded = [proto.decode_info(d)[0] for _, t, d in rs if t == NbdRep.INFO]
    assert decoded == [(NbdInfo.EXPORT, (8192, TF.HAS_FLAGS | TF.READ_ONLY)),
                       (NbdInfo.NAME, "ro"),
                       (NbdInfo.BLOCK_SIZE, (1, 4096, 64 * 1024 * 1024))]


def test_description_omitted_when_empty():
    hs = started()
    _, rs = send(hs, opt(NbdOpt.INFO, info_payload("ro", [NbdInfo.DESCRIPTION])))
    kinds = [struct.unpack(">H", d[:2])[0] for _, t, d in rs if t == NbdRep.INFO]
    assert kinds == [NbdInfo.EXPORT, NbdInfo.BLOCK_SIZE]


def test_go_empty_name_uses_default_export():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.GO, info_payload("", [NbdInfo.NAME])))
    assert events and events[0].export.name == "disk"
    # NBD_INFO_NAME tells the client which export it got.
    assert (NbdOpt.GO, NbdRep.INFO, b"\0\x01disk") in rs


def test_go_explicit_default_export():
    hs = HandshakeServer(make_exports(), default_export="ro")
    hs.data_to_send()
    hs.receive_data(proto.encode_client_flags(FLAGS_OK))
    events, _ = send(hs, opt(NbdOpt.GO, info_payload("")))
    assert events[0].export.name == "ro"


@pytest.mark.parametrize("option", [NbdOpt.INFO, NbdOpt.GO])
def test_unknown_export(option):
    hs = started()
    events, rs = send(hs, opt(option, info_payload("nope")))
    assert events == []
    assert [(o, t) for o, t, _ in rs] == [(option, NbdRep.ERR_UNKNOWN)]
    events, rs = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    assert isinstance(events[0], Negotiated)


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\x04di", info_payload("disk") + b"x",
                                     b"\0\0\0\x02\xff\xfe\0\0", b"\0\0\0\x04disk\0\x02\0\x01"])
def test_malformed_info_payload(payload):
    hs = started()
    events, rs = send(hs, opt(NbdOpt.GO, payload))
    assert events == []
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.GO, NbdRep.ERR_INVALID)]
    assert hs.state is HsState.OPTION


# -- NBD_OPT_STRUCTURED_REPLY and SEND_DF ------------------------------------------------------

def test_structured_reply():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.STRUCTURED_REPLY))
    assert events == [] and rs == [(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK, b"")]
    events, rs = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    ev = events[0]
    assert ev.structured is True
    assert ev.flags == DISK_FLAGS  # SEND_DF kept
    assert rs[0][2] == struct.pack(">HQH", NbdInfo.EXPORT, 1 << 30, DISK_FLAGS)


def test_structured_reply_with_payload_is_invalid():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.STRUCTURED_REPLY, b"\0"))
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.STRUCTURED_REPLY, NbdRep.ERR_INVALID)]
    assert hs.structured is False
    events, _ = send(hs, opt(NbdOpt.GO, info_payload()))
    assert events[0].structured is False


def test_structured_reply_twice_is_invalid():
    hs = started()
    _, rs = send(hs, opt(NbdOpt.STRUCTURED_REPLY) + opt(NbdOpt.STRUCTURED_REPLY))
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK),
                                          (NbdOpt.STRUCTURED_REPLY, NbdRep.ERR_INVALID)]
    assert hs.structured is True


def test_send_df_cleared_without_structured_replies():
    hs = started()
    _, rs = send(hs, opt(NbdOpt.INFO, info_payload()))
    (_, (size, flags)), _ = proto.decode_info(rs[0][2])
    assert flags & TF.SEND_DF == 0 and flags == DISK_FLAGS & ~TF.SEND_DF
    events, _ = send(hs, opt(NbdOpt.GO, info_payload()))
    assert events[0].flags & TF.SEND_DF == 0


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_send_df_cleared_for_export_name(no_zeroes):
    hs = started(ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0))
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME, b"disk"))
    out = hs.data_to_send()
    size, flags = struct.unpack_from(">QH", out)
    assert flags == DISK_FLAGS & ~TF.SEND_DF
    assert events[0].flags == flags


# -- meta contexts -----------------------------------------------------------------------------

@pytest.mark.parametrize("option", [NbdOpt.LIST_META_CONTEXT, NbdOpt.SET_META_CONTEXT])
def test_meta_context_needs_structured(option):
    hs = started()
    events, rs = send(hs, opt(option, proto.encode_meta_request("disk", [BASE_ALLOCATION])))
    assert events == []
    assert [(o, t) for o, t, _ in rs] == [(option, NbdRep.ERR_INVALID)]
    events, _ = send(hs, opt(NbdOpt.GO, info_payload()))
    assert events[0].meta_contexts == {}


def structured() -> HandshakeServer:
    hs = started()
    hs.receive_data(opt(NbdOpt.STRUCTURED_REPLY))
    assert hs.data_to_send()
    return hs


BASE_REPLY = (NbdRep.META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID) + b"base:allocation")


@pytest.mark.parametrize("queries", [[], ["base:"], [BASE_ALLOCATION],
                                     ["qemu:dirty-bitmap:x", "base:"]])
def test_list_meta_context_matches(queries):
    hs = structured()
    _, rs = send(hs, opt(NbdOpt.LIST_META_CONTEXT,
                         proto.encode_meta_request("disk", queries)))
    assert [(t, d) for _, t, d in rs] == [BASE_REPLY, (NbdRep.ACK, b"")]
    assert all(o == NbdOpt.LIST_META_CONTEXT for o, _, _ in rs)
    assert proto.decode_rep_meta_context(rs[0][2])[0] == (1, BASE_ALLOCATION)
    assert hs.meta_contexts == {}  # listing selects nothing


@pytest.mark.parametrize("queries", [["qemu:dirty-bitmap:x"], ["base:alloc"], ["nope:"]])
def test_list_meta_context_no_match(queries):
    hs = structured()
    _, rs = send(hs, opt(NbdOpt.LIST_META_CONTEXT,
                         proto.encode_meta_request("disk", queries)))
    assert [(t, d) for _, t, d in rs] == [(NbdRep.ACK, b"")]


def test_set_meta_context_base_allocation():
    hs = structured()
    _, rs = send(hs, opt(NbdOpt.SET_META_CONTEXT,
                         proto.encode_meta_request("disk", [BASE_ALLOCATION])))
    assert [(t, d) for _, t, d in rs] == [BASE_REPLY, (NbdRep.ACK, b"")]
    events, _ = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    assert events[0].meta_contexts == {BASE_ALLOCATION_ID: BASE_ALLOCATION}
    assert events[0].structured is True


def test_set_meta_context_no_queries_selects_nothing():
    hs = structured()
    send(hs, opt(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("disk", [BASE_ALLOCATION])))
    _, rs = send(hs, opt(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("disk", [])))
    assert [(t, d) for _, t, d in rs] == [(NbdRep.ACK, b"")]
    events, _ = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    assert events[0].meta_contexts == {}


def test_set_meta_context_for_another_export_is_dropped():
    hs = structured()
    send(hs, opt(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("ro", [BASE_ALLOCATION])))
    events, _ = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    assert events[0].meta_contexts == {}


def test_meta_context_unknown_export():
    hs = structured()
    _, rs = send(hs, opt(NbdOpt.SET_META_CONTEXT,
                         proto.encode_meta_request("nope", [BASE_ALLOCATION])))
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.SET_META_CONTEXT, NbdRep.ERR_UNKNOWN)]


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\x04disk",
                                     proto.encode_meta_request("disk", []) + b"!"])
def test_meta_context_malformed(payload):
    hs = structured()
    _, rs = send(hs, opt(NbdOpt.LIST_META_CONTEXT, payload))
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.LIST_META_CONTEXT, NbdRep.ERR_INVALID)]


# -- oversized options -------------------------------------------------------------------------

def test_oversized_option_is_drained_then_too_big():
    hs = started()
    length = MAX_OPTION_LEN + 1
    header = proto.encode_option_header(NbdOpt.LIST, length)
    events = hs.receive_data(header)
    assert events == [] and hs.data_to_send() == b""
    body = b"\xab" * length
    # Drained in pieces; nothing is answered before the last byte.
    for i in range(0, length - 1, 10_000):
        assert hs.receive_data(body[i:min(i + 10_000, length - 1)]) == []
        assert hs.data_to_send() == b""
    events, rs = send(hs, body[-1:] + opt(NbdOpt.LIST))
    assert events == []
    assert rs[0][:2] == (NbdOpt.LIST, NbdRep.ERR_TOO_BIG)
    list_ok(rs, 1)


def test_option_at_max_len_is_not_too_big():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.LIST, bytes(MAX_OPTION_LEN)))
    assert [(o, t) for o, t, _ in rs] == [(NbdOpt.LIST, NbdRep.ERR_INVALID)]


def test_oversized_export_name_closes():
    hs = started()
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME, b"x" * (MAX_OPTION_LEN + 5)))
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].error
    assert hs.data_to_send() == b""


# -- ABORT -------------------------------------------------------------------------------------

def test_abort():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.ABORT) + opt(NbdOpt.LIST))
    assert rs == [(NbdOpt.ABORT, NbdRep.ACK, b"")]
    assert len(events) == 1 and isinstance(events[0], Closed) and not events[0].error
    assert hs.state is HsState.CLOSED
    assert hs.receive_data(opt(NbdOpt.LIST)) == [] and hs.data_to_send() == b""


# -- NBD_OPT_EXPORT_NAME -----------------------------------------------------------------------

@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    hs = started(ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0))
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME, b"ro"))
    out = hs.data_to_send()
    expected = struct.pack(">QH", 8192, TF.HAS_FLAGS | TF.READ_ONLY)
    if not no_zeroes:
        expected += bytes(124)
    assert out == expected
    assert len(events) == 1 and isinstance(events[0], Negotiated)
    assert events[0].export.name == "ro" and events[0].structured is False


def test_export_name_empty_is_default():
    hs = started()
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME))
    assert events[0].export.name == "disk"


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe"])
def test_export_name_unknown_or_invalid_closes(name):
    hs = started()
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME, name))
    assert len(events) == 1 and isinstance(events[0], Closed)
    assert hs.data_to_send() == b""  # no way to report an error for EXPORT_NAME


# -- every payload consumed, even when refused -------------------------------------------------

REFUSED = [
    pytest.param(NbdOpt.STARTTLS, b"tls please", NbdRep.ERR_UNSUP, id="starttls"),
    pytest.param(NbdOpt.EXTENDED_HEADERS, b"\0" * 9, NbdRep.ERR_UNSUP, id="extended"),
    pytest.param(4242, b"IHAVEOPT" + bytes(8), NbdRep.ERR_UNSUP, id="unknown"),
    pytest.param(NbdOpt.LIST, opt(NbdOpt.LIST), NbdRep.ERR_INVALID, id="list"),
    pytest.param(NbdOpt.STRUCTURED_REPLY, opt(NbdOpt.ABORT), NbdRep.ERR_INVALID,
                 id="structured"),
    pytest.param(NbdOpt.LIST_META_CONTEXT, proto.encode_meta_request("disk", ["base:"]),
                 NbdRep.ERR_INVALID, id="list-meta-unstructured"),
    pytest.param(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("disk", ["base:"]),
                 NbdRep.ERR_INVALID, id="set-meta-unstructured"),
    pytest.param(NbdOpt.INFO, b"\0\0\0\x10short", NbdRep.ERR_INVALID, id="info-malformed"),
    pytest.param(NbdOpt.GO, info_payload("nope"), NbdRep.ERR_UNKNOWN, id="go-unknown"),
    pytest.param(NbdOpt.GO, info_payload("disk") + opt(NbdOpt.ABORT), NbdRep.ERR_INVALID,
                 id="go-trailing"),
]


@pytest.mark.parametrize("option,payload,rtype", REFUSED)
def test_refused_option_payload_is_consumed(option, payload, rtype):
    hs = started()
    events, rs = send(hs, opt(option, payload) + opt(NbdOpt.LIST))
    assert events == []
    assert rs[0][:2] == (option, rtype)
    list_ok(rs, 1)
    assert hs.state is HsState.OPTION and bytes(hs._in) == b""


# -- incremental input -------------------------------------------------------------------------

TRANSCRIPT = (
    opt(NbdOpt.LIST)
    + opt(NbdOpt.STARTTLS)
    + opt(NbdOpt.STRUCTURED_REPLY)
    + opt(NbdOpt.LIST_META_CONTEXT, proto.encode_meta_request("disk", []))
    + opt(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("disk", [BASE_ALLOCATION]))
    + opt(NbdOpt.INFO, info_payload("nope"))
    + opt(NbdOpt.INFO, info_payload("disk", [NbdInfo.NAME, NbdInfo.DESCRIPTION]))
    + opt(NbdOpt.GO, info_payload("disk", [NbdInfo.NAME]))
)
PIPELINED = proto.encode_request(NbdCmd.READ, 0, 1, 0, 4096) + b"\x25\x60"


def run_chunks(data: bytes, size: int):
    """Feed `data` in chunks of `size` like a connection would: once the handshake is done,
    the rest of the stream (leftover + unfed chunks) belongs to the transmission phase."""
    hs = server()
    out = hs.data_to_send()
    events = []
    rest = b""
    for i in range(0, len(data), size):
        if hs.state in (HsState.DONE, HsState.CLOSED):
            rest = data[i:]
            break
        events += hs.receive_data(data[i:i + size])
        out += hs.data_to_send()
    return events, out, hs.leftover + rest, hs.state


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 17, 1000])
def test_byte_at_a_time_equals_all_at_once(size):
    data = proto.encode_client_flags(FLAGS_OK) + TRANSCRIPT + PIPELINED
    whole = run_chunks(data, len(data))
    pieces = run_chunks(data, size)
    assert pieces == whole
    events, out, leftover, state = whole
    assert state is HsState.DONE
    assert len(events) == 1 and isinstance(events[0], Negotiated)
    assert events[0].meta_contexts == {BASE_ALLOCATION_ID: BASE_ALLOCATION}
    assert leftover == PIPELINED
    rs = replies(out[18:])
    assert [t for _, t, _ in rs][-1] == NbdRep.ACK
    assert len(rs) == 3 + 1 + 1 + 2 + 2 + 1 + 5 + 4


def test_options_seen_independent_of_chunking():
    data = (proto.encode_client_flags(FLAGS_OK)
            + opt(NbdOpt.INFO, info_payload("x" * 5000)) + opt(NbdOpt.GO, info_payload()))
    whole = run_chunks(data, len(data))
    assert isinstance(whole[0][0], Negotiated)
    assert run_chunks(data, 1) == whole


def test_too_many_options_closes():
    hs = started()
    events, rs = send(hs, opt(NbdOpt.STARTTLS) * MAX_OPTIONS)
    assert events == [] and len(rs) == MAX_OPTIONS
    events = hs.receive_data(opt(NbdOpt.STARTTLS))
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].error


# -- leftover after GO -------------------------------------------------------------------------

def test_pipelined_bytes_after_go_in_leftover():
    hs = started()
    req = proto.encode_request(NbdCmd.READ, 0, 7, 0, 512)
    events = hs.receive_data(opt(NbdOpt.GO, info_payload()) + req + opt(NbdOpt.LIST))
    assert isinstance(events[0], Negotiated)
    assert hs.leftover == req + opt(NbdOpt.LIST)
    replies(hs.data_to_send())  # only GO's replies, all well formed
    # Once done, further input is not the handshake's business.
    assert hs.receive_data(b"more") == []
    assert hs.leftover == req + opt(NbdOpt.LIST)


def test_pipelined_bytes_after_export_name_in_leftover():
    hs = server()
    hs.data_to_send()
    req = proto.encode_request(NbdCmd.FLUSH, 0, 1, 0, 0)
    events = hs.receive_data(proto.encode_client_flags(FLAGS_OK)
                             + opt(NbdOpt.EXPORT_NAME, b"disk") + req)
    assert isinstance(events[0], Negotiated)
    assert hs.leftover == req


def test_no_leftover():
    hs = started()
    events = hs.receive_data(opt(NbdOpt.GO, info_payload()))
    assert isinstance(events[0], Negotiated) and hs.leftover == b""


# -- garbage -----------------------------------------------------------------------------------

@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_after_client_flags(data):
    hs = started()
    events = []
    for chunk in (data[:7], data[7:]):
        events += hs.receive_data(chunk)
    replies(hs.data_to_send())
    assert all(isinstance(e, Closed) for e in events)
    assert len(events) <= 1


_options = st.one_of(
    st.sampled_from(list(NbdOpt)), st.integers(0, 20), st.integers(0, 0xFFFFFFFF))
_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda n, i: proto.encode_info_request(n, i),
              st.sampled_from(["", "disk", "ro", "nope"]), st.lists(st.integers(0, 5))),
    st.builds(lambda n, q: proto.encode_meta_request(n, q),
              st.sampled_from(["", "disk", "ro", "nope"]),
              st.lists(st.sampled_from(["base:", BASE_ALLOCATION, "x:y", ""]), max_size=3)),
)


@given(st.lists(st.tuples(_options, _payloads), max_size=8), st.binary(max_size=20),
       st.integers(1, 50))
@settings(max_examples=300, deadline=None)
def test_random_option_sequences(options, tail, chunk):
    hs = started()
    data = b"".join(opt(o, p) for o, p in options) + tail
    events = []
    for i in range(0, len(data), chunk):
        events += hs.receive_data(data[i:i + chunk])
    out = hs.data_to_send()
    assert all(isinstance(e, (Closed, Negotiated)) for e in events)
    assert len(events) <= 1
    assert (hs.state in (HsState.DONE, HsState.CLOSED)) == bool(events)
    # Everything sent is a well formed option reply, except the final NBD_OPT_EXPORT_NAME
    # reply (size + flags, no zeroes as negotiated).
    pos, magic = 0, struct.pack(">Q", REPLY_MAGIC)
    while pos < len(out) and out[pos:pos + 8] == magic:
        (_, rtype, _), n = proto.decode_option_reply(out[pos:])
        assert rtype in set(NbdRep)
        pos += n
    if pos < len(out):
        assert isinstance(events[0], Negotiated)
        assert len(out) - pos == 10


# -- refusal (no export served, e.g. a Secondary node) ----------------------------------------

def refusing() -> HandshakeServer:
    hs = HandshakeServer(make_exports(), refusal="node is Secondary")
    hs.data_to_send()
    hs.receive_data(proto.encode_client_flags(FLAGS_OK))
    return hs


@pytest.mark.parametrize("option", [NbdOpt.INFO, NbdOpt.GO])
def test_refusal_info_go_is_policy_error(option):
    hs = refusing()
    events, rs = send(hs, opt(option, info_payload("disk")))
    assert events == []
    assert rs == [(option, NbdRep.ERR_POLICY, b"node is Secondary")]
    events, rs = send(hs, opt(NbdOpt.LIST))  # still negotiating
    list_ok(rs)


def test_refusal_export_name_closes():
    hs = refusing()
    events = hs.receive_data(opt(NbdOpt.EXPORT_NAME, b"disk"))
    assert len(events) == 1 and isinstance(events[0], Closed)
    assert events[0].reason == "node is Secondary" and not events[0].error
    assert hs.data_to_send() == b""
