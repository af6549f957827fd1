"""blockrep.peer.handshake: the sans-IO link handshake, wired in memory.

Two machines exchange bytes through a pump (whole, byte at a time, random chunks); an
attacker is a piece of code that holds transcripts and splices them: relay, reflection,
replay all end in Refused, never Established. Before the peer has proven itself, the
bounds hold (payload cap, one deadline) and an acceptor gives away no proof and no nonce to
a party that did not name it. Arbitrary input raises nothing but LinkProtocolError.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep.peer import proto
from blockrep.peer.handshake import (
    ACCEPTOR,
    DIALER,
    NONCE_LEN,
    PRE_AUTH_MAX_CONTROL,
    Established,
    HandshakeParams,
    HsPhase,
    LinkHandshake,
    Refused,
    Send,
    StartTls,
    proof,
)
from blockrep.peer.proto import HEADER_SIZE, MAGIC, LinkProtocolError, P

SETTINGS = settings(max_examples=200, deadline=None)
SECRET = b"s3cret"
ND = bytes(range(32))          # the dialer's nonce
NA = bytes(range(100, 132))    # the acceptor's nonce
STATE = {"role": "Secondary", "disk": "UpToDate", "gen": [1, 0, []], "bitmap": []}


ALGS = {"csums_alg": "xxh3-128", "verify_alg": "xxh3-128"}  # the defaults, in every STATE


def params(me, peer, *, secret=SECRET, resource="r0", size=1 << 20, tls=False, timeout=5.0,
           **algs):
    return HandshakeParams(resource=resource, me=me, peer=peer, secret=secret, size=size,
                           tls=tls, timeout=timeout, **algs)


def dialer(nonce=ND, now=0.0, **kw) -> LinkHandshake:
    return LinkHandshake(params("alpha", "beta", **kw), dialer=True, nonce=nonce, now=now,
                         local_state=lambda: dict(STATE, role="Primary"))


def acceptor(nonce=NA, now=0.0, **kw) -> LinkHandshake:
    return LinkHandshake(params("beta", "alpha", **kw), dialer=False, nonce=nonce, now=now,
                         local_state=lambda: dict(STATE))


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def others(events) -> list:
    return [e for e in events if not isinstance(e, Send)]


def packets(data: bytes) -> list[tuple[int, dict | None]]:
    """Split bytes into (type, body) the way a reader would (test-side decoder)."""
    out, pos = [], 0
    while pos < len(data):
        magic, ptype, *_, paylen, _crc = struct.unpack_from(">IHHQQIII", data, pos)
        assert magic == MAGIC
        payload = data[pos + HEADER_SIZE:pos + HEADER_SIZE + paylen]
        out.append((ptype, proto.decode_control(payload) if paylen else None))
        pos += HEADER_SIZE + paylen
    return out


def feed(hs: LinkHandshake, data: bytes, now: float = 0.0, chunks=None) -> list:
    """Feed data whole, or in pieces of the given sizes (cycled), collecting events."""
    events = []
    if chunks is None:
        return hs.receive_data(data, now)
    pos, i = 0, 0
    while pos < len(data):
        n = chunks[i % len(chunks)]
        events += hs.receive_data(data[pos:pos + n], now)
        pos += n
        i += 1
    return events


def pump(d: LinkHandshake, a: LinkHandshake, chunks=None, tls_error=(None, None)):
    """Run both to the end; -> (dialer events, acceptor events) without the Sends."""
    ev_d, ev_a = d.start(), a.start()
    to_a, to_d = sent(ev_d), sent(ev_a)
    got_d, got_a = others(ev_d), others(ev_a)
    for _ in range(20):
        if not to_a and not to_d:
            break
        ea = feed(a, to_a, chunks=chunks) if to_a else []
        ed = feed(d, to_d, chunks=chunks) if to_d else []
        to_a, to_d = sent(ed), sent(ea)
        got_d += others(ed)
        got_a += others(ea)
        if d.phase is a.phase is HsPhase.TLS:  # both wrapped the connection in TLS
            assert not to_a and not to_d
            ed2, ea2 = d.tls_done(tls_error[0], 0.0), a.tls_done(tls_error[1], 0.0)
            to_a, to_d = to_a + sent(ed2), to_d + sent(ea2)
            got_d += others(ed2)
            got_a += others(ea2)
    return got_d, got_a


def established(events) -> Established:
    (ev,) = [e for e in events if isinstance(e, Established)]
    return ev


def refused(events) -> Refused:
    (ev,) = [e for e in events if isinstance(e, Refused)]
    return ev


# -- the happy path -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [None, [1], [3, 1, 7], [35, 36, 37]])
def test_handshake_establishes_both_sides(chunks):
    d, a = dialer(), acceptor()
    ev_d, ev_a = pump(d, a, chunks)
    e_d, e_a = established(ev_d), established(ev_a)
    assert e_d.state == {**STATE, "size": 1 << 20, **ALGS}
    assert e_a.state == {**STATE, "role": "Primary", "size": 1 << 20, **ALGS}
    assert e_d.hello["node"] == "beta" and e_a.hello["node"] == "alpha"
    assert e_d.leftover == e_a.leftover == b""
    assert d.phase is a.phase is HsPhase.ESTABLISHED
    assert d.peer_authenticated and a.peer_authenticated


def test_transcript_order_dialer_first_acceptor_proves_last():
    d, a = dialer(), acceptor()
    assert a.start() == []  # the acceptor says nothing until the dialer spoke
    hello_d = sent(d.start())
    assert [t for t, _ in packets(hello_d)] == [P.HELLO]
    body = packets(hello_d)[0][1]
    assert body == {"version": 3, "features": proto.FEATURES, "resource": "r0", "node": "alpha",
                    "peer": "beta", "nonce": ND}
    hello_a = sent(a.receive_data(hello_d, 0.0))
    assert [t for t, _ in packets(hello_a)] == [P.HELLO]  # no proof yet
    assert packets(hello_a)[0][1]["nonce"] == NA
    auth_d = sent(d.receive_data(hello_a, 0.0))
    assert [t for t, _ in packets(auth_d)] == [P.AUTH]
    auth_a = sent(a.receive_data(auth_d, 0.0))
    assert [t for t, _ in packets(auth_a)] == [P.AUTH, P.STATE]
    state_d = sent(d.receive_data(auth_a, 0.0))
    assert [t for t, _ in packets(state_d)] == [P.STATE]


def test_leftover_after_state_is_handed_on():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    hello_a = sent(a.receive_data(hello_d, 0.0))
    auth_d = sent(d.receive_data(hello_a, 0.0))
    auth_a = sent(a.receive_data(auth_d, 0.0))
    state_d = sent(d.receive_data(auth_a, 0.0))
    extra = proto.pack_header(P.PING) + b"partial"
    ev = established(a.receive_data(state_d + extra, 0.0))
    assert ev.leftover == extra
    assert a.receive_data(b"more", 0.0) == []  # done: nothing more is taken


def test_pings_after_auth_are_ignored():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    auth_d = sent(d.receive_data(sent(a.receive_data(hello_d, 0.0)), 0.0))
    sent(a.receive_data(auth_d, 0.0))
    assert a.receive_data(proto.pack_header(P.PING) + proto.pack_header(P.PING_ACK), 0) == []
    assert a.phase is HsPhase.STATE


# -- proofs -------------------------------------------------------------------------------------

def _field(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def test_proof_known_answer():
    msg = (_field(b"blockrep-link-auth-v2") + _field(b"dialer") + _field(b"alpha")
           + _field(b"beta") + _field(b"r0") + struct.pack(">III", 2, 0, 0)
           + _field(ND) + _field(NA))
    want = hmac.new(SECRET, msg, hashlib.sha256).digest()
    assert proof(SECRET, DIALER, dialer="alpha", acceptor="beta", resource="r0", version=2,
                 features_d=0, features_a=0, nonce_d=ND, nonce_a=NA) == want


BASE = dict(dialer="alpha", acceptor="beta", resource="r0", version=2, features_d=0,
            features_a=0, nonce_d=ND, nonce_a=NA)


@pytest.mark.parametrize("change", [
    {"dialer": "beta", "acceptor": "alpha"},      # direction swapped
    {"dialer": "alph", "acceptor": "abeta"},       # field boundary shifted
    {"resource": "r1"}, {"version": 1}, {"features_d": 1}, {"features_a": 1},
    {"nonce_d": NA, "nonce_a": ND},                # nonces swapped
    {"nonce_d": bytes(32)}, {"nonce_a": bytes(32)},
])
def test_proof_binds_every_field(change):
    good = proof(SECRET, DIALER, **BASE)
    assert proof(SECRET, DIALER, **{**BASE, **change}) != good
    assert proof(SECRET, ACCEPTOR, **BASE) != good   # the label
    assert proof(b"other", DIALER, **BASE) != good    # the secret


# -- refusals with reasons ----------------------------------------------------------------------

def test_wrong_secret_refused_both_sides():
    d, a = dialer(), acceptor(secret=b"other")
    ev_d, ev_a = pump(d, a)
    assert refused(ev_a).reason == "authentication failed: the shared secrets differ"
    assert not refused(ev_a).authenticated
    r = refused(ev_d)
    assert r.by_peer and "authentication failed: the shared secrets differ" in r.reason
    assert not r.standalone


@pytest.mark.parametrize("kw, local, told", [
    ({"resource": "r1"}, "resource name differs: this node serves 'r1', the peer offered "
                         "'r0'", "resource name differs: this node does not serve 'r0'"),
])
def test_acceptor_reveals_nothing_to_a_party_that_does_not_name_it(kw, local, told):
    d, a = dialer(), acceptor(**kw)
    out = a.receive_data(sent(d.start()), 0.0)
    assert refused(out).reason == local
    (pkt,) = packets(sent(out))
    assert pkt == (P.REFUSE, {"reason": told, "standalone": False})  # no HELLO, no nonce


def test_acceptor_refuses_a_dialer_that_is_not_its_configured_peer():
    a = acceptor()
    mallory = LinkHandshake(params("mallory", "beta"), dialer=True, nonce=ND, now=0,
                            local_state=dict)
    out = a.receive_data(sent(mallory.start()), 0.0)
    assert "unexpected peer node 'mallory'" in refused(out).reason
    assert [t for t, _ in packets(sent(out))] == [P.REFUSE]


def test_dialer_must_name_the_acceptor():
    a = acceptor()
    wrong = LinkHandshake(params("alpha", "gamma"), dialer=True, nonce=ND, now=0,
                          local_state=dict)
    out = a.receive_data(sent(wrong.start()), 0.0)
    assert "the peer wanted node 'gamma', this is 'beta'" == refused(out).reason


def test_version_mismatch_refused():
    a = acceptor()
    hello = proto.encode_control(P.HELLO, {"version": 1, "resource": "r0", "node": "alpha",
                                            "challenge": ND})
    out = a.receive_data(hello, 0.0)
    assert "link protocol version 1 is not supported (this node speaks 3)" in \
        refused(out).reason


def test_size_mismatch_refused_both_sides_after_auth():
    d, a = dialer(size=1 << 20), acceptor(size=2 << 20)
    ev_d, ev_a = pump(d, a)
    for ev in (refused(ev_d), refused(ev_a)):
        assert "disk sizes differ" in ev.reason and ev.authenticated


@pytest.mark.parametrize("key", ["csums_alg", "verify_alg"])
def test_digest_mismatch_refused_both_sides_after_auth(key):
    d, a = dialer(**{key: "sha256"}), acceptor()
    ev_d, ev_a = pump(d, a)
    name = key.replace("_", "-")
    # each side gets the other's STATE and refuses, each from its own point of view
    r_d, r_a = refused(ev_d), refused(ev_a)
    assert r_d.reason == (f"{name} differs: this node (alpha) uses 'sha256', the peer (beta) "
                          f"uses 'xxh3-128'; configure the same {name} on both nodes")
    assert r_a.reason == (f"{name} differs: this node (beta) uses 'xxh3-128', the peer "
                          f"(alpha) uses 'sha256'; configure the same {name} on both nodes")
    assert r_d.authenticated and r_a.authenticated
    assert not any(isinstance(e, Established) for e in ev_d + ev_a)


def test_state_without_digest_names_refused():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    auth_d = sent(d.receive_data(sent(a.receive_data(hello_d, 0)), 0))
    auth_state_a = sent(a.receive_data(auth_d, 0))
    n = HEADER_SIZE + struct.unpack_from(">I", auth_state_a, 28)[0]
    d.receive_data(auth_state_a[:n], 0)  # the acceptor's proof
    old_state = proto.encode_control(P.STATE, {**STATE, "size": 1 << 20})  # no digest names
    r = refused(d.receive_data(old_state, 0))
    assert r.reason.startswith("csums-alg differs: this node (alpha) uses 'xxh3-128', the "
                               "peer (beta) does not say its csums-alg")


def test_refuse_from_an_unauthenticated_peer_never_means_standalone():
    d = dialer()
    d.start()
    out = d.receive_data(proto.encode_control(P.REFUSE, {"reason": "go away",
                                                         "standalone": True}), 0.0)
    r = refused(out)
    assert r.reason == "peer refused: go away" and r.by_peer
    assert not r.standalone and not r.authenticated


def test_refuse_from_an_authenticated_peer_may_mean_standalone():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    auth_d = sent(d.receive_data(sent(a.receive_data(hello_d, 0)), 0))
    auth_state_a = sent(a.receive_data(auth_d, 0))
    auth_only = auth_state_a[:HEADER_SIZE + struct.unpack_from(">I", auth_state_a, 28)[0]]
    assert packets(sent(d.receive_data(auth_only, 0)))[0][0] == P.STATE
    assert d.peer_authenticated
    out = d.receive_data(proto.encode_control(P.REFUSE, {"reason": "split brain",
                                                         "standalone": True}), 0)
    assert refused(out).standalone and refused(out).authenticated


# -- TLS ----------------------------------------------------------------------------------------

def test_tls_both_sides():
    d, a = dialer(tls=True), acceptor(tls=True)
    first = d.start()
    assert packets(sent(first)) == [(P.STARTTLS, None)]
    ev_d, ev_a = pump(dialer(tls=True), acceptor(tls=True))
    assert established(ev_d) and established(ev_a)
    assert StartTls() in ev_d and StartTls() in ev_a


def test_tls_peer_certificate_refused():
    ev_d, ev_a = pump(dialer(tls=True), acceptor(tls=True),
                      tls_error=(None, "the peer's certificate does not name node 'alpha'"))
    assert refused(ev_a).reason == "the peer's certificate does not name node 'alpha'"
    assert "peer refused: the peer's certificate does not name node 'alpha'" == \
        refused(ev_d).reason


def test_plain_dialer_refused_by_tls_acceptor_with_clear_messages():
    ev_d, ev_a = pump(dialer(), acceptor(tls=True))
    assert "requires TLS" in refused(ev_a).reason
    assert "peer refused: this node requires TLS on the link (tls = true)" in \
        refused(ev_d).reason


def test_tls_dialer_refused_by_plain_acceptor_with_clear_messages():
    ev_d, ev_a = pump(dialer(tls=True), acceptor())
    assert "asks for TLS on the link, but this node has tls = false" in refused(ev_a).reason
    assert "peer refused: this node has tls = false" in refused(ev_d).reason


def test_plaintext_after_starttls_is_an_injection():
    a = acceptor(tls=True)
    starttls = proto.pack_header(P.STARTTLS)
    with pytest.raises(LinkProtocolError, match="after STARTTLS"):
        a.receive_data(starttls + b"\x16\x03\x01", 0.0)
    assert a.phase is HsPhase.CLOSED


def test_tls_done_outside_tls_phase_is_an_error():
    with pytest.raises(LinkProtocolError):
        dialer().tls_done(None, 0.0)


# -- attacks ------------------------------------------------------------------------------------

def test_relay_between_two_acceptors_goes_nowhere():
    """The old attack: a byte pipe between the two nodes' listening ports. Both are
    acceptors here; both wait for a dialer's HELLO; the deadline ends both."""
    a1 = LinkHandshake(params("alpha", "beta"), dialer=False, nonce=ND, now=0,
                       local_state=dict)
    a2 = acceptor()
    assert a1.start() == [] and a2.start() == []
    assert refused(a1.check_time(5.0)).reason == "link handshake not completed within 5s"
    assert refused(a2.check_time(5.0)).reason == "link handshake not completed within 5s"


