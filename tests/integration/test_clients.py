"""Standard NBD clients against `blockrep serve`: nbdinfo, qemu-io, qemu-img, nbdcopy, fio,
and libnbd (structured/sparse reads, block status)."""

from __future__ import annotations

import json
import os
import random
import threading

from support.helpers import require_tool, run
from support.nbd_testlib import MiB, RawClient, files_equal, recv_exact, run_libnbd, \
    write_random_file

from blockrep.nbd import proto
from blockrep.nbd.constants import NbdCmd


def _make_file(path, size: int, fill: bytes = b"\0") -> str:
    with open(path, "wb") as f:
        if fill == b"\0":
            f.truncate(size)
        else:
            block = fill * MiB
            for _ in range(size // MiB):
                f.write(block)
    return str(path)


def _nbdinfo_json(*args: str) -> dict:
    res = run(["nbdinfo", "--json", *args], timeout=60)
    return json.loads(res.stdout)


# -- nbdinfo --------------------------------------------------------------------------------

def test_nbdinfo_writable_export(serve):
    require_tool("nbdinfo")
    srv = serve("64M")
    info = _nbdinfo_json(srv.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-size"] == 64 * MiB
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 64 * MiB
    assert exp["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df", "can_cache",
                "can_fast_zero", "can_multi_conn"):
        assert exp[cap] is True, (cap, exp)
    assert "base:allocation" in exp["contexts"]


def test_nbdinfo_read_only_export(serve, tmp_path):
    require_tool("nbdinfo")
    disk = _make_file(tmp_path / "ro.img", 16 * MiB)
    srv = serve("16M", "--read-only", disk=disk)
    (exp,) = _nbdinfo_json(srv.uri)["exports"]
    assert exp["export-size"] == 16 * MiB
    assert exp["is_read_only"] is True
    # a read-only export does not offer the write-like commands
    assert exp["can_trim"] is False
    assert exp["can_zero"] is False
    assert exp["can_flush"] is True


def test_nbdinfo_list_shows_export_name_and_description(serve):
    require_tool("nbdinfo")
    srv = serve("8M", export="vol-a")
    listing = _nbdinfo_json("--list", f"nbd://127.0.0.1:{srv.port}/")
    names = {e["export-name"]: e for e in listing["exports"]}
    assert list(names) == ["vol-a"]
    assert names["vol-a"]["description"] == "blockrep export vol-a"
    assert names["vol-a"]["export-size"] == 8 * MiB
    # the named export is reachable by its name ...
    (exp,) = _nbdinfo_json(srv.uri)["exports"]
    assert exp["export-name"] == "vol-a"
    # ... and an unknown name is refused (negative control)
    res = run(["nbdinfo", f"nbd://127.0.0.1:{srv.port}/no-such-export"], check=False,
              timeout=60)
    assert res.returncode != 0
    assert srv.proc.poll() is None


# -- qemu-io --------------------------------------------------------------------------------

def _qemu_io(uri: str, *cmds: str, check: bool = True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    res = run(argv + [uri], timeout=120, check=False)
    if check:
        assert res.returncode == 0, f"qemu-io failed:\n{res.stdout}\n{res.stderr}"
        assert "Pattern verification failed" not in res.stdout + res.stderr, res.stdout
        assert "failed" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    return res


def test_qemu_io_write_read_zero_discard_fua_aio_unaligned(serve):
    require_tool("qemu-io")
    srv = serve("64M")
    _qemu_io(
        srv.uri,
        # baseline: 8 MiB of 0x55 (a 4 MiB request, too: large requests take the thread path)
        "write -P 0x55 0 4M", "write -P 0x55 4M 4M", "read -P 0x55 0 8M",
        # write zeroes over written data reads back as zeroes; the neighbours are untouched
        "write -z 1M 256k", "read -P 0 1M 256k", "read -P 0x55 0 1M",
        "read -P 0x55 1280k 256k",
        # discard over written data reads back as zeroes
        "discard 2M 512k", "read -P 0 2M 512k", "read -P 0x55 2560k 64k",
        # FUA write
        "write -f -P 0x77 3M 64k", "read -P 0x77 3M 64k",
        # asynchronous writes, then a flush
        "aio_write -P 0x21 5M 4k", "aio_write -P 0x22 5128k 300k", "aio_write -P 0x23 6M 1M",
        "aio_flush",
        "read -P 0x21 5M 4k", "read -P 0x22 5128k 300k", "read -P 0x23 6M 1M",
        # odd, unaligned offsets and lengths; the bytes around them keep the old pattern
        "write -P 0x66 4097 12345", "read -P 0x55 0 4097", "read -P 0x66 4097 12345",
        "read -P 0x55 16442 1000",
        "write -P 0x99 7340033 1", "read -P 0x99 7340033 1", "read -P 0x55 7340032 1",
        "read -P 0x55 7340034 1",
        "write -P 0x3c 7000001 99999", "read -P 0x3c 7000001 99999",
    )
    # the bytes really are in the backing file
    with open(srv.disk, "rb") as f:
        f.seek(4096)
        assert f.read(12347) == b"\x55" + b"\x66" * 12345 + b"\x55"
        f.seek(1 * MiB)
        assert f.read(256 * 1024) == bytes(256 * 1024)
        f.seek(3 * MiB)
        assert f.read(64 * 1024) == b"\x77" * 64 * 1024


def test_qemu_io_detects_wrong_pattern(serve):
    """Negative control: the pattern check used above does fail on wrong data."""
    require_tool("qemu-io")
    srv = serve("8M")
    _qemu_io(srv.uri, "write -P 0xab 0 64k")
    res = _qemu_io(srv.uri, "read -P 0xac 0 64k", check=False)
    assert res.returncode != 0
    assert "Pattern verification failed" in res.stdout + res.stderr


# -- qemu-img -------------------------------------------------------------------------------

def test_qemu_img_convert_and_compare(serve, tmp_path):
    require_tool("qemu-img")
    src = str(tmp_path / "src.img")
    write_random_file(src, 64 * MiB)
    srv = serve("64M")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri], timeout=120)
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri], timeout=120)
    assert "Images are identical" in res.stdout
    assert files_equal(src, srv.disk)
    # negative control: one changed byte is found
    with open(src, "r+b") as f:
        f.seek(40 * MiB + 12345)
        b = f.read(1)
        f.seek(40 * MiB + 12345)
        f.write(bytes([b[0] ^ 0xFF]))
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri], timeout=120,
              check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Content mismatch at offset 41955328" in res.stdout, res.stdout


