"""`blockrep demo`: a replicated device on loopback with embedded defaults.

Creates two disk images and a resource configuration under a state directory, creates
metadata, starts both nodes (`blockrep up`) as child processes, promotes alpha (a new pair of
blank images needs no initial sync), waits until the nodes are connected, prints how to
attach NBD clients, and on Ctrl-C demotes alpha and stops both nodes cleanly. The pair is
blockrep.loopback's, the one the tests and tools/bench start too.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

from .config import load
from .disk import parse_size
from .loopback import NODES, LoopbackPair, PairError, ports_near


def _pair(d: str, size: int, nbd_port: int) -> LoopbackPair:
    """The demo's pair; a configuration left by an earlier run keeps its ports and secret."""
    path = os.path.join(d, "r0.toml")
    if os.path.exists(path):
        old = load(path)
        secret = old.shared_secret
        ports = {n: (old.nodes[n].address[1], old.nodes[n].nbd[1]) for n in NODES}
    else:
        secret = secrets.token_hex(16)
        a_link, b_link, a_nbd, b_nbd = ports_near([7789, 7790, nbd_port, nbd_port + 1])
        ports = {"alpha": (a_link, a_nbd), "beta": (b_link, b_nbd)}
    return LoopbackPair(d, name="r0", secret=secret, size=size, ports=ports,
                        resource={"protocol": "C"}, shared_config=True,
                        comment="blockrep demo resource: two nodes on this machine "
                                "(see docs/operations.md)")


def _cli(pair: LoopbackPair, node: str, *args, check=True) -> subprocess.CompletedProcess:
    res = pair.cli(node, *args)
    if check and res.returncode != 0:
        raise SystemExit(f"blockrep demo: 'blockrep {' '.join(args)} --node {node}' failed: "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


def run_demo(args) -> int:
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    size = parse_size(args.size)
    fresh = not all(os.path.exists(os.path.join(d, f"{n}.img")) for n in NODES)
    pair = _pair(d, size, args.nbd_port)
    cfg_path = pair.configs["alpha"]
    cfg = load(cfg_path)
    if fresh:
        for node in NODES:
            print(_cli(pair, node, "create-md", "--force").stdout.strip())
    procs = pair.procs
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            for node in NODES:
                pair.start(node, new_session=True)
            pair.wait_status("alpha", lambda s: s["connection"] == "Connected", 30,
                             "the nodes to connect")
            st = pair.admin("alpha")
            if st["role"] != "Primary":
                if st["disk"] == "UpToDate":
                    _cli(pair, "alpha", "primary")
                elif fresh:  # two new blank images are identical: no initial sync needed
                    _cli(pair, "alpha", "primary", "--force", "--skip-initial-sync")
                else:
                    _cli(pair, "alpha", "primary", "--force")
            # Established, and the peer's disk state arrived (it follows the connect in
            # the peer's P_STATE), or a resync started
            pair.wait_status("alpha", lambda s: s["replication"] == "SyncSource" or
                             s["replication"] == "Established" and
                             s["peer"]["disk"] == "UpToDate", 30,
                             "replication to be established")
        except PairError as exc:
            raise SystemExit(f"blockrep demo: {exc}; see {d}/alpha.log, {d}/beta.log") from None
        st = pair.admin("alpha")
        host, port = cfg.nodes["alpha"].nbd
        uri = f"nbd://{host}:{port}/"
        exe = os.path.relpath(os.path.join(os.path.dirname(sys.executable), "blockrep"))
        print(f"""
blockrep demo is running: resource r0, {size >> 20} MiB, protocol C
  alpha (Primary)   disk {cfg.nodes['alpha'].disk}
  beta  (Secondary) disk {cfg.nodes['beta'].disk}
  state: {st['role']}/{st['disk']}, peer {st['peer']['role']}/{st['peer']['disk']}, \
{st['connection']}, {st['replication']}

NBD URI: {uri}
  nbdinfo {uri}
  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' {uri}
  nbdfuse /tmp/mnt {uri} &   # then: losetup -f --show /tmp/mnt/nbd
  (with a kernel nbd module: nbd-client -N '' {host} {port} /dev/nbd0)
Watch it:
  {exe} status {cfg_path} --node alpha
  {exe} events {cfg_path} --node beta
Logs: {d}/alpha.log, {d}/beta.log.   Ctrl-C stops both nodes.""", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stopping:
            if deadline and time.monotonic() > deadline:
                break
            for node, p in procs.items():
                if p.poll() is not None:
                    print(f"node {node} exited with {p.returncode}; stopping", flush=True)
                    stopping = True
            time.sleep(0.2)
    finally:
        print("stopping: demoting alpha, then both nodes down", flush=True)
        if procs.get("alpha") and procs["alpha"].poll() is None:
            _cli(pair, "alpha", "secondary", check=False)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for node, p in procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            print(f"node {node} stopped (exit {p.returncode})", flush=True)
    return 0
