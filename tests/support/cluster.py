"""A two-node resource for integration tests: blockrep.loopback's pair (the one `demo` and
tools/bench use too), with the tests' defaults (short timeouts, metadata created), their
CLI and status through `blockrep status --json`, and failures as AssertionErrors that carry
the node's log."""

from __future__ import annotations

import json
import subprocess

from blockrep.disk import parse_size
from blockrep.loopback import NODES, LoopbackPair, PairError


class Cluster(LoopbackPair):
    NODES = NODES

    def __init__(self, tmp_path, size: str = "256M", secret: str = "test-secret",
                 resource: dict | None = None, metadata: bool = True,
                 sizes: dict | None = None, addresses: dict | None = None,
                 secrets_per_node: dict | None = None, names_per_node: dict | None = None,
                 resource_per_node: dict | None = None,
                 node_keys: dict | None = None):
        """node_keys: keys of a node's own [node.NAME] table, e.g. {"alpha": {...}}."""
        per_node = {n: dict((resource_per_node or {}).get(n, {})) for n in NODES}
        for n in NODES:
            if n in (names_per_node or {}):
                per_node[n]["name"] = names_per_node[n]
            if n in (secrets_per_node or {}):
                per_node[n]["shared-secret"] = secrets_per_node[n]
        super().__init__(tmp_path, secret=secret, addresses=addresses, per_node=per_node,
                         node_keys=node_keys,
                         size={n: parse_size((sizes or {}).get(n, size)) for n in NODES},
                         resource={"timeout": 3.0, "ping-interval": 0.5, **(resource or {})})
        self.metadata = metadata
        self.logs: dict[str, str] = {}
        self.resource_names = {n: self.views[n]["name"] for n in NODES}
        if metadata:
            for n in NODES:
                self.cli(n, "create-md", "--force")

    # -- processes ---------------------------------------------------------------------------
    def start(self, node: str, *extra: str, netns: str | None = None) -> subprocess.Popen:
        self.logs[node] = self.log_path(node)
        if not self.metadata:
            extra = (*extra, "--no-metadata")
        try:
            return super().start(node, *extra, netns=netns)
        except PairError as exc:
            raise AssertionError(str(exc)) from None

    # -- CLI ---------------------------------------------------------------------------------
    def cli(self, node: str, cmd: str, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        res = super().cli(node, cmd, *args, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"blockrep {cmd} on {node} failed ({res.returncode}): "
                                 f"{res.stderr}{res.stdout}\n--- log:\n{self.log(node)[-3000:]}")
        return res

    def status(self, node: str) -> dict:
        return json.loads(self.cli(node, "status", "--json").stdout)

    def admin(self, node: str, cmd: str = "status", timeout: float = 10.0, **args):
        """One request on the node's admin socket, without a CLI process (fast polling)."""
        try:
            return super().admin(node, cmd, timeout, **args)
        except PairError as exc:
            raise AssertionError(str(exc)) from None

    def wait_status(self, node: str, pred, timeout: float = 30, what: str = "status", *,
                    fast: bool = False) -> dict:
        """Poll the node's status until pred(status) holds; returns that status. Through
        `blockrep status --json` every 0.1 s, or with fast=True straight from the admin
        socket every 0.05 s."""
        def via_cli(n):
            try:
                return self.status(n)
            except AssertionError as exc:  # not up yet
                raise PairError(str(exc)) from None
        try:
            return super().wait_status(node, pred, timeout, what,
                                       get=None if fast else via_cli,
                                       interval=0.05 if fast else 0.1)
        except PairError as exc:
            raise AssertionError(f"{exc}\n--- log:\n{self.log(node)[-4000:]}") from None

    def wait_connected(self, timeout: float = 30) -> None:
        for n in self.NODES:
            self.wait_status(n, lambda s: s["connection"] == "Connected" and
                             s["replication"] in ("Established",), timeout,
                             "connected and Established")

    def up_pair(self, primary: str = "alpha", blank: bool = True) -> None:
        """Start both nodes, promote `primary` (new blank pair: no initial sync)."""
        try:
            super().up_pair(primary, blank)
        except PairError as exc:
            raise AssertionError(f"{exc}\n--- log:\n{self.log(primary)[-3000:]}") from None
