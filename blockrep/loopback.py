"""Two nodes of one resource on this machine: the pair `blockrep demo` runs, the tests drive
(tests/support/cluster.py) and tools/bench.py measures.

Owns: the pair's configuration (ports, images, run directory, one file or one per node),
creating images and metadata, starting and stopping the two `blockrep up` processes (with
any Python, so bench can run another checkout), requests to their admin sockets, waiting for
a state, and bringing a new pair up with one Primary.
Must not: know what a test or a benchmark checks; the callers decide what a failure means
(the errors raised here say what was waited for and what was seen last).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

NODES = ("alpha", "beta")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PairError(RuntimeError):
    """A node did not start or did not reach a state in time; str() says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def ports_near(starts: list[int]) -> list[int]:
    """Free ports, each the first free one from its start, all different."""
    taken: set[int] = set()
    out = []
    for port in starts:
        while port in taken or not port_free(port):
            port += 1
        taken.add(port)
        out.append(port)
    return out


def config_text(resource: dict, nodes: dict[str, dict], comment: str = "") -> str:
    """A resource configuration: `resource` keys as given, then one table per node."""
    lines = [f"# {comment}"] if comment else []
    lines.append("[resource]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in resource.items()]
    for name, table in nodes.items():
        lines += ["", f"[node.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM (a clean shutdown), SIGKILL after `timeout`; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class LoopbackPair:
    """Nodes alpha and beta of resource `name` under `directory`.

    Images `NODE.img` of `size` bytes are created when missing (or pass `disks`); ports are
    free ones unless given as {node: (link, nbd)}; `resource` adds or overrides resource
    keys; `per_node` overrides them in one node's view only (then each node gets its own
    configuration file, as when a test wants the two to disagree); `node_keys` adds keys to
    a node's own [node.NAME] table (in every view)."""

    def __init__(self, directory, *, name: str = "r0", secret: str = "blockrep-loopback",
                 size: int | dict | None = None, disks: dict | None = None,
                 ports: dict | None = None, addresses: dict | None = None,
                 resource: dict | None = None, per_node: dict | None = None,
                 shared_config: bool = False, python: str = sys.executable,
                 root: str = ROOT,
                 comment: str = "", node_keys: dict | None = None):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        self.python = python
        self.root = root  # the checkout whose blockrep `python -m blockrep` runs (its cwd)
        self.procs: dict[str, subprocess.Popen] = {}
        self.disks = disks or {n: os.path.join(self.dir, f"{n}.img") for n in NODES}
        self.ports = ports or {n: (free_port(), free_port()) for n in NODES}  # (link, nbd)
        self.addresses = addresses or {n: "127.0.0.1" for n in NODES}
        if size is not None:
            for n in NODES:
                want = size[n] if isinstance(size, dict) else size
                if not os.path.exists(self.disks[n]):
                    with open(self.disks[n], "wb") as f:
                        f.truncate(want)
        base = {"name": name, "shared-secret": secret,
                "run-dir": os.path.join(self.dir, "run"), **(resource or {})}
        nodes = {n: {"address": f"{self.addresses[n]}:{self.ports[n][0]}",
                     "disk": self.disks[n],
                     "nbd": f"{self.addresses[n]}:{self.ports[n][1]}",
                     **(node_keys or {}).get(n, {})} for n in NODES}
        self.configs: dict[str, str] = {}
        self.views: dict[str, dict] = {}
        for n in NODES:
            view = {**base, **(per_node or {}).get(n, {})}
            self.views[n] = view
            path = os.path.join(self.dir, f"{name}.toml" if shared_config else
                                f"{name}-{n}.toml")
            self.configs[n] = path
            if not (shared_config and n != NODES[0]):
                with open(path, "w") as f:
                    f.write(config_text(view, nodes, comment))

    # -- where things are --------------------------------------------------------------------
    def disk(self, node: str) -> str:
        return self.disks[node]

    def uri(self, node: str) -> str:
        return f"nbd://{self.addresses[node]}:{self.ports[node][1]}/"

    def nbd_port(self, node: str) -> int:
        return self.ports[node][1]

    def admin_socket(self, node: str) -> str:
        view = self.views[node]
        return os.path.join(view["run-dir"], f"{view['name']}.{node}.sock")

    def log_path(self, node: str) -> str:
        return os.path.join(self.dir, f"{node}.log")

    def log(self, node: str) -> str:
        try:
            with open(self.log_path(node)) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- processes ---------------------------------------------------------------------------
    def argv(self, node: str, cmd: str, *args: str) -> list[str]:
        return [self.python, "-m", "blockrep", cmd, self.configs[node], "--node", node, *args]

    def cli(self, node: str, cmd: str, *args: str, timeout: float = 60) \
            -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(node, cmd, *args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, stdin=subprocess.DEVNULL)

    def create_md(self) -> None:
        for n in NODES:
            res = self.cli(n, "create-md", "--force")
            if res.returncode != 0:
                raise PairError(f"create-md on {n} failed: {(res.stderr or res.stdout).strip()}")

    def start(self, node: str, *extra: str, netns: str | None = None,
              new_session: bool = False, wait: bool = True,
              log: str | None = None) -> subprocess.Popen:
        """Start `blockrep up` for `node` (output appended to its log) and, with wait=True,
        wait until its admin socket exists."""
        argv = self.argv(node, "up", *extra)
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(log or self.log_path(node), "a") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=self.root,
                                 start_new_session=new_session)
        self.procs[node] = p
        if wait:
            deadline = time.monotonic() + 30
            while p.poll() is None and not os.path.exists(self.admin_socket(node)):
                if time.monotonic() > deadline:
                    raise PairError(f"node {node} did not open its admin socket in 30s:\n"
                                    f"{self.log(node)[-3000:]}")
                time.sleep(0.02)
            if p.poll() is not None:
                raise PairError(f"node {node} exited {p.returncode}:\n{self.log(node)[-3000:]}")
        return p

    def stop(self, node: str, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL after `timeout`; the exit status."""
        p = self.procs.get(node)
        return None if p is None else stop_process(p, timeout)

    def stop_all(self) -> None:
        for n in NODES:
            self.stop(n)

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(node)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(30)
        sock = self.admin_socket(node)
        if sig == signal.SIGKILL and os.path.exists(sock):
            os.unlink(sock)  # a killed node leaves it behind

    # -- admin socket ------------------------------------------------------------------------
    def admin(self, node: str, cmd: str = "status", timeout: float = 10.0, **args):
        """One request on the node's admin socket (no CLI process: cheap enough to poll).
        Raises OSError when the node is not there, PairError when it refuses."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.admin_socket(node))
            with s.makefile("rwb") as f:
                f.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
                f.flush()
                line = f.readline()
        if not line:
            raise ConnectionError(f"{node} closed the admin connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise PairError(f"{node}: {cmd} failed: {reply.get('error')}")
        return reply["result"]

    def wait_status(self, node: str, pred, timeout: float = 30, what: str = "status", *,
                    get=None, interval: float = 0.05) -> dict:
        """Poll `get(node)` (default: the admin socket) until pred(status) holds; returns
        that status, or raises PairError naming `what` and the last status seen."""
        get = get or self.admin
        last: dict = {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                last = get(node)
                if pred(last):
                    return last
            except (OSError, ValueError, PairError):
                pass
            if time.monotonic() > deadline:
                raise PairError(f"{node}: timed out after {timeout}s waiting for {what}; "
                                f"last status {json.dumps(last)}")
            time.sleep(interval)

    def up_pair(self, primary: str = "alpha", blank: bool = True, *, timeout: float = 60,
                start=None) -> None:
        """Start both nodes, promote `primary` and wait until its peer is UpToDate. blank:
        the two disks are known to be identical (new blank images, or copies), so no
        initial sync is needed."""
        for n in NODES:
            (start or self.start)(n)
        self.wait_status(primary, lambda s: s["connection"] == "Connected", timeout,
                         "connected")
        args = ["--force", "--skip-initial-sync"] if blank else ["--force"]
        res = self.cli(primary, "primary", *args)
        if res.returncode != 0:
            raise PairError(f"primary on {primary} failed: {(res.stderr or res.stdout).strip()}")
        for n in NODES:
            self.wait_status(n, lambda s: s["connection"] == "Connected" and
                             s["replication"] == "Established", timeout,
                             "connected and Established")
        self.wait_status(primary, lambda s: s["role"] == "Primary" and
                         s["peer"]["disk"] == "UpToDate", timeout,
                         "Primary with UpToDate peer")
