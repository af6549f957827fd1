"""Helpers shared by the two-node integration tests (test_replication, test_recovery,
test_netns): fio and qemu-io runs against a node's NBD export, comparing and reading the
nodes' disks. Admin-socket requests and fast status polling are Cluster methods
(tests/support/cluster.py: Cluster.admin, Cluster.wait_status(..., fast=True))."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Self

from support.helpers import run

MiB = 1 << 20


def fio(tmp_path, uri: str, name: str, *opts: str, timeout: float = 120,
        netns: str | None = None, background: bool = False):
    """Run fio's nbd engine on `uri` (inside network namespace `netns` if given) and return
    its checked JSON report; with background=True return a running FioJob at once."""
    out = os.path.join(str(tmp_path), f"{name}.json")
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
            "--verify_state_save=0", "--output-format=json", f"--output={out}", *opts]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    if background:
        return FioJob(subprocess.Popen(argv, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), out)
    res = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=timeout, check=False)
    return check_fio(res.returncode, res.stdout, res.stderr, out)


def check_fio(rc: int, stdout: str, stderr: str, out: str) -> dict:
    text = ""
    if os.path.exists(out):
        with open(out) as f:
            text = f.read()
    assert rc == 0, f"fio exited {rc}\nstdout:\n{stdout[-3000:]}\nstderr:\n" \
                    f"{stderr[-3000:]}\nreport:\n{text[-3000:]}"
    report = json.loads(text[text.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}"
    return report


def fio_bytes_written(report: dict) -> int:
    return sum(j["write"]["io_bytes"] for j in report["jobs"])


class FioJob:
    """fio running in the background. As a context manager it kills fio if it is still
    running on the way out (a failed test step never leaves it behind)."""

    def __init__(self, proc: subprocess.Popen, out: str):
        self.proc = proc
        self.out = out  # fio's JSON report
        self.stdout = self.stderr = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._kill()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self, timeout: float = 120) -> None:
        """Wait for fio to end (killed if it is still running after `timeout`)."""
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        finally:
            self._kill()

    def report(self) -> dict:
        """The checked JSON report of the finished run (see check_fio)."""
        return check_fio(self.proc.returncode, self.stdout, self.stderr, self.out)


def qemu_io(uri: str, *cmds: str, netns: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    argv.append(uri)
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    res = run(argv, timeout=timeout, check=False)
    if check:
        bad = res.returncode != 0 or "fail" in res.stdout.lower() or \
            "error" in res.stdout.lower() or "pattern verification" in res.stdout.lower()
        assert not bad, f"qemu-io {cmds} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def cmp_data(c, size: int, what: str = "data areas differ") -> None:
    """The first `size` bytes (the data area) of both nodes' disks are identical."""
    res = run(["cmp", "-n", str(size), c.disk("alpha"), c.disk("beta")], check=False)
    assert res.returncode == 0, f"{what}: {res.stdout}{res.stderr}"


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
