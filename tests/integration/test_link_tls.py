"""TLS on the peer link (tls = true, docs/operations.md, docs/security.md) with certificates
made by trustme: a TLS link replicates (beta's certificate names it, alpha's is pinned by
fingerprint); a certificate from another CA, one for another name, a wrong fingerprint and a
plain peer facing a TLS node are all refused with a clear reason on both sides."""

from __future__ import annotations

import hashlib
import json
import os
import ssl

import pytest
import trustme
from support.helpers import require_tool
from support.repltools import MiB, qemu_io, read_at


def edit(path: str, section: str, values: dict | None = None, drop: tuple = ()) -> None:
    """Set (or with `drop`, remove) keys of [section] in one configuration file."""
    values = values or {}
    with open(path) as f:
        lines = f.read().split("\n")
    at = lines.index(f"[{section}]") + 1
    end = next((i for i in range(at, len(lines)) if lines[i].startswith("[")), len(lines))
    keep = [ln for ln in lines[at:end] if ln.split(" = ")[0] not in (*values, *drop)]
    lines[at:end] = [f"{k} = {json.dumps(v)}" for k, v in values.items()] + keep
    with open(path, "w") as f:
        f.write("\n".join(lines))


def add_keys(c, section: str, values: dict) -> None:
    """Set keys of [section] in every node's configuration file."""
    for path in c.configs.values():
        edit(path, section, values)


def issue(ca: trustme.CA, directory: str, file_name: str, *names: str) -> tuple[str, str, str]:
    """-> (certificate path, key path, SHA-256 fingerprint) of a leaf for `names`."""
    leaf = ca.issue_cert(*names)
    cert = os.path.join(directory, f"{file_name}.crt")
    key = os.path.join(directory, f"{file_name}.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return cert, key, hashlib.sha256(der).hexdigest()


def tls_cluster(cluster, tmp_path, **kw):
    """A TLS pair: one CA; beta's certificate names beta; alpha's names only
    'alpha.example' and is pinned by its fingerprint in [node.alpha]."""
    d = str(tmp_path / "tls")
    os.makedirs(d, exist_ok=True)
    ca = trustme.CA()
    ca_path = os.path.join(d, "ca.crt")
    ca.cert_pem.write_to_path(ca_path)
    # placeholders at [resource] level keep create-md happy; each node overrides them
    c = cluster(size="32M", resource={"tls": True, "tls-ca": ca_path, "tls-cert": "-",
                                      "tls-key": "-"}, **kw)
    a_cert, a_key, a_fp = issue(ca, d, "alpha", "alpha.example")
    b_cert, b_key, _ = issue(ca, d, "beta", "beta")
    add_keys(c, "node.alpha", {"tls-cert": a_cert, "tls-key": a_key, "tls-fingerprint": a_fp})
    add_keys(c, "node.beta", {"tls-cert": b_cert, "tls-key": b_key})
    return c, ca, d


def test_tls_link_replicates(cluster, tmp_path):
    require_tool("qemu-io")
    c, _, _ = tls_cluster(cluster, tmp_path)
    c.up_pair()
    for n in c.NODES:
        assert "link to the peer over TLSv1.3" in c.log(n), c.log(n)
    before = c.admin("beta")["counters"]["writes_applied"]
    qemu_io(c.uri("alpha"), "write -P 0x5c 1M 2M")
    c.wait_status("beta", lambda s: s["counters"]["writes_applied"] > before, 20,
                  "writes applied on beta", fast=True)
    assert read_at(c.disk("beta"), MiB, 2 * MiB) == b"\x5c" * (2 * MiB)


def _other_ca(c, ca, d):
    path = os.path.join(d, "other-ca.crt")
    trustme.CA().cert_pem.write_to_path(path)
    edit(c.configs["beta"], "resource", {"tls-ca": path})  # beta trusts another CA only


def _other_name(c, ca, d):
    cert, key, _ = issue(ca, d, "alpha-other", "gamma")
    add_keys(c, "node.alpha", {"tls-cert": cert, "tls-key": key})
    edit(c.configs["beta"], "node.alpha", drop=("tls-fingerprint",))  # the name must match


def _wrong_fingerprint(c, ca, d):
    edit(c.configs["beta"], "node.alpha", {"tls-fingerprint": "ab" * 32})


def _plain_alpha(c, ca, d):
    edit(c.configs["alpha"], "resource", {"tls": False})


CASES = {
    # case: (change, beta's reason, alpha's reason)
    "other-ca": (_other_ca, "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]",
                 "it may not accept this node's certificate"),
    "other-name": (_other_name, "the peer's certificate does not name node 'alpha'",
                   "peer refused: the peer's certificate does not name node 'alpha'"),
    "wrong-fingerprint": (_wrong_fingerprint, "the peer's certificate has SHA-256 "
                          "fingerprint", "peer refused: the peer's certificate has SHA-256"),
    "plain-peer": (_plain_alpha, "the peer connected without TLS, but this node requires TLS",
                   "peer refused: this node requires TLS on the link (tls = true)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tls_refusals_are_clear_on_both_sides(cluster, tmp_path, case):
    change, beta_reason, alpha_reason = CASES[case]
    c, ca, d = tls_cluster(cluster, tmp_path)
    change(c, ca, d)
    for n in c.NODES:
        c.start(n)
    for n, reason in (("beta", beta_reason), ("alpha", alpha_reason)):
        s = c.wait_status(n, lambda s: reason in s["last_error"], 20, f"error {reason!r}",
                          fast=True)
        assert s["connection"] != "Connected" and s["replication"] == "Off", s
        assert s["link_rejections"]["count"] >= 1, s
