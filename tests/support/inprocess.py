"""In-process test kit for the asyncio shell: an in-memory link, a fault-injecting disk, and
two Nodes joined by that link on one event loop (no sockets, no subprocesses).

    from support.inprocess import FaultyDisk, MemoryLink, Pair, run  # tests/ is on sys.path

- `MemoryTransport` / `connect(a, b)`: real PeerLink protocols on both ends, bytes handed
  across with `call_soon` in order; `hold()` keeps what one side sends back (a packet "on
  the wire"), `release()` delivers it, `cut()` drops the connection on both sides.
- `FaultyDisk`: a real `Disk` whose calls can fail (`fail`: EIO/ENOSPC... for chosen calls
  and ranges) or wait for the test (`hold`: a call running in an I/O thread blocks until
  `Gate.release()`, which reorders completions; calls on the event loop pass); `no_punch` makes hole punching and zero
  ranges unsupported, like a backing file system that cannot. (In-process, at the Disk
  API; `blockrep.faults.disk.FaultyDisk` is the out-of-process one: nbdkit's error filter
  behind nbdfuse, for tests that run real node processes.)
- `Pair`: alpha (Primary) and beta (Secondary), both UpToDate with the same data, connected;
  `compression=` "lz4" for both, or {"alpha": "zstd", "beta": "none"} for each its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import threading
from unittest import mock

from blockrep import state as st
from blockrep.config import NodeConfig, ResourceConfig
from blockrep.disk import FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, Disk
from blockrep.nbd.handshake import make_export
from blockrep.peer import compress
from blockrep.shell import admin
from blockrep.shell import node as node_mod
from blockrep.shell.link import PeerLink
from blockrep.shell.nbd_server import NbdServer
from blockrep.state import DiskState, ReplState

DEADLINE = 10.0  # seconds any single wait in these tests may take


def run(coro, timeout: float = 30.0):
    """Run one test coroutine on a fresh event loop, with a deadline."""
    async def main():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


async def wait_until(pred, what: str = "condition", timeout: float = DEADLINE):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def settle(steps: int = 20):
    """Let queued callbacks (link deliveries, acks) run."""
    for _ in range(steps):
        await asyncio.sleep(0)


# -- the in-memory link --------------------------------------------------------------------
class MemoryTransport(asyncio.Transport):
    """One end of an in-memory stream connection feeding an asyncio.BufferedProtocol."""

    def __init__(self, loop, protocol, name: str):
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.name = name
        self.peer: MemoryTransport | None = None
        self.closing = False
        self.holding = False
        self.held: list[bytes] = []
        self.paused = False
        self.inbox: list[bytes] = []
        self.sent = 0

    def get_extra_info(self, name, default=None):
        return {"peername": (self.name, 0)}.get(name, default)

    # sending
    def write(self, data):
        self.writelines([data])

    def writelines(self, parts):
        if self.closing:
            return
        data = b"".join(bytes(p) for p in parts)  # copied now, like a socket buffer
        self.sent += len(data)
        if self.holding:
            self.held.append(data)
        else:
            self.loop.call_soon(self.peer._receive, data)

    def hold(self) -> None:
        """Keep everything this end sends from now on (it is 'on the wire')."""
        self.holding = True

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for data in held:
            self.loop.call_soon(self.peer._receive, data)

    # receiving
    def _receive(self, data: bytes) -> None:
        if self.closing:
            return
        if self.paused:
            self.inbox.append(data)
            return
        proto = self.protocol
        mv = memoryview(data)
        while mv and not self.closing:
            buf = proto.get_buffer(len(mv))
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            proto.buffer_updated(n)

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False
        inbox, self.inbox = self.inbox, []
        for data in inbox:
            self._receive(data)

    def is_reading(self):
        return not self.paused

    # closing
    def is_closing(self):
        return self.closing

    def close(self):
        self._lose(None)

    def abort(self):
        self._lose(None)

    def _lose(self, exc) -> None:
        for t in (self, self.peer):
            if t is not None and not t.closing:
                t.closing = True
                self.loop.call_soon(t.protocol.connection_lost, exc)


class MemoryLink:
    """Two PeerLinks joined in memory: `a` belongs to the dialing node."""

    def __init__(self, a_node, b_node):
        loop = asyncio.get_running_loop()
        self.a = PeerLink(a_node, outbound=True)
        self.b = PeerLink(b_node, outbound=False)
        self.ta = MemoryTransport(loop, self.a, a_node.name)
        self.tb = MemoryTransport(loop, self.b, b_node.name)
        self.ta.peer, self.tb.peer = self.tb, self.ta
        self.b.connection_made(self.tb)
        self.a.connection_made(self.ta)

    def cut(self) -> None:
        self.ta.abort()


async def connect(a_node, b_node) -> MemoryLink:
    link = MemoryLink(a_node, b_node)
    await wait_until(lambda: a_node.link is link.a and b_node.link is link.b and
                     a_node.repl != ReplState.OFF and b_node.repl != ReplState.OFF,
                     "link established")
    return link


# -- the faulty disk -----------------------------------------------------------------------
class Gate:
    """Holds matching disk calls made in I/O threads until released."""

    def __init__(self, call: str, offset: int, length: int, times: int | None):
        self.call, self.offset, self.length, self.times = call, offset, length, times
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.waiting = 0

    def release(self) -> None:
        self.opened.set()


class Fault:
    def __init__(self, call, offset, length, err, times):
        self.call, self.offset, self.length, self.err, self.times = \
            call, offset, length, err, times
        self.hits = 0


def _matches(rule, call: str, offset: int, length: int) -> bool:
    return rule.call == call and offset < rule.offset + rule.length and \
        rule.offset < offset + max(length, 1) and (rule.times is None or rule.times > 0)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class FaultyDisk(Disk):
    """A Disk whose calls fail or wait on the test's say (see the module docstring)."""

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.faults: list[Fault] = []
        self.gates: list[Gate] = []
        self.no_punch = False
        self.lock = threading.Lock()

    def fail(self, call: str, offset: int = 0, length: int = 1 << 62, err: int = errno.EIO,
             times: int | None = None) -> Fault:
        f = Fault(call, offset, length, err, times)
        self.faults.append(f)
        return f

    def hold(self, call: str, offset: int = 0, length: int = 1 << 62,
             times: int | None = 1) -> Gate:
        g = Gate(call, offset, length, times)
        self.gates.append(g)
        return g

    def _check(self, call: str, offset: int, length: int) -> None:
        gate = None
        with self.lock:
            for f in self.faults:
                if _matches(f, call, offset, length):
                    f.hits += 1
                    if f.times is not None:
                        f.times -= 1
                    raise OSError(f.err, f"injected {os.strerror(f.err)} in {call} at "
                                         f"{offset}+{length}")
            on_loop = _on_event_loop()
            for g in self.gates:
                if not on_loop and _matches(g, call, offset, length):
                    if g.times is not None:
                        g.times -= 1
                    gate = g
                    break
        if gate is not None:
            gate.entered.set()
            if not gate.opened.wait(DEADLINE):
                raise OSError(errno.ETIMEDOUT, "gate never released")

    def write(self, offset, data, fua=False):
        self._check("write", offset, len(data))
        super().write(offset, data, fua)

    def read(self, offset, length):
        self._check("read", offset, length)
        return super().read(offset, length)

    def readinto(self, offset, buf):
        self._check("read", offset, len(buf))
        super().readinto(offset, buf)

    def flush(self):
        self._check("flush", 0, 0)
        super().flush()

    def trim(self, offset, length, fua=False):
        self._check("trim", offset, length)
        super().trim(offset, length, fua)

    def zero(self, offset, length, **kw):
        self._check("zero", offset, length)
        super().zero(offset, length, **kw)

    def _fallocate(self, mode, offset, length):
        if self.no_punch and mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, "hole punching not supported here")
        super()._fallocate(mode, offset, length)


