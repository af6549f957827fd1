"""NBD wire structures: one encode_x/decode_x pair per structure, side by side.

Owns: the byte layout of every NBD message blockrep sends or accepts.
Must not: touch sockets, clocks or disks. Decoders take a buffer and return
(value, bytes_consumed); a buffer too short raises `Truncated` (consuming nothing);
anything malformed raises `NbdProtocolError`. Nothing else escapes a decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    NbdInfo,
)


class NbdProtocolError(Exception):
    """The peer broke the rules of the NBD protocol."""


class Truncated(NbdProtocolError):
    """More bytes are needed to decode this structure; nothing was consumed."""


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")


def _need(buf, n: int) -> None:
    if len(buf) < n:
        raise Truncated(f"need {n} bytes, have {len(buf)}")


# -- handshake -------------------------------------------------------------------------------

def encode_server_greeting(handshake_flags: int) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_server_greeting(buf) -> tuple[int, int]:
    _need(buf, _GREETING.size)
    magic, opt, flags = _GREETING.unpack_from(buf)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise NbdProtocolError("not a fixed-newstyle NBD server greeting")
    return flags, _GREETING.size


def encode_client_flags(flags: int) -> bytes:
    return _U32.pack(flags)


def decode_client_flags(buf) -> tuple[int, int]:
    _need(buf, 4)
    return _U32.unpack_from(buf)[0], 4


def encode_option_header(option: int, length: int) -> bytes:
    return _OPTION.pack(IHAVEOPT, option, length)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(buf) -> tuple[tuple[int, int], int]:
    """-> ((option, payload_length), 16). The payload is not part of this structure."""
    _need(buf, _OPTION.size)
    magic, option, length = _OPTION.unpack_from(buf)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"bad option magic {magic:#x}")
    return (option, length), _OPTION.size


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(REPLY_MAGIC, option, reply_type, len(data)) + data


def decode_option_reply(buf) -> tuple[tuple[int, int, bytes], int]:
    _need(buf, _OPT_REPLY.size)
    magic, option, reply_type, length = _OPT_REPLY.unpack_from(buf)
    if magic != REPLY_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}")
    _need(buf, _OPT_REPLY.size + length)
    data = bytes(buf[_OPT_REPLY.size:_OPT_REPLY.size + length])
    return (option, reply_type, data), _OPT_REPLY.size + length


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return _EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def decode_export_name_reply(buf, no_zeroes: bool) -> tuple[tuple[int, int], int]:
    n = _EXPORT_NAME_REPLY.size + (0 if no_zeroes else 124)
    _need(buf, n)
    size, flags = _EXPORT_NAME_REPLY.unpack_from(buf)
    return (size, flags), n


# -- option payloads --------------------------------------------------------------------------

def _decode_name(buf, pos: int) -> tuple[str, int]:
    """A u32-length-prefixed UTF-8 string at pos -> (text, new_pos)."""
    _need(buf, pos + 4)
    n = _U32.unpack_from(buf, pos)[0]
    pos += 4
    _need(buf, pos + n)
    try:
        text = bytes(buf[pos:pos + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise NbdProtocolError("string is not valid UTF-8") from None
    return text, pos + n


def _encode_name(name: str) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw


def encode_info_request(name: str, infos: list[int]) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO payload."""
    return _encode_name(name) + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)


def decode_info_request(buf) -> tuple[tuple[str, list[int]], int]:
    name, pos = _decode_name(buf, 0)
    _need(buf, pos + 2)
    count = _U16.unpack_from(buf, pos)[0]
    pos += 2
    _need(buf, pos + 2 * count)
    infos = [_U16.unpack_from(buf, pos + 2 * i)[0] for i in range(count)]
    return (name, infos), pos + 2 * count


