"""shell/busypoll: the loop keeps polling for a window after the last kick, then sleeps;
NBD requests and peer-link chunks kick it; bad windows are refused."""

from __future__ import annotations

import asyncio

import pytest

from blockrep.shell.busypoll import BusyPoll
from blockrep.shell.nbd_limits import NbdLimits


class FakeLoop:
    """call_soon collects callbacks; step() runs one trip through the loop."""

    def __init__(self):
        self.ready = []

    def call_soon(self, fn):
        self.ready.append(fn)

    def step(self):
        ready, self.ready = self.ready, []
        for fn in ready:
            fn()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_window_keeps_the_loop_polling_then_closes():
    loop, clock = FakeLoop(), Clock()
    bp = BusyPoll(loop, 200, clock=clock)  # 200 µs
    assert not bp.spinning and not loop.ready
    bp.kick()
    assert bp.spinning and len(loop.ready) == 1
    for _ in range(10):  # inside the window: every trip re-arms one poll step
        clock.t += 10e-6
        loop.step()
        assert len(loop.ready) == 1
    assert bp.spins == 10
    clock.t += 200e-6  # past the window: the step does not re-arm, the loop may sleep
    loop.step()
    assert not bp.spinning and not loop.ready and bp.spins == 10
    bp.kick()  # a new request opens it again
    assert bp.spinning and len(loop.ready) == 1


def test_kicks_extend_the_window_and_never_stack_steps():
    loop, clock = FakeLoop(), Clock()
    bp = BusyPoll(loop, 100, clock=clock)
    for _ in range(50):  # a kick every 60 µs: never closes, one step in flight at a time
        bp.kick()
        bp.kick()
        clock.t += 60e-6
        loop.step()
        assert bp.spinning and len(loop.ready) == 1
    clock.t += 100e-6
    loop.step()
    assert not bp.spinning


def test_it_runs_on_a_real_loop():
    async def main():
        bp = BusyPoll(asyncio.get_running_loop(), 1000)
        bp.kick()
        while bp.spinning:  # closes by itself, however slowly this machine runs
            await asyncio.sleep(0)
        return bp.spins
    assert asyncio.run(asyncio.wait_for(main(), 30)) >= 0


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

    from test_nbd_flow import _HeldTarget, attach, feed

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
        while srv.busy.spinning:
            await asyncio.sleep(0)
        assert srv.busy.spins >= 0
    asyncio.run(main())
