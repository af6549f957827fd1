"""The `blockrep` command line.

Owns: the argument parser, the client side of the admin socket, exit codes (one per failure
class, listed in docs/operations.md), `--json` output (results and errors), waiting for
states (`wait-connect`, `wait-sync`).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import sys
import time

from .config import parse_address
from .disk import Disk, parse_size
from .nbd.handshake import make_export

log = logging.getLogger("blockrep")

# exit codes, one per failure class (docs/operations.md)
EXIT_OK = 0
EXIT_ERROR = 1         # anything else: I/O errors of serve/up, a node that went away
EXIT_USAGE = 2         # bad arguments or request (argparse uses 2 too)
EXIT_CONFIG = 3        # the configuration is invalid
EXIT_NOT_RUNNING = 4   # the node is not running (no admin socket)
EXIT_REFUSED = 5       # the node refused the command (its state does not allow it)
EXIT_PERMISSION = 6    # not allowed: admin socket permissions, SO_PEERCRED, unsafe run-dir
EXIT_TIMEOUT = 7       # wait-connect / wait-sync / the admin request timed out
EXIT_METADATA = 8      # metadata missing, corrupt or in use
EXIT_PIPE = 141        # stdout closed early (`blockrep status | head`): 128 + SIGPIPE

_CODE_EXIT = {"usage": EXIT_USAGE, "config": EXIT_CONFIG, "permission-denied": EXIT_PERMISSION,
              "unsafe-run-dir": EXIT_PERMISSION}


class CliError(SystemExit):
    """A failure the CLI reports in one line (or one JSON object) and exits with."""

    def __init__(self, message: str, status: int = EXIT_ERROR, code: str = "error",
                 prog: str = "blockrep"):
        super().__init__(status)
        self.message = message
        self.kind = code
        self.prog = prog  # the one line reads "PROG: MESSAGE"

    def __str__(self) -> str:
        return self.message

async def _serve(args) -> int:
    from .shell.nbd_limits import NbdLimits, server_tls
    from .shell.nbd_server import NbdServer

    tls = server_tls(args.tls, args.tls_cert, args.tls_key, args.tls_ca, args.tls_verify_client)
    size = parse_size(args.size) if args.size else None
    disk = Disk(args.disk, size=size, create=args.create, read_only=args.read_only,
                direct=args.direct)
    limits = NbdLimits(handshake_timeout=args.handshake_timeout,
                       max_handshakes=args.max_handshakes, busy_poll_us=args.busy_poll)
    server = NbdServer(disk, make_export(args.export, disk.size, read_only=args.read_only,
                                         direct=args.direct), limits=limits, tls=tls)
    if args.unix:
        await server.listen_unix(args.unix)
        log.info("serving %s (%d bytes) on unix:%s", args.disk, disk.size, args.unix)
    if args.listen or not args.unix:
        host, port = parse_address(args.listen or "127.0.0.1:10809", "--listen",
                                   default_port=10809, default_host="127.0.0.1",
                                   any_port=True)
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
        from .config import ConfigError
        if isinstance(exc, ConfigError):
            raise CliError(str(exc), EXIT_USAGE, "usage", prog="blockrep serve") from None
        raise CliError(str(exc), prog="blockrep serve") from None


# -- replicated resources -----------------------------------------------------------------------

def _load_cfg(args):
    """The resource named by args.config (a name in the configuration directory or a path)
    and this node of it."""
    from .config import ConfigError, load, resolve
    try:
        cfg = load(resolve(args.config))
        node = cfg.node(args.node)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG, "config") from None
    return cfg, node


def _local_nodes(args) -> list:
    """`status` with no resource (or `all`): (cfg, node name) for every resource of the
    configuration directory and each of its nodes on this host: --node, else the host
    name's node, else every node whose admin socket exists (a pair on one host)."""
    import socket as _s

    from .config import ConfigError, config_dir, load, resource_files
    files = resource_files()
    if not files:
        raise CliError(f"no resources configured in {config_dir()} (set BLOCKREP_CONFIG_DIR "
                       f"or name a .toml file)", EXIT_CONFIG, "config")
    out, seen = [], set()
    for path in files:
        try:
            cfg = load(path)
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_CONFIG, "config") from None
        if args.node:
            names = [args.node] if args.node in cfg.nodes else []
        elif _s.gethostname() in cfg.nodes:
            names = [_s.gethostname()]
        else:
            names = [n for n in cfg.nodes if os.path.exists(cfg.admin_socket(n))]
        out += [(cfg, n) for n in names if (cfg.name, n) not in seen]
        seen.update((cfg.name, n) for n in names)
    return out


