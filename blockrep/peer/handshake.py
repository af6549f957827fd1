"""Sans-IO peer-link handshake: optional STARTTLS, HELLO, connection-bound proofs, STATE.

Owns: the order of the handshake packets, every check on them, the proofs (HMAC-SHA256
over a transcript that binds the connection: role label, both node names, the resource,
the protocol version, both sides' features and both nonces) and the bounds that hold until
the peer has proven itself (small control payloads, one deadline for the whole exchange).
Bytes go in with `receive_data(data, now)`; events come out: `Send` (bytes for the peer),
`StartTls` (the shell wraps the connection in TLS, then calls `tls_done`), `Established`
(the peer's HELLO and STATE; bytes past the handshake in `leftover`) or `Refused`.
Must not: touch sockets, clocks or the node; time comes in as `now`, the nonce from the
caller, the local state from the `local_state` callable (called once, after the peer
proved itself). Broken framing raises LinkProtocolError (the only exception that escapes).

Order (docs/wire-protocol.md): the dialer speaks first and proves first, so an acceptor
reveals nothing (no name, no proof) to a party that did not name it and its resource, and
gives no proof to a party that has not given one:

    dialer                                   acceptor
    [STARTTLS        ->                      (tls = true only)
                     <-  STARTTLS            both wrap the connection in TLS]
    HELLO {nonce_d}  ->
                     <-  HELLO {nonce_a}
    AUTH proof_d     ->                      verifies with label "dialer"
                     <-  AUTH proof_a, STATE
    verifies with label "acceptor"
    STATE            ->

Each STATE names the disk size, csums-alg and verify-alg; any that differs from this node's
is refused (both sides say which).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Callable

from ..digest import DEFAULT as DEFAULT_DIGEST
from .proto import (
    FEATURES,
    HEADER_SIZE,
    MAX_CONTROL,
    VERSION,
    LinkProtocolError,
    P,
    check_header,
    check_payload,
    decode_control,
    encode_control,
    need,
    pack_header,
)

NONCE_LEN = 32
PROOF_LEN = 32
PRE_AUTH_MAX_CONTROL = 4096  # control payload bytes accepted before the peer proved itself
AUTH_LABEL = b"blockrep-link-auth-v2"
DIALER = "dialer"
ACCEPTOR = "acceptor"


# -- events -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Wrap the connection in TLS now (nothing else is read or sent until tls_done)."""


@dataclass(frozen=True)
class Established:
    hello: dict
    state: dict
    leftover: bytes  # bytes received past the peer's STATE: the established link's first


@dataclass(frozen=True)
class Refused:
    reason: str
    by_peer: bool        # the peer refused (its P_REFUSE), rather than this side
    authenticated: bool  # the peer had proven it knows the secret when this happened
    standalone: bool = False  # stop reconnecting (only ever from an authenticated peer)


# -- parameters and proofs ----------------------------------------------------------------------

@dataclass(frozen=True)
class HandshakeParams:
    """What a node supplies: who it is, whom it expects, what must match."""
    resource: str
    me: str
    peer: str
    secret: bytes
    size: int
    tls: bool = False
    timeout: float = 5.0  # the whole exchange up to the peer's proof (a trickle cannot extend)
    csums_alg: str = DEFAULT_DIGEST  # block digests: both nodes must use the same (STATE)
    verify_alg: str = DEFAULT_DIGEST
    features: int = FEATURES  # advertised in HELLO (compression: what this node decodes)


