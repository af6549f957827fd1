"""In-process checks of shell/node.py's state setters and shell/admin.py: each setter logs
`old -> new` once and emits one event; commands refuse with the precondition's named result;
the SO_PEERCRED rule; the run directory checks. No sockets to a peer, no subprocesses."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from blockrep import config
from blockrep.loopback import config_text
from blockrep.shell import admin
from blockrep.shell.node import Node
from blockrep.state import ConnState, DiskState, ReplState, Role, Rv


class Recorder:
    """Stands in for an events subscriber's StreamWriter."""

    def __init__(self):
        self.lines = []

    def is_closing(self):
        return False

    def write(self, data):
        import json
        self.lines.append(json.loads(data))


@pytest.fixture
def node(tmp_path):
    disk = tmp_path / "a.img"
    disk.write_bytes(b"")
    os.truncate(disk, 1 << 20)
    path = tmp_path / "r0.toml"
    path.write_text(config_text(
        {"name": "r0", "shared-secret": "s", "run-dir": str(tmp_path / "run")},
        {"alpha": {"address": "127.0.0.1:1", "disk": str(disk), "nbd": "127.0.0.1:2"},
         "beta": {"address": "127.0.0.1:3", "disk": str(disk), "nbd": "127.0.0.1:4"}}))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    n = Node(config.load(str(path)), "alpha")
    yield n
    n.executor.shutdown(wait=True)
    n.disk.close()
    loop.close()
    asyncio.set_event_loop(None)


@pytest.mark.parametrize("setter, attr, kind, old, new", [
    ("set_role", "role", "role", Role.SECONDARY, Role.PRIMARY),
    ("set_connection", "conn", "connection", ConnState.CONNECTING, ConnState.STANDALONE),
    ("set_replication", "repl", "replication", ReplState.OFF, ReplState.ESTABLISHED),
    ("set_disk", "disk_state", "disk", DiskState.INCONSISTENT, DiskState.UP_TO_DATE),
])
def test_each_setter_logs_once_and_emits_one_event(node, caplog, setter, attr, kind, old,
                                                    new):
    rec = Recorder()
    node.admin.subscribers.append(rec)
    assert getattr(node, attr) == old
    with caplog.at_level(logging.INFO, logger="blockrep.node"):
        getattr(node, setter)(new)
        getattr(node, setter)(new)  # no change: nothing logged, nothing emitted
    assert getattr(node, attr) == new
    assert [r.getMessage() for r in caplog.records] == [f"{kind}: {old.value} -> {new.value}"]
    assert len(rec.lines) == 1
    ev = rec.lines[0]
    assert (ev["event"], ev[kind], ev["old"], ev["node"]) == (kind, new.value, old.value,
                                                              "alpha")


def test_commands_refuse_with_named_results(node):
    with pytest.raises(admin.CommandRefused) as e:
        admin.cmd_primary(node)
    assert e.value.rv == Rv.NO_UP_TO_DATE_DISK and e.value.code == "no-up-to-date-disk"
    assert str(e.value) == ("primary refused: the local disk is Inconsistent, not UpToDate "
                            "(use --force to override)")
    with pytest.raises(admin.CommandRefused) as e:
        admin.cmd_verify(node)
    assert e.value.rv == Rv.NOT_CONNECTED
    assert admin.cmd_secondary(node) == "already Secondary"
    assert admin.cmd_resync(node) == "nothing out of sync"
    node.role = Role.PRIMARY
    with pytest.raises(admin.CommandRefused) as e:
        admin.cmd_invalidate(node)
    assert e.value.rv == Rv.IS_PRIMARY and str(e.value) == \
        "invalidate refused: this node is Primary"
    with pytest.raises(admin.CommandRefused) as e:
        admin.cmd_connect(node, discard_my_data=True)
    assert str(e.value) == "connect --discard-my-data refused: this node is Primary"
    assert not node.discard_my_data


def test_disconnect_and_connect_go_through_the_setter(node):
    rec = Recorder()
    node.admin.subscribers.append(rec)
    assert admin.cmd_disconnect(node) == "StandAlone"
    assert admin.cmd_connect(node) == "Connecting"
    assert [(e["event"], e["connection"]) for e in rec.lines] == [
        ("connection", "StandAlone"), ("connection", "Connecting")]


def test_peer_credentials_rule(node):
    srv = node.admin
    me = os.geteuid()
    assert srv.allowed((1, 0, 0), "primary") is None          # root
    assert srv.allowed((1, me, 0), "down") is None            # the node's own user
    other = 65534 if me != 65534 else 65533
    why = srv.allowed((1, other, other), "status")
    assert why and why.startswith("permission denied: 'status' needs root")
    srv.gid = 4242  # an admin-group: its members may read, nothing else
    assert srv.allowed((1, other, 4242), "status") is None
    assert srv.allowed((1, other, 4242), "events") is None
    why = srv.allowed((1, other, 4242), "secondary")
    assert why and "may only read status and events" in why
    assert srv.allowed((1, other, other), "status")           # not a member


def test_run_dir_checks(tmp_path):
    d = tmp_path / "run"
    assert admin.check_run_dir(str(d)) == f"run directory {d} does not exist"
    admin.prepare_run_dir(str(d), None)
    assert os.stat(d).st_mode & 0o777 == 0o700 and admin.check_run_dir(str(d)) is None
    os.chmod(d, 0o770)
    assert "writable by group or others (mode 0770)" in admin.check_run_dir(str(d))
    with pytest.raises(admin.AdminError) as e:
        admin.prepare_run_dir(str(d), None)
    assert e.value.code == "unsafe-run-dir"
    os.chmod(d, 0o700)
    other = 65534 if os.geteuid() != 65534 else 65533
    if os.geteuid() == 0:
        os.chown(d, other, -1)  # made by someone else first
        why = admin.check_run_dir(str(d))
    else:
        why = admin.check_run_dir(str(d), uid=other)
    assert why and "is owned by" in why and "refusing to use it" in why
    f = tmp_path / "file"
    f.write_text("")
    assert "is not a directory" in admin.check_run_dir(str(f))
