"""Shared helpers for the integration tests: free ports, deadlines, processes, tools."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from blockrep.loopback import stop_process  # noqa: F401  (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
SYSTEM_PY = "/usr/bin/python3"  # python3-libnbd lives there (nbdsh)


def require_tool(*names: str) -> None:
    """Skip when a tool is missing, except in CI, where a missing tool is a failure."""
    for name in names:
        if shutil.which(name) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{name} is not installed (CI must install it: .ci/run)")
            pytest.skip(f"{name} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run(argv, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {res.returncode}\nstdout:\n{res.stdout[-3000:]}"
                             f"\nstderr:\n{res.stderr[-3000:]}")
    return res


@dataclass
class Served:
    """A `blockrep serve` process."""
    disk: str
    port: int
    proc: subprocess.Popen
    log: str
    export: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()


def start_serve(disk: str, log_dir: str, *extra: str, size: str | None = None,
                export: str = "") -> Served:
    port = free_port()
    log = os.path.join(log_dir, f"serve-{port}.log")
    argv = [PY, "-m", "blockrep", "serve", "--disk", disk, "--listen", f"127.0.0.1:{port}",
            "--export", export, *extra]
    if size:
        argv += ["--size", size, "--create"]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    srv = Served(disk, port, proc, log, export)
    try:
        wait_for(lambda: proc.poll() is not None or port_open(port), what="blockrep serve")
        if proc.poll() is not None:
            raise AssertionError(f"blockrep serve exited {proc.returncode}: {srv.log_text()}")
    except BaseException:
        stop_process(proc)
        raise
    return srv