def admin_connect(cfg, node: str, timeout: float = 30.0):
    """A connected socket to a running node's admin socket (or CliError). The directory
    must be controlled by root or this user only: anyone else could have put a fake
    server there."""
    import socket as _s

    from .shell.admin import check_run_dir

    path = cfg.admin_socket(node)
    denied = CliError(f"permission denied on admin socket {path}: node {node} takes "
                      f"requests from root, its own user and its admin-group only",
                      EXIT_PERMISSION, "permission-denied")
    try:
        os.lstat(path)
    except PermissionError:
        raise denied from None
    except OSError:
        raise CliError(f"node {node} of resource {cfg.name} is not running (no admin socket "
                       f"{path})", EXIT_NOT_RUNNING, "not-running") from None
    why = check_run_dir(os.path.dirname(path) or ".")
    if why:
        raise CliError(f"not trusting admin socket {path}: {why}", EXIT_PERMISSION,
                       "unsafe-run-dir")
    sock = _s.socket(_s.AF_UNIX, _s.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except PermissionError:
        sock.close()
        raise denied from None
    except OSError as exc:
        sock.close()
        raise CliError(f"node {node} of resource {cfg.name} is not running (admin socket "
                       f"{path}: {exc.strerror})", EXIT_NOT_RUNNING, "not-running") from None
    return sock


def admin_call(cfg, node: str, cmd: str, timeout: float = 30.0, **args):
    """One request to a running node's admin socket -> its result (or CliError)."""
    sock = admin_connect(cfg, node, timeout)
    try:
        with sock, sock.makefile("rwb") as f:
            f.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
            f.flush()
            line = f.readline()
    except TimeoutError:
        raise CliError(f"node {node} did not answer {cmd!r} within {timeout:g}s",
                       EXIT_TIMEOUT, "timeout") from None
    except OSError as exc:
        raise CliError(f"node {node}: admin connection failed: {exc.strerror}") from None
    if not line:
        raise CliError(f"node {node} closed the admin connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        code = reply.get("code", "error")
        status = _CODE_EXIT.get(code, EXIT_REFUSED if code != "error" else EXIT_ERROR)
        raise CliError(str(reply.get("error")), status, code)
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
                raise CliError(str(exc), EXIT_METADATA, "metadata", prog="blockrep up") from None
            except (OSError, ValueError) as exc:  # the disk or metadata file: missing, in use
                raise _disk_error("up", exc) from None
        await Node(cfg, node.name, store=store).run()

    from .shell.admin import AdminError
    try:
        uvloop.run(run())
    except AdminError as exc:
        raise CliError(str(exc), _CODE_EXIT.get(exc.code, EXIT_ERROR), exc.code,
                       prog="blockrep up") from None
    except (OSError, ValueError) as exc:
        raise CliError(str(exc), prog="blockrep up") from None
    return 0


def _print_result(args, result) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "result": result}))
    elif result is not None:
        print(result if isinstance(result, str) else json.dumps(result))


def _simple(cmd: str, **fixed):
    def run(args) -> int:
        cfg, node = _load_cfg(args)
        extra = {k: getattr(args, k) for k in fixed}
        _print_result(args, admin_call(cfg, node.name, cmd, **extra))
        return EXIT_OK
    return run


