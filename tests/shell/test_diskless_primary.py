"""on-io-error = detach on a PRIMARY (issue 8 item 2): the disk goes Diskless and the node
keeps serving through its UpToDate peer: writes to the peer only (completed on its ack,
nothing marked), reads as P_READ_REQUEST / P_READ_REPLY, ordered on the Secondary after
the writes before them. Writes in flight at the detach complete once the peer has them;
without the peer everything fails with EIO; without a peer holding every block the disk is
not detached (the error goes to the client)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from blockrep import state as st
from blockrep.meta import AL_EXTENT
from blockrep.peer.requests import FLUSH, TRIM, WRITE
from blockrep.shell import admin
from blockrep.state import DiskState

from support.inprocess import Pair, metastore, pattern, run, settle, wait_until
from support.nbd_testlib import RawClient
from .test_write_path import BIG, SMALL

MiB = 1 << 20


class Reads:
    """Reads through alpha's Diskless path: `await reads.get(offset, n)` -> (err, data)."""

    def __init__(self, node):
        self.node = node

    def start(self, offset, length) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.node.diskless.read(offset, length,
                                lambda key, err, data: fut.set_result((err, bytes(data or b""))),
                                None)
        return fut

    async def get(self, offset, length):
        return await asyncio.wait_for(self.start(offset, length), 10)


async def _detached_pair(tmp_path, **kw) -> Pair:
    """alpha Primary, then a failing local write makes it a Diskless Primary."""
    p = await Pair(tmp_path, **kw).start()
    assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
    p.alpha.disk.fail("write")  # every local write fails from now on
    assert await p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL)) == 0
    assert p.alpha.disk_state == DiskState.DISKLESS and p.alpha.diskless.active
    await wait_until(lambda: p.beta.peer_disk == DiskState.DISKLESS, "beta knows")
    return p


def test_primary_eio_detaches_and_serves_through_the_peer(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            events = []
            p.alpha.admin.emit = lambda k, **f: events.append((k, f)) if k == "disk" else None
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
            p.alpha.disk.fail("write", MiB, SMALL, times=1)
            p.link.ta.hold()  # alpha's packets stay "on the wire"
            d = p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL))
            await settle()
            assert p.alpha.disk_state == DiskState.DISKLESS
            assert not d.done, "answered before the peer had the write"
            p.link.ta.release()
            assert await d == 0
            assert p.read(p.beta, MiB, SMALL) == pattern(2, SMALL)
            assert p.read(p.alpha, MiB, SMALL) == bytes(SMALL)  # never written here
            assert [f["disk"] for _, f in events] == ["Failed", "Diskless"]
            assert "I/O error on write" in events[1][1]["reason"]
            assert events[1][1]["io"] == "through the peer beta"
            s = admin.status(p.alpha)
            assert "I/O error" in s["disk_failure"] and s["diskless"]["serving"]
            assert "diskless primary: I/O through the peer (serving)" in \
                admin.format_status(s)
            # from now on: writes to the peer only, nothing marked, no local disk I/O
            p.alpha.disk.faults.clear()  # even a healed disk is not touched again
            for i, kind in enumerate((WRITE, WRITE, TRIM)):
                off = (4 + i) * MiB
                n = BIG if i == 1 else SMALL
                data = pattern(3 + i, n) if kind == WRITE else None
                assert await p.submit(p.alpha, kind, off, n, data) == 0
            assert await p.submit(p.alpha, FLUSH, 0, 0) == 0
            assert p.alpha.bitmap.count() == 0
            assert p.read(p.beta, 4 * MiB, SMALL) == pattern(3, SMALL)
            assert p.read(p.beta, 5 * MiB, BIG) == pattern(4, BIG)
            assert p.read(p.alpha, 4 * MiB, SMALL) == bytes(SMALL)
            # reads come from the peer, the right bytes, small and large
            reads = Reads(p.alpha)
            assert await reads.get(0, SMALL) == (0, pattern(1, SMALL))
            assert await reads.get(MiB, SMALL) == (0, pattern(2, SMALL))
            assert await reads.get(5 * MiB, BIG) == (0, pattern(4, BIG))
            assert await reads.get(6 * MiB, SMALL) == (0, bytes(SMALL))  # trimmed
            d = admin.status(p.alpha)["diskless"]
            assert d["peer_reads_bytes"] == 3 * SMALL + BIG
            assert d["peer_writes_bytes"] == 3 * SMALL + BIG  # the write at 1 MiB too
            assert admin.status(p.beta)["diskless"]["served_reads_bytes"] == 3 * SMALL + BIG
            # a Diskless node is never promoted, and attach on a Primary is refused
            with pytest.raises(admin.CommandRefused) as ei:
                admin.cmd_attach(p.alpha)
            assert ei.value.rv == st.Rv.IS_PRIMARY and "secondary" in str(ei.value)
        finally:
            await p.close()
    run(main())


