"""Online verify never reports a difference caused by a write still landing in a thread, on
either node (issue 8: 384 blocks "differed" on identical images)."""

from __future__ import annotations

import pytest

from blockrep.peer.requests import WRITE
from blockrep.shell import admin

from support.inprocess import Pair, pattern, run, settle, wait_until
from .test_write_path import BIG

OFF = 3 << 20


@pytest.mark.parametrize("where", ["primary", "secondary"])
def test_verify_ignores_large_writes_in_flight(tmp_path, where):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            node = p.alpha if where == "primary" else p.beta
            gate = node.disk.hold("write", OFF, BIG)
            d = p.submit(p.alpha, WRITE, OFF, data=pattern(7, BIG))
            await wait_until(gate.entered.is_set, "large write held in a thread")
            if where == "primary":
                await wait_until(lambda: p.beta.applier.writes_applied == 1, "beta has it")
            assert admin.cmd_verify(p.alpha) == "verify started"
            await settle(200)  # the verify reaches the range while the write is held
            gate.release()
            assert await d == 0
            await wait_until(lambda: p.alpha.verifier.current is None and p.alpha.verifier.last,
                             "verify finished")
            assert p.alpha.verifier.last["state"] == "done"
            assert p.alpha.verifier.last["found_blocks"] == 0
            assert p.alpha.bitmap.count() == 0 and p.beta.bitmap.count() == 0
            assert p.read(p.alpha, OFF, BIG) == p.read(p.beta, OFF, BIG) == pattern(7, BIG)
        finally:
            await p.close()
    run(main())


def test_verify_still_finds_real_differences(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            p.beta.disk.write(OFF + 4096, b"x" * 4096)  # behind replication's back
            admin.cmd_verify(p.alpha)
            await wait_until(lambda: p.alpha.verifier.current is None and p.alpha.verifier.last,
                             "verify finished")
            assert p.alpha.verifier.last["found_blocks"] == 1
            assert p.alpha.bitmap.test(OFF + 4096) and p.beta.bitmap.test(OFF + 4096)
        finally:
            await p.close()
    run(main())
