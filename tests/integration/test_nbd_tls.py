"""NBD over TLS (NBD_OPT_STARTTLS, X.509) with real clients: nbdinfo and nbdcopy on nbds://
URIs (libnbd, gnutls) and qemu-io with tls-creds-x509; `--tls require` answers nothing but
STARTTLS and ABORT before TLS; `--tls on` serves both; client certificates when asked; a
resource's NBD export with `nbd-tls = "require"`."""

from __future__ import annotations

import filecmp
import struct

import pytest
from support.helpers import PY, ROOT, require_tool, run
from support.nbd_testlib import (MiB, RawClient, recv_exact, wait_closed_by_peer,
                                 write_random_file)
from support.tlscerts import make_certs

from blockrep.nbd import proto
from blockrep.nbd.constants import ClientFlag, NbdOpt, NbdRep


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("nbd-tls-certs")))


def tls_args(certs, mode="require", *extra):
    return ("--tls", mode, "--tls-cert", certs.cert, "--tls-key", certs.key, *extra)


def nbds(port: int, cdir: str) -> str:
    return f"nbds://127.0.0.1:{port}/?tls-certificates={cdir}"


def qemu_tls(port: int, cdir: str, *cmds: str, check: bool = True):
    argv = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={cdir},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"]
    for c in cmds:
        argv += ["-c", c]
    return run(argv, timeout=60, check=check)


def option_reply(sock) -> tuple[int, int, bytes]:
    head = recv_exact(sock, 20)
    n = struct.unpack(">I", head[16:])[0]
    return proto.decode_option_reply(head + recv_exact(sock, n))[0]


def test_require_nbdinfo_nbdcopy_qemu(serve, certs, tmp_path):
    require_tool("nbdinfo", "nbdcopy", "qemu-io")
    srv = serve("32M", *tls_args(certs))
    info = run(["nbdinfo", nbds(srv.port, certs.client_dir)], timeout=30).stdout
    assert "with TLS" in info and "33554432" in info, info
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    write_random_file(src, 32 * MiB)
    run(["nbdcopy", str(src), nbds(srv.port, certs.client_dir)], timeout=120)
    run(["nbdcopy", nbds(srv.port, certs.client_dir), str(back)], timeout=120)
    assert filecmp.cmp(src, back, shallow=False)
    assert filecmp.cmp(src, srv.disk, shallow=False)
    out = qemu_tls(srv.port, certs.client_dir, "write -P 0x5a 1M 256k",
                   "read -P 0x5a 1M 256k").stdout
    assert "Pattern verification failed" not in out and "read 262144/262144" in out, out
    # plain clients get nothing
    res = run(["nbdinfo", srv.uri], timeout=30, check=False)
    assert res.returncode != 0
    res = qemu_tls(srv.port, certs.anon_dir, "read 0 4k", check=False)  # no client cert: ok
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("option,payload", [
    (NbdOpt.LIST, b""), (NbdOpt.STRUCTURED_REPLY, b""),
    (NbdOpt.INFO, proto.encode_info_request("", [])),
    (NbdOpt.GO, proto.encode_info_request("", [])),
])
def test_require_answers_tls_reqd_before_tls(serve, certs, option, payload):
    srv = serve("8M", *tls_args(certs))
    with RawClient(srv.port) as c:
        c.read_greeting()
        c.sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE
                                                 | ClientFlag.NO_ZEROES))
        for _ in range(2):
            c.sock.sendall(proto.encode_option(option, payload))
            opt, rtype, data = option_reply(c.sock)
            assert (opt, rtype) == (option, NbdRep.ERR_TLS_REQD), data
        c.sock.sendall(proto.encode_option(NbdOpt.ABORT))
        assert option_reply(c.sock)[:2] == (NbdOpt.ABORT, NbdRep.ACK)
        assert wait_closed_by_peer(c.sock)


