"""tools/soak: two blockrep nodes for N minutes under a versioned writer while faults are
injected at random, then a check that nothing acknowledged was lost.

Setup: two images, one resource (alpha dials beta through the link proxy of
blockrep/faults/proxy.py), alpha promoted on blank disks. A writer (blockrep/faults/writer.py)
keeps `--qd` 4 KiB writes in flight to the current Primary over NBD; every block carries its
number and a version, and every acknowledgement is recorded. Every few seconds one fault:

  kill-secondary   kill -9 of the Secondary, restarted after a pause
  kill-primary     SIGSTOP, then kill -9 of the Primary; if the Secondary was still
                   Connected, Established and UpToDate it is promoted (failover) and the
                   old Primary later restarts as Secondary, otherwise the old Primary
                   restarts and is promoted again
  stop             SIGSTOP of either node for 0.5-6 s (often longer than `timeout`), SIGCONT
  cut              both directions of the link reset, reconnects refused for 0.5-5 s
  blackhole        the link silently stops forwarding for 1-6 s
  flip             one byte of the next link chunk of at least 40 bytes (header or payload,
                   either direction) is inverted: the header checksum or the payload CRC
                   catches it, the link drops, reconnects and resyncs
  disk-eio         (--disk-faults) either node's disk fails writes with EIO for 0.5-2 s,
                   through nbdkit's error filter behind nbdfuse; on-io-error = detach makes
                   it Diskless. A Secondary: the Primary marks everything from then on;
                   once the disk is healed the soak runs `attach` and the full sync brings
                   it back. The Primary (chosen only while the pair is in sync: it
                   detaches only while its peer holds every block): it goes on Diskless,
                   its I/O through the peer, for a while; then the soak moves the clients
                   (switchover: clients off, `secondary`, the peer promoted, clients to
                   it; attach on a Primary is refused) and attaches the old disk

With --fio, fio verify=crc32c jobs run back to back beside the writer on the region after
its blocks. At the end: every fault undone, both nodes running, a Primary, the last fio job
finished (or stopped after 30 s: interrupted), the writer drained, the sync awaited;
every block is read from the Primary and checked against the ledger (the latest
acknowledged version or a later one that was in flight), both data areas are compared, and
the summary printed. `--hold` scales every fault's duration (0.3: faults three times as
dense); `--pairs N` runs N independent pairs (own images, proxy, writer, seed + i) at once in
one process and adds their figures up. Exit status 1 on any lost or corrupt block, differing disks, or a node
left stuck (not Connected/Established/UpToDate in sync, or not answering).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blockrep.faults.disk import FaultyDisk  # noqa: E402
from blockrep.faults.node import NodeProcess  # noqa: E402
from blockrep.faults.proxy import LinkProxy  # noqa: E402
from blockrep.faults.writer import BLOCK, Ledger, NbdClient, make_block  # noqa: E402
from blockrep.peer.proto import HEADER_SIZE  # noqa: E402

PY = sys.executable
KINDS = ("kill-secondary", "kill-primary", "stop", "cut", "blackhole", "flip")
TIMEOUT = 3.0
FIO_GRACE = 30.0  # seconds the last fio job gets to finish at the end, then it is stopped


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = args.dir or tempfile.mkdtemp(prefix="blockrep-soak-")
        self.scale = args.hold
        os.makedirs(os.path.join(self.dir, "run"), exist_ok=True)
        self.nodes = {n: NodeProcess(self.dir, n, PY, ROOT) for n in ("alpha", "beta")}
        self.kinds = list(KINDS) + (["disk-eio"] if args.disk_faults else [])
        self.faults = collections.Counter()
        self.notes: list[str] = []
        self.ledger = Ledger(args.blocks)
        self.run_id = self.rng.getrandbits(63)
        self.primary: str | None = None
        self.last_primary = "alpha"  # holds every acknowledged write
        self.proxy: LinkProxy | None = None
        self.writing = True
        self.last_ack = time.monotonic()
        self.longest_gap = 0.0
        self.reconnects = 0
        self.size = 0
        self.client_epoch = 0  # bumped by faults that may fail a client's requests
        self.fio = collections.Counter()
        self.fio_proc: asyncio.subprocess.Process | None = None
        self.fio_stopped = False  # the running job was stopped by the soak: interrupted

    def kill_fio(self, term: bool = False) -> None:
        """End the running fio job, if any (SIGKILL, or SIGTERM with `term`); it counts as
        interrupted. One that has just exited but is not yet reaped raises
        ProcessLookupError, which is not a failure of the soak."""
        proc = self.fio_proc
        if proc is not None and proc.returncode is None:
            try:
                proc.terminate() if term else proc.kill()
            except ProcessLookupError:
                return  # it had ended by itself: its result stands as it is
            self.fio_stopped = True

    def say(self, text: str) -> None:
        if self.args.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- setup -------------------------------------------------------------------------------
    def write_configs(self) -> None:
        a, b = self.nodes["alpha"], self.nodes["beta"]
        for me in (a, b):
            lines = ["[resource]", 'name = "r0"', 'shared-secret = "soak"',
                     f'run-dir = "{os.path.join(self.dir, "run")}"', f"timeout = {TIMEOUT}",
                     "ping-interval = 0.5", "connect-interval = 0.5"]
            for n in (a, b):
                port = self.proxy.port if (me is a and n is b) else n.link_port
                lines += ["", f"[node.{n.name}]", f'address = "127.0.0.1:{port}"',
                          f'disk = "{n.disk_path}"', f'nbd = "127.0.0.1:{n.nbd_port}"']
            with open(me.config, "w") as f:
                f.write("\n".join(lines) + "\n")

    async def setup(self) -> None:
        size = self.args.size_mib << 20
        for n in self.nodes.values():
            with open(n.image, "wb") as f:
                f.truncate(size)
            if self.args.disk_faults:
                n.faulty = FaultyDisk(self.dir, size, backing=n.image, name=f"{n.name}-disk")
                n.disk_path = n.faulty.start()
        self.proxy = LinkProxy(("127.0.0.1", self.nodes["beta"].link_port),
                               seed=self.args.seed)
        await self.proxy.start()
        self.write_configs()
        for n in self.nodes.values():
            subprocess.run([PY, "-m", "blockrep", "create-md", n.config, "--node", n.name,
                            "--force"], check=True, capture_output=True, cwd=ROOT)
            await n.start()
        a = self.nodes["alpha"]
        await self.wait(lambda s: s["alpha"] and s["alpha"]["connection"] == "Connected",
                        30, "first connection")
        await a.admin("primary", force=True, skip_initial_sync=True)
        self.primary = "alpha"
        st = await self.wait(self.healthy, 60, "Established")
        self.size = st["alpha"]["size_bytes"]
        if self.args.blocks * BLOCK > self.size:
            raise SystemExit(f"soak: --blocks {self.args.blocks} exceeds the data area")

    async def statuses(self) -> dict:
        return {n: await node.status() for n, node in self.nodes.items()}

    async def wait(self, pred, timeout: float, what: str) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.statuses()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                self.notes.append(f"timed out after {timeout:.0f}s waiting for {what}: "
                                  + json.dumps({n: _brief(s) for n, s in st.items()}))
                return None
            await asyncio.sleep(0.1)

    @staticmethod
    def healthy(st: dict) -> bool:
        return all(s is not None and s["connection"] == "Connected" and
                   s["replication"] == "Established" and s["disk"] == "UpToDate" and
                   s["out_of_sync_bytes"] == 0 and
                   s["counters"]["writes_pending_peer"] == 0 for s in st.values())

    # -- the writer --------------------------------------------------------------------------
    async def writer(self) -> None:
        client: NbdClient | None = None
        lock = asyncio.Lock()

        client_node = None

        async def connected() -> NbdClient | None:
            nonlocal client, client_node
            async with lock:
                if client is not None and client_node == self.primary and \
                        client._rx is not None and not client._rx.done():
                    return client
                if client is not None:  # lost, or the clients move to another Primary
                    client.close()
                    client = None
                for name in [self.primary] if self.primary else []:
                    c = NbdClient()
                    try:
                        await c.connect("127.0.0.1", self.nodes[name].nbd_port, timeout=2.0)
                    except (OSError, asyncio.TimeoutError, Exception):
                        continue
                    client, client_node = c, name
                    self.reconnects += 1
                    return client
                return None

        async def worker() -> None:
            interval = self.args.qd / self.args.rate if self.args.rate else 0.0
            while self.writing:
                t0 = time.monotonic()
                c = await connected()
                if c is None:
                    await asyncio.sleep(0.2)
                    continue
                block = self.rng.randrange(self.args.blocks)
                while block in self.ledger.in_flight:
                    block = self.rng.randrange(self.args.blocks)
                version = self.ledger.next_version(block)
                try:
                    err = await asyncio.wait_for(
                        c.write(block * BLOCK, make_block(self.run_id, block, version)), 120)
                except (ConnectionError, OSError):
                    self.ledger.abandon(block)
                    await asyncio.sleep(0.1)
                    continue
                except asyncio.TimeoutError:
                    self.ledger.abandon(block)
                    self.notes.append(f"a write to block {block} was unanswered for 120 s")
                    c.close()
                    continue
                self.ledger.done(block, version, err)
                if not err:
                    now = time.monotonic()
                    self.longest_gap = max(self.longest_gap, now - self.last_ack)
                    self.last_ack = now
                if interval:
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

        await asyncio.gather(*(worker() for _ in range(self.args.qd)))
        if client is not None:
            client.close()

    # -- fio verify beside the writer --------------------------------------------------------
    async def fio_loop(self) -> None:
        """Back-to-back fio jobs (4 KiB random writes, then verify=crc32c) on a region after
        the writer's blocks, against the current Primary. A job that fails while no fault
        could break its connection (kill -9 of the Primary, failover, disk EIO) and the soak
        did not stop it is a verify failure. `--thread`: a job is one process (fio forks
        each job into a session of its own otherwise, which outlives a killed fio); a job
        still running when this loop is cancelled (an error, ^C) is killed and reaped."""
        off = self.args.blocks * BLOCK
        size = min(8 << 20, (self.size - off) // BLOCK * BLOCK)
        jobdir = os.path.join(self.dir, "fio")
        os.makedirs(jobdir, exist_ok=True)
        while self.writing and size >= BLOCK:
            if self.primary is None:
                await asyncio.sleep(0.2)
                continue
            epoch, port = self.client_epoch, self.nodes[self.primary].nbd_port
            self.fio["runs"] += 1
            proc = await asyncio.create_subprocess_exec(
                "fio", f"--name=soak{self.fio['runs']}", "--thread", "--ioengine=nbd",
                f"--uri=nbd://127.0.0.1:{port}/", "--rw=randwrite", "--bs=4k",
                "--iodepth=4", f"--offset={off}", f"--size={size}", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                f"--randseed={self.rng.getrandbits(31)}", cwd=jobdir,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            self.fio_proc, self.fio_stopped = proc, False
            try:
                out, _ = await proc.communicate()
            except BaseException:
                self.kill_fio()
                await proc.wait()
                raise
            finally:
                self.fio_proc = None
            if proc.returncode == 0:
                self.fio["verified"] += 1
            elif epoch != self.client_epoch or self.fio_stopped:
                self.fio["interrupted"] += 1
                await asyncio.sleep(0.5)
            else:
                self.fio["failed"] += 1
                self.notes.append(f"fio job {self.fio['runs']} failed: "
                                  f"{out.decode(errors='replace')[-800:]}")
                await asyncio.sleep(0.5)

    async def end_fio(self, task: asyncio.Task, grace: float = FIO_GRACE) -> None:
        """The soak is over (`writing` is False): the running fio job gets `grace` seconds
        to finish, then is stopped (SIGTERM, SIGKILL after 5 s) and counts as
        interrupted; `task` (the fio loop) ends with it."""
        for stop, wait in ((None, grace), ("term", 5.0), ("kill", 5.0)):
            if stop:
                self.kill_fio(term=stop == "term")
            await asyncio.wait([task], timeout=wait)
            if task.done():
                task.result()  # the loop's own error, if any
                return
        task.cancel()
        self.notes.append("fio: the last job did not end on SIGKILL")

    # -- faults ------------------------------------------------------------------------------
    def roles(self) -> tuple[NodeProcess, NodeProcess]:
        p = self.nodes[self.primary or self.last_primary]
        return p, self.nodes["beta" if p.name == "alpha" else "alpha"]

    async def ensure_primary(self, candidate: str, timeout: float = 60.0) -> bool:
        """Make `candidate` Primary (never --force). Only a node known to hold every
        acknowledged write is a candidate: the last Primary, or a Secondary that was
        Connected, Established and UpToDate when the Primary died. Promoting any UpToDate
        node would be the operator error that fencing exists for, not a blockrep fault."""
        deadline = time.monotonic() + timeout
        node = self.nodes[candidate]
        while time.monotonic() < deadline:
            s = await node.status()
            if s and s["role"] == "Primary":
                self.primary = self.last_primary = candidate
                return True
            if s and s["disk"] == "UpToDate" and s["peer"]["role"] != "Primary":
                try:
                    await node.admin("primary")
                    self.primary = self.last_primary = candidate
                    return True
                except (RuntimeError, OSError, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.2)
        self.notes.append(f"{candidate} could not be promoted within {timeout:.0f} s")
        return False

    def hold(self, lo: float, hi: float) -> float:
        """How long a fault lasts: uniform in [lo, hi] seconds, times --hold."""
        return self.rng.uniform(lo, hi) * self.scale

    async def fault(self, kind: str) -> None:
        prim, sec = self.roles()
        r = self.rng
        if kind == "kill-secondary":
            sec.kill9()
            await asyncio.sleep(self.hold(0.5, 4))
            await sec.start()
        elif kind == "kill-primary":
            # freeze the Primary first: nothing it acknowledges from here on, so a Secondary
            # that is still Established and UpToDate now holds every acknowledged write
            prim.signal(signal.SIGSTOP)
            await asyncio.sleep(0.2)
            s = await sec.status()
            can_fail_over = bool(s and s["connection"] == "Connected" and
                                 s["replication"] == "Established" and s["disk"] == "UpToDate")
            prim.kill9()
            self.client_epoch += 1
            self.primary = None
            if can_fail_over:
                await asyncio.sleep(self.hold(0.0, 1.0))
                failed_over = await self.ensure_primary(sec.name, 20)
                self.faults["failover"] += failed_over
                await asyncio.sleep(self.hold(0.5, 4))
                await prim.start()  # reattach the old Primary, now Secondary
                if not failed_over:
                    await self.ensure_primary(prim.name)
            else:
                await asyncio.sleep(self.hold(0.5, 2))
                await prim.start()
                await self.ensure_primary(prim.name)
        elif kind == "stop":
            victim = r.choice((prim, sec))
            victim.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(self.hold(0.5, 6))
            finally:
                victim.signal(signal.SIGCONT)
        elif kind == "cut":
            self.proxy.refuse(True)
            self.proxy.cut()
            try:
                await asyncio.sleep(self.hold(0.5, 5))
            finally:
                self.proxy.refuse(False)
        elif kind == "blackhole":
            self.proxy.blackhole(True)
            try:
                await asyncio.sleep(self.hold(1, 6))
            finally:
                self.proxy.blackhole(False)
        elif kind == "disk-eio":
            victim = sec
            if r.random() < 0.5 and await self.in_sync():
                victim = prim
                self.faults["disk-eio-primary"] += 1
            victim.faulty.inject("pwrite")
            try:
                await asyncio.sleep(self.hold(0.5, 2))
            finally:
                victim.faulty.heal()
            if victim is prim:
                await asyncio.sleep(self.hold(0.5, 3))  # Diskless, serving through sec
                await self.switchover(prim, sec)
            await self.reattach(victim)
        elif kind == "flip":
            # header or payload, toward either node; the next chunk that is at least a header
            self.proxy.flip(direction=r.choice(("fwd", "rev")), count=1,
                            min_chunk=HEADER_SIZE, at=r.randrange(HEADER_SIZE + 64))
            await asyncio.sleep(self.hold(0.5, 2))
            self.proxy.flip(direction="both", count=0)  # disarm one that found no chunk

    async def in_sync(self) -> bool:
        st = await self.statuses()
        return all(s is not None and s["connection"] == "Connected" and
                   s["replication"] == "Established" and s["disk"] == "UpToDate" and
                   s["out_of_sync_bytes"] == 0 for s in st.values())

    async def switchover(self, prim: NodeProcess, sec: NodeProcess) -> None:
        """Move the clients off a Diskless Primary (attach on a Primary is refused): the
        clients go, it is demoted, the peer (UpToDate, holding everything) is promoted and
        the clients follow. The operator's planned switchover (docs/operations.md)."""
        s = await prim.status()
        if s is None or s["disk"] != "Diskless" or s["role"] != "Primary":
            return  # it did not detach (or was restarted): nothing to move
        self.primary = None
        self.client_epoch += 1  # the clients' connections are closed on purpose
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.kill_fio()  # (also one that started just now)
            s = await prim.status()
            if s is not None and s["nbd"]["clients"] == 0:
                try:
                    await prim.admin("secondary")
                    break
                except (RuntimeError, OSError, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.1)
        else:
            self.notes.append(f"switchover: {prim.name} could not be demoted in 30 s")
            await self.ensure_primary(prim.name)
            return
        self.faults["switchover"] += await self.ensure_primary(sec.name)

    async def reattach(self, node: NodeProcess, timeout: float = 30.0) -> None:
        """A node whose disk was detached (Diskless) gets `attach` once its disk is healed:
        the operator's step after replacing a disk (docs/operations.md, "Disk failures")."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            s = await node.status()
            if s is None and not node.running:
                return  # killed meanwhile: it attaches its disk when it starts again
            if s is not None and s["disk"] != "Diskless":
                return
            if s is not None:
                try:
                    await node.admin("attach")
                    self.faults["attach"] += 1
                    return
                except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
                    last = str(exc)
            await asyncio.sleep(0.2)
        self.notes.append(f"{node.name} stayed Diskless: attach failed for {timeout:.0f} s"
                          f" ({last})")

    async def faults_loop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(*self.args.interval) * self.scale)
            # let the pair reconnect first (not necessarily finish resync), up to a bound
            await self.wait(lambda st: all(s and s["connection"] == "Connected"
                                           for s in st.values()), 20, "reconnection")
            if time.monotonic() >= deadline:
                break
            kind = self.rng.choice(self.kinds)
            self.say(f"fault {sum(self.faults[k] for k in self.kinds) + 1}: {kind} "
                     f"(primary {self.primary}, acked {self.ledger.writes_acked})")
            self.faults[kind] += 1
            await self.fault(kind)

    # -- the end -----------------------------------------------------------------------------
    async def finish(self, writer_task: asyncio.Task, fio_task: asyncio.Task | None) -> dict:
        for n in self.nodes.values():
            n.signal(signal.SIGCONT)
            if n.faulty is not None:
                n.faulty.heal()
            if not n.running:
                await n.start()
        self.proxy.reset()
        for n in self.nodes.values():
            if n.faulty is not None:
                await self.reattach(n)
        await self.ensure_primary(self.primary or self.last_primary)
        await asyncio.sleep(2.0)  # acknowledged writes after the last fault
        self.writing = False
        if fio_task is not None:
            await self.end_fio(fio_task)
        try:
            await asyncio.wait_for(asyncio.shield(writer_task), 90)
        except asyncio.TimeoutError:
            self.notes.append(f"writer stuck: {len(self.ledger.in_flight)} writes unanswered")
            writer_task.cancel()
        settled = await self.wait(self.healthy, self.args.settle, "both nodes in sync")
        stuck = [] if settled else sorted(self.nodes)
        result = {"blocks_checked": 0, "lost": -1, "corrupt": -1, "examples": []}
        if self.primary:
            result = await self.check_on_primary()
        for n in self.nodes.values():
            if not n.terminate():
                stuck.append(f"{n.name} (did not stop on SIGTERM)")
        result["differing_blocks"] = self.compare_disks()
        result["stuck"] = stuck
        return result

    async def check_on_primary(self) -> dict:
        c = NbdClient()
        await c.connect("127.0.0.1", self.nodes[self.primary].nbd_port)
        data = bytearray()
        step = 256 * BLOCK
        for off in range(0, self.args.blocks * BLOCK, step):
            err, chunk = await c.read(off, min(step, self.args.blocks * BLOCK - off))
            if err:
                raise RuntimeError(f"read at {off} failed with NBD error {err}")
            data += chunk
        c.close()
        mv = memoryview(data)
        return self.ledger.check(lambda b: mv[b * BLOCK:(b + 1) * BLOCK], self.run_id)

    def compare_disks(self) -> int:
        import numpy as np
        a, b = (np.memmap(n.image, dtype=np.uint8, mode="r", shape=(self.size,))
                for n in self.nodes.values())
        blocks = self.size // BLOCK
        diff = np.any(a[:blocks * BLOCK].reshape(blocks, BLOCK) !=
                      b[:blocks * BLOCK].reshape(blocks, BLOCK), axis=1)
        return int(diff.sum())

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.terminate(10)
            if n.faulty is not None:
                n.faulty.stop()

    async def run(self) -> int:
        await self.setup()
        writer_task = asyncio.ensure_future(self.writer())
        fio_task = asyncio.ensure_future(self.fio_loop()) if self.args.fio else None
        t0 = time.monotonic()
        try:
            await self.faults_loop(t0 + self.args.minutes * 60)
            result = await self.finish(writer_task, fio_task)
        finally:
            self.writing = False
            self.kill_fio()  # at once, whatever ended the soak; the loop reaps it
            for task in (writer_task, fio_task):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (writer_task, fio_task) if t),
                                 return_exceptions=True)
            self.cleanup()
            await self.proxy.close()
        return self.report(result, time.monotonic() - t0)

    def report(self, r: dict, elapsed: float) -> tuple[int, dict]:
        L = self.ledger
        rounds = sum(self.faults[k] for k in self.kinds)
        identical = r["differing_blocks"] == 0
        bad = r["lost"] != 0 or r["corrupt"] != 0 or not identical or r["stuck"] or \
            self.fio["failed"]
        summary = {
            "seed": self.args.seed, "minutes": round(elapsed / 60, 2), "rounds": rounds,
            "faults": {k: self.faults[k] for k in (*self.kinds, "failover", "attach")
                       + (("disk-eio-primary", "switchover") if self.args.disk_faults
                          else ())},
            "writes": {"sent": L.writes_sent, "acknowledged": L.writes_acked,
                       "errors": L.write_errors, "nbd_connections": self.reconnects,
                       "longest_gap_s": round(self.longest_gap, 2)},
            "fio": {k: self.fio[k] for k in ("runs", "verified", "interrupted", "failed")},
            "acknowledged_blocks_checked": r["blocks_checked"], "lost": r["lost"],
            "corrupt": r["corrupt"], "disks_identical": identical,
            "differing_blocks": r["differing_blocks"], "stuck": r["stuck"],
            "examples": r["examples"], "notes": self.notes, "dir": self.dir,
            "result": "FAIL" if bad else "PASS"}
        if self.args.json:
            if not self.args.quiet:
                print(json.dumps(summary, indent=1))
        elif not self.args.quiet:
            print(f"soak: seed {summary['seed']}, {summary['minutes']} min, {rounds} rounds")
            print("faults: " + ", ".join(f"{k} {v}" for k, v in summary["faults"].items()))
            w = summary["writes"]
            print(f"writes: {w['sent']} sent, {w['acknowledged']} acknowledged, "
                  f"{w['errors']} errors, {w['nbd_connections']} NBD connections, longest "
                  f"gap without an acknowledgement {w['longest_gap_s']} s")
            if self.args.fio:
                f = summary["fio"]
                print(f"fio verify jobs: {f['runs']} run, {f['verified']} verified, "
                      f"{f['interrupted']} interrupted (a Primary fault, the end), "
                      f"{f['failed']} failed")
            print(f"acknowledged blocks checked: {r['blocks_checked']}, lost: {r['lost']}, "
                  f"corrupt: {r['corrupt']}")
            print(f"disks identical: {'yes' if identical else 'no'} "
                  f"({r['differing_blocks']} differing 4 KiB blocks)")
            print(f"stuck nodes: {', '.join(r['stuck']) or 'none'}")
            for line in r["examples"] + self.notes:
                print(f"  {line}")
            print(f"logs: {self.dir}")
            print(f"result: {summary['result']}")
        return (1 if bad else 0), summary


async def soak_pairs(args) -> int:
    """--pairs N: N independent soaks at once; each prints its own summary, then the sum."""
    if args.pairs == 1:
        return (await Soak(args).run())[0]
    base = args.dir or tempfile.mkdtemp(prefix="blockrep-soak-")
    soaks = []
    for i in range(args.pairs):
        a = argparse.Namespace(**vars(args))
        a.seed, a.dir, a.quiet = args.seed + i, os.path.join(base, f"pair{i}"), True
        os.makedirs(a.dir, exist_ok=True)
        soaks.append(Soak(a))
    results = await asyncio.gather(*(s.run() for s in soaks), return_exceptions=True)
    total = collections.Counter()
    faults = collections.Counter()
    bad = 0
    out = []
    for i, res in enumerate(results):
        if isinstance(res, BaseException):
            bad = 1
            out.append({"pair": i, "result": "FAIL", "error": repr(res)})
            continue
        code, sm = res
        bad |= code
        faults.update(sm["faults"])
        total.update(rounds=sm["rounds"], acknowledged=sm["writes"]["acknowledged"],
                     checked=sm["acknowledged_blocks_checked"], lost=max(0, sm["lost"]),
                     corrupt=max(0, sm["corrupt"]), differing=sm["differing_blocks"],
                     stuck=len(sm["stuck"]), errors=sm["writes"]["errors"])
        out.append(dict(sm, pair=i))
    if args.json:
        print(json.dumps({"pairs": out, "total": dict(total), "faults": dict(faults),
                          "result": "FAIL" if bad else "PASS"}, indent=1))
        return bad
    for sm in out:
        if "error" in sm:
            print(f"pair {sm['pair']}: FAIL: {sm['error']}")
            continue
        w = sm["writes"]
        print(f"pair {sm['pair']}: seed {sm['seed']}, {sm['minutes']} min, {sm['rounds']} "
              f"rounds ({', '.join(f'{k} {v}' for k, v in sm['faults'].items())}); "
              f"{w['acknowledged']} writes acknowledged, {w['errors']} errors; "
              + (f"fio verify jobs {sm['fio']['verified']} verified, "
                 f"{sm['fio']['interrupted']} interrupted, {sm['fio']['failed']} failed; "
                 if args.fio else "") +
              f"{sm['acknowledged_blocks_checked']} blocks checked, lost {sm['lost']}, "
              f"corrupt {sm['corrupt']}; disks identical: "
              f"{'yes' if sm['disks_identical'] else 'no'}; stuck: "
              f"{', '.join(sm['stuck']) or 'none'}; {sm['result']}")
        for line in sm["examples"] + sm["notes"]:
            print(f"  {line}")
    print(f"total: {args.pairs} pairs, {total['rounds']} faults ("
          + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())) + f"), "
          f"{total['acknowledged']} writes acknowledged, {total['checked']} acknowledged "
          f"blocks checked, lost {total['lost']}, corrupt {total['corrupt']}, "
          f"{total['differing']} differing blocks, {total['stuck']} stuck nodes")
    print(f"logs: {base}")
    print(f"result: {'FAIL' if bad else 'PASS'}")
    return bad


def _brief(s: dict | None) -> str:
    if s is None:
        return "not answering"
    return (f"{s['role']}/{s['disk']}/{s['connection']}/{s['replication']} "
            f"oos={s['out_of_sync_bytes']} peer={s['peer']['role']}/{s['peer']['disk']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--size-mib", type=int, default=64, help="each node's image")
    ap.add_argument("--blocks", type=int, default=4096, help="4 KiB blocks the writer uses")
    ap.add_argument("--qd", type=int, default=4, help="writes in flight")
    ap.add_argument("--rate", type=float, default=400, help="writes per second cap (0: none)")
    ap.add_argument("--interval", type=float, nargs=2, default=(1.0, 4.0),
                    metavar=("MIN", "MAX"), help="seconds between faults")
    ap.add_argument("--settle", type=float, default=120, help="seconds allowed for the "
                    "final sync before a node counts as stuck")
    ap.add_argument("--disk-faults", action="store_true", help="also inject disk EIO "
                    "(nbdkit error filter + nbdfuse; needs root and FUSE)")
    ap.add_argument("--fio", action="store_true", help="also run fio verify=crc32c jobs "
                    "back to back on a region after the writer's blocks")
    ap.add_argument("--hold", type=float, default=1.0, help="scale of every fault's "
                    "duration and of the pause between faults (0.3: denser faults)")
    ap.add_argument("--pairs", type=int, default=1, help="independent node pairs soaked "
                    "at once (figures added up)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every fault")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    args.quiet = False
    import uvloop
    return uvloop.run(soak_pairs(args))


if __name__ == "__main__":
    sys.exit(main())
