"""blockrep.peer.messages: control-message bodies from the peer are checked at the boundary.

Every malformed body is one LinkProtocolError; nothing else escapes, and whatever is accepted
can be stored (a generation fits the superblock's u64 fields). The malformed cases below are
the inputs tools/fuzz found crashing the node's handlers (regression tests).
"""

from __future__ import annotations

import pytest

from blockrep.bitmap import Bitmap
from blockrep.meta import Superblock
from blockrep.peer import messages
from blockrep.peer.proto import LinkProtocolError
from blockrep.state import DiskState, Generation, Role

SIZE = 1 << 30


def good_state(**kw):
    body = {"role": "Primary", "disk": "UpToDate", "gen": [6, 4, [2]], "changes": 7}
    body.update(kw)
    return body


def test_valid_bodies():
    ps = messages.peer_state(good_state(), SIZE)
    assert (ps.role, ps.disk) == (Role.PRIMARY, DiskState.UP_TO_DATE)
    assert ps.gen == Generation(6, 4, [2]) and ps.changes == 7
    assert messages.state_update({"role": "Secondary", "disk": "Outdated"}) == \
        (Role.SECONDARY, DiskState.OUTDATED)
    assert messages.control_op({"op": "sync-start"}) == "sync-start"
    assert messages.sync_start({"total": 4096, "csum": True, "uuid": 10}) == (4096, True, 10)
    assert messages.sync_start({"uuid": 2}) == (0, False, 2)
    assert messages.sync_done({"gen": [8, 0, [6, 4]]}) == Generation(8, 0, [6, 4])


BAD_GENS = [4, [101, ",en", [8, 0, [6, 4]]], [-14, 0, [6, 4]], {0: [8, 0, [6, 4]]},
            [1 << 64, 0, []], [1, 2, [3, -1]], [1.5, 0, []], [float("inf"), 0, []],
            [True, 0, []], [1, 2, 3], [1, 2, [3], 4], "abc", None]


@pytest.mark.parametrize("gen", BAD_GENS, ids=repr)
def test_bad_generation_is_a_protocol_error(gen):
    with pytest.raises(LinkProtocolError):
        messages.sync_done({"gen": gen})
    with pytest.raises(LinkProtocolError):
        messages.peer_state(good_state(gen=gen), SIZE)


@pytest.mark.parametrize("changes", ["abcd", [0, 5], 0.5, float("inf"), True, -1,
                                     SIZE // 4096 + 1, None, {"a": 1}], ids=repr)
def test_bad_bit_count_is_a_protocol_error(changes):
    with pytest.raises(LinkProtocolError):
        messages.peer_state(good_state(changes=changes), SIZE)


@pytest.mark.parametrize("body", [{}, {"role": "Primary"}, {"role": ["x"], "disk": "UpToDate"},
                                  {"role": "Primary", "disk": {}}], ids=repr)
def test_bad_state_update(body):
    with pytest.raises(LinkProtocolError):
        messages.state_update(body)


def test_missing_generation():
    with pytest.raises(LinkProtocolError):
        messages.sync_done({"cen": [8, 0, [6, 4]]})


@pytest.mark.parametrize("total", ["\x00ucm", -1, 1.5, None, [1], float("inf"), True, 1 << 64],
                         ids=repr)
def test_bad_sync_start(total):
    with pytest.raises(LinkProtocolError):
        messages.sync_start({"total": total, "uuid": 2})


@pytest.mark.parametrize("uuid", [None, 0, -2, 1 << 64, 1.5, True, "2", [2]], ids=repr)
def test_sync_start_needs_a_sync_identifier(uuid):
    with pytest.raises(LinkProtocolError):
        messages.sync_start({"total": 4096, "uuid": uuid})


@pytest.mark.parametrize("op", [["state"], {"a": 1}, 7, None, b"state"], ids=repr)
def test_control_op_must_be_a_name(op):
    with pytest.raises(LinkProtocolError):
        messages.control_op({"op": op})


def test_accepted_generation_is_storable():
    g = messages.sync_done({"gen": [(1 << 64) - 2, 0, [1, 2, 3, 4, 5]]})
    Superblock(gen=g).encode()
    assert len(g.history) == 4


def test_or_chunk_documents_value_error_only():
    import zlib
    for args in ((0, 1, b"garbage"), (0, 1, zlib.compress(bytes(9))), (-1, 1, b""),
                 (0, 1 << 30, b""), (0, 1, zlib.compress(bytes(8))[:-1])):
        with pytest.raises(ValueError):
            Bitmap(SIZE).or_chunk(*args)
    assert Bitmap(SIZE).or_chunk(0, 1, zlib.compress(b"\x03" + bytes(7))) == 2
