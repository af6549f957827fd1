"""Faulty disks for tests and tools/soak, made of real parts.

`FaultyDisk`: nbdkit's memory (or file) plugin behind its `error` filter (and optionally its
`delay` filter), exposed as a regular file by nbdfuse. The file is what a blockrep node gets
as its disk. Errors are off until switched on at run time: the error filter injects only
while its trigger file exists (`error-<op>-file=`), one trigger per operation (pread, pwrite,
trim, zero), so `inject("pwrite")` makes every write fail with the chosen errno (EIO by
default) and `heal()` ends it. FUSE without writeback caching sends each write to nbdfuse
before write() returns, so a failed NBD write is the writer's pwrite() error at once.

`TinyTmpfs`: a tmpfs of a few MiB holding a sparse file much larger than it: writes fail with
ENOSPC once the tmpfs is full (a thin-provisioned disk running out of space).

Both need root (FUSE, mount) and the nbdkit, nbdfuse and fusermount3 tools; every process
is started and ended by PID, every mount is unmounted on stop().
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

OPS = ("pread", "pwrite", "trim", "zero")
TOOLS = ("nbdkit", "nbdfuse", "fusermount3")


class HarnessError(Exception):
    """The faulty disk could not be set up."""


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None,
          log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what}: process exited {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}: {_tail(log)}")
        time.sleep(0.02)


def _tail(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-2000:]


def _end(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _unmount(mountpoint: str) -> None:
    for argv in (["fusermount3", "-u", mountpoint], ["fusermount3", "-u", "-z", mountpoint]):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(argv, capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + 5
        while os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)


class FaultyDisk:
    """nbdkit (memory or file plugin) + error filter [+ delay filter] -> nbdfuse file."""

    def __init__(self, workdir: str, size: int, *, backing: str | None = None,
                 error: str = "EIO", rate: float = 1.0, delay_read_ms: float = 0,
                 delay_write_ms: float = 0, name: str = "disk"):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise HarnessError(f"FaultyDisk needs {', '.join(missing)} (see tools/setup)")
        self.dir = os.path.join(workdir, f"faulty-{name}")
        self.size = size
        self.backing = backing
        self.error = error
        self.rate = rate
        self.delays = {"delay-read": delay_read_ms, "delay-write": delay_write_ms}
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.path = os.path.join(self.mountpoint, name)
        self.socket = os.path.join(self.dir, "nbdkit.sock")
        self.nbdkit_log = os.path.join(self.dir, "nbdkit.log")
        self.nbdfuse_log = os.path.join(self.dir, "nbdfuse.log")
        self.nbdkit: subprocess.Popen | None = None
        self.nbdfuse: subprocess.Popen | None = None

    def trigger(self, op: str) -> str:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r} (one of {', '.join(OPS)})")
        return os.path.join(self.dir, f"inject-{op}")

    def nbdkit_argv(self) -> list[str]:
        argv = ["nbdkit", "-f", "-U", self.socket, "--filter=error"]
        if any(self.delays.values()):
            argv.append("--filter=delay")
        argv += ["file", self.backing] if self.backing else ["memory", f"size={self.size}"]
        for op in OPS:
            argv += [f"error-{op}={self.error}", f"error-{op}-rate={self.rate}",
                     f"error-{op}-file={self.trigger(op)}"]
        argv += [f"{k}={v}ms" for k, v in self.delays.items() if v]
        return argv

    def start(self) -> str:
        """Start nbdkit and nbdfuse; returns the path of the exposed file."""
        os.makedirs(self.mountpoint, exist_ok=True)
        self.heal()
        if self.backing and not os.path.exists(self.backing):
            with open(self.backing, "wb") as f:
                f.truncate(self.size)
        try:
            with open(self.nbdkit_log, "w") as log:
                self.nbdkit = subprocess.Popen(self.nbdkit_argv(), stdout=log,
                                               stderr=subprocess.STDOUT)
            _wait(lambda: os.path.exists(self.socket), 30, "nbdkit socket", self.nbdkit,
                  self.nbdkit_log)
            with open(self.nbdfuse_log, "w") as log:
                self.nbdfuse = subprocess.Popen(["nbdfuse", self.path, "--unix", self.socket],
                                                stdout=log, stderr=subprocess.STDOUT)
            _wait(lambda: os.path.ismount(self.mountpoint) and os.path.exists(self.path),
                  30, "nbdfuse mount", self.nbdfuse, self.nbdfuse_log)
        except BaseException:
            self.stop()
            raise
        return self.path

    def inject(self, *ops: str) -> None:
        """Make these operations fail (default: writes) from now on."""
        for op in ops or ("pwrite",):
            with open(self.trigger(op), "w"):
                pass

    def heal(self, *ops: str) -> None:
        """Stop failing these operations (default: all)."""
        for op in ops or OPS:
            try:
                os.unlink(self.trigger(op))
            except FileNotFoundError:
                pass

    def injected(self) -> list[str]:
        return [op for op in OPS if os.path.exists(self.trigger(op))]

    def stop(self) -> None:
        self.heal()
        _unmount(self.mountpoint)
        _end(self.nbdfuse)
        _end(self.nbdkit)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class TinyTmpfs:
    """A sparse file of `size` bytes on a tmpfs of `capacity` bytes: ENOSPC once full."""

    def __init__(self, workdir: str, size: int, capacity: int, name: str = "disk.img"):
        self.mountpoint = os.path.join(workdir, "tiny-tmpfs")
        self.path = os.path.join(self.mountpoint, name)
        self.size = size
        self.capacity = capacity

    def start(self) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.capacity}",
                              "tmpfs", self.mountpoint], capture_output=True, text=True,
                             timeout=30, check=False)
        if res.returncode != 0:
            raise HarnessError(f"mount tmpfs: {res.stderr.strip()}")
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        return self.path

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", self.mountpoint], capture_output=True, timeout=30,
                           check=False)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