# -- nbdcopy --------------------------------------------------------------------------------

def _nbdcopy_roundtrip(serve, tmp_path, *serve_args: str):
    size = 256 * MiB
    src = str(tmp_path / "src.img")
    write_random_file(src, size)
    zero_at, zero_len = 64 * MiB, 16 * MiB  # a zero run: nbdcopy sends WRITE_ZEROES for it
    with open(src, "r+b") as f:
        f.seek(zero_at)
        f.write(bytes(zero_len))
    # the target starts out as 0xFF everywhere, so zeroing (or not) is visible
    disk = _make_file(tmp_path / "served.img", size, b"\xff")
    srv = serve("256M", *serve_args, disk=disk)
    run(["nbdcopy", src, srv.uri], timeout=120)
    in_ok = files_equal(src, srv.disk)
    out = str(tmp_path / "out.img")
    run(["nbdcopy", srv.uri, out], timeout=120)
    out_ok = files_equal(src, out)
    assert in_ok, "the served backing file differs from the source after nbdcopy in"
    assert out_ok, "nbdcopy out of the server differs from the source"
    assert srv.proc.poll() is None


def test_nbdcopy_roundtrip_256m(serve, tmp_path):
    require_tool("nbdcopy")
    _nbdcopy_roundtrip(serve, tmp_path)