def encode_meta_request(name: str, queries: list[str]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload."""
    return (_encode_name(name) + _U32.pack(len(queries))
            + b"".join(_encode_name(q) for q in queries))


def decode_meta_request(buf) -> tuple[tuple[str, list[str]], int]:
    name, pos = _decode_name(buf, 0)
    _need(buf, pos + 4)
    count = _U32.unpack_from(buf, pos)[0]
    pos += 4
    queries = []
    for _ in range(count):
        q, pos = _decode_name(buf, pos)
        queries.append(q)
    return (name, queries), pos


def encode_rep_server(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER payload (reply to NBD_OPT_LIST)."""
    return _encode_name(name) + description.encode()


def decode_rep_server(buf) -> tuple[tuple[str, str], int]:
    name, pos = _decode_name(buf, 0)
    try:
        desc = bytes(buf[pos:]).decode()
    except UnicodeDecodeError:
        raise NbdProtocolError("description is not valid UTF-8") from None
    return (name, desc), len(buf)


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def decode_rep_meta_context(buf) -> tuple[tuple[int, str], int]:
    _need(buf, 4)
    cid = _U32.unpack_from(buf)[0]
    try:
        return (cid, bytes(buf[4:]).decode()), len(buf)
    except UnicodeDecodeError:
        raise NbdProtocolError("context name is not valid UTF-8") from None


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(NbdInfo.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return _U16.pack(NbdInfo.NAME) + name.encode()


def encode_info_description(text: str) -> bytes:
    return _U16.pack(NbdInfo.DESCRIPTION) + text.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK.pack(NbdInfo.BLOCK_SIZE, minimum, preferred, maximum)


def decode_info(buf) -> tuple[tuple[int, object], int]:
    """An NBD_REP_INFO payload -> ((info_type, value), consumed)."""
    _need(buf, 2)
    kind = _U16.unpack_from(buf)[0]
    if kind == NbdInfo.EXPORT:
        _need(buf, _INFO_EXPORT.size)
        _, size, flags = _INFO_EXPORT.unpack_from(buf)
        return (kind, (size, flags)), _INFO_EXPORT.size
    if kind == NbdInfo.BLOCK_SIZE:
        _need(buf, _INFO_BLOCK.size)
        return (kind, _INFO_BLOCK.unpack_from(buf)[1:]), _INFO_BLOCK.size
    if kind in (NbdInfo.NAME, NbdInfo.DESCRIPTION):
        try:
            return (kind, bytes(buf[2:]).decode()), len(buf)
        except UnicodeDecodeError:
            raise NbdProtocolError("info string is not valid UTF-8") from None
    return (kind, bytes(buf[2:])), len(buf)


# -- transmission -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def encode_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(buf) -> tuple[Request, int]:
    _need(buf, _REQUEST.size)
    magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(buf)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length), _REQUEST.size


# Hot path: the shell calls this directly on its receive buffer (no object per request).
unpack_request_from = _REQUEST.unpack_from
pack_simple_reply = _SIMPLE.pack
pack_structured_header = _STRUCTURED.pack


def encode_simple_reply(error: int, cookie: int) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def decode_simple_reply(buf) -> tuple[tuple[int, int], int]:
    _need(buf, _SIMPLE.size)
    magic, error, cookie = _SIMPLE.unpack_from(buf)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"bad simple reply magic {magic:#x}")
    return (error, cookie), _SIMPLE.size


def encode_structured_header(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def decode_structured_header(buf) -> tuple[tuple[int, int, int, int], int]:
    _need(buf, _STRUCTURED.size)
    magic, flags, rtype, cookie, length = _STRUCTURED.unpack_from(buf)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError(f"bad structured reply magic {magic:#x}")
    return (flags, rtype, cookie, length), _STRUCTURED.size


def encode_error_payload(error: int, message: str = "") -> bytes:
    raw = message.encode()[:4096].decode("utf-8", "ignore").encode()  # whole characters
    return struct.pack(">IH", error, len(raw)) + raw


def decode_error_payload(buf) -> tuple[tuple[int, str], int]:
    _need(buf, 6)
    error, n = struct.unpack_from(">IH", buf)
    _need(buf, 6 + n)
    try:
        return (error, bytes(buf[6:6 + n]).decode()), 6 + n
    except UnicodeDecodeError:
        raise NbdProtocolError("error message is not valid UTF-8") from None


def encode_block_status_payload(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS payload: context id, then (length, flags) descriptors."""
    n = len(extents)
    flat = [v for ext in extents for v in ext]
    return struct.pack(f">I{2 * n}I", context_id, *flat)


def decode_block_status_payload(buf) -> tuple[tuple[int, list[tuple[int, int]]], int]:
    _need(buf, 4)
    if (len(buf) - 4) % 8:
        raise NbdProtocolError("block status payload is not whole descriptors")
    n = (len(buf) - 4) // 8
    vals = struct.unpack_from(f">I{2 * n}I", buf)
    return (vals[0], list(zip(vals[1::2], vals[2::2]))), len(buf)


def encode_offset_hole_payload(offset: int, length: int) -> bytes:
    return struct.pack(">QI", offset, length)


def decode_offset_hole_payload(buf) -> tuple[tuple[int, int], int]:
    _need(buf, 12)
    return struct.unpack_from(">QI", buf), 12


U64 = _U64