# -- two nodes -----------------------------------------------------------------------------
def make_config(tmp_path, size: int) -> ResourceConfig:
    nodes = {}
    for i, name in enumerate(("alpha", "beta")):
        path = os.path.join(str(tmp_path), f"{name}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        nodes[name] = NodeConfig(name=name, address=("127.0.0.1", 1 + i), disk=path,
                                 nbd=("127.0.0.1", 11 + i))
    return ResourceConfig(path="<in-process>", name="r0", shared_secret="test", nodes=nodes,
                          run_dir=str(tmp_path))


class Done:
    """A completion callback `cb(cookie, err)` the test can await."""

    def __init__(self):
        self.fut = asyncio.get_running_loop().create_future()

    def __call__(self, cookie, err):
        assert not self.fut.done(), "request completed twice"
        self.fut.set_result(err)

    @property
    def done(self) -> bool:
        return self.fut.done()

    @property
    def err(self):
        return self.fut.result() if self.fut.done() else None

    def __await__(self):
        return asyncio.wait_for(asyncio.shield(self.fut), DEADLINE).__await__()


class Pair:
    """alpha and beta on this loop, same data, both UpToDate; `await pair.start()` connects
    them and makes alpha Primary."""

    def __init__(self, tmp_path, size: int = 16 << 20, store_factory=None,
                 compression: str | dict = "none"):
        self.cfg = make_config(tmp_path, size)
        self.size = size
        with mock.patch.object(node_mod, "Disk", FaultyDisk):
            self.alpha, self.beta = (
                node_mod.Node(_node_cfg(self.cfg, name, compression), name,
                              store=_store(store_factory, self.cfg, name))
                for name in ("alpha", "beta"))
        gen = st.new_uuid()
        for n in (self.alpha, self.beta):
            n.gen.__dict__.update(st.Generation(current=gen).__dict__)  # the store's too
            n.disk_state = DiskState.UP_TO_DATE
            n.nbd = NbdServer(n.disk, make_export("", n.size), target=n.replicator)
            n.nbd.read_error = n.diskless.read_failed  # as Node.start wires it
        self.link: MemoryLink | None = None

    async def start(self, primary: bool = True) -> "Pair":
        self.link = await connect(self.alpha, self.beta)
        if primary:
            assert admin.cmd_primary(self.alpha) == "Primary"
            await settle()
        return self

    async def reconnect(self) -> MemoryLink:
        self.link = await connect(self.alpha, self.beta)
        return self.link

    async def resynced(self) -> None:
        """Both Established again (the resync done) and beta's applier idle."""
        await wait_until(lambda: self.alpha.repl == ReplState.ESTABLISHED and
                         self.beta.repl == ReplState.ESTABLISHED, "resync done")
        await wait_until(lambda: self.beta.applier.idle, "applier idle")

    async def cut(self) -> None:
        self.link.cut()
        await wait_until(lambda: self.alpha.link is None and self.beta.link is None,
                         "both sides saw the link go")

    def submit(self, node, kind, offset, length=None, data=None, *, fua=False, may_trim=True,
               fast_zero=False) -> Done:
        done = Done()
        if length is None:
            length = len(data) if data is not None else 0
        node.replicator.submit(kind, offset, length, data, fua, may_trim, fast_zero, done, 0)
        return done

    def read(self, node, offset, length) -> bytes:
        return Disk.read(node.disk, offset, length)

    async def close(self) -> None:
        for n in (self.alpha, self.beta):
            for link in [n.link, *n.handshaking]:
                if link is not None:
                    link.abort("test over")
        for n in (self.alpha, self.beta):
            for g in getattr(n.disk, "gates", []):
                g.release()
        for _ in range(3):  # let thread completions come back and held-back work finish
            await asyncio.sleep(0.01)
            await settle()
        for n in (self.alpha, self.beta):
            n.executor.shutdown(wait=True)
            n.nbd.executor.shutdown(wait=True)
        await settle()
        for n in (self.alpha, self.beta):
            if n.store is not None:
                n.store.close()
            else:
                n.disk.close()


def _node_cfg(cfg, name: str, compression: str | dict) -> ResourceConfig:
    """The resource as `name` has it configured: its own `compression` setting."""
    setting = compression.get(name, "none") if isinstance(compression, dict) else compression
    if setting == "none":
        return cfg
    alg, level = compress.parse(setting)
    return dataclasses.replace(cfg, compression=alg, compression_level=level)


def _store(factory, cfg, name):
    return factory(cfg, name) if factory is not None else None


def metastore(cfg, name):
    """A store_factory for Pair: internal metadata (activity log, bitmap) on a FaultyDisk."""
    from blockrep import meta
    with mock.patch.object(meta, "Disk", FaultyDisk):
        meta.create_md(cfg, cfg.node(name), force=True)
        return meta.open_store(cfg, cfg.node(name))


def pattern(tag: int, length: int) -> bytes:
    """Recognisable data: every 8 bytes say `tag`."""
    return (tag.to_bytes(8, "little") * (length // 8 + 1))[:length]
