"""Activity log and metadata faults on the write path (issue 8): an extent leaves the log
only after its local writes completed; an AL write error is an EIO reply with memory never
ahead of disk; TRIM/WRITE_ZEROES leave both replicas reading the same bytes."""

from __future__ import annotations

import errno

import pytest

from blockrep.meta import AL_EXTENT
from blockrep.peer.requests import TRIM, WRITE, ZERO

from support.inprocess import Pair, metastore, pattern, run, settle, wait_until
from .test_write_path import BIG, SMALL


def test_al_extent_stays_while_its_large_write_runs(tmp_path):
    async def main():
        p = Pair(tmp_path, size=64 << 20, store_factory=metastore)
        await p.start()
        try:
            store = p.alpha.store
            store.al_limit = 2
            gate = p.alpha.disk.hold("write", 0, BIG)
            big = p.submit(p.alpha, WRITE, 0, data=pattern(1, BIG))
            await wait_until(gate.entered.is_set, "large write running on alpha")
            await wait_until(lambda: p.beta.applier.writes_applied == 1, "beta has it")
            p.alpha.replicator.periodic_barrier(p.alpha.link)  # its epoch gets acked
            await settle(50)
            for i in (1, 2, 3):  # cold extents push the log past its limit
                assert await p.submit(p.alpha, WRITE, i * AL_EXTENT,
                                      data=pattern(i, SMALL)) == 0
            assert 0 in store.al, "extent evicted while its write is still running"
            gate.release()
            assert await big == 0
        finally:
            await p.close()
    run(main())


def test_al_write_error_is_an_eio_reply_and_memory_stays_behind_disk(tmp_path):
    """Under pass-on (under detach a Primary with an UpToDate peer detaches instead:
    tests/shell/test_diskless_primary.py)."""
    async def main():
        p = Pair(tmp_path, size=64 << 20, store_factory=metastore)
        p.cfg.on_io_error = "pass-on"
        await p.start()
        try:
            store = p.alpha.store
            real = store._write_al

            def failing():
                raise OSError(errno.EIO, "injected: activity-log write failed")
            store._write_al = failing
            before = dict(store.al)
            d = p.submit(p.alpha, WRITE, 5 * AL_EXTENT, data=pattern(9, SMALL))
            assert await d == errno.EIO
            assert dict(store.al) == before  # nothing in memory the disk does not have
            assert not p.alpha.replicator.pending
            await settle()
            assert p.beta.applier.writes_applied == 0  # nothing went to the peer
            assert p.read(p.alpha, 5 * AL_EXTENT, SMALL) == bytes(SMALL)
            store._write_al = real  # the disk recovers: the same write now works
            assert await p.submit(p.alpha, WRITE, 5 * AL_EXTENT, data=pattern(9, SMALL)) == 0
            assert 5 in store.al
            assert p.read(p.beta, 5 * AL_EXTENT, SMALL) == pattern(9, SMALL)
        finally:
            await p.close()
    run(main())


@pytest.mark.parametrize("no_punch", ["alpha", "beta"])
@pytest.mark.parametrize("kind", [TRIM, ZERO])
def test_trim_and_zero_leave_replicas_identical_without_hole_punching(tmp_path, no_punch,
                                                                      kind):
    async def main():
        p = await Pair(tmp_path).start()
        try:
            off, n = 2 << 20, 64 << 10
            assert await p.submit(p.alpha, WRITE, off, data=pattern(5, n)) == 0
            getattr(p, no_punch).disk.no_punch = True
            assert await p.submit(p.alpha, kind, off + 4096, 8192) == 0
            await settle()
            want = pattern(5, n)[:4096] + bytes(8192) + pattern(5, n)[12288:]
            assert p.read(p.alpha, off, n) == want
            assert p.read(p.beta, off, n) == want
        finally:
            await p.close()
    run(main())


def _nbd_client_writes(port: int, writes) -> list[int]:
    """A blocking NBD client (run in a thread): handshake, then each write's error."""
    import socket
    import struct

    from blockrep.nbd import proto
    from blockrep.nbd.constants import ClientFlag, NbdCmd, NbdOpt, NbdRep

    def recv(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return buf

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        recv(18)
        sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE |
                                               ClientFlag.NO_ZEROES))
        sock.sendall(proto.encode_option(NbdOpt.GO, proto.encode_info_request("", [])))
        while True:
            head = recv(20)
            (opt, rtype, _), _ = proto.decode_option_reply(
                head + recv(struct.unpack(">I", head[16:20])[0]))
            if rtype == NbdRep.ACK:
                break
        errs = []
        for i, (offset, data) in enumerate(writes):
            sock.sendall(proto.encode_request(NbdCmd.WRITE, 0, i, offset, len(data)) + data)
            (err, cookie), _ = proto.decode_simple_reply(recv(16))
            assert cookie == i
            errs.append(err)
        return errs


def test_al_write_error_through_nbd_answers_eio_and_keeps_the_connection(tmp_path):
    async def main():
        p = Pair(tmp_path, size=64 << 20, store_factory=metastore)
        p.cfg.on_io_error = "pass-on"
        await p.start()
        try:
            srv = await p.alpha.nbd.listen_tcp("127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            store = p.alpha.store
            real, calls = store._write_al, []

            def fail_once():
                calls.append(1)
                if len(calls) == 1:
                    raise OSError(errno.EIO, "injected: activity-log write failed")
                real()
            store._write_al = fail_once
            import asyncio
            errs = await asyncio.to_thread(_nbd_client_writes, port, [
                (6 * AL_EXTENT, pattern(1, SMALL)), (6 * AL_EXTENT, pattern(2, SMALL))])
            assert errs == [errno.EIO, 0]  # an error reply, then the same connection works
            assert p.read(p.beta, 6 * AL_EXTENT, SMALL) == pattern(2, SMALL)
            await p.alpha.nbd.close()
        finally:
            await p.close()
    run(main())