def test_relay_of_the_dialers_proof_into_another_connection_fails():
    """Mallory holds a connection to the acceptor as 'alpha' (nonce chosen by her) and
    gets the real dialer to prove itself on another connection: the proof is bound to the
    other connection's nonces and fails here."""
    victim = acceptor(nonce=NA)
    mallory_hello = proto.encode_control(P.HELLO, {"version": 3, "features": 0,
                                                    "resource": "r0", "node": "alpha",
                                                    "peer": "beta", "nonce": bytes(32)})
    victim.receive_data(mallory_hello, 0.0)
    # the real dialer, talking to Mallory posing as beta with another acceptor nonce
    d = dialer()
    fake_a = acceptor(nonce=bytes(range(200, 232)))
    auth_d = sent(d.receive_data(sent(fake_a.receive_data(sent(d.start()), 0)), 0))
    out = victim.receive_data(auth_d, 0.0)
    assert refused(out).reason == "authentication failed: the shared secrets differ"
    assert [t for t, _ in packets(sent(out))] == [P.REFUSE]  # the victim proved nothing


def test_reflection_of_the_dialers_own_hello_and_proof_fails():
    d = dialer()
    hello = packets(sent(d.start()))[0][1]
    # Mallory, dialed as beta, sends back alpha's own nonce under beta's name
    reflected = proto.encode_control(P.HELLO, {**hello, "node": "beta", "peer": "alpha"})
    out = d.receive_data(reflected, 0.0)
    assert refused(out).reason == "the peer sent back this node's own nonce (a reflection)"
    assert sent(out) == b""  # no proof given


