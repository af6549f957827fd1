"""Sans-IO server side of the NBD fixed-newstyle handshake.

Owns: option negotiation up to the start of transmission (or the end of the connection).
Bytes go in with `receive_data`, bytes to send come out of `data_to_send`, and the outcome is
an event: `Negotiated` (transmission starts; any bytes received past the handshake are in
`leftover`), `StartTls` (NBD_OPT_STARTTLS was acknowledged: the shell sends the ACK, upgrades
the transport, then calls `tls_established`) or `Closed`. Must not: touch sockets, clocks or
disks. Every option's payload is consumed before it is answered, even when it is refused.

TLS modes (spec "TLS support"): "off" (NOTLS: STARTTLS is answered ERR_UNSUP), "on" (the
client may upgrade; plain sessions are served too) and "require" (FORCEDTLS: before TLS,
every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD and EXPORT_NAME ends the
connection).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import proto
from .constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    ClientFlag,
    HandshakeFlag,
    NbdInfo,
    NbdOpt,
    NbdRep,
    TransmissionFlag,
)
from .proto import NbdProtocolError, Truncated

TF = TransmissionFlag

MAX_OPTION_LEN = 64 * 1024  # larger payloads are drained and answered ERR_TOO_BIG
MAX_OPTIONS = 4096  # a client that never finishes negotiating is cut off


@dataclass
class Export:
    """What the handshake needs to know about one export."""
    name: str
    size: int
    flags: int  # transmission flags
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 64 * 1024 * 1024


WRITABLE_FLAGS = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM
                  | TF.SEND_WRITE_ZEROES | TF.SEND_DF | TF.SEND_CACHE | TF.SEND_FAST_ZERO
                  | TF.CAN_MULTI_CONN)
READ_ONLY_FLAGS = (TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_DF | TF.SEND_CACHE
                   | TF.CAN_MULTI_CONN)


def make_export(name: str, size: int, *, read_only: bool = False, direct: bool = False,
                description: str = "") -> Export:
    """The export of a blockrep disk (`serve` and a replicated resource alike): the
    transmission flags it offers, and its block sizes (O_DIRECT needs 4 KiB alignment)."""
    return Export(name=name, size=size, flags=READ_ONLY_FLAGS if read_only else WRITABLE_FLAGS,
                  description=description or f"blockrep export {name}",
                  min_block=4096 if direct else 1, pref_block=4096,
                  max_block=64 * 1024 * 1024)


@dataclass
class Negotiated:
    export: Export
    structured: bool
    flags: int  # transmission flags as sent to the client
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass
class StartTls:
    """Send what `data_to_send` holds (the ACK), then start TLS as the server."""


TLS_MODES = ("off", "on", "require")


@dataclass
class Closed:
    reason: str
    error: bool = False  # True when the client broke the protocol


class HsState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION = "option"
    DISCARD = "discard"
    TLS = "tls"  # STARTTLS acknowledged; waiting for the shell to finish the TLS handshake
    DONE = "done"
    CLOSED = "closed"


class HandshakeServer:
    def __init__(self, exports: dict[str, Export], default_export: str | None = None,
                 refusal: str | None = None, tls: str = "off"):
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        self.tls = tls
        self.tls_active = False
        self.exports = exports
        self.refusal = refusal  # when set, no export is served (e.g. a Secondary node)
        self.default_export = default_export if default_export is not None else next(
            iter(exports), "")
        self.state = HsState.CLIENT_FLAGS
        self.no_zeroes = False
        self.fixed = False
        self.structured = False
        self.meta_export: str | None = None
        self.meta_contexts: dict[int, str] = {}
        self.leftover = b""
        self._in = bytearray()
        self._out: list[bytes] = [proto.encode_server_greeting(
            HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]
        self._discard_left = 0
        self._discard_option = 0
        self._options_seen = 0
        self._events: list = []

    # -- I/O boundary ------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data) -> list:
        if self.state in (HsState.DONE, HsState.CLOSED):
            return []
        if self.state is HsState.TLS:
            if data:
                self._close("protocol error: data before the TLS handshake was started",
                            error=True)
            events, self._events = self._events, []
            return events
        self._in += data
        try:
            while self.state in (HsState.CLIENT_FLAGS, HsState.OPTION, HsState.DISCARD) \
                    and self._step():
                pass
        except NbdProtocolError as exc:
            self._close(f"protocol error: {exc}", error=True)
        if self.state is HsState.TLS and self._in:
            # the client must wait for the ACK before its TLS hello (spec)
            self._close("protocol error: client sent data after NBD_OPT_STARTTLS before "
                        "the ACK", error=True)
        if self.state is HsState.DONE:
            self.leftover = bytes(self._in)
            self._in.clear()
        events, self._events = self._events, []
        return events

    def tls_established(self) -> list:
        """The shell finished the TLS handshake: options are read over TLS from now on."""
        if self.state is not HsState.TLS:
            raise RuntimeError("tls_established without an acknowledged NBD_OPT_STARTTLS")
        self.tls_active = True
        self.state = HsState.OPTION
        return []

    # -- machinery ---------------------------------------------------------------------------
    def _close(self, reason: str, error: bool = False) -> None:
        self.state = HsState.CLOSED
        self._events.append(Closed(reason, error))

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(proto.encode_option_reply(option, rtype, data))

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode())

    def _step(self) -> bool:
        """Consume one unit of input; False when more bytes are needed."""
        if self.state is HsState.CLIENT_FLAGS:
            try:
                flags, n = proto.decode_client_flags(self._in)
            except Truncated:
                return False
            del self._in[:n]
            if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                raise NbdProtocolError(f"unknown client flags {flags:#x}")
            self.fixed = bool(flags & ClientFlag.FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self.state = HsState.OPTION
            return True
        if self.state is HsState.DISCARD:
            n = min(self._discard_left, len(self._in))
            del self._in[:n]
            self._discard_left -= n
            if self._discard_left:
                return False
            self.state = HsState.OPTION
            if self._discard_option == NbdOpt.EXPORT_NAME:
                self._close("export name too long", error=True)
            elif self._tls_required(self._discard_option):
                self._error(self._discard_option, NbdRep.ERR_TLS_REQD, "TLS is required")
            else:
                self._error(self._discard_option, NbdRep.ERR_TOO_BIG,
                            f"option payload larger than {MAX_OPTION_LEN} bytes")
            return True
        # OPTION
        try:
            (option, length), n = proto.decode_option_header(self._in)
        except Truncated:
            return False
        if length > MAX_OPTION_LEN:
            self._count_option()
            del self._in[:n]
            self.state = HsState.DISCARD
            self._discard_left = length
            self._discard_option = option
            return True
        if len(self._in) < n + length:
            return False
        self._count_option()
        payload = bytes(self._in[n:n + length])
        del self._in[:n + length]
        handler = _OPTION_HANDLERS.get(option)
        if self._tls_required(option):
            if option == NbdOpt.EXPORT_NAME:  # cannot be answered with an error (spec)
                self._close("NBD_OPT_EXPORT_NAME before TLS (TLS is required)")
            else:
                self._error(option, NbdRep.ERR_TLS_REQD,
                            "TLS is required: send NBD_OPT_STARTTLS first")
        elif handler is None:
            name = NbdOpt(option).name if option in NbdOpt._value2member_map_ else str(option)
            self._error(option, NbdRep.ERR_UNSUP, f"option {name} is not supported")
        else:
            handler(self, option, payload)
        return True

    def flags_for(self, export: Export) -> int:
        """Transmission flags as sent: SEND_DF only with structured replies (spec)."""
        if self.structured:
            return export.flags
        return int(export.flags) & ~int(TransmissionFlag.SEND_DF)

    def _tls_required(self, option: int) -> bool:
        return (self.tls == "require" and not self.tls_active
                and option not in (NbdOpt.STARTTLS, NbdOpt.ABORT))

    def _count_option(self) -> None:
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise NbdProtocolError("too many options")

    def _lookup(self, name: str) -> Export | None:
        return self.exports.get(name if name else self.default_export)

    # -- option handlers ---------------------------------------------------------------------
    def _opt_export_name(self, option: int, payload: bytes) -> None:
        try:
            name = payload.decode()
        except UnicodeDecodeError:
            raise NbdProtocolError("export name is not valid UTF-8") from None
        export = self._lookup(name)
        if export is None or self.refusal:
            self._close(self.refusal or f"unknown export {name!r}")
            return
        self._out.append(proto.encode_export_name_reply(export.size, self.flags_for(export),
                                                        self.no_zeroes))
        self._finish(export, name)

    def _opt_abort(self, option: int, payload: bytes) -> None:
        self._reply(option, NbdRep.ACK)
        self._close("client sent NBD_OPT_ABORT")

    def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, NbdRep.ERR_INVALID, "NBD_OPT_LIST takes no payload")
            return
        for export in self.exports.values():
            self._reply(option, NbdRep.SERVER,
                        proto.encode_rep_server(export.name, export.description))
        self._reply(option, NbdRep.ACK)

    def _opt_starttls(self, option: int, payload: bytes) -> None:
        if self.tls == "off":
            self._error(option, NbdRep.ERR_UNSUP, "TLS is not enabled on this server")
        elif payload:
            self._error(option, NbdRep.ERR_INVALID, "NBD_OPT_STARTTLS takes no payload")
        elif self.tls_active:
            self._error(option, NbdRep.ERR_INVALID, "TLS is already active")
        elif not self.fixed:
            raise NbdProtocolError("NBD_OPT_STARTTLS needs fixed newstyle negotiation")
        else:
            self._reply(option, NbdRep.ACK)
            self.state = HsState.TLS
            self._events.append(StartTls())

    def _opt_info_go(self, option: int, payload: bytes) -> None:
        try:
            (name, infos), n = proto.decode_info_request(payload)
        except NbdProtocolError:
            self._error(option, NbdRep.ERR_INVALID, "malformed NBD_OPT_INFO/GO payload")
            return
        if n != len(payload):
            self._error(option, NbdRep.ERR_INVALID, "trailing bytes in NBD_OPT_INFO/GO")
            return
        export = self._lookup(name)
        if export is None:
            self._error(option, NbdRep.ERR_UNKNOWN, f"unknown export {name!r}")
            return
        if self.refusal:
            self._error(option, NbdRep.ERR_POLICY, self.refusal)
            return
        self._reply(option, NbdRep.INFO, proto.encode_info_export(export.size, self.flags_for(export)))
        if NbdInfo.NAME in infos:
            self._reply(option, NbdRep.INFO, proto.encode_info_name(export.name))
        if NbdInfo.DESCRIPTION in infos and export.description:
            self._reply(option, NbdRep.INFO, proto.encode_info_description(export.description))
        self._reply(option, NbdRep.INFO, proto.encode_info_block_size(
            export.min_block, export.pref_block, export.max_block))
        self._reply(option, NbdRep.ACK)
        if option == NbdOpt.GO:
            self._finish(export, name)

    def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, NbdRep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no payload")
            return
        if self.structured:
            self._error(option, NbdRep.ERR_INVALID, "structured replies already negotiated")
            return
        self.structured = True
        self._reply(option, NbdRep.ACK)

    def _opt_meta_context(self, option: int, payload: bytes) -> None:
        setting = option == NbdOpt.SET_META_CONTEXT
        if not self.structured:
            self._error(option, NbdRep.ERR_INVALID,
                        "meta contexts need NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            (name, queries), n = proto.decode_meta_request(payload)
        except NbdProtocolError:
            self._error(option, NbdRep.ERR_INVALID, "malformed meta context request")
            return
        if n != len(payload):
            self._error(option, NbdRep.ERR_INVALID, "trailing bytes in meta context request")
            return
        if self._lookup(name) is None:
            self._error(option, NbdRep.ERR_UNKNOWN, f"unknown export {name!r}")
            return
        if not queries:
            matched = not setting  # LIST with no query lists everything; SET selects nothing
        else:
            matched = any(q == BASE_ALLOCATION or (not setting and q == "base:")
                          for q in queries)
        if setting:
            self.meta_contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if matched else {}
            self.meta_export = name
        if matched:
            self._reply(option, NbdRep.META_CONTEXT,
                        proto.encode_rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION))
        self._reply(option, NbdRep.ACK)

    def _finish(self, export: Export, name: str) -> None:
        if self.meta_export is not None and self.meta_export != name:
            self.meta_contexts = {}  # contexts were chosen for another export
        self.state = HsState.DONE
        self._events.append(Negotiated(export, self.structured, self.flags_for(export),
                                       dict(self.meta_contexts)))


_OPTION_HANDLERS = {
    NbdOpt.EXPORT_NAME: HandshakeServer._opt_export_name,
    NbdOpt.ABORT: HandshakeServer._opt_abort,
    NbdOpt.LIST: HandshakeServer._opt_list,
    NbdOpt.STARTTLS: HandshakeServer._opt_starttls,
    NbdOpt.INFO: HandshakeServer._opt_info_go,
    NbdOpt.GO: HandshakeServer._opt_info_go,
    NbdOpt.STRUCTURED_REPLY: HandshakeServer._opt_structured_reply,
    NbdOpt.LIST_META_CONTEXT: HandshakeServer._opt_meta_context,
    NbdOpt.SET_META_CONTEXT: HandshakeServer._opt_meta_context,
}
