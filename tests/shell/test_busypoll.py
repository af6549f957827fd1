"""shell/busypoll: the loop keeps polling for a window after the last kick, then sleeps;
NBD requests and peer-link chunks kick it; bad windows are refused."""

from __future__ import annotations

import asyncio

import pytest

from blockrep.shell.busypoll import BusyPoll
from blockrep.shell.nbd_limits import NbdLimits


def test_window_keeps_the_loop_polling_then_closes():
    async def main():
        bp = BusyPoll(asyncio.get_running_loop(), 20_000)  # 20 ms
        assert not bp.spinning
        bp.kick()
        assert bp.spinning
        await asyncio.sleep(0.005)
        assert bp.spinning and bp.spins > 10  # polled many times inside the window
        await asyncio.sleep(0.05)
        assert not bp.spinning  # closed 20 ms after the kick: the loop sleeps again
        spins = bp.spins
        await asyncio.sleep(0.01)
        assert bp.spins == spins
        bp.kick()  # a new request opens it again
        assert bp.spinning
        await asyncio.sleep(0.05)
        assert not bp.spinning and bp.spins > spins
    asyncio.run(main())


def test_kicks_extend_the_window():
    async def main():
        bp = BusyPoll(asyncio.get_running_loop(), 10_000)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < 0.05:  # a kick every 2 ms for 50 ms: never closes
            bp.kick()
            await asyncio.sleep(0.002)
            assert bp.spinning
        await asyncio.sleep(0.05)
        assert not bp.spinning
    asyncio.run(main())


def test_off_by_default_and_bounds():
    assert NbdLimits().busy_poll_us == 0
    with pytest.raises(ValueError, match="busy-poll"):
        NbdLimits(busy_poll_us=-1)
    with pytest.raises(ValueError, match="busy-poll"):
        NbdLimits(busy_poll_us=20_000)
    with pytest.raises(ValueError):
        BusyPoll(None, -5)


def test_nbd_requests_kick_it():
    from blockrep.nbd import proto
    from blockrep.nbd.constants import NbdCmd
    from blockrep.nbd.handshake import Export
    from blockrep.nbd.constants import TransmissionFlag as TF
    from blockrep.shell.nbd_server import NbdServer

    from tests.test_nbd_flow import _HeldTarget, attach, feed

    async def main():
        loop = asyncio.get_running_loop()
        pending = []
        export = Export("", 1 << 30, TF.HAS_FLAGS | TF.SEND_FLUSH)
        off = NbdServer(None, export, target=_HeldTarget(pending))
        assert off.busy is None  # off: nothing is kicked, nothing spins
        srv = NbdServer(None, export, target=_HeldTarget(pending),
                        limits=NbdLimits(busy_poll_us=5_000))
        conn, _tr = attach(srv, loop)
        assert not srv.busy.spinning
        req = proto.encode_request(NbdCmd.WRITE, 0, 1, 0, 4096) + bytes(4096)
        assert feed(conn, req) == len(req)
        assert srv.busy.spinning and len(pending) == 1
        await asyncio.sleep(0.03)
        assert not srv.busy.spinning and srv.busy.spins > 0
    asyncio.run(main())