def test_reflection_of_the_dialers_proof_as_the_acceptors_fails():
    d = dialer()
    d.start()
    hello_a = proto.encode_control(P.HELLO, {"version": 3, "features": 0, "resource": "r0",
                                              "node": "beta", "peer": "alpha", "nonce": NA})
    auth_d = sent(d.receive_data(hello_a, 0.0))
    out = d.receive_data(auth_d, 0.0)  # its own proof back: labelled dialer, not acceptor
    assert refused(out).reason == "authentication failed: the shared secrets differ"
    assert not d.peer_authenticated


def test_replayed_dialer_transcript_fails():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    auth_d = sent(d.receive_data(sent(a.receive_data(hello_d, 0)), 0))
    state_d = sent(d.receive_data(sent(a.receive_data(auth_d, 0)), 0))
    assert established(a.receive_data(state_d, 0))  # the recorded session worked
    later = acceptor(nonce=bytes(range(50, 82)))  # a fresh connection, a fresh nonce
    out = later.receive_data(hello_d, 0) + later.receive_data(auth_d + state_d, 0)
    assert refused(out).reason == "authentication failed: the shared secrets differ"
    assert not later.peer_authenticated


def test_replayed_acceptor_transcript_fails():
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    hello_a = sent(a.receive_data(hello_d, 0))
    auth_state_a = sent(a.receive_data(sent(d.receive_data(hello_a, 0)), 0))
    later = dialer(nonce=bytes(range(60, 92)))
    later.start()
    out = later.receive_data(hello_a, 0) + later.receive_data(auth_state_a, 0)
    assert refused(out).reason == "authentication failed: the shared secrets differ"