def cmd_status(args) -> int:
    from .shell.admin import format_status
    if args.config in (None, "all"):
        return _status_all(args)
    cfg, node = _load_cfg(args)
    if args.drbd:  # drbdsetup status --json's shape, for tools written for DRBD
        print(json.dumps(admin_call(cfg, node.name, "drbd-status"), indent=2))
        return EXIT_OK
    s = admin_call(cfg, node.name, "status")
    print(json.dumps(s, indent=1) if args.json else format_status(s))
    return EXIT_OK


def _status_all(args) -> int:
    """Every resource of this host, like `drbdadm status`: a node that is not running is
    listed as such (exit EXIT_NOT_RUNNING once all are shown)."""
    from .shell.admin import format_status
    results, down = [], 0
    for cfg, name in _local_nodes(args):
        try:
            results.append((cfg, name, admin_call(cfg, name, "drbd-status" if args.drbd
                                                  else "status"), None))
        except CliError as exc:
            if exc.kind != "not-running":
                raise
            down += 1
            results.append((cfg, name, None, exc))
    if args.drbd:
        print(json.dumps([r for _, _, res, _ in results if res for r in res], indent=2))
    elif args.json:
        print(json.dumps([res if res is not None else
                          {"resource": cfg.name, "node": name, "running": False,
                           "error": exc.message, "code": exc.kind}
                          for cfg, name, res, exc in results], indent=1))
    else:
        for cfg, name, res, exc in results:
            print(format_status(res) if res is not None else
                  f"{cfg.name} node:{name} not running")
    return EXIT_NOT_RUNNING if down else EXIT_OK


def _event_stream(args, request: dict):
    """The node's events, one decoded message at a time (the first carries the snapshot in
    `result`); an error answer raises CliError; Ctrl-C ends the stream quietly."""
    cfg, node = _load_cfg(args)
    sock = admin_connect(cfg, node.name, timeout=None)
    with sock, sock.makefile("rwb") as f:
        f.write((json.dumps(request) + "\n").encode())
        f.flush()
        try:
            for line in f:
                ev = json.loads(line)
                if ev.get("ok") is False:
                    raise CliError(str(ev.get("error")),
                                   _CODE_EXIT.get(ev.get("code"), EXIT_ERROR),
                                   ev.get("code", "error"))
                yield ev
        except KeyboardInterrupt:
            pass


def cmd_events(args) -> int:
    for ev in _event_stream(args, {"cmd": "events"}):
        if "result" in ev:
            ev = {"event": "exists", **{k: ev["result"][k] for k in
                  ("role", "disk", "connection", "replication", "out_of_sync_bytes")}}
        print(json.dumps(ev), flush=True)
    return EXIT_OK


def cmd_adjust(args) -> int:
    cfg, node = _load_cfg(args)
    res = admin_call(cfg, node.name, "adjust", path=os.path.abspath(cfg.path))
    if args.json:
        _print_result(args, res)
    else:
        print("\n".join(res["changed"]) or res.get("note", ""))
    return EXIT_OK


def cmd_events2(args) -> int:
    """The event stream in drbdsetup events2's shape (shell/events.py)."""
    from .shell.events import Events2
    r = Events2(statistics=args.statistics, timestamps=args.timestamps)
    for ev in _event_stream(args, {"cmd": "events", "args": {"statistics": args.statistics}}):
        out = r.exists(ev["result"], ev.get("wallclock")) if "result" in ev else r.event(ev)
        if out:
            print("\n".join(out), flush=True)
        if "result" in ev and args.now:
            break
    return EXIT_OK


