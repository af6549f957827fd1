"""TLS on the peer link: the contexts a node builds from its configuration, and the check
that the peer's certificate belongs to the peer node.

Owns: mutual TLS (TLS 1.3, certificate required both ways, verified against `tls-ca`), and
the name/fingerprint rule: the peer's certificate must match `tls-fingerprint` of the
peer's [node.X] section when one is configured, else name the peer node in its
subjectAltName (DNS). Must not: read or write link packets (blockrep.peer.handshake).
"""

from __future__ import annotations

import hashlib
import ssl

from ..config import ConfigError, NodeConfig


def link_contexts(me: NodeConfig) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """-> (server context for accepted links, client context for dialed links)."""
    return _context(me, server_side=True), _context(me, server_side=False)


def _context(me: NodeConfig, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # both directions check the peer's name: check_peer below
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(me.tls_cert, me.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node {me.name}: cannot load tls-cert {me.tls_cert!r} / tls-key "
                          f"{me.tls_key!r}: {_why(exc)}") from None
    try:
        ctx.load_verify_locations(cafile=me.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node {me.name}: cannot load tls-ca {me.tls_ca!r}: "
                          f"{_why(exc)}") from None
    return ctx


def _why(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def check_peer(ssl_object, peer: NodeConfig) -> str | None:
    """None when the verified peer certificate is the peer node's; else why not."""
    if ssl_object is None:
        return "the link is not TLS"
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return "the peer sent no certificate"
    fp = hashlib.sha256(der).hexdigest()
    if peer.tls_fingerprint:
        if fp != peer.tls_fingerprint:
            return (f"the peer's certificate has SHA-256 fingerprint {fp}, the configuration "
                    f"of node {peer.name} names {peer.tls_fingerprint}")
        return None
    names = [v for k, v in ssl_object.getpeercert().get("subjectAltName", ()) if k == "DNS"]
    if peer.name.lower() not in (n.lower() for n in names):
        return (f"the peer's certificate does not name node {peer.name!r} (its DNS names: "
                f"{', '.join(names) or 'none'}; or set tls-fingerprint in [node.{peer.name}])")
    return None