# -- bounds before authentication ---------------------------------------------------------------

def test_large_payload_announced_before_auth_is_refused_at_the_header():
    a = acceptor()
    header = proto.pack_header(P.HELLO, paylen=64 * 1024 * 1024)
    with pytest.raises(LinkProtocolError, match="too large.*before authentication"):
        a.receive_data(header, 0.0)
    assert len(a._in) <= HEADER_SIZE
    assert a.receive_data(b"x", 0.0) == []  # closed


def test_payload_at_the_cap_is_read_before_auth():
    a = acceptor()
    header = proto.pack_header(P.HELLO, paylen=PRE_AUTH_MAX_CONTROL)
    assert a.receive_data(header + b"\x80" * 100, 0.0) == []  # still waiting for the rest


def test_state_may_be_large_after_auth():
    big = {"bitmap": list(range(200_000))}
    d = LinkHandshake(params("alpha", "beta"), dialer=True, nonce=ND, now=0,
                      local_state=lambda: big)
    ev_d, ev_a = pump(d, acceptor(), chunks=[4096])
    assert established(ev_a).state["bitmap"] == big["bitmap"]


def test_deadline_covers_the_whole_exchange_not_each_byte():
    a = acceptor(now=100.0, timeout=5.0)
    hello_d = sent(dialer().start())
    assert len(hello_d) > 60
    for i in range(50):  # a trickle: one byte every 0.1 s keeps nothing alive
        assert a.receive_data(hello_d[i:i + 1], 100.0 + i * 0.1) == []
    assert a.check_time(104.9) == []
    assert refused(a.check_time(105.0)).reason == "link handshake not completed within 5s"
    assert a.phase is HsPhase.CLOSED
    assert a.receive_data(hello_d[50:], 105.1) == []


