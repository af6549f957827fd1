"""In-process tests of the replicated write path: two Nodes on one loop, an in-memory link,
FaultyDisk backing files (see support.py)."""

from __future__ import annotations

from blockrep.peer.requests import FLUSH, TRIM, WRITE, ZERO
from blockrep.shell.replication import ASYNC_LOCAL

from .support import Pair, pattern, run, settle, wait_until

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