def _wait_for_state(args, pred, what: str) -> int:
    """Poll the node's status until pred(status) holds, or fail after --timeout."""
    cfg, node = _load_cfg(args)
    deadline = time.monotonic() + args.timeout
    while True:
        s = admin_call(cfg, node.name, "status")
        if pred(s):
            _print_result(args, {k: s[k] for k in ("role", "disk", "connection",
                                                     "replication", "out_of_sync_bytes")}
                          if args.json else f"{what}: {s['connection']}, {s['replication']}, "
                          f"{s['disk']}/{s['peer']['disk']}")
            return EXIT_OK
        if time.monotonic() >= deadline:
            raise CliError(f"timed out after {args.timeout:g}s waiting for {what} (now "
                           f"{s['connection']}, {s['replication']}, disks "
                           f"{s['disk']}/{s['peer']['disk']})", EXIT_TIMEOUT, "timeout")
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def cmd_wait_connect(args) -> int:
    return _wait_for_state(args, lambda s: s["connection"] == "Connected"
                           and s["replication"] != "Off", "connected")


def cmd_wait_sync(args) -> int:
    return _wait_for_state(args, lambda s: s["replication"] == "Established"
                           and s["disk"] == "UpToDate" and s["peer"]["disk"] == "UpToDate",
                           "in sync")


