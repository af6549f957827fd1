"""NBD_OPT_STARTTLS in the sans-IO handshake: off (NOTLS), on, require (FORCEDTLS)."""

from __future__ import annotations

import pytest

from blockrep.nbd import proto
from blockrep.nbd.constants import ClientFlag, NbdInfo, NbdOpt, NbdRep
from blockrep.nbd.handshake import Closed, HandshakeServer, HsState, Negotiated, StartTls

from test_handshake import FLAGS_OK, info_payload, list_ok, make_exports, opt, send


def started(tls: str, flags: int = FLAGS_OK) -> HandshakeServer:
    hs = HandshakeServer(make_exports(), tls=tls)
    hs.data_to_send()
    assert hs.receive_data(proto.encode_client_flags(flags)) == []
    return hs


def upgraded(tls: str) -> HandshakeServer:
    hs = started(tls)
    events, rs = send(hs, opt(NbdOpt.STARTTLS))
    assert rs == [(NbdOpt.STARTTLS, NbdRep.ACK, b"")]
    assert len(events) == 1 and isinstance(events[0], StartTls)
    assert hs.state is HsState.TLS
    hs.tls_established()
    assert hs.tls_active and hs.state is HsState.OPTION
    return hs


def test_bad_mode():
    with pytest.raises(ValueError):
        HandshakeServer(make_exports(), tls="maybe")


def test_off_answers_unsup_and_serves_plain():
    hs = started("off")
    events, rs = send(hs, opt(NbdOpt.STARTTLS))
    assert events == [] and rs[0][:2] == (NbdOpt.STARTTLS, NbdRep.ERR_UNSUP)
    list_ok(send(hs, opt(NbdOpt.LIST))[1])


@pytest.mark.parametrize("mode", ["on", "require"])
def test_starttls_then_go(mode):
    hs = upgraded(mode)
    list_ok(send(hs, opt(NbdOpt.LIST))[1])
    events, rs = send(hs, opt(NbdOpt.GO, info_payload("disk", [NbdInfo.NAME])))
    assert rs[-1][1] == NbdRep.ACK
    assert len(events) == 1 and isinstance(events[0], Negotiated)


@pytest.mark.parametrize("mode", ["on", "require"])
def test_second_starttls_is_invalid(mode):
    hs = upgraded(mode)
    events, rs = send(hs, opt(NbdOpt.STARTTLS))
    assert events == [] and rs[0][:2] == (NbdOpt.STARTTLS, NbdRep.ERR_INVALID)


def test_starttls_with_payload_is_invalid():
    hs = started("on")
    events, rs = send(hs, opt(NbdOpt.STARTTLS, b"x"))
    assert events == [] and rs[0][:2] == (NbdOpt.STARTTLS, NbdRep.ERR_INVALID)
    assert hs.state is HsState.OPTION


def test_on_serves_plain_too():
    hs = started("on")
    list_ok(send(hs, opt(NbdOpt.LIST))[1])
    events, rs = send(hs, opt(NbdOpt.GO, info_payload("disk")))
    assert isinstance(events[0], Negotiated)


@pytest.mark.parametrize("option,payload", [
    (NbdOpt.LIST, b""), (NbdOpt.INFO, info_payload("disk")), (NbdOpt.GO, info_payload("disk")),
    (NbdOpt.STRUCTURED_REPLY, b""), (NbdOpt.SET_META_CONTEXT, b"junk"), (999, b"x" * 10),
])
def test_require_answers_only_tls_reqd_before_tls(option, payload):
    hs = started("require")
    events, rs = send(hs, opt(option, payload))
    assert events == []
    assert rs == [(option, NbdRep.ERR_TLS_REQD, rs[0][2])]
    assert not hs.structured and hs.state is HsState.OPTION


def test_require_oversized_option_is_tls_reqd():
    hs = started("require")
    n = 70000
    events, rs = send(hs, proto.encode_option_header(NbdOpt.LIST, n) + bytes(n))
    assert events == [] and rs[0][:2] == (NbdOpt.LIST, NbdRep.ERR_TLS_REQD)


def test_require_export_name_before_tls_closes():
    hs = started("require")
    events, rs = send(hs, opt(NbdOpt.EXPORT_NAME, b"disk"))
    assert rs == [] and len(events) == 1 and isinstance(events[0], Closed)


def test_require_abort_is_answered():
    hs = started("require")
    events, rs = send(hs, opt(NbdOpt.ABORT))
    assert rs == [(NbdOpt.ABORT, NbdRep.ACK, b"")] and isinstance(events[0], Closed)


def test_bytes_after_starttls_before_ack_close():
    """The client must wait for the ACK before its TLS hello."""
    hs = started("require")
    events, rs = send(hs, opt(NbdOpt.STARTTLS) + b"\x16\x03\x01")
    assert rs == [(NbdOpt.STARTTLS, NbdRep.ACK, b"")]
    assert isinstance(events[0], StartTls) and isinstance(events[-1], Closed)
    assert events[-1].error


def test_starttls_needs_fixed_newstyle():
    hs = started("on", flags=ClientFlag.NO_ZEROES)
    events, rs = send(hs, opt(NbdOpt.STARTTLS))
    assert rs == [] and isinstance(events[0], Closed) and events[0].error


def test_tls_established_without_starttls_is_a_bug():
    with pytest.raises(RuntimeError):
        started("on").tls_established()