def test_nbdcopy_roundtrip_direct(serve, tmp_path):
    require_tool("nbdcopy")
    _nbdcopy_roundtrip(serve, tmp_path, "--direct")


# -- fio ------------------------------------------------------------------------------------

def _fio(uri: str, out_json: str, *extra: str, check_rc: bool = True):
    argv = ["fio", "--name=blockrep", "--ioengine=nbd", f"--uri={uri}",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4",
            "--size=64M", "--offset_increment=64M",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--fsync=16",
            "--output-format=json", f"--output={out_json}", *extra]
    res = run(argv, timeout=180, check=False)
    with open(out_json) as f:
        text = f.read()
    report = json.loads(text[text.index("{"):]) if "{" in text else None
    if check_rc:
        assert res.returncode == 0, f"fio failed:\n{res.stdout}\n{res.stderr}\n{text[-3000:]}"
    return res, report


def test_fio_random_write_verify_4_connections(serve, tmp_path):
    require_tool("fio")
    srv = serve("256M")
    res, report = _fio(srv.uri, str(tmp_path / "fio-write.json"))
    jobs = report["jobs"]
    assert len(jobs) == 4
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == 64 * MiB, job["write"]
        assert job["read"]["io_bytes"] == 64 * MiB, job["read"]  # the verify pass
        assert job["sync"]["total_ios"] > 0  # flushes were sent
    # a fresh set of connections verifies everything again
    res, report = _fio(srv.uri, str(tmp_path / "fio-verify.json"), "--verify_only")
    for job in report["jobs"]:
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] == 64 * MiB
    # negative control: corrupt one block behind the server's back; verification fails
    with open(srv.disk, "r+b") as f:
        f.seek(5 * 4096 + 100)
        f.write(b"corrupt!")
    res, report = _fio(srv.uri, str(tmp_path / "fio-bad.json"), "--verify_only",
                       check_rc=False)
    assert res.returncode != 0
    assert any(job["error"] != 0 for job in report["jobs"])
    assert "verify failed" in res.stdout + res.stderr


# -- sparse reads and block status ----------------------------------------------------------

SPARSE_SCRIPT = r'''
M = 1 << 20
h = connect(meta=True)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

def status_map(count, offset):
    got = []
    def cb(ctx, off, entries, err):
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION, ctx
        pos = off
        for i in range(0, len(entries), 2):
            got.append([pos, entries[i], entries[i + 1]])
            pos += entries[i]
        return 0
    h.block_status(count, offset, cb)
    return got

def read_chunks(count, offset, flags=0):
    chunks = []
    def cb(buf, off, status, err):
        chunks.append([off, len(buf), status])
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    return bytes(data), sorted(chunks)

data = os.urandom(16 * M)
for i in range(4):
    h.pwrite(data[i * 4 * M:(i + 1) * 4 * M], i * 4 * M)
h.flush()
before_map = status_map(16 * M, 0)
before_read = h.pread(8 * M, 4 * M) == data[4 * M:12 * M]

h.trim(8 * M, 4 * M)  # [4M, 12M) becomes a hole
expected = data[:4 * M] + bytes(8 * M) + data[12 * M:]

out = {"before_map": before_map, "before_read": before_read, "reads": {}}
for name, (count, offset, flags) in {
        "all_16m": (16 * M, 0, 0),
        "edge_128k": (128 * 1024, 4 * M - 64 * 1024, 0),
        "edge_100k_hole_first": (100 * 1024, 12 * M - 50 * 1024, 0),
        "small_in_hole": (4096, 6 * M, 0),
        "small_edge": (8192, 4 * M - 4096, 0),
        "df_16m": (16 * M, 0, nbd.CMD_FLAG_DF),
}.items():
    got, chunks = read_chunks(count, offset, flags)
    out["reads"][name] = {"ok": got == expected[offset:offset + count],
                          "zeros_ok": got[max(0, 4 * M - offset):12 * M - offset]
                          == bytes(len(got[max(0, 4 * M - offset):12 * M - offset])),
                          "count": count, "chunks": chunks}
out["after_map"] = status_map(16 * M, 0)
h.shutdown()
result(out)
'''