@pytest.mark.parametrize("trigger", ["other-write", "its-own-error"])
def test_write_in_flight_at_the_detach_completes_once_the_peer_has_it(tmp_path, trigger):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            if trigger == "other-write":
                gate = p.alpha.disk.hold("write", 2 * MiB, BIG)  # lands in a thread, held
                big = p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(7, BIG))
                await wait_until(gate.entered.is_set, "large write running on alpha")
                p.alpha.disk.fail("write", 0, SMALL)
                assert await p.submit(p.alpha, WRITE, 0, data=pattern(8, SMALL)) == 0
                assert p.alpha.disk_state == DiskState.DISKLESS
                assert await big == 0  # its local write is still held: the peer's ack did it
                gate.release()
            else:
                p.alpha.disk.fail("write", 2 * MiB, BIG)  # the thread's write fails itself
                big = p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(7, BIG))
                assert await big == 0
                assert p.alpha.disk_state == DiskState.DISKLESS
            await settle()
            assert p.read(p.beta, 2 * MiB, BIG) == pattern(7, BIG)
            assert await Reads(p.alpha).get(2 * MiB, BIG) == (0, pattern(7, BIG))
            assert p.alpha.bitmap.count() == 0
        finally:
            await p.close()
    run(main())


def test_link_loss_while_diskless_fails_everything_with_eio(tmp_path):
    async def main():
        p = await _detached_pair(tmp_path)
        try:
            reads = Reads(p.alpha)
            p.link.ta.hold()  # nothing reaches beta any more
            w = p.submit(p.alpha, WRITE, 3 * MiB, data=pattern(3, SMALL))
            f = p.submit(p.alpha, FLUSH, 0, 0)
            r = reads.start(0, SMALL)
            await settle()
            assert not (w.done or f.done or r.done())
            await p.cut()
            assert await w == errno.EIO and await f == errno.EIO
            assert (await r)[0] == errno.EIO
            # and while there is no peer, at once
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(4, SMALL)) == errno.EIO
            assert (await reads.get(0, SMALL))[0] == errno.EIO
            assert p.alpha.bitmap.count() == 0  # nothing to record: no disk
            assert not admin.status(p.alpha)["diskless"]["serving"]
            # the peer comes back with the same data: service goes on through it
            await p.reconnect()
            assert await reads.get(MiB, SMALL) == (0, pattern(2, SMALL))
            assert await p.submit(p.alpha, WRITE, 3 * MiB, data=pattern(5, SMALL)) == 0
            assert p.read(p.beta, 3 * MiB, SMALL) == pattern(5, SMALL)
        finally:
            await p.close()
    run(main())


def test_diskless_primary_under_protocol_a_waits_for_the_peer(tmp_path):
    """Protocol A answers once the packet is queued because the local disk has the data; a
    Diskless Primary has no local copy: its writes complete on the peer's write ack (EIO if
    the link goes first), whatever the protocol."""
    async def main():
        p = await _detached_pair(tmp_path)
        try:
            p.alpha.replicator.set_protocol("A")
            p.link.ta.hold()  # nothing reaches beta any more
            w = p.submit(p.alpha, WRITE, 3 * MiB, data=pattern(3, SMALL))
            await settle()
            assert not w.done  # only in this node's memory: not answered
            await p.cut()
            assert await w == errno.EIO
            await p.reconnect()
            w = p.submit(p.alpha, WRITE, 3 * MiB, data=pattern(4, SMALL))
            assert await w == 0
            assert p.read(p.beta, 3 * MiB, SMALL) == pattern(4, SMALL)  # on the peer's disk
        finally:
            await p.close()
    run(main())