def cmd_demo(args) -> int:
    from .demo import run_demo
    try:
        return run_demo(args)
    except SystemExit as exc:
        if isinstance(exc, CliError) or not isinstance(exc.code, str):
            raise
        raise CliError(exc.code.removeprefix("blockrep demo: "), prog="blockrep demo") from None


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
    s.add_argument("--json", action="store_true", help="errors as JSON on stdout")
    s.add_argument("--tls", choices=("off", "on", "require"), default="off",
                   help="NBD_OPT_STARTTLS: off, on (client's choice) or require")
    s.add_argument("--tls-cert", help="server certificate (PEM) for --tls on/require")
    s.add_argument("--tls-key", help="server private key (PEM)")
    s.add_argument("--tls-ca", help="CA certificate(s) (PEM) for client certificates")
    s.add_argument("--tls-verify-client", action="store_true",
                   help="require a client certificate signed by --tls-ca")
    s.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="seconds from accept to the end of the handshake (default 10)")
    s.add_argument("--max-handshakes", type=int, default=64,
                   help="connections in the handshake at once; the oldest is dropped "
                        "(default 64)")
    s.add_argument("--busy-poll", type=float, default=0.0, metavar="USEC",
                   help="keep polling the sockets this many microseconds after each "
                        "request instead of sleeping: lower latency at queue depth 1 for "
                        "CPU time (default 0: off)")
    s.set_defaults(func=cmd_serve)

    def res_cmd(name, helptext, func, *, optional=False):
        c = sub.add_parser(name, help=helptext)
        what = ("a resource's name (its file in the configuration directory, "
                "BLOCKREP_CONFIG_DIR or /etc/blockrep) or the path of its .toml file")
        c.add_argument("config", nargs="?" if optional else None, metavar="RESOURCE",
                       help=what + ('; with none, or "all", every resource of this host'
                                    if optional else ""))
        c.add_argument("--node", help="this node's name (default: the host name)")
        c.add_argument("--json", action="store_true",
                       help="machine-readable output, errors included")
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
    res_cmd("attach", "bring back a detached disk (repaired or replaced at the configured "
            "path): full sync from the peer", _simple("attach"))
    c = res_cmd("protocol", "switch the running resource's replication protocol",
                _simple("protocol", protocol=None))
    c.add_argument("protocol", choices=("A", "B", "C"),
                   help="A: ack when queued for the peer, B: when the peer has received "
                        "it, C: when it is on the peer's disk")
    c = res_cmd("status", "show the resource's state (every resource's, with none named)",
                cmd_status, optional=True)
    c.add_argument("--drbd", action="store_true",
                   help="JSON in the shape of `drbdsetup status --json` (resources with "
                        "devices, connections and peer_devices)")
    for name, helptext, func in (
            ("wait-connect", "wait until the peer is connected", cmd_wait_connect),
            ("wait-sync", "wait until both disks are UpToDate and no resync runs",
             cmd_wait_sync)):
        c = res_cmd(name, helptext, func)
        c.add_argument("--timeout", type=float, default=60.0,
                       help=f"give up after this many seconds (exit {EXIT_TIMEOUT}; "
                            f"default 60)")
    res_cmd("events", "print state changes as JSON lines until interrupted", cmd_events)
    c = res_cmd("events2", "state changes in drbdsetup events2's shape: an 'exists' dump "
                "ending with 'exists -', then 'change' lines (old->new)", cmd_events2)
    c.add_argument("--now", action="store_true", help="print the 'exists' dump and exit")
    c.add_argument("--statistics", action="store_true",
                   help="sizes, counters, resync/verify progress every second")
    c.add_argument("--timestamps", action="store_true",
                   help="prefix each line with the wall-clock time (ISO 8601)")
    res_cmd("verify", "online verify: compare the disks block by block", _simple("verify"))
    res_cmd("resync", "copy what is marked out of sync (e.g. after verify)",
            _simple("resync"))
    res_cmd("invalidate", "discard local data: full resync from the peer",
            _simple("invalidate"))
    res_cmd("adjust", "apply the configuration's changed tunables to the running node",
            cmd_adjust)
    res_cmd("resume-io", "resume client I/O suspended by fencing", _simple("resume-io"))
    c = res_cmd("create-md", "create metadata for this node", cmd_create_md)
    c.add_argument("--force", action="store_true", help="overwrite existing metadata")
    res_cmd("dump-md", "print this node's metadata (node must be down)", cmd_dump_md)

    d = sub.add_parser("demo", help="two replicated nodes on loopback with defaults")
    d.add_argument("--dir", default="state/demo", help="state directory (default state/demo)")
    d.add_argument("--size", default="1G", help="size of each disk image (default 1G)")
    d.add_argument("--nbd-port", type=int, default=10809, help="NBD port of the primary")
    d.add_argument("--duration", type=float, default=0,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    d.add_argument("--json", action="store_true", help="errors as JSON on stdout")
    d.set_defaults(func=cmd_demo)
    return p


def _disk_error(cmd: str, exc: Exception) -> CliError:
    """A disk that cannot be used (DiskError is one line); in use -> EXIT_METADATA."""
    if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
        return CliError(str(exc), EXIT_METADATA, "in-use", prog=f"blockrep {cmd}")
    return CliError(str(exc), prog=f"blockrep {cmd}")


def cmd_create_md(args) -> int:
    from .meta import MetaError, create_md
    cfg, node = _load_cfg(args)
    try:
        _print_result(args, create_md(cfg, node, force=args.force))
    except MetaError as exc:
        raise CliError(str(exc), EXIT_METADATA, "metadata", prog="blockrep create-md") \
            from None
    except (OSError, ValueError) as exc:  # the disk or metadata file: missing, in use
        raise _disk_error("create-md", exc) from None
    return EXIT_OK


def cmd_dump_md(args) -> int:
    from .meta import MetaError, dump_md
    cfg, node = _load_cfg(args)
    try:
        _print_result(args, dump_md(cfg, node))
    except MetaError as exc:
        raise CliError(str(exc), EXIT_METADATA, "metadata", prog="blockrep dump-md") \
            from None
    except (OSError, ValueError) as exc:  # the disk or metadata file: missing, in use
        raise _disk_error("dump-md", exc) from None
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        try:
            return args.func(args)
        except CliError as exc:
            if getattr(args, "json", False):
                print(json.dumps({"ok": False, "error": exc.message, "code": exc.kind,
                                  "exit": exc.code}))
            else:
                print(f"{exc.prog}: {exc.message}", file=sys.stderr)
            return exc.code
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # `blockrep status | head`: the reader is gone; no traceback, no second error
        # when Python flushes stdout on exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
