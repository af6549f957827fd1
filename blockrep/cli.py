"""The `blockrep` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .disk import Disk, parse_size
from .nbd.constants import TransmissionFlag as TF
from .nbd.handshake import Export

log = logging.getLogger("blockrep")

WRITABLE_FLAGS = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM
                  | TF.SEND_WRITE_ZEROES | TF.SEND_DF | TF.SEND_CACHE | TF.SEND_FAST_ZERO
                  | TF.CAN_MULTI_CONN)
READ_ONLY_FLAGS = (TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_DF | TF.SEND_CACHE
                   | TF.CAN_MULTI_CONN)


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"bad address {text!r}: port is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"bad address {text!r}: port out of range")
    return host, p


def make_export(name: str, size: int, read_only: bool, direct: bool) -> Export:
    return Export(name=name, size=size, flags=READ_ONLY_FLAGS if read_only else WRITABLE_FLAGS,
                  description=f"blockrep export {name}",
                  min_block=4096 if direct else 1, pref_block=4096,
                  max_block=64 * 1024 * 1024)


async def _serve(args) -> int:
    from .shell.nbd_server import NbdServer

    size = parse_size(args.size) if args.size else None
    disk = Disk(args.disk, size=size, create=args.create, read_only=args.read_only,
                direct=args.direct)
    server = NbdServer(disk, make_export(args.export, disk.size, args.read_only, args.direct))
    if args.unix:
        await server.listen_unix(args.unix)
        log.info("serving %s (%d bytes) on unix:%s", args.disk, disk.size, args.unix)
    if args.listen or not args.unix:
        host, port = parse_hostport(args.listen or "127.0.0.1:10809", 10809)
        srv = await server.listen_tcp(host, port)
        actual = srv.sockets[0].getsockname()[1]
        log.info("serving %s (%d bytes) on nbd://%s:%d/%s", args.disk, disk.size, host,
                 actual, args.export)
        if args.port_file:
            with open(args.port_file, "w") as f:
                f.write(f"{actual}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining %d connection(s)", len(server.connections))
    await server.close()
    if not args.read_only:
        disk.flush()
    disk.close()
    log.info("stopped")
    return 0


def cmd_serve(args) -> int:
    import uvloop

    try:
        return uvloop.run(_serve(args))
    except (OSError, ValueError) as exc:
        print(f"blockrep serve: {exc}", file=sys.stderr)
        return 1


# -- replicated resources -----------------------------------------------------------------------

def _load_cfg(args):
    from .config import ConfigError, load
    try:
        cfg = load(args.config)
        node = cfg.node(args.node)
    except ConfigError as exc:
        raise SystemExit(f"blockrep: {exc}") from None
    return cfg, node


def admin_call(cfg, node: str, cmd: str, timeout: float = 30.0, **args):
    """One request to a running node's admin socket -> its result (or SystemExit)."""
    import json
    import socket as _s

    path = cfg.admin_socket(node)
    sock = _s.socket(_s.AF_UNIX, _s.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        raise SystemExit(f"blockrep: node {node} of resource {cfg.name} is not running "
                         f"(admin socket {path}: {exc.strerror})") from None
    with sock, sock.makefile("rwb") as f:
        f.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
        f.flush()
        line = f.readline()
    if not line:
        raise SystemExit(f"blockrep: node {node} closed the admin connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise SystemExit(f"blockrep: {reply.get('error')}")
    return reply["result"]


def cmd_up(args) -> int:
    import uvloop

    from .shell.node import Node

    cfg, node = _load_cfg(args)

    async def run():
        store = None
        if not args.no_metadata:
            from .meta import MetaError, open_store
            try:
                store = open_store(cfg, node)
            except MetaError as exc:
                raise SystemExit(f"blockrep up: {exc}") from None
        await Node(cfg, node.name, store=store).run()

    try:
        uvloop.run(run())
    except (OSError, ValueError) as exc:
        print(f"blockrep up: {exc}", file=sys.stderr)
        return 1
    return 0


def _simple(cmd: str, **fixed):
    def run(args) -> int:
        cfg, node = _load_cfg(args)
        extra = {k: getattr(args, k) for k in fixed}
        result = admin_call(cfg, node.name, cmd, **extra)
        if result is not None:
            print(result if isinstance(result, str) else __import__("json").dumps(result))
        return 0
    return run


def format_status(s: dict) -> str:
    def human(n):
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or unit == "TiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
    lines = [f"{s['resource']} node:{s['node']} role:{s['role']}",
             f"  disk:{s['disk']} size:{human(s['size_bytes'])}",
             f"  {s['peer']['name']} connection:{s['connection']} role:{s['peer']['role']}",
             f"    replication:{s['replication']} peer-disk:{s['peer']['disk']} "
             f"out-of-sync:{human(s['out_of_sync_bytes'])}"]
    if s.get("sync"):
        sy = s["sync"]
        eta = f" eta:{sy['eta_s']}s" if sy.get("eta_s") is not None else ""
        lines.append(f"    sync: {sy['percent']}% ({human(sy['done_bytes'])} of "
                     f"{human(sy['total_bytes'])}) rate:{human(sy['rate_bytes_per_s'])}/s{eta}")
    if s.get("decision"):
        lines.append(f"    last decision: {s['decision']['strategy']} "
                     f"(rule: {s['decision']['rule']})")
    if s.get("verify"):
        v = s["verify"]
        lines.append(f"    verify: {v.get('state')} {v.get('percent', '')}% "
                     f"out-of-sync found: {human(v.get('found_bytes', 0))}")
    if s.get("last_error"):
        lines.append(f"    last error: {s['last_error']}")
    c = s["counters"]
    lines.append(f"  writes replicated:{c['writes_replicated']} "
                 f"({human(c['bytes_replicated'])}) applied:{c['writes_applied']} "
                 f"local-only:{c['writes_local_only']}")
    n = s["nbd"]
    lines.append(f"  nbd: nbd://{n['address']}/{n['export']} "
                 f"{'serving' if n['serving'] else 'refusing (Secondary)'} "
                 f"clients:{n['clients']}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    import json
    cfg, node = _load_cfg(args)
    s = admin_call(cfg, node.name, "status")
    print(json.dumps(s, indent=1) if args.json else format_status(s))
    return 0


def cmd_events(args) -> int:
    import json
    import socket as _s
    cfg, node = _load_cfg(args)
    sock = _s.socket(_s.AF_UNIX, _s.SOCK_STREAM)
    try:
        sock.connect(cfg.admin_socket(node.name))
    except OSError as exc:
        raise SystemExit(f"blockrep: node {node.name} is not running ({exc.strerror})")
    with sock, sock.makefile("rwb") as f:
        f.write(b'{"cmd": "events"}\n')
        f.flush()
        try:
            for line in f:
                ev = json.loads(line)
                if "result" in ev:
                    ev = {"event": "exists", **{k: ev["result"][k] for k in
                          ("role", "disk", "connection", "replication", "out_of_sync_bytes")}}
                print(json.dumps(ev), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockrep", description="blockrep: block-level "
                                "replication with an NBD frontend")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve one disk over NBD, standalone (no replication)")
    s.add_argument("--disk", required=True, help="backing file or block device")
    s.add_argument("--size", help="size for --create, e.g. 1G; checked against the disk")
    s.add_argument("--create", action="store_true", help="create the file if missing")
    s.add_argument("--listen", help="TCP HOST:PORT (default 127.0.0.1:10809; port 0 = any)")
    s.add_argument("--unix", help="also/instead listen on this Unix socket path")
    s.add_argument("--export", default="", help="export name (default: empty)")
    s.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    s.add_argument("--direct", action="store_true", help="open the disk with O_DIRECT")
    s.add_argument("--port-file", help="write the bound TCP port here (for scripts)")
    s.set_defaults(func=cmd_serve)

    def res_cmd(name, helptext, func):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("config", help="resource configuration (TOML)")
        c.add_argument("--node", help="this node's name (default: the host name)")
        c.set_defaults(func=func)
        return c

    c = res_cmd("up", "run this node of the resource in the foreground", cmd_up)
    c.add_argument("--no-metadata", action="store_true",
                   help="keep generation identifiers and bitmap in memory only")
    res_cmd("down", "stop a running node", _simple("down"))
    c = res_cmd("primary", "promote this node", _simple("primary", force=0,
                                                           skip_initial_sync=0))
    c.add_argument("--force", action="store_true",
                   help="promote even if the local disk is not UpToDate")
    c.add_argument("--skip-initial-sync", action="store_true",
                   help="with --force on a new pair of blank disks: no initial full sync")
    res_cmd("secondary", "demote this node", _simple("secondary"))
    c = res_cmd("connect", "(re)enable the peer connection", _simple("connect",
                                                                     discard_my_data=0))
    c.add_argument("--discard-my-data", action="store_true",
                   help="resolve a split brain: this node's changes are overwritten")
    res_cmd("disconnect", "drop the peer connection and stay StandAlone",
            _simple("disconnect"))
    c = res_cmd("status", "show the resource's state", cmd_status)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    res_cmd("events", "print state changes as JSON lines until interrupted", cmd_events)
    res_cmd("verify", "online verify: compare the disks block by block", _simple("verify"))
    res_cmd("resync", "copy what is marked out of sync (e.g. after verify)",
            _simple("resync"))
    res_cmd("invalidate", "discard local data: full resync from the peer",
            _simple("invalidate"))
    c = res_cmd("create-md", "create metadata for this node", cmd_create_md)
    c.add_argument("--force", action="store_true", help="overwrite existing metadata")
    res_cmd("dump-md", "print this node's metadata (node must be down)", cmd_dump_md)

    d = sub.add_parser("demo", help="two replicated nodes on loopback with defaults")
    d.add_argument("--dir", default="state/demo", help="state directory (default state/demo)")
    d.add_argument("--size", default="1G", help="size of each disk image (default 1G)")
    d.add_argument("--nbd-port", type=int, default=10809, help="NBD port of the primary")
    d.add_argument("--duration", type=float, default=0,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    d.set_defaults(func=cmd_demo)
    return p


def cmd_create_md(args) -> int:
    from .meta import MetaError, create_md
    cfg, node = _load_cfg(args)
    try:
        print(create_md(cfg, node, force=args.force))
    except MetaError as exc:
        raise SystemExit(f"blockrep create-md: {exc}") from None
    return 0


def cmd_dump_md(args) -> int:
    from .meta import MetaError, dump_md
    cfg, node = _load_cfg(args)
    try:
        print(dump_md(cfg, node))
    except MetaError as exc:
        raise SystemExit(f"blockrep dump-md: {exc}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
