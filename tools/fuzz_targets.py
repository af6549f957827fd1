"""The fuzz targets of tools/fuzz: one per decoder, each with its seeds and allowed errors.

A target's build() imports what it drives (inside atheris' instrumentation, so coverage
guides the search) and returns (one_input, seeds): one_input(data) feeds the decoder and
checks invariants with assert; seeds are valid encodings to start from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable


@dataclass
class Target:
    name: str
    doc: str
    build: Callable
    allowed: Callable  # -> tuple of the exception classes the decoder documents
    max_len: int = 4096


TARGETS: dict[str, Target] = {}


def target(name: str, doc: str, allowed: Callable, max_len: int = 4096):
    def deco(fn):
        TARGETS[name] = Target(name, doc, fn, allowed, max_len)
        return fn
    return deco


def _nbd_errors():
    from blockrep.nbd.proto import NbdProtocolError
    return (NbdProtocolError,)


def _link_errors():
    from blockrep.peer.proto import LinkProtocolError
    return (LinkProtocolError,)


def _meta_errors():
    from blockrep.meta import MetaError
    return (MetaError,)


def _config_errors():
    from blockrep.config import ConfigError
    return (ConfigError,)


def _bitmap_errors():
    return (ValueError,)  # Bitmap.or_chunk / Bitmap(words=...) document ValueError


def _nothing():
    return ()


# -- NBD ---------------------------------------------------------------------------------------

@target("nbd-handshake", "NBD fixed-newstyle option negotiation (HandshakeServer)", _nothing)
def nbd_handshake():
    from blockrep.nbd import handshake as hs, proto
    from blockrep.nbd.constants import BASE_ALLOCATION, ClientFlag, NbdInfo, NbdOpt

    flags = 0x1ff
    exports = {"": hs.Export("", 1 << 20, flags, "default"),
               "b": hs.Export("b", 4096, flags | 2, "", 512, 4096, 1 << 20)}
    greeting = proto.encode_server_greeting(3)

    def one(data: bytes) -> None:
        if not data:
            return
        ctl, body = data[0], data[1:]
        server = hs.HandshakeServer(exports, refusal="Secondary" if ctl & 0x80 else None)
        assert server.data_to_send() == greeting
        step = 1 + (ctl & 0x3F)
        chunks = [body] if ctl & 0x40 else [body[i:i + step] for i in range(0, len(body), step)]
        finished = None
        for c in chunks:
            events = server.receive_data(c)
            out = server.data_to_send()
            assert isinstance(out, bytes)
            for ev in events:
                assert finished is None, "event after the end of the handshake"
                assert isinstance(ev, (hs.Negotiated, hs.Closed)), ev
                finished = ev
            if finished is not None:
                assert server.receive_data(b"more") == []
        if isinstance(finished, hs.Negotiated):
            assert finished.export in exports.values()
            assert not ctl & 0x80, "a refusing server negotiated an export"
            assert isinstance(server.leftover, bytes)
            assert set(finished.meta_contexts) <= {1}

    cf = proto.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    opt = proto.encode_option
    seeds = [
        b"\x40" + cf + opt(NbdOpt.STRUCTURED_REPLY)
        + opt(NbdOpt.SET_META_CONTEXT, proto.encode_meta_request("", [BASE_ALLOCATION]))
        + opt(NbdOpt.GO, proto.encode_info_request("", [NbdInfo.NAME, NbdInfo.DESCRIPTION]))
        + proto.encode_request(0, 0, 1, 0, 512),
        b"\x07" + cf + opt(NbdOpt.LIST) + opt(NbdOpt.INFO, proto.encode_info_request("b", []))
        + opt(NbdOpt.LIST_META_CONTEXT, proto.encode_meta_request("b", ["base:"]))
        + opt(NbdOpt.EXPORT_NAME, b"b"),
        b"\x00" + cf + opt(NbdOpt.STARTTLS) + opt(99, b"xyz") + opt(NbdOpt.ABORT),
        b"\xc0" + cf + opt(NbdOpt.GO, proto.encode_info_request("", [])),
        b"\x40" + cf + proto.encode_option_header(NbdOpt.INFO, 70000) + bytes(300),
    ]
    return one, seeds


@target("nbd-proto", "NBD structure decoders (nbd/proto.py)", _nbd_errors)
def nbd_proto():
    from blockrep.nbd import proto
    from blockrep.nbd.constants import NbdInfo

    decoders = [
        proto.decode_server_greeting, proto.decode_client_flags, proto.decode_option_header,
        proto.decode_option_reply, lambda b: proto.decode_export_name_reply(b, True),
        lambda b: proto.decode_export_name_reply(b, False), proto.decode_info_request,
        proto.decode_meta_request, proto.decode_rep_server, proto.decode_rep_meta_context,
        proto.decode_info, proto.decode_request, proto.decode_simple_reply,
        proto.decode_structured_header, proto.decode_error_payload,
        proto.decode_block_status_payload, proto.decode_offset_hole_payload,
    ]

    def one(data: bytes) -> None:
        if not data:
            return
        which = data[0] % len(decoders)
        buf = data[1:]
        if data[0] & 0x80:
            buf = bytearray(buf)  # the shell decodes from bytearrays and memoryviews too
        value, n = decoders[which](buf)
        assert 0 <= n <= len(buf), (n, len(buf))
        if decoders[which] is proto.decode_request:
            r = value
            assert proto.encode_request(r.cmd, r.flags, r.cookie, r.offset, r.length) == \
                bytes(buf[:n])
        if decoders[which] is proto.decode_info_request:
            name, infos = value
            assert proto.encode_info_request(name, infos) == bytes(buf[:n])

    seeds = [bytes([0]) + proto.encode_server_greeting(3),
             bytes([2]) + proto.encode_option(7, b"abc"),
             bytes([3]) + proto.encode_option_reply(7, 1, b"x"),
             bytes([6]) + proto.encode_info_request("name", [0, 1, 2]),
             bytes([7]) + proto.encode_meta_request("", ["base:allocation", "q"]),
             bytes([8]) + proto.encode_rep_server("n", "descr"),
             bytes([10]) + proto.encode_info_block_size(1, 4096, 1 << 25),
             bytes([10]) + proto.encode_info_export(4096, 3),
             bytes([10]) + proto.encode_info_name("n") + bytes([NbdInfo.NAME]),
             bytes([11]) + proto.encode_request(1, 1, 7, 4096, 512),
             bytes([12]) + proto.encode_simple_reply(0, 7),
             bytes([13]) + proto.encode_structured_header(1, 1, 7, 12),
             bytes([14]) + proto.encode_error_payload(5, "boom"),
             bytes([15]) + proto.encode_block_status_payload(1, [(4096, 0), (512, 3)]),
             bytes([16]) + proto.encode_offset_hole_payload(0, 4096)]
    return one, seeds


@target("nbd-transmission", "NBD request stream + validation (RequestRules, nbd_error)",
        _nothing)
def nbd_transmission():
    import errno

    from blockrep.nbd import proto, transmission as tm
    from blockrep.nbd.constants import NbdCmd, NbdErr, TransmissionFlag as TF

    errors = {0} | {int(e) for e in NbdErr}
    params = struct.Struct(">QHBB")  # size, transmission flags, bits, log2(max_block)

    def one(data: bytes) -> None:
        if len(data) < params.size:
            return
        size, tflags, bits, lmax = params.unpack_from(data)
        size = max(size, 1)
        max_block = 1 << (lmax % 33)
        rules = tm.RequestRules(size, tflags, bool(bits & 1), bool(bits & 2), max_block)
        err = tm.nbd_error(OSError(bits % 140, "x"))
        assert err in errors
        buf = memoryview(data)[params.size:]
        while True:
            try:
                r, n = proto.decode_request(buf)
            except proto.NbdProtocolError:
                break  # truncated, or a bad magic: the connection ends
            buf = buf[n:]
            e = rules.check(r.cmd, r.flags, r.offset, r.length)
            assert e in errors, e
            if e == 0 and r.cmd not in (NbdCmd.FLUSH, NbdCmd.DISC):
                assert 0 < r.length and r.offset + r.length <= size, r
                if r.cmd in (NbdCmd.READ, NbdCmd.WRITE):
                    assert r.length <= max_block, r
                if tflags & TF.READ_ONLY:
                    assert r.cmd not in (NbdCmd.WRITE, NbdCmd.TRIM, NbdCmd.WRITE_ZEROES), r

    head = params.pack(1 << 20, 0x1ff, 3, 25)
    req = proto.encode_request
    seeds = [head + req(0, 0, 1, 0, 4096) + req(1, 1, 2, 4096, 512) + req(3, 0, 3, 0, 0)
             + req(4, 0, 4, 0, 4096) + req(6, 2, 5, 0, 4096) + req(7, 8, 6, 0, 1 << 20)
             + req(2, 0, 7, 0, 0),
             params.pack(4096, 0x3, 0, 12) + req(1, 0, 1, 0, 4096) + req(0, 4, 2, 4000, 200),
             params.pack(errno.EIO, 0x1ff, 5, 0) + req(5, 0, 1, 1 << 40, 1)]
    return one, seeds


# -- link ---------------------------------------------------------------------------------------

@target("link-frame", "link packet framing: headers, control maps, data CRCs (peer/proto.py)",
        _link_errors)
def link_frame():
    from blockrep import native
    from blockrep.peer import proto
    from blockrep.peer.proto import P

    def one(data: bytes) -> None:
        # inputs of even length get each header's checksum recomputed, so that mutated
        # fields reach the checks past hcrc; odd ones exercise the hcrc check itself
        fix = len(data) % 2 == 0
        buf = bytearray(data)
        pos = 0
        while len(buf) - pos >= proto.HEADER_SIZE:  # as PeerLink._parse walks its buffer
            if fix:
                buf[pos + 36:pos + 40] = native.crc32c(bytes(buf[pos:pos + 36])).to_bytes(4, "big")
            ptype, flags, pid, offset, size, paylen, crc = proto.unpack_header(buf, pos)
            assert paylen <= proto.MAX_PAYLOAD
            p0 = pos + proto.HEADER_SIZE
            if len(buf) - p0 < paylen:
                break
            payload = buf[p0:p0 + paylen]
            pos = p0 + paylen
            if ptype in proto.CONTROL_TYPES:
                body = proto.decode_control(payload)
                assert isinstance(body, dict)
                if ptype == P.HELLO:
                    proto.need(body, "challenge", bytes)
                elif ptype == P.AUTH:
                    proto.need(body, "response", bytes)
            elif ptype in proto.DATA_TYPES:
                assert isinstance(proto.check_crc(payload, crc), bool)
                if flags & proto.F_RUNS:  # batched resync data: the run table
                    runs, base = proto.parse_runs(payload, 1 << 40)
                    assert sum(n for _, n in runs) == len(payload) - base
            elif ptype == P.READ_REPLY:  # a Diskless Primary's read: data or an errno
                proto.check_payload(ptype, crc, payload)
                err = proto.read_reply_error(flags, size)
                assert 0 <= err < 4096 and (err == 0) == (not flags & proto.F_ERR)

    data = b"\xff" * 4096
    seeds = [proto.encode_control(P.HELLO, {"version": 1, "resource": "r0", "node": "a",
                                            "challenge": bytes(32), "size": 1 << 30})
             + proto.encode_control(P.AUTH, {"response": bytes(32)})
             + proto.pack_header(P.PING) + proto.data_header(P.DATA, 1, 0, data) + data,
             proto.encode_control(P.STATE, {"role": "Primary", "changes": 4})
             + proto.data_header(P.RS_DATA, 2, 4096, b"abc", 8) + b"abd"]
    batch = bytearray(proto.runs_table_size(2) + 8)
    proto.pack_runs_table(batch, [(0, 4), (4096, 4)])
    seeds.append(proto.data_header(P.RS_DATA, 3, 0, bytes(batch), proto.F_RUNS) + batch)
    seeds.append(proto.pack_header(P.READ_REQUEST, 0, 4, 8192, 4096)  # and its two answers
                 + proto.data_header(P.READ_REPLY, 4, 8192, data) + data
                 + proto.pack_header(P.READ_REPLY, proto.F_ERR, 5, 8192, 5))
    return one, seeds


@target("link-handshake", "the link handshake machine fed arbitrary bytes in arbitrary "
        "pieces, as dialer or acceptor, with or without TLS (peer/handshake.py)", _link_errors)
def link_handshake():
    from blockrep.peer import handshake as hs_mod
    from blockrep.peer import proto

    state = {"role": "Secondary", "disk": "UpToDate", "gen": [1, 0, []], "bitmap": []}
    kinds = (hs_mod.Send, hs_mod.StartTls, hs_mod.Established, hs_mod.Refused)

    def machine(dialer: bool, tls: bool) -> hs_mod.LinkHandshake:
        me, peer = ("alpha", "beta") if dialer else ("beta", "alpha")
        p = hs_mod.HandshakeParams(resource="r0", me=me, peer=peer, secret=b"s3cret",
                                   size=1 << 20, tls=tls, timeout=5.0)
        return hs_mod.LinkHandshake(p, dialer=dialer, nonce=bytes(range(dialer, 32 + dialer)),
                                    now=0.0, local_state=lambda: dict(state))

    def one(data: bytes) -> None:
        if len(data) < 2:
            return
        mode, step = data[0], data[1] or 1  # who we are; the size of each piece we get
        hs = machine(bool(mode & 1), bool(mode & 2))
        events = hs.start()
        now = 0.0
        for pos in range(2, len(data), step):
            if hs.phase is hs_mod.HsPhase.CLOSED:
                break
            if hs.phase is hs_mod.HsPhase.TLS:  # the shell would run TLS here; say how it went
                events += hs.tls_done(None if mode & 4 else "handshake failed", now)
                continue
            events += hs.receive_data(data[pos:pos + step], now)
            # bounded before the peer proved itself: one header and a small control map
            assert hs.peer_authenticated or len(hs._in) <= (
                proto.HEADER_SIZE + hs_mod.PRE_AUTH_MAX_CONTROL + step), len(hs._in)
            now += 0.25
            events += hs.check_time(now)
        for ev in events:
            assert isinstance(ev, kinds), ev
            if isinstance(ev, hs_mod.Established):
                assert hs.peer_authenticated  # never without the proof

    # seeds: what a real peer says first, so the fuzzer starts from well-formed packets
    d, a = machine(True, False), machine(False, False)
    hello_d = b"".join(e.data for e in d.start() if isinstance(e, hs_mod.Send))
    reply_a = b"".join(e.data for e in a.receive_data(hello_d, 0.0) if isinstance(e, hs_mod.Send))
    seeds = [b"\x00\x07" + hello_d, b"\x01\x40" + reply_a,
             b"\x02\x28" + proto.pack_header(proto.P.STARTTLS) + hello_d,
             b"\x07\x01" + proto.pack_header(proto.P.STARTTLS) + reply_a]
    return one, seeds


@target("link-control", "link control-message bodies: P_STATE and CONTROL operations "
        "(peer/messages.py)", _link_errors)
def link_control():
    from blockrep.meta import Superblock
    from blockrep.peer import messages, proto
    from blockrep.shell.node import _CONTROL_OPS

    size = 1 << 30

    def check_gen(g) -> None:
        Superblock(gen=g).encode()  # what the node adopts must be storable in metadata

    def one(data: bytes) -> None:
        body = proto.decode_control(data)
        try:
            ps = messages.peer_state(body, size)
        except proto.LinkProtocolError:
            pass
        else:
            check_gen(ps.gen)
            assert 0 <= ps.changes <= size >> 12
        op = messages.control_op(body)
        if _CONTROL_OPS.get(op) is None:
            return
        if op == "state":
            messages.state_update(body)
        elif op == "sync-start":
            total, csum, uuid = messages.sync_start(body)
            assert isinstance(total, int) and 0 <= total and isinstance(csum, bool)
            assert 0 < uuid < 1 << 64
        elif op == "sync-done":
            check_gen(messages.sync_done(body))

    import msgpack
    pk = lambda b: msgpack.packb(b, use_bin_type=True)  # noqa: E731
    seeds = [pk({"role": "Primary", "disk": "UpToDate", "gen": [6, 4, [2]],
                 "was_primary": True, "changes": 12}),
             pk({"op": "state", "role": "Secondary", "disk": "Outdated"}),
             pk({"op": "sync-start", "total": 1 << 20, "csum": True, "uuid": 6}),
             pk({"op": "sync-done", "gen": [8, 0, [6, 4]]}),
             pk({"op": "verify", "action": "start"}), pk({"op": "renegotiate"})]
    return one, seeds


# -- metadata -----------------------------------------------------------------------------------

@target("meta-superblock", "superblock decoding (meta.Superblock.decode)", _meta_errors)
def meta_superblock():
    from blockrep import native
    from blockrep.meta import MAGIC, SB_CRC_AT, SB_SIZE, Superblock
    from blockrep.state import DiskState, Generation

    def one(data: bytes) -> None:
        if not data:
            return
        buf = bytearray(data[1:SB_SIZE + 1].ljust(SB_SIZE, b"\0"))
        if data[0] & 1:  # a well-formed frame around fuzzed fields: get past magic and CRC
            buf[:8] = MAGIC
            if data[0] & 2:
                buf[8:12] = struct.pack("<I", 1)
            if data[0] & 4:
                buf[48:60] = struct.pack("<III", 4096, 4 << 20, 32)
            struct.pack_into("<I", buf, SB_CRC_AT, native.crc32c(bytes(buf[:SB_CRC_AT])))
        sb = Superblock.decode(bytes(buf), "fuzz")
        if sb is None:
            return
        again = Superblock.decode(sb.encode(), "fuzz")
        assert (again.seq, again.data_size, again.md_size, again.disk_state, again.gen) == \
            (sb.seq, sb.data_size, sb.md_size, sb.disk_state, sb.gen)

    good = Superblock(seq=5, data_size=1 << 30, md_size=1 << 20, resource="r0", node="a",
                      disk_state=DiskState.UP_TO_DATE, gen=Generation(10, 8, [6])).encode()
    seeds = [b"\x00" + good, b"\x07" + good, b"\x00" + bytes(600), b"\x01" + bytes(512)]
    return one, seeds


@target("meta-al", "activity-log transactions (meta.decode_al) applied to a bitmap",
        _meta_errors, max_len=8192)
def meta_al():
    from blockrep import native
    from blockrep.bitmap import Bitmap
    from blockrep.meta import AL_EXTENT, AL_MAGIC, AL_MAX_PER_SLOT, AL_SLOT, AL_SLOTS, decode_al

    def one(data: bytes) -> None:
        if not data:
            return
        ctl = data[0]
        raw = bytearray(AL_SLOTS * AL_SLOT)
        piece = 16 + (ctl & 0x3F) * 4
        body = data[1:]
        for i in range(min(AL_SLOTS, -(-len(body) // piece))):
            chunk = body[i * piece:(i + 1) * piece]
            slot = i * AL_SLOT
            raw[slot:slot + len(chunk)] = chunk
            if ctl & 0x80:  # make it a committed transaction around the fuzzed extents
                struct.pack_into("<I", raw, slot, AL_MAGIC)
                count = min(max(len(chunk) - 20, 0) // 4, AL_MAX_PER_SLOT)
                struct.pack_into("<I", raw, slot + 12, count)
                end = 20 + 4 * count
                struct.pack_into("<I", raw, slot + AL_SLOT - 4,
                                 native.crc32c(bytes(raw[slot:slot + end])))
        if ctl & 0x40:
            raw = raw[:len(raw) - (ctl & 0x3F) * 97]  # a short read of the area
        seq, exts = decode_al(bytes(raw))
        assert len(exts) <= AL_MAX_PER_SLOT and seq >= 0
        bm = Bitmap(64 << 20)
        for ext in exts:  # what MetaStore does with them after a crash
            bm.set_range(ext * AL_EXTENT, AL_EXTENT)
        assert bm.count() <= bm.nbits

    seeds = [b"\x85" + bytes(20) + struct.pack("<5I", 0, 1, 2, 3, 15),
             b"\x80" + b"\x01" * 200, b"\x00" + bytes(64)]
    return one, seeds


@target("bitmap", "bitmap chunks as a peer sends them (Bitmap.or_chunk, P_BITMAP) and "
        "on-disk words", _bitmap_errors)
def bitmap():
    import zlib

    import numpy as np

    from blockrep.bitmap import Bitmap

    def one(data: bytes) -> None:
        if len(data) < 12:
            return
        size = 1 + (struct.unpack_from("<I", data)[0] % (1 << 26))
        ctl = data[0]
        if ctl & 1:  # words as read from disk
            raw = data[4:]
            words = np.frombuffer(raw[:len(raw) // 8 * 8], dtype="<u8")
            bm = Bitmap(size, words)
        else:  # a P_BITMAP chunk: first word, word count, payload (zlib or garbage)
            w0, n = struct.unpack_from("<ii", data, 4)
            payload = data[12:]
            if ctl & 2:
                payload = zlib.compress(payload)
            bm = Bitmap(size)
            bm.or_chunk(w0, n, payload)
        again = Bitmap(size)
        for chunk in bm.encode_chunks():
            again.or_chunk(*chunk)
        assert np.array_equal(again.words, bm.words) or ctl & 1  # words may have tail bits
        assert again.count() <= again.nbits
        for off, ln in again.byte_runs(1 << 20):
            assert 0 <= off and off + ln <= size and 0 < ln <= 1 << 20

    seeds = [struct.pack("<Iii", 1 << 24, 0, 2) + zlib.compress(b"\x0f" + bytes(15)),
             b"\x02" + struct.pack("<I", 1 << 20)[1:] + struct.pack("<ii", 1, 1) + bytes(8),
             struct.pack("<I", 4096 * 64 + 1) + np.arange(2, dtype="<u8").tobytes()]
    return one, seeds


# -- configuration ------------------------------------------------------------------------------

@target("config", "resource configuration: TOML text -> validated ResourceConfig",
        _config_errors)
def config():
    from blockrep import config as cfgmod

    def one(data: bytes) -> None:
        cfg = cfgmod.loads(data, "fuzz.toml")
        assert len(cfg.nodes) == 2
        for n in cfg.nodes.values():
            assert 0 < n.address[1] < 65536 and 0 < n.nbd[1] < 65536
            assert isinstance(n.disk, str)
        for v in (cfg.ping_interval, cfg.timeout, cfg.connect_interval, cfg.barrier_interval):
            assert 0 < v < float("inf"), v
        cfg.admin_socket(next(iter(cfg.nodes)))

    seeds = [b"""[resource]
name = "r0"
shared-secret = "s"
protocol = "C"
ping-interval = 1
timeout = 4.5
resync-rate = "100M"
resync-window = 16
after-sb-0pri = "discard-zero-changes"

[node.alpha]
address = "10.0.0.1:7789"
disk = "/dev/vdb"
nbd = "127.0.0.1:10809"
meta-disk = "/var/lib/a.md"

[node.beta]
address = "[::1]:7790"
disk = "/dev/vdc"
nbd = "localhost:10810"
export = "e"
""", b'[resource]\nname="x"\nshared-secret="y"\n[node.a]\naddress="h:1"\ndisk="d"\n'
         b'nbd="h:2"\n[node.b]\naddress="h:3"\ndisk="d2"\nnbd="h:4"\n']
    return one, seeds
