"""systemd integration: the shipped blockrep@.service passes `systemd-analyze verify`, and
`blockrep up` speaks sd_notify itself (READY=1 once attached and listening, STATUS= lines on
state changes, STOPPING=1) to a listener on $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from support.helpers import PY, ROOT, port_open, require_tool, run, stop_process

UNIT = os.path.join(ROOT, "contrib", "systemd", "blockrep@.service")


def _verify_root(tmp_path, with_binary: bool) -> str:
    """A root for `systemd-analyze verify --root`: the system's units, the shipped unit, and
    (if with_binary) an executable at the unit's ExecStart path."""
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / "blockrep@.service")
    if with_binary:
        (root / "usr/local/bin").mkdir(parents=True)
        shim = root / "usr/local/bin/blockrep"
        shim.write_text(f"#!/bin/sh\nexec {os.path.dirname(PY)}/blockrep \"$@\"\n")
        shim.chmod(0o755)
    return str(root)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    require_tool("systemd-analyze")
    res = run(["systemd-analyze", "verify", f"--root={_verify_root(tmp_path, True)}",
               "blockrep@r0.service"], check=False, timeout=60)
    print(f"systemd-analyze verify blockrep@r0.service: exit {res.returncode}, "
          f"output {res.stdout + res.stderr!r}")
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res
    with open(UNIT) as f:
        text = f.read()
    for line in ("Type=notify", "NotifyAccess=main", "ExecStop=-/usr/local/bin/blockrep down"):
        assert line in text


def test_unit_verify_catches_a_missing_binary(tmp_path):
    """The check above can fail: without the ExecStart binary, verify refuses the unit."""
    require_tool("systemd-analyze")
    res = run(["systemd-analyze", "verify", f"--root={_verify_root(tmp_path, False)}",
               "blockrep@r0.service"], check=False, timeout=60)
    assert res.returncode != 0 and "not executable" in res.stdout + res.stderr, res


def _recv(sock: socket.socket, timeout: float = 30.0) -> dict:
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n") if line)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_up_sends_ready_status_and_stopping(cluster, tmp_path, abstract):
    c = cluster(size="16M")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"blockrep-test-{os.getpid()}-{id(listener)}"
        listener.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp_path / "notify.sock")
        listener.bind(addr)
    env = {**os.environ, "NOTIFY_SOCKET": addr}
    with open(os.path.join(c.dir, "alpha.log"), "w") as log, listener:
        proc = subprocess.Popen([PY, "-m", "blockrep", "up", c.configs["alpha"], "--node",
                                 "alpha"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            msg = _recv(listener)
            # READY=1 only once attached and listening: admin socket and NBD answer now
            assert msg.get("READY") == "1", msg
            assert msg.get("MAINPID") == str(proc.pid), msg
            assert msg["STATUS"].startswith("Secondary disk:Inconsistent beta:Connecting"), msg
            assert os.path.exists(c.admin_socket("alpha"))
            assert port_open(c.nbd_port("alpha"))
            c.cli("alpha", "primary", "--force")
            msg = _recv(listener)
            while "Primary" not in msg.get("STATUS", ""):
                msg = _recv(listener)
            assert msg["STATUS"].startswith("Primary disk:UpToDate"), msg
            c.cli("alpha", "down")
            while "STOPPING" not in msg:
                msg = _recv(listener)
            assert msg == {"STOPPING": "1", "STATUS": "going down"}, msg
            assert proc.wait(30) == 0
        finally:
            stop_process(proc)


def test_notify_without_socket_is_a_no_op(monkeypatch):
    from blockrep import sdnotify
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/dir/notify.sock")
    assert sdnotify.notify("READY=1") is False  # logged, never raised
