"""`blockrep demo`: a replicated device on loopback with embedded defaults.

Creates two disk images and a resource configuration under a state directory, creates
metadata, starts both nodes (`blockrep up`) as child processes, promotes alpha (a new pair of
blank images needs no initial sync), waits until the nodes are connected, prints how to
attach NBD clients, and on Ctrl-C demotes alpha and stops both nodes cleanly.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from .config import load
from .disk import parse_size


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick(port: int, taken: set) -> int:
    while port in taken or not _port_free(port):
        port += 1
    taken.add(port)
    return port


def _write_config(d: str, size: int, nbd_port: int) -> str:
    path = os.path.join(d, "r0.toml")
    if os.path.exists(path):
        return path
    taken: set = set()
    ports = {"a_link": _pick(7789, taken), "b_link": _pick(7790, taken),
             "a_nbd": _pick(nbd_port, taken), "b_nbd": _pick(nbd_port + 1, taken)}
    text = f"""# blockrep demo resource: two nodes on this machine (see docs/operations.md)
[resource]
name = "r0"
protocol = "C"
shared-secret = "{secrets.token_hex(16)}"
run-dir = "{os.path.join(d, 'run')}"

[node.alpha]
address = "127.0.0.1:{ports['a_link']}"
disk = "{os.path.join(d, 'alpha.img')}"
nbd = "127.0.0.1:{ports['a_nbd']}"

[node.beta]
address = "127.0.0.1:{ports['b_link']}"
disk = "{os.path.join(d, 'beta.img')}"
nbd = "127.0.0.1:{ports['b_nbd']}"
"""
    with open(path, "w") as f:
        f.write(text)
    return path


def _cli(*args, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "blockrep", *args], capture_output=True,
                         text=True, timeout=60)
    if check and res.returncode != 0:
        raise SystemExit(f"blockrep demo: 'blockrep {' '.join(args)}' failed: "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


def _status(cfg_path: str, node: str) -> dict | None:
    res = _cli("status", cfg_path, "--node", node, "--json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"blockrep demo: timed out waiting for {what}")


def run_demo(args) -> int:
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    size = parse_size(args.size)
    fresh = False
    for node in ("alpha", "beta"):
        img = os.path.join(d, f"{node}.img")
        if not os.path.exists(img):
            with open(img, "wb") as f:
                f.truncate(size)
            fresh = True
    cfg_path = _write_config(d, size, args.nbd_port)
    cfg = load(cfg_path)
    if fresh:
        for node in ("alpha", "beta"):
            print(_cli("create-md", cfg_path, "--node", node, "--force").stdout.strip())
    procs = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for node in ("alpha", "beta"):
            log = open(os.path.join(d, f"{node}.log"), "a")
            procs[node] = subprocess.Popen(
                [sys.executable, "-m", "blockrep", "up", cfg_path, "--node", node],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for node in ("alpha", "beta"):
            _wait(lambda n=node: procs[n].poll() is not None or _status(cfg_path, n), 30,
                  f"node {node} to start")
            if procs[node].poll() is not None:
                raise SystemExit(f"blockrep demo: node {node} exited; see "
                                 f"{os.path.join(d, node + '.log')}")
        _wait(lambda: (_status(cfg_path, "alpha") or {}).get("connection") == "Connected",
              30, "the nodes to connect")
        st = _status(cfg_path, "alpha")
        if st["role"] != "Primary":
            if st["disk"] == "UpToDate":
                _cli("primary", cfg_path, "--node", "alpha")
            elif fresh:  # two new blank images are identical: no initial sync needed
                _cli("primary", cfg_path, "--node", "alpha", "--force", "--skip-initial-sync")
            else:
                _cli("primary", cfg_path, "--node", "alpha", "--force")
        _wait(lambda: (_status(cfg_path, "alpha") or {}).get("replication") in
              ("Established", "SyncSource"), 30, "replication to be established")
        st = _status(cfg_path, "alpha")
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
            _cli("secondary", cfg_path, "--node", "alpha", check=False)
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
