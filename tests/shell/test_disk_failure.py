"""on-io-error (issue 8 item 2): an I/O error on a Secondary's disk detaches it (Failed ->
Diskless) with the reason in status and events; the Primary learns it, marks every write
from then on out of sync, reports the peer disk Diskless; a Diskless node is never promoted.
With `pass-on` the Secondary stays attached and the failed blocks are marked by NEG_ACK."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from blockrep import state as st
from blockrep.peer.requests import WRITE
from blockrep.shell import admin
from blockrep.state import DiskState

from support.inprocess import Pair, metastore, pattern, run, settle, wait_until
from .test_write_path import BIG, SMALL

MiB = 1 << 20


def _events(node, kind):
    got = []
    node.admin.emit = lambda k, **f: got.append((k, f)) if k == kind else None
    return got


def test_secondary_eio_detaches_and_primary_marks_everything_after(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            disk_events = _events(p.beta, "disk")
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
            p.beta.disk.fail("write", MiB, SMALL, errno.EIO)
            assert await p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL)) == 0
            await wait_until(lambda: p.beta.disk_state == DiskState.DISKLESS,
                             "beta detached its disk")
            assert [f["disk"] for _, f in disk_events] == ["Failed", "Diskless"]
            assert "I/O error" in disk_events[0][1]["reason"]
            assert "I/O error" in admin.status(p.beta)["disk_failure"]
            await wait_until(lambda: p.alpha.peer_disk == DiskState.DISKLESS,
                             "alpha knows its peer is Diskless")
            assert p.alpha.bitmap.test(MiB)
            before = p.alpha.bitmap.count_bytes()
            # from now on every write is out of sync on alpha, none reaches beta's disk
            applied = p.beta.applier.writes_applied
            assert await p.submit(p.alpha, WRITE, 4 * MiB, data=pattern(3, BIG)) == 0
            await settle()
            assert p.alpha.bitmap.count_bytes() >= before + BIG
            assert p.beta.applier.writes_applied == applied
            assert p.read(p.beta, 4 * MiB, BIG) == b"\0" * BIG
            # beta can never be promoted on its failed disk, forced or not
            for force in (False, True):
                v = st.check_promote(dataclasses.replace(p.beta.facts(), linked=False),
                                     force=force)
                assert v.refused and v.rv == st.Rv.DISK_FAILED, v
        finally:
            await p.close()
    run(main())


def test_promotion_of_detached_secondary_refused_after_primary_lost(tmp_path):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            p.beta.disk.fail("write", 0, 1 << 40, errno.EIO)
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, SMALL)) == 0
            await wait_until(lambda: p.beta.disk_state == DiskState.DISKLESS, "detached")
            await p.cut()
            with pytest.raises(admin.CommandRefused) as ei:
                admin.cmd_primary(p.beta, force=True)
            assert ei.value.rv == st.Rv.DISK_FAILED
            with pytest.raises(admin.CommandRefused):
                admin.cmd_primary(p.beta)
            assert p.beta.role == st.Role.SECONDARY
        finally:
            await p.close()
    run(main())


def test_pass_on_keeps_the_secondary_attached(tmp_path):
    async def main():
        p = Pair(tmp_path)
        p.cfg.on_io_error = "pass-on"
        await p.start()
        try:
            p.beta.disk.fail("write", MiB, SMALL, errno.EIO)
            assert await p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL)) == 0
            await wait_until(lambda: p.alpha.bitmap.count_bytes() >= SMALL, "marked")
            assert p.beta.disk_state == DiskState.UP_TO_DATE
            assert await p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(3, SMALL)) == 0
            await settle()
            assert p.read(p.beta, 2 * MiB, SMALL) == pattern(3, SMALL)
        finally:
            await p.close()
    run(main())


def _attach_and_resync(tmp_path, store_factory=None):
    async def main():
        p = await Pair(tmp_path, store_factory=store_factory).start()
        try:
            assert await p.submit(p.alpha, WRITE, 0, data=pattern(1, BIG)) == 0
            p.beta.disk.fail("write", MiB, SMALL, errno.EIO)
            assert await p.submit(p.alpha, WRITE, MiB, data=pattern(2, SMALL)) == 0
            await wait_until(lambda: p.alpha.peer_disk == DiskState.DISKLESS, "detached")
            assert await p.submit(p.alpha, WRITE, 2 * MiB, data=pattern(3, BIG)) == 0
            with pytest.raises(admin.CommandRefused):
                admin.cmd_resync(p.alpha)  # nothing to resync onto a detached disk
            p.beta.disk.faults.clear()  # the disk is repaired (or replaced at its path)
            assert admin.cmd_attach(p.beta) == "Inconsistent"
            assert admin.cmd_attach(p.beta).startswith("the disk is attached")
            await wait_until(lambda: p.alpha.link is None and p.beta.link is None,
                             "renegotiating")
            await p.reconnect()
            await wait_until(lambda: p.beta.disk_state == DiskState.UP_TO_DATE and
                             p.alpha.peer_disk == DiskState.UP_TO_DATE and
                             p.alpha.repl == p.beta.repl == st.ReplState.ESTABLISHED,
                             "full sync done")
            assert admin.status(p.beta)["disk_failure"] == ""
            for off, tag, n in ((0, 1, BIG), (MiB, 2, SMALL), (2 * MiB, 3, BIG)):
                assert p.read(p.beta, off, n) == pattern(tag, n)
            assert p.alpha.bitmap.count() == 0
            # replicating again
            assert await p.submit(p.alpha, WRITE, 3 * MiB, data=pattern(4, SMALL)) == 0
            await settle()
            assert p.read(p.beta, 3 * MiB, SMALL) == pattern(4, SMALL)
        finally:
            await p.close()
    run(main())


def test_attach_after_detach_resyncs_from_the_peer(tmp_path):
    _attach_and_resync(tmp_path)


def test_attach_with_internal_metadata(tmp_path):
    _attach_and_resync(tmp_path, metastore)
