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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockrep", description=__doc__)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
