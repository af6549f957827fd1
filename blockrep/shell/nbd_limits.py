"""Resource bounds of the NBD server (docs/nbd.md, "Bounds"), and its TLS settings.

Owns: the limits (one frozen dataclass, validated), the per-server counters that the limits
apply to, and the server-side TLS context. Must not: touch sockets (nbd_server.py enforces
the limits by pausing reads from the socket; nothing here buffers).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from ..nbd.handshake import TLS_MODES

MiB = 1 << 20


@dataclass(frozen=True)
class NbdLimits:
    handshake_timeout: float = 10.0  # from accept to the end of the handshake, TLS included
    max_handshakes: int = 64  # connections still in the handshake; the oldest is dropped
    conn_bytes: int = 64 * MiB  # write payload bytes in flight on one connection
    conn_requests: int = 256  # requests in flight on one connection
    node_bytes: int = 256 * MiB  # write payload bytes in flight on all connections together
    read_batch: int = 8 * MiB  # read reply bytes built per pass before the socket is checked
    busy_poll_us: float = 0.0  # keep the loop polling this long after a request (shell/busypoll)

    def __post_init__(self):
        if not self.handshake_timeout > 0:
            raise ValueError("NBD handshake timeout must be > 0")
        for name in ("max_handshakes", "conn_bytes", "conn_requests", "node_bytes",
                     "read_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"NBD limit {name} must be >= 1")
        if not 0 <= self.busy_poll_us <= 10_000:
            raise ValueError("busy-poll must be between 0 and 10000 microseconds")


@dataclass(frozen=True)
class NbdTls:
    """`mode` is off | on | require; `context` is set unless mode is off."""
    mode: str = "off"
    context: ssl.SSLContext | None = None

    def __post_init__(self):
        if self.mode not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.mode!r}")
        if self.mode != "off" and self.context is None:
            raise ValueError(f"tls = {self.mode} needs a certificate and key")


def server_tls(mode: str, cert: str | None, key: str | None, ca: str | None = None,
               verify_client: bool = False) -> NbdTls:
    """NbdTls from X.509 files (PEM). With `verify_client`, clients must present a
    certificate signed by `ca`. Raises ValueError with one clear line."""
    if mode not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {mode!r}")
    if mode == "off":
        return NbdTls()
    if not cert or not key:
        raise ValueError(f"tls = {mode} needs a certificate and a key (--tls-cert, --tls-key)")
    if verify_client and not ca:
        raise ValueError("verifying client certificates needs a CA (--tls-ca)")
    for path in (cert, key, ca):
        if path and not os.path.isfile(path):
            raise ValueError(f"TLS: no such file: {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # spec: TLS 1.2 or later
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"TLS: cannot load certificate/key: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_client else (
        ssl.CERT_OPTIONAL if ca else ssl.CERT_NONE)
    return NbdTls(mode, ctx)
