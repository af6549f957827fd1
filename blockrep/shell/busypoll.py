"""Event-loop busy polling: for a short window after the last I/O the loop polls its sockets
instead of sleeping.

Why: at queue depth 1 a request arrives a few tens of microseconds after the previous reply.
If the loop has gone to sleep in epoll_wait by then, the CPU it ran on may have gone idle
(a halted vCPU in a VM) and waking it costs more than serving the request: measured on the
2-core development VM, 4 KiB QD1 writes went from 11.1k to 38.5k IOPS when a nice-19 spinner
kept the CPUs awake (nbdkit: 13.8k -> 16.2k). While a window is open a callback re-arms
itself with call_soon, so uvloop polls with a zero timeout (epoll_wait(0)) between
callbacks; the window closes `window_us` after the last kick and the loop sleeps as before.
The cost is CPU time while clients are active; `0` (the default) turns it off. It is the
userspace twin of the kernel's SO_BUSY_POLL (which loopback and veth do not honour).

Owns: the window. Kicked by the NBD connections (and the peer link) on every received
chunk. Must not: block (one poll step is one trip through the loop).
"""

from __future__ import annotations

import time


class BusyPoll:
    """`kick()` on I/O activity; the loop stays awake until `window_us` after the last one."""

    __slots__ = ("loop", "window", "until", "spinning", "spins", "clock")

    def __init__(self, loop, window_us: float, clock=time.monotonic):
        if window_us < 0:
            raise ValueError("busy-poll window must be >= 0 microseconds")
        self.loop = loop
        self.window = window_us / 1e6
        self.until = 0.0
        self.spinning = False
        self.spins = 0  # poll steps taken (a figure for status and tests)
        self.clock = clock

    def kick(self) -> None:
        self.until = self.clock() + self.window
        if not self.spinning:
            self.spinning = True
            self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        if self.clock() < self.until:
            self.spins += 1
            self.loop.call_soon(self._spin)
        else:
            self.spinning = False
