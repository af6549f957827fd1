"""A versioned-block writer for soak tests, and the check of what it was told.

Every write is one 4 KiB block that names itself: magic, run id, block number, version and a
CRC32C of the whole block, the rest filled from (block, version). At most one write per block
is in flight, so a block's versions are ordered. The `Ledger` records, per block, the latest
version acknowledged to the writer and the highest version ever sent; after the run every
block on disk must hold a version in [acknowledged, sent] (zeroes only if nothing was ever
acknowledged). A block below its acknowledged version is a lost write.

`NbdClient` is a minimal asyncio NBD client (fixed newstyle, NBD_OPT_GO, simple replies,
pipelined requests) over blockrep's own NBD codecs.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import numpy as np

from .. import native
from ..nbd import proto
from ..nbd.constants import (SIMPLE_REPLY_SIZE, ClientFlag, HandshakeFlag, NbdCmd, NbdInfo,
                             NbdOpt, NbdRep)

BLOCK = 4096
MAGIC = b"BRSOAK01"
_HEAD = struct.Struct("<8sQQQI")  # magic, run id, block, version, crc (crc computed as 0)


def make_block(run_id: int, block: int, version: int) -> bytes:
    fill = struct.pack("<QQ", block, version) * (BLOCK // 16)
    buf = bytearray(_HEAD.pack(MAGIC, run_id, block, version, 0) + fill[_HEAD.size:])
    struct.pack_into("<I", buf, 32, native.crc32c(buf))
    return bytes(buf)


def parse_block(buf, run_id: int) -> int | str:
    """-> the version the block holds (0 for all zeroes), or a string saying what is wrong."""
    mv = memoryview(buf)
    if not any(mv[:_HEAD.size]) and not np.frombuffer(mv, dtype=np.uint64).any():
        return 0
    magic, rid, _block, version, crc = _HEAD.unpack_from(mv)
    if magic != MAGIC or rid != run_id:
        return "foreign content"
    check = bytearray(mv)
    struct.pack_into("<I", check, 32, 0)
    if native.crc32c(check) != crc:
        return f"bad CRC (version {version})"
    return version


@dataclass
class Ledger:
    blocks: int
    acked: np.ndarray = field(init=False)
    sent: np.ndarray = field(init=False)
    in_flight: set = field(default_factory=set)
    writes_sent: int = 0
    writes_acked: int = 0
    write_errors: int = 0

    def __post_init__(self):
        self.acked = np.zeros(self.blocks, dtype=np.uint64)
        self.sent = np.zeros(self.blocks, dtype=np.uint64)

    def next_version(self, block: int) -> int:
        v = int(self.sent[block]) + 1
        self.sent[block] = v
        self.in_flight.add(block)
        self.writes_sent += 1
        return v

    def done(self, block: int, version: int, error: int) -> None:
        self.in_flight.discard(block)
        if error:
            self.write_errors += 1
        else:
            self.writes_acked += 1
            if version > self.acked[block]:
                self.acked[block] = version

    def abandon(self, block: int) -> None:
        """The connection died with this write in flight: it may or may not have landed."""
        self.in_flight.discard(block)

    def check(self, read_block, run_id: int) -> dict:
        """Compare every block (read_block(i) -> bytes) with what was acknowledged."""
        checked = lost = bad = 0
        examples: list[str] = []
        for b in range(self.blocks):
            acked, sent = int(self.acked[b]), int(self.sent[b])
            got = parse_block(read_block(b), run_id)
            if acked:
                checked += 1
            if isinstance(got, str) or got > sent:
                bad += 1
                what = got if isinstance(got, str) else f"version {got} never sent"
                if len(examples) < 10:
                    examples.append(f"block {b}: {what} (acknowledged {acked}, sent {sent})")
            elif got < acked:
                lost += 1
                if len(examples) < 10:
                    examples.append(f"block {b}: holds version {got}, version {acked} was "
                                    f"acknowledged (sent {sent})")
        return {"blocks_checked": checked, "lost": lost, "corrupt": bad, "examples": examples,
                "acknowledged_versions": int(self.acked.sum())}


class NbdClientError(Exception):
    pass


class NbdClient:
    """Pipelined simple-reply NBD client. `await write(off, data)` -> NBD error (0 = ok)."""

    def __init__(self):
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.size = 0
        self._cookie = 0
        self._waiting: dict[int, tuple[asyncio.Future, int]] = {}
        self._rx: asyncio.Task | None = None

    async def connect(self, host: str, port: int, export: str = "",
                      timeout: float = 5.0) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout)
        try:
            await asyncio.wait_for(self._handshake(export), timeout)
        except BaseException:
            self.close()
            raise
        self._rx = asyncio.ensure_future(self._receive())

    async def _handshake(self, export: str) -> None:
        r, w = self.reader, self.writer
        flags, _ = proto.decode_server_greeting(await r.readexactly(18))
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdClientError("server is not fixed newstyle")
        w.write(proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        w.write(proto.encode_option(NbdOpt.GO, proto.encode_info_request(export, [])))
        while True:
            head = await r.readexactly(20)
            length = struct.unpack(">I", head[16:20])[0]
            (_opt, rtype, data), _ = proto.decode_option_reply(head + await r.readexactly(length))
            if rtype == NbdRep.ACK:
                return
            if rtype == NbdRep.INFO:
                (kind, value), _ = proto.decode_info(data)
                if kind == NbdInfo.EXPORT:
                    self.size = value[0]
                continue
            raise NbdClientError(f"NBD_OPT_GO refused ({rtype:#x}): "
                                 f"{bytes(data[4:]).decode(errors='replace')}")

    async def _receive(self) -> None:
        try:
            while True:
                (err, cookie), _ = proto.decode_simple_reply(
                    await self.reader.readexactly(SIMPLE_REPLY_SIZE))
                fut, rlen = self._waiting.pop(cookie, (None, 0))
                data = await self.reader.readexactly(rlen) if rlen and not err else b""
                if fut is not None and not fut.done():
                    fut.set_result((err, data))
        except (OSError, asyncio.IncompleteReadError, proto.NbdProtocolError) as exc:
            self._fail(exc)

    def _fail(self, exc) -> None:
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"NBD connection lost: {exc}"))
        self._waiting.clear()

    async def _request(self, cmd: int, offset: int, length: int, payload=None,
                       rlen: int = 0) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing() or \
                (self._rx is not None and self._rx.done()):
            raise ConnectionError("NBD connection is closed")
        self._cookie += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[self._cookie] = (fut, rlen)
        self.writer.write(proto.encode_request(cmd, 0, self._cookie, offset, length))
        if payload is not None:
            self.writer.write(payload)
        return await fut

    async def write(self, offset: int, data: bytes) -> int:
        return (await self._request(NbdCmd.WRITE, offset, len(data), data))[0]

    async def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return await self._request(NbdCmd.READ, offset, length, rlen=length)

    async def flush(self) -> int:
        return (await self._request(NbdCmd.FLUSH, 0, 0))[0]

    def close(self) -> None:
        if self._rx is not None:
            self._rx.cancel()
        if self.writer is not None:
            self.writer.close()
        self._fail("closed")
