"""blockrep.config: the NBD export's TLS and handshake keys."""

from __future__ import annotations

from test_config import bad, base, with_

from blockrep.config import parse


def test_defaults():
    cfg = parse(base())
    assert cfg.nbd_tls == "off" and cfg.nbd_handshake_timeout == 10.0
    assert cfg.nodes["alpha"].nbd_tls_cert == "" and cfg.nodes["alpha"].nbd_tls_ca == ""


def test_tls_with_certificates():
    def m(raw):
        raw["resource"].update({"nbd-tls": "require", "nbd-handshake-timeout": 3})
        for n in raw["node"].values():
            n.update({"nbd-tls-cert": "/etc/c.pem", "nbd-tls-key": "/etc/k.pem",
                      "nbd-tls-ca": "/etc/ca.pem"})
    cfg = parse(with_(m))
    assert cfg.nbd_tls == "require" and cfg.nbd_handshake_timeout == 3.0
    assert cfg.nodes["beta"].nbd_tls_key == "/etc/k.pem"


def test_bad_mode():
    bad(with_(lambda r: r["resource"].update({"nbd-tls": "yes"})), "nbd-tls", "require")


def test_tls_without_certificate():
    bad(with_(lambda r: r["resource"].update({"nbd-tls": "on"})), "node.alpha",
        "nbd-tls-cert")


def test_bad_handshake_timeout():
    bad(with_(lambda r: r["resource"].update({"nbd-handshake-timeout": 0})),
        "nbd-handshake-timeout")
