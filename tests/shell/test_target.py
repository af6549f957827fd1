"""The Target boundary: LocalTarget answers inline with an errno (FLUSH later, through the
callback); the NBD server's write dispatch has no replication branches."""

from __future__ import annotations

import ast
import errno
import inspect
from concurrent.futures import ThreadPoolExecutor

from blockrep.peer.requests import FLUSH, TRIM, WRITE, ZERO
from blockrep.shell import replication, target
from blockrep.shell.target import LocalTarget

from support.inprocess import Done, FaultyDisk, pattern, run


def _disk(tmp_path, size=1 << 20):
    path = tmp_path / "d.img"
    path.write_bytes(b"")
    with open(path, "wb") as f:
        f.truncate(size)
    return FaultyDisk(str(path))


def test_local_target_writes_inline_and_flushes_later(tmp_path):
    async def main():
        disk = _disk(tmp_path)
        with ThreadPoolExecutor(1) as ex:
            t = LocalTarget(disk, ex)
            assert t.submit(WRITE, 4096, 4096, pattern(1, 4096), 1, 0, 0, None, 7) == 0
            assert disk.read(4096, 4096) == pattern(1, 4096)
            assert t.submit(ZERO, 4096, 1024, None, 0, 1, 0, None, 7) == 0
            assert t.submit(TRIM, 8192, 4096, None, 0, 1, 0, None, 7) == 0
            assert disk.read(4096, 1024) == bytes(1024)
            done = Done()
            assert t.submit(FLUSH, 0, 0, None, 0, 0, 0, done, 7) is None
            assert await done == 0
            disk.fail("write", 0, 4096, err=errno.ENOSPC)
            assert t.submit(WRITE, 0, 4096, bytes(4096), 0, 0, 0, None, 7) == errno.ENOSPC
            disk.fail("flush")
            done = Done()
            t.submit(FLUSH, 0, 0, None, 0, 0, 0, done, 7)
            assert await done == errno.EIO
        disk.close()
    run(main())


def test_no_nbd_flags_beyond_the_nbd_server_on_the_write_path():
    # the replicator and the targets never see NBD flag bits or constants
    for mod in (replication, target):
        src = inspect.getsource(mod)
        imported = [n.module or "" for n in ast.walk(ast.parse(src))
                    if isinstance(n, ast.ImportFrom)]
        assert not any("nbd" in m.split(".") for m in imported), (mod.__name__, imported)
        assert "CmdFlag" not in src and "NbdCmd" not in src
