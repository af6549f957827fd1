"""Helpers local to the integration tests: a raw-socket NBD client (built on the encoders of
blockrep.nbd.proto, so it can send requests libnbd refuses to send), a runner for
python3-libnbd scripts (libnbd only exists for the system python), and small file helpers.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import textwrap
import time

from support.helpers import SYSTEM_PY, run

from blockrep.nbd import proto
from blockrep.nbd.constants import (
    SIMPLE_REPLY_SIZE,
    ClientFlag,
    HandshakeFlag,
    NbdCmd,
    NbdInfo,
    NbdOpt,
    NbdRep,
)

MiB = 1 << 20


# -- raw socket client ------------------------------------------------------------------------

def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 4 * MiB))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closes the connection (EOF or reset) within `timeout`.
    Anything the peer still sends before closing is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True


def still_open(sock: socket.socket, wait: float = 0.3) -> bool:
    """True when the peer neither closes nor sends anything within `wait` seconds."""
    sock.settimeout(wait)
    try:
        sock.recv(1)
    except socket.timeout:
        return True
    except OSError:
        return False
    return False  # it closed (b"") or sent something unexpected


class RawClient:
    """Minimal NBD client over a plain socket: fixed newstyle, NBD_OPT_GO, simple replies
    (no structured replies are negotiated, so every reply is a 16-byte simple reply)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.size = None
        self.tflags = None
        self._cookie = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_greeting(self) -> int:
        flags, _ = proto.decode_server_greeting(recv_exact(self.sock, 18))
        assert flags & HandshakeFlag.FIXED_NEWSTYLE
        return flags

    def handshake(self, export: str = "") -> None:
        self.read_greeting()
        self.sock.sendall(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE
                                                    | ClientFlag.NO_ZEROES))
        self.sock.sendall(proto.encode_option(
            NbdOpt.GO, proto.encode_info_request(export, [NbdInfo.BLOCK_SIZE])))
        while True:
            head = recv_exact(self.sock, 20)
            length = struct.unpack(">I", head[16:20])[0]
            (opt, rtype, data), _ = proto.decode_option_reply(head + recv_exact(self.sock,
                                                                                length))
            assert opt == NbdOpt.GO, opt
            if rtype == NbdRep.ACK:
                break
            if rtype == NbdRep.INFO:
                (kind, value), _ = proto.decode_info(data)
                if kind == NbdInfo.EXPORT:
                    self.size, self.tflags = value
                continue
            raise AssertionError(f"NBD_OPT_GO refused: reply type {rtype:#x} {data!r}")
        assert self.size is not None, "no NBD_INFO_EXPORT before ACK"

    def send_request(self, cmd: int, offset: int, length: int, flags: int = 0,
                     payload: bytes | memoryview | None = None) -> int:
        self._cookie += 1
        self.sock.sendall(proto.encode_request(cmd, flags, self._cookie, offset, length))
        if payload is not None:
            self.sock.sendall(payload)
        return self._cookie

    def simple_reply(self) -> tuple[int, int]:
        (err, cookie), _ = proto.decode_simple_reply(recv_exact(self.sock, SIMPLE_REPLY_SIZE))
        return err, cookie

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        cookie = self.send_request(NbdCmd.WRITE, offset, len(data), flags, data)
        err, got = self.simple_reply()
        assert got == cookie, (got, cookie)
        return err

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        cookie = self.send_request(NbdCmd.READ, offset, length, flags)
        err, got = self.simple_reply()
        assert got == cookie, (got, cookie)
        if err:
            return err, b""
        return 0, recv_exact(self.sock, length)

    def disconnect(self) -> None:
        self.send_request(NbdCmd.DISC, 0, 0)


# -- python3-libnbd scripts ----------------------------------------------------------------------

LIBNBD_PRELUDE = '''
import errno, json, os, sys, time
import nbd

URI = sys.argv[1]

def connect(strict=None, uri=None, meta=False):
    h = nbd.NBD()
    if strict is not None:
        h.set_strict_mode(strict)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri or URI)
    return h

def err_of(fn, *args):
    """0 when fn(*args) succeeds, else the errno libnbd reports."""
    try:
        fn(*args)
        return 0
    except nbd.Error as e:
        return e.errnum

def result(obj):
    print("RESULT " + json.dumps(obj))
'''


def run_libnbd(tmp_path, uri: str, body: str, *args: str, timeout: float = 120,
               name: str = "script") -> dict | list:
    """Run `body` (after LIBNBD_PRELUDE) under the system python that has python3-libnbd;
    return what it passed to result()."""
    path = os.path.join(str(tmp_path), f"{name}.py")
    with open(path, "w") as f:
        f.write(LIBNBD_PRELUDE + "\n" + textwrap.dedent(body))
    res = run([SYSTEM_PY, path, uri, *args], timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"script printed no RESULT\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def popen_libnbd(tmp_path, uri: str, body: str, *args: str, name: str = "script"):
    path = os.path.join(str(tmp_path), f"{name}.py")
    with open(path, "w") as f:
        f.write(LIBNBD_PRELUDE + "\n" + textwrap.dedent(body))
    out = open(os.path.join(str(tmp_path), f"{name}.out"), "w")
    try:
        return subprocess.Popen([SYSTEM_PY, path, uri, *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    finally:
        out.close()


# -- files -------------------------------------------------------------------------------------

def write_random_file(path, size: int, chunk: int = 8 * MiB) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def files_equal(a, b, chunk: int = 8 * MiB) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