def test_peer_read_waits_for_an_overlapping_write_landing_on_the_secondary(tmp_path):
    async def main():
        p = await _detached_pair(tmp_path)
        try:
            reads = Reads(p.alpha)
            gate = p.beta.disk.hold("write", 8 * MiB, BIG)  # beta applies it in a thread
            w = p.submit(p.alpha, WRITE, 8 * MiB, data=pattern(9, BIG))
            await wait_until(gate.entered.is_set, "the write landing on beta")
            inside = reads.start(8 * MiB + BIG // 2, SMALL)  # overlaps it: must wait
            elsewhere = reads.start(0, SMALL)  # behind it in the stream: waits too
            await settle(50)
            assert not inside.done() and not elsewhere.done() and not w.done
            gate.release()
            assert await inside == (0, pattern(9, BIG)[BIG // 2:BIG // 2 + SMALL])
            assert await elsewhere == (0, pattern(1, SMALL))
            assert await w == 0
            # a large read runs in beta's I/O threads; a later overlapping write waits for it
            gate = p.beta.disk.hold("read", 8 * MiB, BIG)
            big = reads.start(8 * MiB, BIG)
            await wait_until(gate.entered.is_set, "the read running on beta")
            w = p.submit(p.alpha, WRITE, 8 * MiB, data=pattern(10, SMALL))
            await settle(50)
            assert not w.done and p.read(p.beta, 8 * MiB, SMALL) == pattern(9, SMALL)
            gate.release()
            assert await big == (0, pattern(9, BIG))
            assert await w == 0
            assert p.read(p.beta, 8 * MiB, SMALL) == pattern(10, SMALL)
        finally:
            await p.close()
    run(main())


def test_secondary_read_error_is_an_eio_for_the_client(tmp_path):
    async def main():
        p = await _detached_pair(tmp_path)
        try:
            p.beta.disk.fail("read", 0, SMALL)
            assert (await Reads(p.alpha).get(0, SMALL))[0] == errno.EIO
            # beta detached too (on-io-error = detach): no copy is left anywhere
            await wait_until(lambda: p.alpha.peer_disk == DiskState.DISKLESS, "both gone")
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(3, SMALL)) == errno.EIO
        finally:
            await p.close()
    run(main())


def test_nbd_read_error_detaches_and_the_peer_answers(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            assert await p.submit(p.alpha, WRITE, MiB, data=pattern(6, BIG)) == 0
            srv = await p.alpha.nbd.listen_tcp("127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            p.alpha.disk.fail("read")

            def client():
                with RawClient(port) as nbd:
                    nbd.handshake()
                    got = [nbd.read(MiB, BIG), nbd.read(MiB + 4096, SMALL)]
                    got.append(nbd.write(0, pattern(7, SMALL)))
                    got.append(nbd.read(0, SMALL))
                    nbd.disconnect()
                    return got
            got = await asyncio.to_thread(client)
            assert got == [(0, pattern(6, BIG)), (0, pattern(6, BIG)[4096:4096 + SMALL]), 0,
                           (0, pattern(7, SMALL))]
            assert p.alpha.disk_state == DiskState.DISKLESS
            assert "I/O error on read" in p.alpha.diskfail.reason
            await p.alpha.nbd.close()
        finally:
            await p.close()
    run(main())


def test_activity_log_write_error_detaches_and_the_peer_takes_the_write(tmp_path):
    async def main():
        p = await Pair(tmp_path, size=64 << 20, store_factory=metastore).start()
        try:
            def failing():
                raise OSError(errno.EIO, "injected: activity-log write failed")
            p.alpha.store._write_al = failing
            assert await p.submit(p.alpha, WRITE, 5 * AL_EXTENT, data=pattern(9, SMALL)) == 0
            assert p.alpha.disk_state == DiskState.DISKLESS
            assert p.read(p.beta, 5 * AL_EXTENT, SMALL) == pattern(9, SMALL)
        finally:
            await p.close()
    run(main())


def test_no_detach_without_a_peer_holding_every_block(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            await p.cut()  # degraded: alpha holds the only copy
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
            p.alpha.disk.fail("write", MiB, SMALL)
            assert await p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL)) == errno.EIO
            assert p.alpha.disk_state == DiskState.UP_TO_DATE
            s = admin.status(p.alpha)
            assert "not detached" in s["disk_kept"] and s["disk_failure"] == ""
            assert not s["diskless"]["active"]
        finally:
            await p.close()
    run(main())


def test_demoted_diskless_primary_attaches_and_resyncs(tmp_path):
    async def main():
        p = await _detached_pair(tmp_path)
        try:
            assert await p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(3, BIG)) == 0
            assert admin.cmd_secondary(p.alpha) == "Secondary"
            await settle()
            assert admin.cmd_primary(p.beta) == "Primary"
            assert await p.submit(p.beta, WRITE, 3 * MiB, data=pattern(4, SMALL)) == 0
            p.alpha.disk.faults.clear()  # the disk is repaired
            assert admin.cmd_attach(p.alpha) == "Inconsistent"
            assert not p.alpha.diskless.active and p.alpha.nbd.remote_read is None
            await wait_until(lambda: p.alpha.link is None and p.beta.link is None,
                             "renegotiating")
            await p.reconnect()
            await wait_until(lambda: p.alpha.disk_state == DiskState.UP_TO_DATE and
                             p.beta.repl == st.ReplState.ESTABLISHED, "full sync done")
            for off, tag, n in ((0, 1, SMALL), (MiB, 2, SMALL), (2 * MiB, 3, BIG),
                                (3 * MiB, 4, SMALL)):
                assert p.read(p.alpha, off, n) == pattern(tag, n)
        finally:
            await p.close()
    run(main())
