"""The admin socket and the CLI conventions around it: exit codes per failure class, --json
for results and errors, no traceback on a closed pipe, wait-connect / wait-sync, the run
directory's and the socket's modes, and who may do what (SO_PEERCRED), tried as a non-root
user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

import pytest
from support.helpers import PY, ROOT, require_tool, run, wait_for

from blockrep import cli


def blockrep(c, node: str, *args: str, as_user: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [PY, "-m", "blockrep", args[0], c.configs[node], "--node", node, *args[1:]]
    if as_user is not None:
        pw = pwd.getpwnam(as_user)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def json_error(res: subprocess.CompletedProcess) -> dict:
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["exit"] == res.returncode, out
    assert "Traceback" not in res.stderr, res.stderr
    return out


def test_exit_codes_and_json_for_results_and_errors(cluster):
    c = cluster(size="64M")
    c.start("alpha")
    # a refusal by the node's state: one line, exit REFUSED, named in --json
    res = blockrep(c, "alpha", "primary")
    assert res.returncode == cli.EXIT_REFUSED, res
    assert res.stderr.strip() == ("blockrep: primary refused: the local disk is "
                                  "Inconsistent, not UpToDate (use --force to override)")
    err = json_error(blockrep(c, "alpha", "primary", "--json"))
    assert err["code"] == "no-up-to-date-disk" and "not UpToDate" in err["error"]
    err = json_error(blockrep(c, "alpha", "verify", "--json"))
    assert (err["code"], err["exit"]) == ("not-connected", cli.EXIT_REFUSED)
    # a node that is not running, a configuration error
    err = json_error(blockrep(c, "beta", "status", "--json"))
    assert (err["code"], err["exit"]) == ("not-running", cli.EXIT_NOT_RUNNING)
    res = blockrep(c, "alpha", "status", "--node", "nosuch")
    assert res.returncode == cli.EXIT_CONFIG and "no [node.nosuch]" in res.stderr, res
    # waiting with a deadline
    res = blockrep(c, "alpha", "wait-connect", "--timeout", "0.5")
    assert res.returncode == cli.EXIT_TIMEOUT and "timed out after 0.5s" in res.stderr, res
    # results in --json
    ok = json.loads(blockrep(c, "alpha", "disconnect", "--json").stdout)
    assert ok == {"ok": True, "result": "StandAlone"}
    ok = json.loads(blockrep(c, "alpha", "connect", "--json").stdout)
    assert ok == {"ok": True, "result": "Connecting"}
    # the directory and the socket: only this user
    run_dir = os.path.dirname(c.admin_socket("alpha"))
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(c.admin_socket("alpha")).st_mode) == 0o600
    c.start("beta")
    res = blockrep(c, "alpha", "wait-connect", "--timeout", "30")
    assert res.returncode == 0 and "connected: Connected" in res.stdout, res
    blockrep(c, "alpha", "primary", "--force", "--skip-initial-sync")
    res = blockrep(c, "beta", "wait-sync", "--timeout", "30", "--json")
    assert res.returncode == 0, res
    assert json.loads(res.stdout)["result"]["disk"] == "UpToDate"


def test_closed_pipe_ends_quietly(cluster):
    c = cluster(size="64M")
    c.start("alpha")
    ev = subprocess.Popen([PY, "-m", "blockrep", "events", c.configs["alpha"], "--node",
                           "alpha"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert json.loads(ev.stdout.readline())["event"] == "exists"
        ev.stdout.close()  # the reader goes away, as `| head -1` does
        # every state change is one more line to write into the closed pipe
        for cmd in ("disconnect", "connect", "disconnect", "connect"):
            blockrep(c, "alpha", cmd)
            if ev.poll() is not None:
                break
        ev.wait(30)
        stderr = ev.stderr.read()
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.wait()
    assert ev.returncode == cli.EXIT_PIPE, (ev.returncode, stderr)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    # and a shell pipeline into head sees only the first line of the text status
    res = subprocess.run(f"{PY} -m blockrep status {c.configs['alpha']} --node alpha | head -1",
                         shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.stdout.startswith("r0 node:alpha") and "Traceback" not in res.stderr, res


def test_unsafe_run_directory_refused(cluster, tmp_path):
    c = cluster(size="64M")
    run_dir = os.path.dirname(c.admin_socket("alpha"))
    os.makedirs(run_dir)
    os.chmod(run_dir, 0o777)  # e.g. made under umask 000
    res = blockrep(c, "alpha", "up", timeout=30)
    assert res.returncode == cli.EXIT_PERMISSION, res
    assert "writable by group or others (mode 0777)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not os.listdir(run_dir)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chmod(run_dir, 0o700)
    os.chown(run_dir, nobody, -1)  # another user made it first
    res = blockrep(c, "alpha", "up", timeout=30)
    assert res.returncode == cli.EXIT_PERMISSION, res
    assert f"is owned by nobody (uid {nobody})" in res.stderr, res.stderr
    # a client does not talk to a socket in such a directory either (a fake server)
    open(c.admin_socket("alpha"), "w").close()
    res = blockrep(c, "alpha", "secondary")
    assert res.returncode == cli.EXIT_PERMISSION, res
    assert "not trusting admin socket" in res.stderr, res.stderr


@pytest.fixture
def temp_users():
    """Two temporary users: `member` in a temporary group, `outsider` not; deleted after."""
    require_tool("useradd", "userdel", "groupadd", "groupdel", "setpriv")
    tag = f"br{os.getpid() % 100000}"
    group, member, outsider = f"{tag}adm", f"{tag}m", f"{tag}o"
    made = []
    try:
        run(["groupadd", group])
        made.append(("groupdel", group))
        run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, member])
        made.insert(0, ("userdel", member))
        run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", outsider])
        made.insert(0, ("userdel", outsider))
        yield {"group": group, "member": member, "outsider": outsider}
    finally:
        for cmd, name in made:
            run([cmd, name], check=False)


def test_non_root_users_refused_state_changes(cluster, temp_users):
    # the users must reach the configuration: a directory others may traverse and read
    top = tempfile.mkdtemp(prefix="blockrep-admin-")
    try:
        os.chmod(top, 0o755)
        c = cluster(size="64M", tmp=top, resource={"admin-group": temp_users["group"]})
        for path in c.configs.values():
            os.chmod(path, 0o644)
        c.start("alpha")
        sock = c.admin_socket("alpha")
        gid = os.stat(sock).st_gid
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o710
        assert os.stat(os.path.dirname(sock)).st_gid == gid
        member, outsider = temp_users["member"], temp_users["outsider"]
        # a member of admin-group may read ...
        res = blockrep(c, "alpha", "status", "--json", as_user=member)
        assert res.returncode == 0 and json.loads(res.stdout)["role"] == "Secondary", res
        # ... but not change anything
        for cmd in (["disconnect"], ["down"], ["primary", "--force"]):
            res = blockrep(c, "alpha", *cmd, as_user=member)
            assert res.returncode == cli.EXIT_PERMISSION, res
            assert res.stderr.strip().startswith(
                f"blockrep: permission denied: {member} (uid "), res.stderr
            assert "may only read status and events" in res.stderr, res.stderr
        # anybody else cannot even connect
        res = blockrep(c, "alpha", "status", as_user=outsider)
        assert res.returncode == cli.EXIT_PERMISSION, res
        assert "permission denied on admin socket" in res.stderr, res.stderr
        res = blockrep(c, "alpha", "down", "--json", as_user=outsider)
        assert json_error(res)["code"] == "permission-denied"
        # nothing changed; root still may
        s = c.status("alpha")
        assert s["connection"] != "StandAlone" and s["role"] == "Secondary", s
        c.cli("alpha", "down")
        wait_for(lambda: c.procs["alpha"].poll() is not None, timeout=30, what="alpha down")
    finally:
        shutil.rmtree(top, ignore_errors=True)
