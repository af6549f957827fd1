"""A userspace TCP link proxy that shapes and breaks connections, for tests, tools/soak and
benchmarks over a "distant" link.

Clients connect to the proxy's listening address; each connection is forwarded to `target`.
Per direction (`fwd`: client -> target, `rev`: target -> client) it applies the link model of
`shaping` (bandwidth cap, one-way delay, jitter). Faults, switchable at run time:
- `cut`: reset both sides of every current connection (new ones are accepted again);
- `refuse`: new connections are reset at once (with `cut`: a lasting partition);
- `blackhole`: sockets stay open and nothing is forwarded in either direction (bytes are held,
  as TCP would retransmit them, or dropped with drop=True); new connections are held too;
- `flip`: XOR one byte (the middle, or byte `at`, of the next chunk of at least `min_chunk`
  bytes) in a direction, `count` times: corruption that TCP's checksum missed.

Three ways to drive it: `LinkProxy` in an asyncio program, `ProxyThread` from synchronous
code (its own loop in a thread), and the command line with a control socket:

    python -m blockrep.faults.proxy --listen 127.0.0.1:7000 --to 127.0.0.1:7789 \\
        --delay-ms 25 --rate 100M --control /tmp/proxy.sock
    python -m blockrep.faults.proxy ctl /tmp/proxy.sock blackhole on=true
    python -m blockrep.faults.proxy ctl /tmp/proxy.sock shape direction=fwd delay_ms=50

(SIGUSR1 toggles the blackhole, SIGUSR2 cuts.) Every command is one JSON line on the control
socket, {"cmd": ..., "args": {...}}, answered by {"ok": true, "result": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import sys
import threading
import time

import uvloop

from .shaping import Schedule, Shape, parse_rate

FWD, REV = "fwd", "rev"
DIRECTIONS = (FWD, REV)
READ_SIZE = 64 * 1024
DEFAULT_BUFFER = 4 * 1024 * 1024  # bytes a direction may hold before it stops reading


class ProxyError(Exception):
    """A bad control command."""


def _directions(direction: str) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ProxyError(f"bad direction {direction!r} (fwd, rev or both)")
    return (direction,)


class _Pipe:
    """One direction of one proxied connection: read, corrupt/schedule, hold, write."""

    def __init__(self, proxy: LinkProxy, direction: str, reader, writer):
        self.proxy, self.direction = proxy, direction
        self.reader, self.writer = reader, writer
        self.sched = Schedule(proxy.shapes[direction], proxy.rng)
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.changed = asyncio.Event()  # queue or blackhole changed

    async def pump_in(self) -> None:
        p = self.proxy
        while True:
            data = await self.reader.read(READ_SIZE)
            if not data:
                break
            while not p.flowing.is_set() and not p.drop:
                await p.flowing.wait()
            if not p.flowing.is_set():  # blackhole, drop mode
                continue
            data = p._maybe_flip(self.direction, data)
            self.sched.shape = p.shapes[self.direction]
            # time.monotonic, not loop.time: uvloop's clock is cached per iteration and its
            # timers have millisecond granularity, so a delay could come out short
            self.queue.append((self.sched.release_time(time.monotonic(), len(data)), data))
            self.queued += len(data)
            self.changed.set()
            hold = self.sched.shape.holds()
            while self.queued >= (min(hold, p.buffer_bytes) if hold else p.buffer_bytes):
                self.changed.clear()
                await self.changed.wait()
        self.queue.append((0.0, b""))  # EOF marker
        self.changed.set()

    async def pump_out(self) -> None:
        p = self.proxy
        while True:
            while not self.queue:
                self.changed.clear()
                await self.changed.wait()
            release, data = self.queue[0]
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            while (wait := release - time.monotonic()) > 0:  # never early
                await asyncio.sleep(wait)
            await p.flowing.wait()
            self.queue.popleft()
            self.queued -= len(data)
            self.changed.set()
            self.writer.write(data)
            p.bytes[self.direction] += len(data)
            await self.writer.drain()


class _Conn:
    def __init__(self, proxy: LinkProxy, creader, cwriter):
        self.proxy = proxy
        self.creader, self.cwriter = creader, cwriter
        self.uwriter = None
        self.main: asyncio.Task | None = None

    def abort(self) -> None:
        """Reset both sides at once (RST, queued bytes dropped)."""
        for w in (self.cwriter, self.uwriter):
            if w is not None and not w.transport.is_closing():
                w.transport.abort()
        if self.main is not None:
            self.main.cancel()

    async def run(self) -> None:
        p = self.proxy
        self.main = asyncio.current_task()
        tasks: list[asyncio.Task] = []
        clean = False
        try:
            await p.flowing.wait()  # a blackholed link does not even connect
            ureader, self.uwriter = await asyncio.open_connection(*p.target)
            for w, inbound in ((self.cwriter, FWD), (self.uwriter, REV)):
                sock = w.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hold = p.shapes[inbound].holds()
                if hold:  # a shaped direction: the kernel buffers no more than the link
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, hold)
            pipes = (_Pipe(p, FWD, self.creader, self.uwriter),
                     _Pipe(p, REV, ureader, self.cwriter))
            tasks = [asyncio.ensure_future(f()) for pipe in pipes
                     for f in (pipe.pump_in, pipe.pump_out)]
            await asyncio.gather(*tasks)
            clean = True  # both directions ended with EOF and everything was delivered
        except (OSError, RuntimeError, asyncio.CancelledError):
            pass  # RuntimeError: uvloop's write on a transport that a cut just closed
        finally:
            for t in tasks:
                t.cancel()
            # reap them: a pending task destroyed later logs from inside the GC
            await asyncio.gather(*tasks, return_exceptions=True)
            if clean:
                for w in (self.cwriter, self.uwriter):
                    w.close()
            else:
                self.main = None
                self.abort()
            p.conns.discard(self)


class LinkProxy:
    """The proxy in an asyncio loop: `await start()`, drive it, `await close()`."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 seed: int | None = None, buffer_bytes: int = DEFAULT_BUFFER):
        self.target = target
        self.listen = listen
        self.rng = random.Random(seed)
        self.buffer_bytes = buffer_bytes
        self.shapes = {d: Shape() for d in DIRECTIONS}
        self.flips = {d: [0, 1, None] for d in DIRECTIONS}  # remaining, min chunk, position
        self.refusing = False
        self.drop = False
        self.flowing: asyncio.Event | None = None
        self.conns: set[_Conn] = set()
        self.server: asyncio.AbstractServer | None = None
        self.bytes = {d: 0 for d in DIRECTIONS}
        self.counts = collections.Counter()
        self.flipped: list[dict] = []

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> int:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server = await asyncio.start_server(self._accept, *self.listen,
                                                 reuse_address=True)
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        mains = [c.main for c in self.conns if c.main is not None]
        for c in list(self.conns):
            c.abort()
        self.flowing.set()
        await asyncio.gather(*mains, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _accept(self, reader, writer) -> None:
        self.counts["accepted"] += 1
        if self.refusing:
            self.counts["refused"] += 1
            writer.transport.abort()
            return
        conn = _Conn(self, reader, writer)
        self.conns.add(conn)
        await conn.run()

    def _maybe_flip(self, direction: str, data: bytes) -> bytes:
        armed = self.flips[direction]
        if armed[0] <= 0 or len(data) < armed[1]:
            return data
        armed[0] -= 1
        buf = bytearray(data)
        pos = len(buf) // 2 if armed[2] is None else min(armed[2], len(buf) - 1)
        buf[pos] ^= 0xFF
        self.counts["flipped"] += 1
        self.flipped.append({"direction": direction, "chunk_bytes": len(buf), "at": pos,
                             "stream_offset": self.bytes[direction] + pos})
        return bytes(buf)

    # -- controls ----------------------------------------------------------------------------
    def shape(self, direction: str = "both", delay_ms: float | None = None,
              jitter_ms: float | None = None, rate: str | float | None = None) -> dict:
        """Change delay/jitter/rate (rate in bits per second: 100M, 1G, 0 = unlimited)."""
        for d in _directions(direction):
            s = self.shapes[d]
            new = Shape(s.delay if delay_ms is None else float(delay_ms) / 1000,
                        s.jitter if jitter_ms is None else float(jitter_ms) / 1000,
                        s.rate if rate is None else parse_rate(rate))
            if new.delay < 0 or new.jitter < 0:
                raise ProxyError("delay and jitter must be ≥ 0")
            self.shapes[d] = new
        return {d: self.shapes[d].describe() for d in DIRECTIONS}

    def cut(self) -> int:
        """Reset every current connection; returns how many."""
        n = len(self.conns)
        for c in list(self.conns):
            c.abort()
        self.counts["cuts"] += 1
        return n

    def refuse(self, on: bool = True) -> bool:
        self.refusing = bool(on)
        return self.refusing

    def blackhole(self, on: bool = True, drop: bool = False) -> bool:
        self.drop = bool(drop)
        if on:
            if self.flowing.is_set():
                self.counts["blackholes"] += 1
            self.flowing.clear()
        else:
            self.flowing.set()
        return bool(on)

    def flip(self, direction: str = FWD, count: int = 1, min_chunk: int = 1,
             at: int | None = None) -> dict:
        """XOR 0xFF into one byte of each of the next `count` chunks of at least `min_chunk`
        bytes: the byte at `at` in the chunk, or its middle byte."""
        for d in _directions(direction):
            self.flips[d] = [int(count), max(1, int(min_chunk)), None if at is None
                             else max(0, int(at))]
        return {d: self.flips[d][0] for d in DIRECTIONS}

    def reset(self) -> None:
        """Back to a clean, unshaped link (connections are kept)."""
        self.shapes = {d: Shape() for d in DIRECTIONS}
        self.flips = {d: [0, 1, None] for d in DIRECTIONS}
        self.refusing = False
        self.blackhole(False)

    def stats(self) -> dict:
        return {"listen": f"{self.listen[0]}:{self.port}",
                "target": f"{self.target[0]}:{self.target[1]}",
                "connections": len(self.conns), "bytes": dict(self.bytes),
                "counts": dict(self.counts), "flipped": list(self.flipped),
                "blackhole": not self.flowing.is_set(), "refusing": self.refusing,
                "shape": {d: self.shapes[d].describe() for d in DIRECTIONS}}

    def command(self, cmd: str, **args):
        """The control protocol: one command by name (used by sockets and threads)."""
        fn = {"shape": self.shape, "cut": self.cut, "refuse": self.refuse,
              "blackhole": self.blackhole, "flip": self.flip, "reset": self.reset,
              "stats": self.stats}.get(cmd)
        if fn is None:
            raise ProxyError(f"unknown command {cmd!r}")
        try:
            return fn(**args)
        except (TypeError, ValueError) as exc:
            raise ProxyError(f"{cmd}: {exc}") from None

    async def serve_control(self, path: str) -> asyncio.AbstractServer:
        """Answer JSON-line commands on a unix socket at `path`."""
        async def client(reader, writer):
            try:
                while line := await reader.readline():
                    try:
                        req = json.loads(line)
                        reply = {"ok": True, "result": self.command(req.get("cmd"),
                                                                    **req.get("args", {}))}
                    except (ProxyError, ValueError, AttributeError) as exc:
                        reply = {"ok": False, "error": str(exc)}
                    writer.write((json.dumps(reply) + "\n").encode())
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
        if os.path.exists(path):
            os.unlink(path)
        return await asyncio.start_unix_server(client, path)


class ProxyThread:
    """A LinkProxy on its own event loop in a daemon thread, driven from synchronous code:
    `with ProxyThread(("127.0.0.1", port)) as p: p.shape(delay_ms=20); p.cut() ...`."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 **kw):
        self.proxy = LinkProxy(target, listen, **kw)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="link-proxy")
        self.thread.start()
        self.port = self._run(self.proxy.start())

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def command(self, cmd: str, **args):
        async def call():
            return self.proxy.command(cmd, **args)
        return self._run(call())

    def shape(self, **kw):
        return self.command("shape", **kw)

    def cut(self) -> int:
        return self.command("cut")

    def refuse(self, on: bool = True):
        return self.command("refuse", on=on)

    def blackhole(self, on: bool = True, drop: bool = False):
        return self.command("blackhole", on=on, drop=drop)

    def flip(self, **kw):
        return self.command("flip", **kw)

    def reset(self):
        return self.command("reset")

    def stats(self) -> dict:
        return self.command("stats")

    def close(self) -> None:
        if self.loop.is_closed():
            return
        async def shutdown():
            await self.proxy.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        self._run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def control(path: str, cmd: str, timeout: float = 10.0, **args):
    """Send one command to a proxy's control socket; returns its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with s.makefile("rwb") as f:
            f.write((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
            f.flush()
            reply = json.loads(f.readline() or b'{"ok": false, "error": "no reply"}')
    if not reply.get("ok"):
        raise ProxyError(reply.get("error"))
    return reply["result"]


# -- command line ---------------------------------------------------------------------------------

def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad address {text!r} (expected HOST:PORT)")
    return host or "127.0.0.1", int(port)


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _ctl_main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m blockrep.faults.proxy ctl SOCKET CMD [key=value ...]",
              file=sys.stderr)
        return 2
    path, cmd, *pairs = argv
    args = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep:
            print(f"bad argument {pair!r} (expected key=value)", file=sys.stderr)
            return 2
        args[key] = _value(val)
    try:
        print(json.dumps(control(path, cmd, **args)))
    except (ProxyError, OSError) as exc:
        print(f"proxy ctl: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(args) -> None:
    proxy = LinkProxy(args.to, args.listen, seed=args.seed)
    port = await proxy.start()
    proxy.shape(delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, rate=args.rate)
    ctl = await proxy.serve_control(args.control) if args.control else None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1,
                            lambda: proxy.blackhole(proxy.flowing.is_set()))
    loop.add_signal_handler(signal.SIGUSR2, proxy.cut)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {args.listen[0]}:{port} -> {args.to[0]}:{args.to[1]}", flush=True)
    await stop.wait()
    if ctl is not None:
        ctl.close()
        os.unlink(args.control)
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        return _ctl_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m blockrep.faults.proxy",
                                 description="TCP link proxy with delay, jitter, bandwidth "
                                 "cap, cut, blackhole and byte flips (see the module's doc)")
    ap.add_argument("--listen", type=_addr, required=True, help="HOST:PORT (port 0: any)")
    ap.add_argument("--to", type=_addr, required=True, help="target HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each way")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="extra delay in [0, J]")
    ap.add_argument("--rate", default="0", help="bandwidth cap each way, bits/s (100M, 1G)")
    ap.add_argument("--control", help="unix socket for run-time commands (see `ctl`)")
    ap.add_argument("--seed", type=int, help="seed of the jitter")
    args = ap.parse_args(argv)
    try:
        parse_rate(args.rate)
    except ValueError as exc:
        ap.error(str(exc))
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
