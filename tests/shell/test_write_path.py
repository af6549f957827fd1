"""In-process tests of the replicated write path: two Nodes on one loop, an in-memory link,
FaultyDisk backing files (see support.py)."""

from __future__ import annotations

import pytest

from blockrep.peer.requests import FLUSH, TRIM, WRITE, ZERO
from blockrep.shell.replication import ASYNC_LOCAL

from support.inprocess import Pair, pattern, run, settle, wait_until

BIG = ASYNC_LOCAL  # written in the I/O threads
SMALL = 4096       # written inline


def test_write_reaches_both_disks_before_it_completes(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            p.link.tb.hold()  # beta's acks stay on the wire
            d = p.submit(p.alpha, WRITE, 8192, data=pattern(1, SMALL))
            await wait_until(lambda: p.beta.applier.writes_applied == 1, "applied on beta")
            await settle()
            assert not d.done  # protocol C: no ack from the peer yet
            p.link.tb.release()
            assert await d == 0
            assert p.read(p.alpha, 8192, SMALL) == p.read(p.beta, 8192, SMALL) == pattern(1, SMALL)
            assert p.alpha.bitmap.count() == 0
        finally:
            await p.close()
    run(main())


class Watch:
    """Completion callback that records, at the moment of completion, whether the
    request's range was already marked out of sync on the primary."""

    def __init__(self, pair, offset, length):
        from support.inprocess import Done
        self.done = Done()
        self.pair, self.offset, self.length = pair, offset, length
        self.marked_at_completion = None

    def __call__(self, cookie, err):
        bm = self.pair.alpha.bitmap
        self.marked_at_completion = all(bm.test(o) for o in
                                        range(self.offset, self.offset + self.length, 4096))
        self.done(cookie, err)


def _submit_watched(p, kind, offset, data=None, length=None):
    length = len(data) if data is not None else (length or 0)
    w = Watch(p, offset, length)
    p.alpha.replicator.submit(kind, offset, length, data, False, True, False, w, 0)
    return w


def test_link_loss_with_writes_in_every_stage(tmp_path):
    """queued, local done, sent, acked, barrier pending: when the link goes, every range the
    peer has not durably confirmed is in the bitmap before its request completes, and every
    request completes without error."""
    async def main():
        p = await Pair(tmp_path).start()
        try:
            a, r = p.alpha, p.alpha.replicator
            # acked (but its epoch not yet confirmed by a barrier ack)
            acked = _submit_watched(p, WRITE, 0, pattern(1, SMALL))
            assert await acked.done == 0
            # barrier pending: a FLUSH whose barrier ack never comes
            p.link.tb.hold()  # nothing beta sends arrives from now on
            flush = p.submit(a, FLUSH, 0, 0)
            # local done, sent, applied on beta: the ack is on the wire
            sent = _submit_watched(p, WRITE, 1 << 20, pattern(2, SMALL))
            # local part in a thread (held), packet sent
            gate = a.disk.hold("write", 2 << 20, BIG)
            local = _submit_watched(p, WRITE, 2 << 20, pattern(3, BIG))
            await wait_until(gate.entered.is_set, "large local write running")
            await settle()
            # not even sent: alpha's transport keeps it
            p.link.ta.hold()
            unsent = _submit_watched(p, WRITE, 3 << 20, pattern(5, SMALL))
            # queued behind the running large write (not started, not sent)
            queued = _submit_watched(p, WRITE, 2 << 20, pattern(4, SMALL))
            await settle()
            assert len(r.waiting) == 1
            assert not any(x.done.done for x in (sent, local, queued, unsent)) and not flush.done
            await p.cut()
            gate.release()
            for w in (sent, local, queued, unsent):
                assert await w.done == 0
                assert w.marked_at_completion, f"completed before marked: {w.offset}"
            assert await flush == 0
            assert all(a.bitmap.test(o) for o in range(0, SMALL, 4096))  # acked, not durable
            assert not r.pending and not r.log.tl and not r.log.barrier_waiters
            # degraded: later writes complete at once, marked first
            later = _submit_watched(p, WRITE, 4 << 20, pattern(6, SMALL))
            assert await later.done == 0 and later.marked_at_completion
        finally:
            await p.close()
    run(main())


def _fifo_case(where):
    async def main(tmp_path):
        p = await Pair(tmp_path).start()
        try:
            node = p.alpha if where == "primary" else p.beta
            gate = node.disk.hold("write", 0, BIG)
            big = p.submit(p.alpha, WRITE, 0, data=pattern(1, BIG))
            await wait_until(gate.entered.is_set, "large write held")
            small = p.submit(p.alpha, WRITE, 4096, data=pattern(2, SMALL))
            other = p.submit(p.alpha, WRITE, 8 << 20, data=pattern(3, SMALL))  # elsewhere
            await settle()
            assert not small.done
            gate.release()
            assert await big == 0 and await small == 0 and await other == 0
            want = pattern(1, BIG)[:4096] + pattern(2, SMALL) + pattern(1, BIG)[8192:]
            await wait_until(lambda: p.beta.applier.idle, "beta idle")
            assert p.read(p.alpha, 0, BIG) == want
            assert p.read(p.beta, 0, BIG) == want
        finally:
            await p.close()
    return main


@pytest.mark.parametrize("where", ["primary", "secondary"])
def test_overlapping_large_then_small_write_land_in_order(tmp_path, where):
    run(_fifo_case(where)(tmp_path))


def test_flush_waits_for_the_peers_barrier_flush(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
            gate = p.beta.disk.hold("flush")
            flush = p.submit(p.alpha, FLUSH, 0, 0)
            await wait_until(gate.entered.is_set, "barrier flush on beta")
            await settle()
            assert not flush.done
            gate.release()
            assert await flush == 0
            assert not p.alpha.replicator.log.tl  # the barrier ack emptied the log
        finally:
            await p.close()
    run(main())


def test_fua_write_is_acked_after_the_peers_flush(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            gate = p.beta.disk.hold("flush")
            d = p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL), fua=True)
            await wait_until(gate.entered.is_set, "FUA flush on beta")
            await settle()
            assert not d.done
            gate.release()
            assert await d == 0
        finally:
            await p.close()
    run(main())


def test_peer_write_error_marks_out_of_sync_before_completion(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            p.beta.disk.fail("write", 0, SMALL, err=28)  # ENOSPC on the secondary
            w = _submit_watched(p, WRITE, 0, pattern(1, SMALL))
            assert await w.done == 0  # the primary has it: the client is not failed
            assert w.marked_at_completion
        finally:
            await p.close()
    run(main())


def test_local_write_error_is_the_clients_error_and_nothing_is_sent(tmp_path):
    """Under pass-on (under detach the Primary detaches and the peer takes the write:
    tests/shell/test_diskless_primary.py)."""
    async def main():
        p = Pair(tmp_path)
        p.cfg.on_io_error = "pass-on"
        await p.start()
        try:
            p.alpha.disk.fail("write", 0, SMALL, times=1)
            d = p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL))
            assert await d == 5
            await settle()
            assert p.beta.applier.writes_applied == 0
        finally:
            await p.close()
    run(main())
