"""Test X.509 certificates made with the openssl tool, laid out the way libnbd (gnutls,
`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) look for them:
server dir: ca-cert.pem server-cert.pem server-key.pem; client dir: ca-cert.pem
client-cert.pem client-key.pem. EC P-256 keys (fast to make); SAN localhost and 127.0.0.1."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from support.helpers import require_tool, run


@dataclass
class Certs:
    server_dir: str
    client_dir: str  # CA + a client certificate
    anon_dir: str  # the CA only: a client without a certificate
    ca: str
    cert: str
    key: str


def _key_and_csr(d: str, name: str, cn: str) -> None:
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{d}/{name}-key.pem", "-out", f"{d}/{name}.csr",
         "-subj", f"/CN={cn}"])


def _sign(work: str, name: str, ext: str, out: str) -> None:
    extfile = f"{work}/{name}.ext"
    with open(extfile, "w") as f:
        f.write(ext)
    run(["openssl", "x509", "-req", "-in", f"{work}/{name}.csr", "-CA", f"{work}/ca-cert.pem",
         "-CAkey", f"{work}/ca-key.pem", "-CAcreateserial", "-days", "2", "-out", out,
         "-extfile", extfile])


def make_certs(base: str) -> Certs:
    require_tool("openssl")
    work = os.path.join(base, "pki")
    dirs = {k: os.path.join(base, k) for k in ("server", "client", "anon")}
    for d in (work, *dirs.values()):
        os.makedirs(d, exist_ok=True)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{work}/ca-key.pem", "-out",
         f"{work}/ca-cert.pem", "-days", "2", "-subj", "/CN=blockrep test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    _key_and_csr(work, "server", "localhost")
    _sign(work, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
          "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
          f"{dirs['server']}/server-cert.pem")
    shutil.copy(f"{work}/server-key.pem", dirs["server"])
    _key_and_csr(work, "client", "blockrep-test-client")
    _sign(work, "client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
          f"{dirs['client']}/client-cert.pem")
    shutil.copy(f"{work}/client-key.pem", dirs["client"])
    for d in dirs.values():
        shutil.copy(f"{work}/ca-cert.pem", d)
    s = dirs["server"]
    return Certs(s, dirs["client"], dirs["anon"], f"{s}/ca-cert.pem", f"{s}/server-cert.pem",
                 f"{s}/server-key.pem")
