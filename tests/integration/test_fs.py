"""A real file system on top of `blockrep serve`: nbdfuse exposes the export as a file,
a loop device turns it into a block device, ext4 goes on top (there is no kernel nbd module
here, so this is the way in for the kernel's block layer)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess

from support.helpers import require_tool, run, wait_for
from support.nbd_testlib import MiB

TOOLS = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck",
         "debugfs", "blockdev")


def _retry(argv, timeout: float = 20.0, what: str = ""):
    """Run argv until it succeeds (e.g. `losetup -d` right after umount can see EBUSY)."""
    last = []

    def attempt():
        res = run(argv, timeout=60, check=False)
        last[:] = [res]
        return res.returncode == 0

    try:
        wait_for(attempt, timeout=timeout, interval=0.2, what=what or " ".join(argv))
    except TimeoutError:
        res = last[0]
        raise AssertionError(f"{argv} kept failing: {res.stdout}{res.stderr}") from None


@contextlib.contextmanager
def nbdfuse_file(uri: str, mountdir: str, logdir: str, expected_size: int):
    """Run nbdfuse in the foreground in its own process; yield the path of the file it
    exposes; unmount it and wait for the process at the end."""
    os.makedirs(mountdir, exist_ok=True)
    pidfile = os.path.join(logdir, "nbdfuse.pid")
    log = open(os.path.join(logdir, "nbdfuse.log"), "w")
    proc = subprocess.Popen(["nbdfuse", "-P", pidfile, mountdir, uri], stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    path = os.path.join(mountdir, "nbd")  # nbdfuse's default file name
    try:
        wait_for(lambda: proc.poll() is not None or (
            os.path.exists(pidfile) and os.path.ismount(mountdir) and os.path.exists(path)),
            timeout=30, what="nbdfuse ready")
        assert proc.poll() is None, open(os.path.join(logdir, "nbdfuse.log")).read()
        assert os.path.getsize(path) == expected_size
        yield path
    finally:
        if os.path.ismount(mountdir):
            res = run(["fusermount3", "-u", mountdir], check=False, timeout=30)
            if res.returncode != 0:
                run(["fusermount3", "-u", "-z", mountdir], check=False, timeout=30)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def loop_device(path: str):
    res = run(["losetup", "--find", "--show", "--direct-io=off", path], timeout=60)
    dev = res.stdout.strip()
    assert dev.startswith("/dev/loop"), res.stdout
    try:
        yield dev
    finally:
        _retry(["losetup", "-d", dev], what=f"losetup -d {dev}")


@contextlib.contextmanager
def mounted(dev: str, mnt: str):
    os.makedirs(mnt, exist_ok=True)
    run(["mount", dev, mnt], timeout=60)
    try:
        yield mnt
    finally:
        _retry(["umount", mnt], what=f"umount {mnt}")


def _write_files(root: str) -> dict[str, str]:
    """A 20 MiB file, a directory tree of small files; returns {relative path: sha256}."""
    rng = random.Random(1234)
    files = {"big.bin": os.urandom(20 * MiB)}
    for i in range(150):
        sub = f"d{i % 7}/e{i % 3}"
        files[f"{sub}/small-{i}.dat"] = rng.randbytes(rng.choice([0, 1, 511, 4096, 4097,
                                                                 rng.randrange(1, 40000)]))
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.sync()
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def _hash_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel.startswith("lost+found"):
                continue
            with open(p, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_ext4_on_nbdfuse_loop_device(serve, tmp_path):
    require_tool(*TOOLS)
    srv = serve("256M")
    fuse_dir = str(tmp_path / "fuse")
    mnt = str(tmp_path / "mnt")
    with nbdfuse_file(srv.uri, fuse_dir, str(tmp_path), 256 * MiB) as image:
        with loop_device(image) as dev:
            run(["mkfs.ext4", "-q", "-F", dev], timeout=120)
            with mounted(dev, mnt):
                want = _write_files(mnt)
                assert _hash_tree(mnt) == want
            # drop cached blocks so the second mount reads through nbdfuse and the server
            run(["blockdev", "--flushbufs", dev], timeout=60, check=False)
            with contextlib.suppress(OSError):
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            with mounted(dev, mnt):
                got = _hash_tree(mnt)
            assert got == want
            res = run(["e2fsck", "-fn", dev], timeout=120, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
    assert srv.proc.poll() is None, srv.log_text()
    # everything is unmounted and detached: the served backing file itself is a clean ext4
    # holding the same bytes
    res = run(["e2fsck", "-fn", srv.disk], timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = subprocess.run(["debugfs", "-R", "cat /big.bin", srv.disk], capture_output=True,
                         timeout=120)
    assert hashlib.sha256(out.stdout).hexdigest() == want["big.bin"]
    # negative control: damage the file system in the backing file; e2fsck notices
    with open(srv.disk, "r+b") as f:
        f.seek(4096)  # the group descriptor table of a 4k-block ext4
        f.write(b"\xa5" * 4096)
    res = run(["e2fsck", "-fn", srv.disk], timeout=120, check=False)
    assert res.returncode != 0, res.stdout