def test_a_byte_past_the_deadline_ends_it():
    a = acceptor(now=0.0, timeout=2.0)
    assert refused(a.receive_data(b"B", 2.0)).reason == \
        "link handshake not completed within 2s"


def test_no_deadline_once_the_peer_is_authenticated():
    d, a = dialer(), acceptor()
    auth_d = sent(d.receive_data(sent(a.receive_data(sent(d.start()), 0)), 0))
    a.receive_data(auth_d, 1.0)
    assert a.peer_authenticated
    assert a.check_time(1000.0) == []


@pytest.mark.parametrize("data, match", [
    (proto.pack_header(P.DATA, paylen=4), "not valid in handshake phase hello"),
    (proto.pack_header(P.STATE, paylen=1) + b"\x80", "not valid in handshake phase hello"),
    (proto.pack_header(P.AUTH, paylen=1) + b"\x80", "not valid in handshake phase hello"),
    (b"XXXX" + bytes(36), "bad packet magic"),
    (proto.pack_header(P.HELLO)[:-1] + b"\x00", "bad packet header checksum"),
    (proto.pack_header(P.HELLO, paylen=3)[:12] + b"\x01" + proto.pack_header(P.HELLO)[13:],
     "bad packet header checksum"),
    (proto.pack_header(P.HELLO, paylen=1, crc=proto.native.crc32c(b"\xc1")) + b"\xc1",
     "undecodable"),
    (proto.pack_header(P.HELLO, paylen=1) + b"\xc1", "CRC32C mismatch in a HELLO payload"),
    (proto.encode_control(P.HELLO, {"version": 3})[:-1] + b"\x04",
     "CRC32C mismatch in a HELLO payload"),
    (proto.encode_control(P.HELLO, {"version": 3, "resource": "r0", "node": "alpha",
                                     "peer": "beta", "nonce": b"short"}), "nonce of 5"),
    (proto.encode_control(P.HELLO, {"version": 3, "resource": "r0", "node": "alpha",
                                     "peer": "beta"}), "'nonce'"),
    (proto.pack_header(999), "not valid in handshake phase"),
])
def test_protocol_errors(data, match):
    with pytest.raises(LinkProtocolError, match=match):
        acceptor().receive_data(data, 0.0)


