"""A blockrep node as a process, for tools/soak and similar drivers (asyncio).

Owns: starting `blockrep up` and waiting for its admin socket, kill -9 (and removing the
stale socket), SIGSTOP/SIGCONT, a clean SIGTERM stop, and admin requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """One `blockrep up` process of resource r0 in `workdir`: start, kill -9, signals, a
    clean stop, and admin requests (JSON lines on its socket) from asyncio."""

    def __init__(self, workdir: str, name: str, python: str = sys.executable,
                 cwd: str | None = None):
        self.name, self.python, self.cwd = name, python, cwd
        self.link_port, self.nbd_port = free_port(), free_port()
        self.image = os.path.join(workdir, f"{name}.img")
        self.disk_path = self.image  # the nbdfuse file with --disk-faults
        self.faulty = None  # a FaultyDisk under it, if any
        self.config = os.path.join(workdir, f"r0-{name}.toml")
        self.log = os.path.join(workdir, f"{name}.log")
        self.socket = os.path.join(workdir, "run", f"r0.{name}.sock")
        self.proc: subprocess.Popen | None = None
        self.stopped = False  # SIGSTOPped

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen([self.python, "-m", "blockrep", "up", self.config, "--node",
                                          self.name], stdout=f, stderr=subprocess.STDOUT,
                                         cwd=self.cwd)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def kill9(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.stopped = False
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)
            self.stopped = sig == signal.SIGSTOP

    def terminate(self, timeout: float = 30.0) -> bool:
        """Clean stop; False if the node had to be killed."""
        if not self.running:
            return True
        self.signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill9()
            return False

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except FileNotFoundError:
            return ""

    async def admin(self, cmd: str = "status", timeout: float = 5.0, **args):
        if self.stopped or not self.running:
            raise ConnectionError(f"{self.name} is not answering (stopped or down)")
        r, w = await asyncio.wait_for(asyncio.open_unix_connection(self.socket), timeout)
        try:
            w.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
            reply = json.loads(await asyncio.wait_for(r.readline(), timeout) or b"{}")
        finally:
            w.close()
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {cmd}: {reply.get('error')}")
        return reply["result"]

    async def status(self) -> dict | None:
        try:
            return await self.admin()
        except (OSError, RuntimeError, ValueError, asyncio.TimeoutError):
            return None