def test_require_export_name_before_tls_closes(serve, certs):
    srv = serve("8M", *tls_args(certs))
    with RawClient(srv.port) as c:
        c.read_greeting()
        c.sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE))
        c.sock.sendall(proto.encode_option(NbdOpt.EXPORT_NAME, b""))
        c.sock.settimeout(10)
        assert c.sock.recv(100) == b""  # closed, nothing answered


def test_on_serves_plain_and_tls(serve, certs):
    require_tool("nbdinfo")
    srv = serve("8M", *tls_args(certs, "on"))
    assert "without TLS" in run(["nbdinfo", srv.uri], timeout=30).stdout
    assert "with TLS" in run(["nbdinfo", nbds(srv.port, certs.client_dir)], timeout=30).stdout


def test_off_refuses_starttls(serve, certs):
    require_tool("nbdinfo")
    srv = serve("8M")
    res = run(["nbdinfo", nbds(srv.port, certs.client_dir)], timeout=30, check=False)
    assert res.returncode != 0


def test_client_certificate_required(serve, certs):
    require_tool("nbdinfo", "qemu-io")
    srv = serve("8M", *tls_args(certs, "require", "--tls-ca", certs.ca, "--tls-verify-client"))
    assert "with TLS" in run(["nbdinfo", nbds(srv.port, certs.client_dir)], timeout=30).stdout
    assert qemu_tls(srv.port, certs.client_dir, "read 0 4k").returncode == 0
    res = run(["nbdinfo", nbds(srv.port, certs.anon_dir)], timeout=30, check=False)
    assert res.returncode != 0
    res = qemu_tls(srv.port, certs.anon_dir, "read 0 4k", check=False)
    assert res.returncode != 0
    assert "TLS handshake failed" in srv.log_text()


@pytest.mark.parametrize("extra,needle", [
    (("--tls", "on"), "needs a certificate and a key"),
    (("--tls", "require", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"),
     "/nonexistent.pem"),
    (("--tls", "on", "--tls-cert", "CERT", "--tls-key", "CERT"), "cannot load"),
])
def test_bad_tls_settings_are_one_line(tmp_path, certs, extra, needle):
    extra = tuple(certs.cert if a == "CERT" else a for a in extra)
    res = run([PY, "-m", "blockrep", "serve", "--disk", str(tmp_path / "d.img"), "--size",
               "1M", "--create", "--listen", "127.0.0.1:0", *extra], timeout=30, check=False,
              cwd=ROOT)
    assert res.returncode == 1
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


def _add_tls(path: str, mode: str, keys: dict) -> None:
    with open(path) as f:
        lines = f.read().splitlines()
    out = []
    for ln in lines:
        out.append(ln)
        if ln == "[resource]":
            out.append(f'nbd-tls = "{mode}"')
        if ln.startswith("nbd = "):
            out += [f'{k} = "{v}"' for k, v in keys.items()]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def test_resource_export_requires_tls(cluster, certs, tmp_path):
    require_tool("nbdinfo", "qemu-io")
    c = cluster(size="32M")
    for n in c.NODES:
        _add_tls(c.configs[n], "require", {"nbd-tls-cert": certs.cert, "nbd-tls-key": certs.key})
    c.up_pair("alpha")
    port = c.nbd_port("alpha")
    out = qemu_tls(port, certs.client_dir, "write -P 0x6b 0 1M", "read -P 0x6b 0 1M").stdout
    assert "Pattern verification failed" not in out, out
    assert "with TLS" in run(["nbdinfo", nbds(port, certs.client_dir)], timeout=30).stdout
    assert run(["nbdinfo", c.uri("alpha")], timeout=30, check=False).returncode != 0
    # the write reached the peer (protocol C): compare once synced
    c.wait_status("alpha", lambda s: s["peer"]["disk"] == "UpToDate", 30, "peer UpToDate")
    with open(c.disk("beta"), "rb") as f:
        assert f.read(MiB) == b"\x6b" * MiB
