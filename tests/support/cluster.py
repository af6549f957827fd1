"""A two-node resource for integration tests: config, images, metadata, processes, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from support.helpers import PY, ROOT, free_port, stop_process, wait_for


class Cluster:
    NODES = ("alpha", "beta")

    def __init__(self, tmp_path, size: str = "256M", secret: str = "test-secret",
                 resource: dict | None = None, metadata: bool = True,
                 sizes: dict | None = None, addresses: dict | None = None,
                 secrets_per_node: dict | None = None, names_per_node: dict | None = None):
        self.dir = str(tmp_path)
        self.metadata = metadata
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        self.ports = {n: (free_port(), free_port()) for n in self.NODES}  # (link, nbd)
        self.addresses = addresses or {n: "127.0.0.1" for n in self.NODES}
        self.configs = {}
        self.resource_names = {n: (names_per_node or {}).get(n, "r0") for n in self.NODES}
        for n in self.NODES:
            img = self.disk(n)
            with open(img, "wb") as f:
                f.truncate(_size((sizes or {}).get(n, size)))
        # one file shared by both nodes, unless a test wants them to disagree
        for n in self.NODES:
            res = {"name": (names_per_node or {}).get(n, "r0"),
                   "shared-secret": (secrets_per_node or {}).get(n, secret),
                   "run-dir": os.path.join(self.dir, "run"),
                   "timeout": 3.0, "ping-interval": 0.5, **(resource or {})}
            self.configs[n] = self._write_config(n, res)
        if metadata:
            for n in self.NODES:
                self.cli(n, "create-md", "--force")

    def _write_config(self, node: str, res: dict) -> str:
        lines = ["[resource]"]
        for k, v in res.items():
            lines.append(f"{k} = {json.dumps(v)}")
        for n in self.NODES:
            link, nbd = self.ports[n]
            lines += ["", f"[node.{n}]", f'address = "{self.addresses[n]}:{link}"',
                      f'disk = "{self.disk(n)}"', f'nbd = "{self.addresses[n]}:{nbd}"']
        path = os.path.join(self.dir, f"r0-{node}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def disk(self, node: str) -> str:
        return os.path.join(self.dir, f"{node}.img")

    def uri(self, node: str) -> str:
        return f"nbd://{self.addresses[node]}:{self.ports[node][1]}/"

    def nbd_port(self, node: str) -> int:
        return self.ports[node][1]

    # -- processes ---------------------------------------------------------------------------
    def start(self, node: str, *extra: str, netns: str | None = None) -> subprocess.Popen:
        log = os.path.join(self.dir, f"{node}.log")
        self.logs[node] = log
        argv = [PY, "-m", "blockrep", "up", self.configs[node], "--node", node, *extra]
        if not self.metadata:
            argv.append("--no-metadata")
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(log, "a") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[node] = p
        wait_for(lambda: p.poll() is not None or os.path.exists(self.admin_socket(node)),
                 timeout=30, what=f"node {node} to start")
        if p.poll() is not None:
            raise AssertionError(f"node {node} exited {p.returncode}:\n{self.log(node)}")
        return p

    def admin_socket(self, node: str) -> str:
        return os.path.join(self.dir, "run", f"{self.resource_names[node]}.{node}.sock")

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(node)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(30)
        sock = self.admin_socket(node)
        if sig == signal.SIGKILL and os.path.exists(sock):
            os.unlink(sock)

    def stop(self, node: str) -> int | None:
        p = self.procs.get(node)
        return stop_process(p) if p is not None else None

    def stop_all(self) -> None:
        for n in self.NODES:
            self.stop(n)

    def log(self, node: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{node}.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- CLI ---------------------------------------------------------------------------------
    def cli(self, node: str, cmd: str, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [PY, "-m", "blockrep", cmd, self.configs[node], "--node", node, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and res.returncode != 0:
            raise AssertionError(f"blockrep {cmd} on {node} failed ({res.returncode}): "
                                 f"{res.stderr}{res.stdout}\n--- log:\n{self.log(node)[-3000:]}")
        return res

    def status(self, node: str) -> dict:
        return json.loads(self.cli(node, "status", "--json").stdout)

    def admin(self, node: str, cmd: str = "status", timeout: float = 10.0, **args):
        """One request on the node's admin socket, without a CLI process (fast polling)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.admin_socket(node))
            with s.makefile("rwb") as f:
                f.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
                f.flush()
                reply = json.loads(f.readline())
        if not reply.get("ok"):
            raise AssertionError(f"{node}: {cmd} failed: {reply.get('error')}")
        return reply["result"]

    def wait_status(self, node: str, pred, timeout: float = 30, what: str = "status", *,
                    fast: bool = False) -> dict:
        """Poll the node's status until pred(status) holds; returns that status. Through
        `blockrep status --json` every 0.1 s, or with fast=True straight from the admin
        socket every 0.05 s."""
        last = {}
        if fast:
            get, interval, errors = self.admin, 0.05, (OSError, ValueError)
        else:
            get, interval, errors = self.status, 0.1, AssertionError

        def check():
            nonlocal last
            try:
                last = get(node)
            except errors:
                return False
            return pred(last)
        try:
            wait_for(check, timeout=timeout, interval=interval, what=f"{node}: {what}")
        except TimeoutError:
            raise AssertionError(f"{node}: timed out after {timeout}s waiting for {what}; "
                                 f"last status {json.dumps(last)}\n--- log:\n"
                                 f"{self.log(node)[-4000:]}") from None
        return last

    def wait_connected(self, timeout: float = 30) -> None:
        for n in self.NODES:
            self.wait_status(n, lambda s: s["connection"] == "Connected" and
                             s["replication"] in ("Established",), timeout,
                             "connected and Established")

    def up_pair(self, primary: str = "alpha", blank: bool = True) -> None:
        """Start both nodes, promote `primary` (new blank pair: no initial sync)."""
        for n in self.NODES:
            self.start(n)
        self.wait_status(primary, lambda s: s["connection"] == "Connected", 30, "connected")
        args = ["--force", "--skip-initial-sync"] if blank else ["--force"]
        self.cli(primary, "primary", *args)
        self.wait_connected(60)
        self.wait_status(primary, lambda s: s["role"] == "Primary" and
                         s["peer"]["disk"] == "UpToDate", 30, "Primary with UpToDate peer")


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