def _field(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def proof(secret: bytes, label: str, *, dialer: str, acceptor: str, resource: str,
          version: int, features_d: int, features_a: int, nonce_d: bytes,
          nonce_a: bytes) -> bytes:
    """HMAC-SHA256 binding one side's proof to this connection and its direction."""
    msg = b"".join((
        _field(AUTH_LABEL), _field(label.encode()), _field(dialer.encode()),
        _field(acceptor.encode()), _field(resource.encode()),
        struct.pack(">III", version, features_d, features_a),
        _field(bytes(nonce_d)), _field(bytes(nonce_a))))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def encode_packet(ptype: int, body: dict | None = None) -> bytes:
    return pack_header(ptype) if body is None else encode_control(ptype, body)


# -- the machine --------------------------------------------------------------------------------

class HsPhase(enum.Enum):
    STARTTLS = "starttls"  # dialer: waiting for the answer; acceptor: for the request
    TLS = "tls"            # the shell runs the TLS handshake
    HELLO = "hello"        # waiting for the peer's HELLO
    AUTH = "auth"          # waiting for the peer's proof
    STATE = "state"        # the peer proved itself; waiting for its STATE
    ESTABLISHED = "established"
    CLOSED = "closed"


# which packets each phase accepts (REFUSE is accepted in every phase that reads)
_ACCEPTS = {
    HsPhase.STARTTLS: {P.STARTTLS, P.HELLO},  # HELLO here: a plain peer (refused)
    HsPhase.HELLO: {P.HELLO, P.STARTTLS},     # STARTTLS here: a TLS peer (refused)
    HsPhase.AUTH: {P.AUTH},
    HsPhase.STATE: {P.STATE, P.PING, P.PING_ACK},
}


class LinkHandshake:
    def __init__(self, params: HandshakeParams, *, dialer: bool, nonce: bytes, now: float,
                 local_state: Callable[[], dict]):
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        self.params = params
        self.dialer = dialer
        self.nonce = bytes(nonce)
        self.deadline = now + params.timeout
        self.local_state = local_state
        self.peer_authenticated = False
        self.peer_hello: dict | None = None
        self.peer_features = 0
        self.phase = HsPhase.STARTTLS if params.tls else HsPhase.HELLO
        self._in = bytearray()
        self._events: list = []
        self._handlers = {P.STARTTLS: self._on_starttls, P.HELLO: self._on_hello,
                          P.AUTH: self._on_auth, P.STATE: self._on_state,
                          P.PING: lambda body: None, P.PING_ACK: lambda body: None}

    @property
    def done(self) -> bool:
        return self.phase in (HsPhase.ESTABLISHED, HsPhase.CLOSED)

    # -- I/O boundary ------------------------------------------------------------------------
    def start(self) -> list:
        """The first events: the dialer speaks first; the acceptor waits."""
        if self.dialer:
            if self.params.tls:
                self._send(P.STARTTLS)
            else:
                self._send_hello()
        return self._take()

    def receive_data(self, data, now: float) -> list:
        if self.done or self.phase is HsPhase.TLS:
            if self.phase is HsPhase.TLS and len(data):
                self._fail("data received while TLS was being set up")
            return []
        if self._expired(now):
            return self._timeout()
        self._in += data
        try:
            while not self.done and self.phase is not HsPhase.TLS and self._step():
                pass
        except LinkProtocolError:
            self.phase = HsPhase.CLOSED
            raise
        if self.phase is HsPhase.TLS and self._in:
            # the peer must wait for the STARTTLS exchange before starting TLS: plaintext
            # bytes here would be taken as if they had come through TLS (injection)
            self._fail("bytes after STARTTLS before the TLS handshake")
        return self._take()

    def check_time(self, now: float) -> list:
        """Called by the shell's timer: the deadline holds until the peer proved itself."""
        if not self.done and self._expired(now):
            return self._timeout()
        return []

    def tls_done(self, error: str | None, now: float) -> list:
        """The shell finished the TLS handshake; error: why the peer's certificate is not
        acceptable (or why TLS failed), None when it is."""
        if self.phase is not HsPhase.TLS:
            raise LinkProtocolError("tls_done outside the TLS phase")
        if error:
            self._refuse(error, tell_peer=True)
        elif self._expired(now):
            return self._timeout()
        else:
            self.phase = HsPhase.HELLO
            if self.dialer:
                self._send_hello()
        return self._take()

    # -- machinery ---------------------------------------------------------------------------
    def _take(self) -> list:
        events, self._events = self._events, []
        return events

    def _expired(self, now: float) -> bool:
        return not self.peer_authenticated and now >= self.deadline

    def _timeout(self) -> list:
        self._refuse(f"link handshake not completed within {self.params.timeout:g}s",
                     tell_peer=False)
        return self._take()

    def _fail(self, what: str):
        self.phase = HsPhase.CLOSED
        raise LinkProtocolError(what)

    def _send(self, ptype: int, body: dict | None = None) -> None:
        self._events.append(Send(encode_packet(ptype, body)))

    def _send_hello(self) -> None:
        p = self.params
        self._send(P.HELLO, {"version": VERSION, "features": p.features,
                             "resource": p.resource, "node": p.me, "peer": p.peer,
                             "nonce": self.nonce})

    def _refuse(self, reason: str, *, tell_peer: bool, told: str | None = None) -> None:
        """This side refuses: tell the peer (`told`, or the same reason), then close."""
        if tell_peer:
            self._send(P.REFUSE, {"reason": told or reason, "standalone": False})
        self.phase = HsPhase.CLOSED
        self._events.append(Refused(reason, by_peer=False,
                                    authenticated=self.peer_authenticated))

    def _step(self) -> bool:
        buf = self._in
        if len(buf) < HEADER_SIZE:
            return False
        try:
            _magic, ptype, _flags, _pid, _off, _size, paylen, _crc = check_header(buf)
        except LinkProtocolError as exc:
            first = self.phase in (HsPhase.HELLO, HsPhase.STARTTLS)
            self._fail(f"{exc}{'; is the peer older than link protocol 3?' if first else ''}")
        limit = MAX_CONTROL if self.peer_authenticated else PRE_AUTH_MAX_CONTROL
        if paylen > limit:
            self._fail(f"handshake packet of {paylen} bytes is too large (limit {limit}"
                       f"{'' if self.peer_authenticated else ' before authentication'})")
        if ptype != P.REFUSE and ptype not in _ACCEPTS[self.phase]:
            name = P(ptype).name if ptype in P._value2member_map_ else str(ptype)
            self._fail(f"packet {name} not valid in handshake phase {self.phase.value}")
        if len(buf) < HEADER_SIZE + paylen:
            return False
        payload = bytes(buf[HEADER_SIZE:HEADER_SIZE + paylen])
        del buf[:HEADER_SIZE + paylen]
        try:
            check_payload(ptype, _crc, payload)
        except LinkProtocolError as exc:
            self._fail(str(exc))
        if ptype == P.REFUSE:
            self._on_refuse(decode_control(payload))
            return True
        if ptype in (P.STARTTLS, P.PING, P.PING_ACK):
            if paylen:
                self._fail(f"{P(ptype).name} carries no payload")
            body = None
        else:
            body = decode_control(payload)
        self._handlers[ptype](body)
        return True

    # -- packet handlers ---------------------------------------------------------------------
    def _on_refuse(self, body: dict) -> None:
        reason = body.get("reason")
        if not isinstance(reason, str):
            reason = "no reason given"
        # an unauthenticated party's word never makes this node stop reconnecting
        standalone = self.peer_authenticated and body.get("standalone") is True
        self.phase = HsPhase.CLOSED
        self._events.append(Refused(f"peer refused: {reason[:500]}", by_peer=True,
                                    authenticated=self.peer_authenticated,
                                    standalone=standalone))

    def _on_starttls(self, body) -> None:
        if not self.params.tls:
            self._refuse("the peer asks for TLS on the link, but this node has tls = false "
                         "in its configuration", tell_peer=True,
                         told="this node has tls = false: plain link connections only")
            return
        if not self.dialer:
            self._send(P.STARTTLS)  # the answer: start the TLS handshake now
        self.phase = HsPhase.TLS
        self._events.append(StartTls())

    def _on_hello(self, body: dict) -> None:
        p = self.params
        if self.phase is HsPhase.STARTTLS:  # a plain peer while this node requires TLS
            self._refuse("the peer connected without TLS, but this node requires TLS on "
                         "the link (tls = true)", tell_peer=True,
                         told="this node requires TLS on the link (tls = true); "
                              "the connection was plain")
            return
        v = body.get("version")
        if v != VERSION:
            self._refuse(f"link protocol version {v!r} is not supported (this node speaks "
                         f"{VERSION})", tell_peer=True)
            return
        resource = body.get("resource")
        if resource != p.resource:
            self._refuse(f"resource name differs: this node serves {p.resource!r}, the "
                         f"peer offered {resource!r}", tell_peer=True,
                         told=f"resource name differs: this node does not serve "
                              f"{str(resource)[:64]!r}")
            return
        node, named = body.get("node"), body.get("peer")
        if node != p.peer:
            self._refuse(f"unexpected peer node {str(node)[:64]!r} (the configuration "
                         f"names {p.peer!r})", tell_peer=True,
                         told=f"unexpected peer node {str(node)[:64]!r}")
            return
        if named != p.me:
            self._refuse(f"the peer wanted node {str(named)[:64]!r}, this is {p.me!r}",
                         tell_peer=True,
                         told=f"this is not node {str(named)[:64]!r}")
            return
        nonce = need(body, "nonce", bytes)
        if len(nonce) != NONCE_LEN:
            raise LinkProtocolError(f"HELLO nonce of {len(nonce)} bytes (expected {NONCE_LEN})")
        if nonce == self.nonce:
            self._refuse("the peer sent back this node's own nonce (a reflection)",
                         tell_peer=False)
            return
        features = body.get("features", 0)
        if not isinstance(features, int) or isinstance(features, bool) or \
                not 0 <= features < 1 << 32:
            raise LinkProtocolError("HELLO lacks valid 'features'")
        self.peer_hello = body
        self.peer_features = features
        self.phase = HsPhase.AUTH
        if self.dialer:  # the acceptor answered: prove first
            self._send(P.AUTH, {"proof": self._proof(DIALER)})
        else:  # the dialer named this node and its resource: now it may know the nonce
            self._send_hello()

    def _proof(self, label: str) -> bytes:
        p, peer_nonce = self.params, self.peer_hello["nonce"]
        if self.dialer:
            d, a, fd, fa, nd, na = p.me, p.peer, p.features, self.peer_features, self.nonce, \
                peer_nonce
        else:
            d, a, fd, fa, nd, na = p.peer, p.me, self.peer_features, p.features, peer_nonce, \
                self.nonce
        return proof(p.secret, label, dialer=d, acceptor=a, resource=p.resource,
                     version=VERSION, features_d=fd, features_a=fa, nonce_d=nd, nonce_a=na)

    def _on_auth(self, body: dict) -> None:
        got = need(body, "proof", bytes)
        if len(got) != PROOF_LEN:
            raise LinkProtocolError(f"AUTH proof of {len(got)} bytes (expected {PROOF_LEN})")
        # the peer's proof carries the opposite label: a reflected proof never verifies
        want = self._proof(ACCEPTOR if self.dialer else DIALER)
        if not hmac.compare_digest(want, got):
            self._refuse("authentication failed: the shared secrets differ", tell_peer=True)
            return
        self.peer_authenticated = True
        self.phase = HsPhase.STATE
        if not self.dialer:
            self._send(P.AUTH, {"proof": self._proof(ACCEPTOR)})
        p = self.params
        self._send(P.STATE, {**self.local_state(), "size": p.size, "csums_alg": p.csums_alg,
                             "verify_alg": p.verify_alg})

    def _on_state(self, body: dict) -> None:
        p = self.params
        size = body.get("size")
        if size != p.size:
            self._refuse(f"disk sizes differ: this node ({p.me}) has {p.size} bytes, the "
                         f"peer ({p.peer}) has {size} bytes", tell_peer=True)
            return
        for key, mine in (("csums_alg", p.csums_alg), ("verify_alg", p.verify_alg)):
            theirs = body.get(key)
            if theirs != mine:
                name = key.replace("_", "-")
                said = f"uses {str(theirs)[:40]!r}" if isinstance(theirs, str) else \
                    f"does not say its {name} (older than this node?)"
                self._refuse(f"{name} differs: this node ({p.me}) uses {mine!r}, the peer "
                             f"({p.peer}) {said}; configure the same {name} on both nodes",
                             tell_peer=True)
                return
        self.phase = HsPhase.ESTABLISHED
        leftover = bytes(self._in)
        self._in.clear()
        self._events.append(Established(self.peer_hello, body, leftover))

