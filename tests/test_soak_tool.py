"""tools/soak's own bookkeeping (the soak itself runs in tests/integration/test_soak.py)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import os
import signal
import subprocess
import types

import pytest
import uvloop
from support.helpers import ROOT, free_port, port_open, require_tool, wait_for


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_tool",
                                                  os.path.join(ROOT, "tools", "soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_killing_a_fio_job_that_just_exited_is_not_a_failure():
    """A fio job that exited but is not reaped yet has returncode None and its kill()
    raises ProcessLookupError; that ended a 30-minute soak of two pairs as FAIL."""
    soak = _soak_module()
    killed = []

    def gone():
        killed.append(True)
        raise ProcessLookupError()

    me = types.SimpleNamespace(fio_proc=types.SimpleNamespace(returncode=None, kill=gone))
    soak.Soak.kill_fio(me)  # no exception
    assert killed
    me.fio_proc = None
    soak.Soak.kill_fio(me)


# -- the life cycle of the soak's fio jobs, against nbdkit (no blockrep node) ----------------

def _alive_in(workdir) -> list[int]:
    """PIDs of the live processes working in `workdir` (a fio job started there and any
    process it forked); zombies have no working directory."""
    want = os.path.realpath(workdir)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == want:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture
def fio_soak(tmp_path):
    """factory(delay_write) -> (Soak, nbdkit log): a Soak whose fio loop targets nbdkit's
    memory plugin (each write delayed by delay_write: "50ms" makes a job last half a
    minute), as if it were the Primary. Anything left running in the fio job directory is
    killed after the test, then nbdkit is stopped."""
    require_tool("fio", "nbdkit")
    servers = []

    def make(delay_write: str = "0"):
        port, log = free_port(), tmp_path / "nbdkit.log"
        servers.append(subprocess.Popen(
            ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "--filter=log",
             "--filter=delay", "memory", "64M", f"logfile={log}",
             f"delay-write={delay_write}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: port_open(port), what="nbdkit")
        args = argparse.Namespace(seed=1, dir=str(tmp_path), hold=1.0, disk_faults=False,
                                  blocks=16, verbose=False)
        s = _soak_module().Soak(args)
        s.size, s.primary = 64 << 20, "alpha"
        s.nodes["alpha"].nbd_port = port
        return s, log

    yield make
    for pid in _alive_in(tmp_path / "fio"):
        os.kill(pid, signal.SIGKILL)
    for p in servers:
        p.terminate()
        p.wait()


async def _writing(log) -> None:
    """Until a fio job's writes reach the server (its job is running)."""
    for _ in range(1200):
        if log.exists() and " Write " in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no fio write reached nbdkit")


def test_a_killed_fio_job_leaves_no_process_behind(fio_soak, tmp_path):
    """The switchover kills the running fio job (kill_fio). fio forked each job into a
    process of its own session, which went on without its parent: to the end of its job,
    or, killed just after the fork, waiting for its parent forever. It held the output pipe
    that the fio loop reads to its end, so the loop waited on it until the end of the soak
    ('writer stuck: 0 writes unanswered, a fio job unfinished'), and fio was still running
    after tools/soak had exited."""
    s, log = fio_soak("50ms")

    async def go():
        task = asyncio.ensure_future(s.fio_loop())
        await _writing(log)
        proc = s.fio_proc
        s.writing = False  # no next job
        s.kill_fio()
        await proc.wait()
        left = _alive_in(tmp_path / "fio")
        if not left:
            await task
        return left

    assert uvloop.run(go()) == []
    assert s.fio == collections.Counter(runs=1, interrupted=1)


def test_a_soak_ended_by_an_error_or_ctrl_c_leaves_no_fio_running(fio_soak, tmp_path):
    """An exception or ^C cancels the fio loop in the middle of a job: the job is killed
    and reaped, not left running."""
    s, log = fio_soak("50ms")

    async def go():
        task = asyncio.ensure_future(s.fio_loop())
        await _writing(log)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    uvloop.run(go())
    assert _alive_in(tmp_path / "fio") == []


def test_the_last_fio_job_is_stopped_when_its_time_is_up(fio_soak, tmp_path):
    """At the end the running job gets a grace period, then is stopped: counted as
    interrupted, with no note (nothing was stuck)."""
    s, log = fio_soak("50ms")

    async def go():
        task = asyncio.ensure_future(s.fio_loop())
        await _writing(log)
        s.writing = False
        await s.end_fio(task, grace=0)

    uvloop.run(go())
    assert _alive_in(tmp_path / "fio") == []
    assert s.fio == collections.Counter(runs=1, interrupted=1)
    assert s.notes == []


def test_the_last_fio_job_may_finish_at_the_end(fio_soak, tmp_path):
    s, log = fio_soak()

    async def go():
        task = asyncio.ensure_future(s.fio_loop())
        await _writing(log)
        s.writing = False
        await s.end_fio(task)

    uvloop.run(go())
    assert _alive_in(tmp_path / "fio") == []
    assert s.fio == collections.Counter(runs=1, verified=1)
    assert s.notes == []
