"""A disk that fails reads, behind `blockrep serve`: every failed READ gets its error promptly
(simple and structured replies, small reads, pooled large reads, sparse-split reads), the
reply stream stays in step (the next request on the same connection works), and the errors
are logged at a bounded rate.

The faulty disk is real (blockrep.faults.disk.FaultyDisk): nbdkit's memory plugin behind its
`error` filter, exposed as a file by `nbdfuse`; reads fail with EIO while the trigger file
exists. A second test uses an in-process backend whose reads are split into chunks.
"""

from __future__ import annotations

import errno
import time

import pytest
from support.helpers import require_tool, start_serve
from support.nbd_testlib import MiB, run_libnbd

from blockrep.faults.disk import TOOLS, FaultyDisk


@pytest.fixture
def faulty_disk(tmp_path):
    """(path of the faulty disk file, trigger path): reads fail with EIO while the trigger
    exists."""
    require_tool(*TOOLS)
    with FaultyDisk(str(tmp_path), 64 * MiB) as d:
        yield d.path, d.trigger("pread")


READS = r'''
import nbd
structured = sys.argv[2] == "1"
trigger = sys.argv[3]
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(URI)
out = {"structured": h.get_structured_replies_negotiated()}
open(trigger, "w").close()          # reads fail from now on
M = 1 << 20
# offsets never read before, so the page cache cannot answer them
cases = {"small": (4096, 1 * M), "pooled": (64 * 1024, 2 * M), "large": (M, 4 * M),
         "df": (M, 8 * M)}
errs = {}
t0 = time.monotonic()
for name, (length, offset) in cases.items():
    try:
        if name == "df" and structured:  # one data chunk (libnbd allows DF only here)
            h.pread_structured(length, offset, lambda *a: 0, flags=nbd.CMD_FLAG_DF)
        else:
            h.pread(length, offset)
        errs[name] = 0
    except nbd.Error as e:
        errs[name] = e.errnum
out["errors"] = errs
out["seconds"] = time.monotonic() - t0
burst = 0
for i in range(2000):               # a burst of failing reads: the log must stay small
    try:
        h.pread(4096, 16 * M + 4096 * (i % 16))
    except nbd.Error:
        burst += 1
out["burst_failed"] = burst
os.unlink(trigger)
out["after"] = h.pread(4096, 32 * M) == bytes(4096)   # the stream is still in step
h.shutdown()
result(out)
'''


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_failed_reads_get_prompt_errors(faulty_disk, tmp_path, structured):
    disk, trigger = faulty_disk
    srv = start_serve(disk, str(tmp_path))
    try:
        # on a stream broken by a data-chunk header without its data, the first failed
        # read never returns: the script times out and the test fails
        res = run_libnbd(tmp_path, srv.uri, READS, "1" if structured else "0", trigger,
                         timeout=30)
    finally:
        srv.stop()
    assert res["structured"] == structured
    assert res["errors"] == {"small": errno.EIO, "pooled": errno.EIO, "large": errno.EIO,
                             "df": errno.EIO}, res
    assert res["burst_failed"] == 2000
    assert res["after"], "the connection is not usable after failed reads"
    print(f"4 failed reads answered in {res['seconds'] * 1000:.1f} ms")
    text = srv.log_text()
    lines = [ln for ln in text.splitlines() if "read" in ln.lower() and "failed" in ln]
    # 2004 failures: a few lines, then a count of the suppressed ones
    assert 1 <= len(lines) <= 20, text[-3000:]
    assert "suppressed" in text, text[-3000:]



class SparseFaultyDisk:
    """A backend whose every range starts with a 4 KiB hole, then data that fails to read
    while `failing` is set: a structured READ is split into hole and data chunks."""

    size = 64 << 20

    def __init__(self):
        self.failing = True

    def starts_with_data(self, offset):
        return False

    def extents(self, offset, length, max_extents=1 << 16):
        if length <= 4096:
            return [(offset, length, True)]
        return [(offset, 4096, True), (offset + 4096, length - 4096, False)]

    def _check(self):
        if self.failing:
            raise OSError(errno.EIO, "injected read error")

    def read(self, offset, length):
        self._check()
        return b"\x11" * length

    def readinto(self, offset, buf):
        self._check()
        memoryview(buf)[:] = b"\x11" * len(buf)


@pytest.fixture
def in_process_server():
    """Factory: serve(backend) -> port of an NbdServer running in a thread's event loop."""
    import asyncio
    import threading

    import uvloop

    from blockrep.nbd.handshake import make_export
    from blockrep.shell.nbd_server import NbdServer

    started = []

    def _serve(backend):
        loop = uvloop.new_event_loop()
        server = NbdServer(backend, make_export("", backend.size, read_only=True))
        srv = loop.run_until_complete(server.listen_tcp("127.0.0.1", 0))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        started.append((loop, server, thread))
        return srv.sockets[0].getsockname()[1]

    yield _serve
    for loop, server, thread in started:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


SPARSE = r'''
h = connect()
assert h.get_structured_replies_negotiated()
M = 1 << 20
out = {"errors": [err_of(h.pread, n, 0) for n in (8192, M, 4 * M)]}
out["after"] = h.pread(4096, 0) == bytes(4096)  # the hole chunk of the next reply
result(out)
'''


def test_failed_read_split_into_chunks_sends_only_the_error(in_process_server, tmp_path):
    """A READ split into hole and data chunks whose data fails: no chunk of it goes out,
    only the error (a hole chunk followed by an error would be legal, a data-chunk header
    without its data is not)."""
    disk = SparseFaultyDisk()
    port = in_process_server(disk)
    res = run_libnbd(tmp_path, f"nbd://127.0.0.1:{port}/", SPARSE, timeout=30)
    assert res["errors"] == [errno.EIO] * 3, res
    assert res["after"]


N_FAILING = 300


def test_primary_write_errors_are_logged_at_a_bounded_rate(cluster):
    """A Primary whose disk fails every write: 300 failing writes leave a few log lines
    and a count, not one line each (whatever the node then does with the failure)."""
    from support.faulttools import faulty_disk_for
    from support.nbd_testlib import RawClient

    require_tool(*TOOLS)
    c = cluster(size="16M")
    disk = faulty_disk_for(c, "alpha")
    try:
        c.up_pair("alpha")
        with RawClient(c.nbd_port("alpha")) as nbd:
            nbd.handshake()
            assert nbd.write(0, b"\x11" * 4096) == 0
            disk.inject("pwrite")
            t0 = time.monotonic()
            for i in range(N_FAILING):
                nbd.write((i % 64) * 4096 + MiB, b"\x22" * 4096)
            elapsed = time.monotonic() - t0
            disk.heal()
            nbd.disconnect()
        text = c.log("alpha")
        lines = [ln for ln in text.splitlines() if "write" in ln and "failed" in ln]
        print(f"{N_FAILING} failing writes on the Primary in {elapsed:.1f} s: {len(lines)} "
              f"log lines")
        # at most 5 lines per 10 s per kind (the writes may also fail in other ways)
        assert len(lines) <= 2 * 5 * (elapsed // 10 + 1), "\n".join(lines[:40])
    finally:
        c.stop_all()
        disk.stop()
