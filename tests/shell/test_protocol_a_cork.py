"""Protocol A's corked sends (shell/link.py send_corked): a write answered once queued may
wait in the link's queue for company (at most CORK_S, or until CORK_BYTES are queued, or
until anything else is sent); the rules of protocol A hold for it all the same. CORK_S is
set far out (or near) per test, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio

from blockrep.peer.requests import FLUSH, WRITE
from blockrep.shell import link as link_mod

from support.inprocess import Pair, pattern, run, settle, wait_until

SMALL = 4096


async def _pair_a(tmp_path) -> Pair:
    p = await Pair(tmp_path).start()
    p.alpha.replicator.set_protocol("A")
    await settle()
    return p


def test_corked_writes_wait_for_a_send_that_is_awaited(tmp_path, monkeypatch):
    monkeypatch.setattr(link_mod, "CORK_S", 3600.0)  # only other sends take them along

    async def main():
        p = await _pair_a(tmp_path)
        try:
            sent0 = p.link.ta.sent
            writes = [p.submit(p.alpha, WRITE, i * SMALL, data=pattern(i + 1, SMALL))
                      for i in range(3)]
            assert all(w.done for w in writes)  # protocol A: answered once queued
            await settle()
            assert p.link.ta.sent == sent0  # corked: nothing on the wire yet
            flush = p.submit(p.alpha, FLUSH, 0, 0)  # its barrier goes out, after them
            assert await flush == 0
            for i in range(3):
                assert p.read(p.beta, i * SMALL, SMALL) == pattern(i + 1, SMALL)
            assert p.alpha.bitmap.count() == 0
        finally:
            await p.close()
    run(main())


def test_corked_bytes_beyond_the_bound_go_out_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(link_mod, "CORK_S", 3600.0)

    async def main():
        p = await _pair_a(tmp_path)
        try:
            n = link_mod.CORK_BYTES // SMALL
            for i in range(n):
                p.submit(p.alpha, WRITE, i * SMALL, data=pattern(i + 1, SMALL))
            await wait_until(lambda: p.beta.applier.writes_applied >= n, "applied on beta")
            assert p.read(p.beta, (n - 1) * SMALL, SMALL) == pattern(n, SMALL)
        finally:
            await p.close()
    run(main())


def test_corked_writes_go_out_after_the_cork_time(tmp_path, monkeypatch):
    monkeypatch.setattr(link_mod, "CORK_S", 0.001)

    async def main():
        p = await _pair_a(tmp_path)
        try:
            w = p.submit(p.alpha, WRITE, 0, data=pattern(7, SMALL))
            assert w.done
            await wait_until(lambda: p.beta.applier.writes_applied >= 1, "applied on beta")
            await wait_until(lambda: not p.alpha.replicator.pending, "write acked by beta")
            assert p.read(p.beta, 0, SMALL) == pattern(7, SMALL)
        finally:
            await p.close()
    run(main())


def test_corked_writes_are_marked_when_the_link_goes(tmp_path, monkeypatch):
    """Invariant 3 under protocol A: answered, still in the link's queue when it is lost:
    in the bitmap before anything can forget it."""
    monkeypatch.setattr(link_mod, "CORK_S", 3600.0)

    async def main():
        p = await _pair_a(tmp_path)
        try:
            for i in range(3):
                assert p.submit(p.alpha, WRITE, (i + 8) * SMALL, data=pattern(i, SMALL)).done
            await settle()
            p.link.ta.hold()  # whatever alpha sends from now on never arrives
            await p.cut()
            assert all(p.alpha.bitmap.test((i + 8) * SMALL) for i in range(3))
            assert p.beta.applier.writes_applied == 0
            await asyncio.sleep(0)
        finally:
            await p.close()
    run(main())


def test_a_small_send_buffer_bounds_the_cork(tmp_path, monkeypatch):
    """With sndbuf-size set, what is corked (not yet in the transport's buffer, so not seen
    by the send-buffer bound) is at most a quarter of it."""
    monkeypatch.setattr(link_mod, "CORK_S", 3600.0)

    async def main():
        p = await _pair_a(tmp_path)
        try:
            limit = 64 * 1024
            tr = p.link.ta
            tr.set_write_buffer_limits = lambda high=None, low=None: None
            p.alpha.congestion.limit = limit
            p.alpha.congestion.configure(p.alpha.link)
            assert p.alpha.link.cork_bytes == limit // 4
            n = limit // 4 // SMALL
            for i in range(n):
                p.submit(p.alpha, WRITE, i * SMALL, data=pattern(i + 1, SMALL))
            await wait_until(lambda: p.beta.applier.writes_applied >= n, "applied on beta")
        finally:
            await p.close()
    run(main())