def test_nonce_must_have_its_length():
    with pytest.raises(ValueError):
        LinkHandshake(params("a", "b"), dialer=True, nonce=b"x", now=0, local_state=dict)
    assert NONCE_LEN == 32


# -- arbitrary input ----------------------------------------------------------------------------

def _drive(hs, data, chunk):
    try:
        hs.start()
        for i in range(0, len(data), chunk):
            for ev in hs.receive_data(data[i:i + chunk], 0.0):
                assert isinstance(ev, (Send, Refused, Established, StartTls))
            if hs.phase is HsPhase.TLS:
                hs.tls_done(None, 0.0)
    except LinkProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=600), st.integers(1, 64), st.booleans(), st.booleans())
def test_arbitrary_bytes_raise_only_protocol_errors(data, chunk, is_dialer, tls):
    hs = dialer(tls=tls) if is_dialer else acceptor(tls=tls)
    _drive(hs, data, chunk)


def _valid_dialer_stream() -> bytes:
    d, a = dialer(), acceptor()
    hello_d = sent(d.start())
    auth_d = sent(d.receive_data(sent(a.receive_data(hello_d, 0)), 0))
    state_d = sent(d.receive_data(sent(a.receive_data(auth_d, 0)), 0))
    return hello_d + auth_d + state_d


VALID = _valid_dialer_stream()


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                max_size=4), st.integers(1, 50))
def test_mutated_transcripts_raise_only_protocol_errors(flips, chunk):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    # a replay with mutations against a fresh acceptor never establishes (fresh nonce)
    a = acceptor(nonce=bytes(range(1, 33)))
    events = []
    try:
        for i in range(0, len(data), chunk):
            events += a.receive_data(bytes(data[i:i + chunk]), 0.0)
    except LinkProtocolError:
        return
    assert not any(isinstance(e, Established) for e in events)


@SETTINGS
@given(st.lists(st.integers(1, 80), min_size=1, max_size=8))
def test_any_chunking_gives_the_same_outcome(chunks):
    ev_d, ev_a = pump(dialer(), acceptor(), chunks)
    assert established(ev_d).state["size"] == established(ev_a).state["size"] == 1 << 20
