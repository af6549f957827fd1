"""Invariant 2 in the shell: overlapping writes of mixed sizes (inline and in threads) land
in submission order on both disks, whatever order the threads finish in."""

from __future__ import annotations

import random

import pytest

from blockrep.peer.requests import WRITE

from support.inprocess import Pair, pattern, run, settle, wait_until

SIZES = (4096, 64 << 10, 256 << 10, 512 << 10)
SPAN = 1 << 20


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_mixed_writes_land_in_order_on_both_disks(tmp_path, seed):
    rnd = random.Random(seed)

    async def main():
        p = await Pair(tmp_path).start()
        try:
            model = bytearray(SPAN + (512 << 10))
            writes = []
            for i in range(10):
                n = rnd.choice(SIZES)
                off = rnd.randrange(0, SPAN // 4096) * 4096
                writes.append((off, pattern(100 * seed + i + 1, n)))
            gates = []
            for off, data in writes:
                if len(data) >= 256 << 10:
                    node = rnd.choice((p.alpha, p.beta))
                    gates.append(node.disk.hold("write", off, len(data)))
            done = [p.submit(p.alpha, WRITE, off, data=data) for off, data in writes]
            for off, data in writes:
                model[off:off + len(data)] = data
            rnd.shuffle(gates)
            for g in gates:
                await settle(rnd.randrange(1, 30))
                g.release()
            for d in done:
                assert await d == 0
            await wait_until(lambda: p.beta.applier.idle, "beta idle")
            await settle()
            assert p.read(p.alpha, 0, len(model)) == bytes(model)
            assert p.read(p.beta, 0, len(model)) == bytes(model)
        finally:
            await p.close()
    run(main())