def _flags_over(extents, start, end):
    """The set of base:allocation flags reported for any byte of [start, end)."""
    seen = set()
    for off, length, flags in extents:
        if off < end and off + length > start:
            seen.add(flags)
    return seen


def _covered(extents, start, end) -> bool:
    pos = start
    for off, length, _ in sorted(extents):
        if off <= pos < off + length:
            pos = off + length
    return pos >= end


def test_sparse_structured_read_and_block_status(serve, tmp_path):
    require_tool("nbdsh")  # python3-libnbd
    srv = serve("64M")
    res = run_libnbd(tmp_path, srv.uri, SPARSE_SCRIPT, name="sparse")
    M = MiB
    # before the trim: all data, reads return the data (the control)
    assert res["before_read"] is True
    assert _flags_over(res["before_map"], 0, 16 * M) == {0}
    for name, r in res["reads"].items():
        assert r["ok"], f"{name}: wrong bytes; chunks={r['chunks']}"
        assert r["zeros_ok"], name
    chunks = res["reads"]
    # the sparse path was taken: holes went out as NBD_REPLY_TYPE_OFFSET_HOLE (status 2)
    hole_chunks = [c for c in chunks["all_16m"]["chunks"] if c[2] == 2]
    assert hole_chunks and all(4 * M <= c[0] and c[0] + c[1] <= 12 * M for c in hole_chunks)
    assert sum(c[1] for c in hole_chunks) == 8 * M
    assert any(c[2] == 2 for c in chunks["edge_128k"]["chunks"])
    assert any(c[2] == 2 for c in chunks["edge_100k_hole_first"]["chunks"])
    # DF: one data chunk, no holes
    assert [c[2] for c in chunks["df_16m"]["chunks"]] == [1]
    # every chunk set covers its whole request exactly once
    for name, r in chunks.items():
        assert sum(c[1] for c in r["chunks"]) == r["count"], (name, r["chunks"])
    # BLOCK_STATUS reports the hole as HOLE|ZERO (3), the data around it as 0
    after = res["after_map"]
    assert _covered(after, 0, 16 * M), after
    assert _flags_over(after, 4 * M, 12 * M) == {3}, after
    assert _flags_over(after, 0, 4 * M) == {0}, after
    assert _flags_over(after, 12 * M, 16 * M) == {0}, after


# -- pipelining -----------------------------------------------------------------------------

