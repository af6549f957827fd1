"""The secondary's applier never outlives its link (issue 8): what a gone link queued is not
applied, writes still landing in threads finish before anything newer touches their range
(promotion, writes after it, resync data after a reconnect)."""

from __future__ import annotations

import asyncio

from blockrep.peer.requests import WRITE
from blockrep.shell import admin

from support.inprocess import Pair, pattern, run, settle, wait_until
from .test_write_path import BIG, SMALL

OFF = 1 << 20


async def _stale_write_on_beta(p):
    """A large write held in beta's I/O thread and a small overlapping one queued behind it;
    then the link goes. Returns the gate holding the large one."""
    gate = p.beta.disk.hold("write", OFF, BIG)
    p.submit(p.alpha, WRITE, OFF, data=pattern(1, BIG))
    await wait_until(gate.entered.is_set, "large write running on beta")
    p.submit(p.alpha, WRITE, OFF, data=pattern(2, SMALL))
    await wait_until(lambda: len(p.beta.applier.queue) == 1, "small write queued on beta")
    await p.cut()
    return gate


def test_nothing_queued_by_a_gone_link_lands_after_promotion(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            gate = await _stale_write_on_beta(p)
            assert not p.beta.applier.queue  # dropped with the link
            assert p.beta.applier.dropped == 1
            res = admin.cmd_primary(p.beta)  # alpha is gone; beta takes over
            task = asyncio.ensure_future(res) if asyncio.iscoroutine(res) else None
            await settle()
            newer = None
            if task is None or task.done():  # promoted at once: a client writes now
                newer = p.submit(p.beta, WRITE, OFF, data=pattern(3, SMALL))
                await settle()
            gate.release()
            if task is not None:
                assert await task == "Primary"
            if newer is None:
                newer = p.submit(p.beta, WRITE, OFF, data=pattern(3, SMALL))
            assert await newer == 0
            await wait_until(lambda: p.beta.applier.idle, "applier idle")
            await settle()
            # the acknowledged newer write is what beta holds
            assert p.read(p.beta, OFF, SMALL) == pattern(3, SMALL)
            assert p.read(p.beta, OFF + SMALL, BIG - SMALL) == pattern(1, BIG)[SMALL:]
        finally:
            await p.close()
    run(main())


def test_writes_after_promotion_wait_for_a_stale_write_still_landing(tmp_path):
    """Even a promotion that does not wait (forced ordering at the write level): a write to
    the range of a stale write still landing waits for it."""
    async def main():
        p = await Pair(tmp_path).start()
        try:
            gate = await _stale_write_on_beta(p)
            p.beta.role = p.alpha.role  # Primary, bypassing cmd_primary's wait
            newer = p.submit(p.beta, WRITE, OFF, data=pattern(3, SMALL))
            await settle()
            assert not newer.done  # waits behind the landing write
            gate.release()
            assert await newer == 0
            await wait_until(lambda: p.beta.applier.idle, "applier idle")
            assert p.read(p.beta, OFF, SMALL) == pattern(3, SMALL)
        finally:
            await p.close()
    run(main())


def test_stale_write_never_overwrites_resync_data_after_reconnect(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            gate = await _stale_write_on_beta(p)
            # alpha, degraded, writes the range again: the newest data
            assert await p.submit(p.alpha, WRITE, OFF, data=pattern(4, BIG)) == 0
            await p.reconnect()
            await wait_until(lambda: p.alpha.resync_source is not None and
                             p.alpha.resync_source.inflight, "resync request in flight")
            await settle()
            gate.release()  # the stale write lands now, after the resync data arrived
            await p.resynced()
            await settle()
            assert p.read(p.beta, OFF, BIG) == pattern(4, BIG)
            assert p.read(p.alpha, OFF, BIG) == pattern(4, BIG)
        finally:
            await p.close()
    run(main())


def test_application_write_waits_for_the_resync_request_of_its_range(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            await p.cut()
            assert await p.submit(p.alpha, WRITE, OFF, data=pattern(1, BIG)) == 0  # degraded
            gate = p.beta.disk.hold("write", OFF, BIG)  # the resync write of that range
            await p.reconnect()
            await wait_until(gate.entered.is_set, "resync data being written on beta")
            app = p.submit(p.alpha, WRITE, OFF + 4096, data=pattern(2, SMALL))
            await settle()
            assert not app.done and len(p.alpha.replicator.waiting) == 1
            gate.release()
            assert await app == 0
            await p.resynced()
            want = pattern(1, BIG)[:4096] + pattern(2, SMALL) + pattern(1, BIG)[8192:]
            assert p.read(p.alpha, OFF, BIG) == want
            assert p.read(p.beta, OFF, BIG) == want
            assert p.alpha.bitmap.count() == 0
        finally:
            await p.close()
    run(main())