def test_pipelined_mixed_requests_raw_client(serve):
    """Thousands of requests sent back to back, without waiting for replies: WRITEs of
    sizes around the inline/thread threshold (256 KiB) and up to the receive-buffer size,
    interleaved with READs; replies may come out of order and are matched by cookie."""
    srv = serve("64M")
    size = 64 * MiB
    rng = random.Random(7)
    # phase 1: known background, written and read back with one request each 32 MiB
    background = os.urandom(size)
    with RawClient(srv.port) as c:
        c.handshake()
        for o in range(0, size, 32 * MiB):
            assert c.write(o, background[o:o + 32 * MiB]) == 0
        image = bytearray(background)
        stream = bytearray()
        expect = {}  # cookie -> None (write) or (offset, length) (read)
        off = 0
        cookie = 0
        while True:
            n = rng.choice([1, 7, 512, 4096, 65535, 65536, 100000, 262143, 262144, 300000,
                            1 * MiB, 2 * MiB - 28])
            off += rng.randrange(0, 5000)
            if off + n > size // 2:
                break
            cookie += 1
            data = os.urandom(n)
            image[off:off + n] = data
            stream += proto.encode_request(NbdCmd.WRITE, 0, cookie, off, n) + data
            expect[cookie] = None
            off += n
            # reads only of the untouched upper half, so no read races a write
            cookie += 1
            rlen = rng.choice([1, 4096, 70000, 262144, 500000])
            roff = size // 2 + rng.randrange(0, size // 2 - rlen)
            stream += proto.encode_request(NbdCmd.READ, 0, cookie, roff, rlen)
            expect[cookie] = (roff, rlen)
        sender = threading.Thread(target=c.sock.sendall, args=(bytes(stream),), daemon=True)
        sender.start()
        bad = []
        for _ in range(len(expect)):
            err, got = c.simple_reply()
            want = expect.pop(got)
            if err:
                bad.append((got, err))
            if want is not None and not err:
                roff, rlen = want
                if recv_exact(c.sock, rlen) != background[roff:roff + rlen]:
                    bad.append((got, "read data"))
        sender.join(60)
        assert not bad, bad[:5]
        assert not expect
        back = b"".join(c.read(o, 16 * MiB)[1] for o in range(0, size, 16 * MiB))
        c.disconnect()
    assert back == bytes(image)
    with open(srv.disk, "rb") as f:
        assert f.read() == bytes(image)


# -- --direct (serial) and --unix -----------------------------------------------------------

DIRECT_SERIAL_SCRIPT = r'''
import random
h = connect(strict=0)  # strict mode off: libnbd sends requests below the minimum block size
size = h.get_size()
out = {"min_block": h.get_block_size(nbd.SIZE_MINIMUM)}
model = bytearray(size)
rng = random.Random(3)
bad = []
for k in range(300):
    n = rng.choice([1, 100, 4095, 4096, 4097, 8191, 12288, 20000, 300000, 1 << 20])
    off = rng.randrange(0, size - n)
    if k % 3 == 0:
        h.zero(n, off)
        d = bytes(n)
    else:
        d = os.urandom(n)
        h.pwrite(d, off)
    model[off:off + n] = d
    if k % 25 == 0:
        for _ in range(10):
            m = rng.choice([1, 5000, 70000, 300000])
            o = rng.randrange(0, size - m)
            if h.pread(m, o) != model[o:o + m]:
                bad.append([o, m])
out["whole_ok"] = h.pread(size, 0) == model
out["bad_reads"] = bad
h.shutdown()
with open(sys.argv[2], "wb") as f:
    f.write(model)
result(out)
'''


def test_direct_serial_unaligned_io(serve, tmp_path):
    """--direct (O_DIRECT with 4k bounce buffers): one request at a time, at unaligned
    offsets and lengths (read-modify-write in the server), stays byte exact."""
    require_tool("nbdsh")
    disk = _make_file(tmp_path / "direct.img", 16 * MiB)
    srv = serve("16M", "--direct", disk=disk)
    model = str(tmp_path / "model.img")
    res = run_libnbd(tmp_path, srv.uri, DIRECT_SERIAL_SCRIPT, model, name="direct")
    assert res["min_block"] == 4096
    assert res["bad_reads"] == []
    assert res["whole_ok"] is True
    assert files_equal(model, srv.disk)


def test_unix_socket_listener(serve, tmp_path):
    require_tool("qemu-io", "nbdinfo")
    sock = str(tmp_path / "nbd.sock")
    srv = serve("16M", "--unix", sock)
    uri = f"nbd+unix:///?socket={sock}"
    (exp,) = _nbdinfo_json(uri)["exports"]
    assert exp["export-size"] == 16 * MiB
    _qemu_io(uri, "write -P 0x42 1M 1M", "read -P 0x42 1M 1M")
    # the TCP listener serves the same disk
    _qemu_io(srv.uri, "read -P 0x42 1M 1M", "read -P 0 0 1M")
    res = _qemu_io(srv.uri, "read -P 0x42 0 1M", check=False)
    assert res.returncode != 0  # negative control
