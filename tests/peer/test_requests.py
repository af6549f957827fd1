"""The request core (blockrep.peer.requests): RangeSet against a model, and the completion
and marking rules of TransferLog.mod under arbitrary event orders."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from blockrep.peer.requests import (BARRIER_ACK, COMPLETED, DETACHED, FLUSH, LINK_LOST,
                                    LOCAL_DONE, NEG_ACK, NO_PEER, NOT_WRITTEN, PEER_ACK,
                                    REMOTE, REMOTE_NEW, WRITE, RangeSet, Req, TransferLog)


# -- RangeSet ------------------------------------------------------------------------------
ranges = hs.tuples(hs.integers(0, 1000), hs.integers(1, 200))


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.tuples(hs.booleans(), ranges), max_size=40), ranges)
def test_rangeset_answers_like_a_model(ops, query):
    rs, model = RangeSet(), {}
    for add, (off, n) in ops:
        if add or not model:
            key = rs.add(off, n)
            model[key] = set(range(off, off + n))
        else:
            key = next(iter(model))
            del rs[key], model[key]
    q = set(range(query[0], query[0] + query[1]))
    assert rs.overlaps(*query) == any(v & q for v in model.values())
    assert sorted(rs.overlapping(*query)) == sorted(k for k, v in model.items() if v & q)
    assert bool(rs) == bool(model)


def test_rangeset_edges_do_not_overlap():
    rs = RangeSet()
    rs.add(100, 100)
    assert not rs.overlaps(0, 100) and not rs.overlaps(200, 10)
    assert rs.overlaps(199, 1) and rs.overlaps(0, 101)


# -- TransferLog ---------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.marked: list[tuple[int, int]] = []
        self.completed: dict[int, tuple[int, list]] = {}

    def mark(self, offset, length):
        self.marked.append((offset, length))

    def cb(self, cookie, err):
        assert cookie not in self.completed, "completed twice"
        self.completed[cookie] = (err, list(self.marked))


def test_completes_only_when_local_and_peer_are_done():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)
    pid = tl.sent(req)
    tl.mod(req, LOCAL_DONE)
    assert 1 not in r.completed
    tl.acked(pid, PEER_ACK)
    assert r.completed[1] == (0, [])
    assert tl.tl == {1: [0, 4096]}  # in the log until a barrier ack
    tl.close_epoch(0.0)
    tl.barrier_acked(1)
    assert tl.tl == {}


def test_link_loss_marks_the_transfer_log_before_completing():
    r = Recorder()
    tl = TransferLog(r.mark)
    done = Req(WRITE, 0, 4096, r.cb, 1)
    tl.acked(tl.sent(done), PEER_ACK)
    tl.mod(done, LOCAL_DONE)
    waiting = Req(WRITE, 8192, 4096, r.cb, 2)
    tl.sent(waiting)
    tl.mod(waiting, LOCAL_DONE)
    flush = Req(FLUSH, 0, 0, r.cb, 3)
    tl.close_epoch(0.0, flush)
    tl.mod(flush, LOCAL_DONE)
    tl.link_lost()
    assert r.completed[2] == (0, [(0, 4096), (8192, 4096), (8192, 4096)])
    assert r.completed[3][0] == 0
    assert not tl.pending and not tl.tl and not tl.barrier_waiters


def test_held_answers_wait_for_release_marked_first_in_completion_order():
    """Suspended I/O (fencing): completions decided while held are answered by release
    only, in the order they completed, each once; link-loss bits are set before."""
    r = Recorder()
    tl = TransferLog(r.mark)
    a, b = Req(WRITE, 0, 4096, r.cb, 1), Req(WRITE, 8192, 4096, r.cb, 2)
    for req in (a, b):
        tl.sent(req)
    tl.mod(a, LOCAL_DONE)
    tl.hold()
    tl.link_lost()  # a completes (its local part is done), b waits for its local part
    tl.hold()  # a second hold keeps what is held
    assert not r.completed and tl.held == [a]
    late = Req(WRITE, 65536, 512, r.cb, 3)
    tl.mod(late, NO_PEER)
    tl.mod(late, LOCAL_DONE)
    tl.mod(b, LOCAL_DONE)
    assert not r.completed and tl.held == [a, late, b]
    order = []
    for req in (a, late, b):
        req.cb = lambda cookie, err: (order.append(cookie), r.cb(cookie, err))
    assert tl.release() == 3 and order == [1, 3, 2]
    assert r.completed[1] == (0, [(0, 4096), (8192, 4096), (0, 4096), (8192, 4096),
                                  (65536, 512)])
    assert tl.held is None and tl.release() == 0
    after = Req(WRITE, 0, 1, r.cb, 4)
    tl.mod(after, NO_PEER)
    tl.mod(after, LOCAL_DONE)
    assert 4 in r.completed  # not held any more


def test_failed_local_part_before_sending_completes_at_once_with_the_error():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)
    tl.mod(req, LOCAL_DONE, 5)
    assert r.completed[1] == (5, [(0, 4096)])
    refused = Req(WRITE, 0, 4096, r.cb, 2)
    tl.mod(refused, NOT_WRITTEN, 5)
    assert r.completed[2] == (5, [(0, 4096)])  # nothing new marked
    with pytest.raises(ValueError):
        sent = Req(WRITE, 0, 1, r.cb, 3)
        tl.sent(sent)
        tl.mod(sent, NOT_WRITTEN, 5)


PEER_EVENTS = (PEER_ACK, NEG_ACK, LINK_LOST)


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.tuples(hs.sampled_from(["write", "flush", "local-only"]),
                          hs.sampled_from(PEER_EVENTS), hs.integers(0, 1), hs.booleans()),
                min_size=1, max_size=12),
       hs.randoms(use_true_random=False))
def test_every_request_completes_once_and_is_marked_before_when_the_peer_may_lack_it(
        specs, rnd):
    r = Recorder()
    tl = TransferLog(r.mark)
    reqs, events = [], []
    for i, (what, peer_ev, local_err, local_first) in enumerate(specs):
        kind = FLUSH if what == "flush" else WRITE
        req = Req(kind, i * 4096, 0 if kind == FLUSH else 4096, r.cb, i)
        reqs.append((req, what, peer_ev, local_err))
        if what == "local-only":
            tl.mod(req, NO_PEER)
            events.append((req, LOCAL_DONE, 5 if local_err else 0))
            continue
        if kind == FLUSH:
            tl.close_epoch(0.0, req)
            pev = BARRIER_ACK if peer_ev == PEER_ACK else peer_ev
        else:
            tl.sent(req)
            pev = peer_ev
        loc = (req, LOCAL_DONE, 5 if local_err else 0)
        peer = (req, pev, 0)
        events += [loc, peer] if local_first else [peer, loc]
    rnd.shuffle(events)
    lost = False
    for req, ev, err in events:
        if ev == LINK_LOST:
            if not lost:
                tl.link_lost()
                lost = True
            continue
        if ev == PEER_ACK or ev == NEG_ACK:
            pid = next((p for p, q in tl.pending.items() if q is req), None)
            if pid is not None:
                tl.acked(pid, ev)
        elif ev == BARRIER_ACK:
            epoch = next((e for e, qs in tl.barrier_waiters.items() if req in qs), None)
            if epoch is not None:
                tl.barrier_acked(epoch)
        else:
            tl.mod(req, ev, err)
    if not lost:
        tl.link_lost()
    for req, what, peer_ev, local_err in reqs:
        assert req.state & COMPLETED and req.cookie in r.completed
        err, marked_before = r.completed[req.cookie]
        assert err == (5 if local_err else 0)
        peer_may_lack = what == "local-only" or peer_ev != PEER_ACK or local_err
        if req.kind == WRITE and peer_may_lack:
            assert (req.offset, req.length) in marked_before


# -- protocols A and B: the client is answered early, the log keeps the request ----------------
from blockrep.peer.requests import QUEUED, RECEIVED  # noqa: E402


@pytest.mark.parametrize("early", [QUEUED, RECEIVED])
@pytest.mark.parametrize("then", [LINK_LOST, NEG_ACK])
def test_early_answer_keeps_the_request_until_the_write_ack(early, then):
    """A (queued) and B (received) complete the request for the client; a later negative
    ack or link loss still marks its range before it can be forgotten."""
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 4096, 8192, r.cb, 1)
    pid = tl.sent(req)
    tl.mod(req, LOCAL_DONE)
    assert 1 not in r.completed
    req.t = 10.0
    tl.mod(req, early)
    assert r.completed[1] == (0, [])
    assert pid in tl.pending  # still waiting for the peer's write
    g = tl.gap(12.5)
    assert g["bytes_not_on_peer_disk"] == 8192 and g["writes_not_on_peer_disk"] == 1
    assert g["bytes_not_received"] == (8192 if early == QUEUED else 0)
    assert g["oldest_s"] == 2.5
    if then == NEG_ACK:
        tl.acked(pid, NEG_ACK)
    else:
        tl.link_lost()
    assert (4096, 8192) in r.marked  # completed once (Recorder asserts), marked after
    assert tl.gap(13.0)["writes_not_on_peer_disk"] == 0


def test_early_answer_then_write_ack_leaves_no_gap():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)
    pid = tl.sent(req)
    req.t = 1.0
    tl.mod(req, QUEUED)
    tl.mod(req, LOCAL_DONE)
    assert r.completed[1] == (0, [])
    tl.acked(pid, PEER_ACK)
    assert not tl.pending and tl.gap(2.0)["bytes_not_on_peer_disk"] == 0
    assert r.marked == []


def test_a_remote_request_is_not_answered_when_queued():
    """A Diskless Primary's write has no local copy: QUEUED (protocol A) does not answer
    it; the peer's write ack does."""
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)
    req.state = REMOTE_NEW
    pid = tl.sent(req)
    tl.mod(req, QUEUED)
    assert 1 not in r.completed
    tl.acked(pid, PEER_ACK)
    assert r.completed[1] == (0, []) and r.marked == []


def test_protocol_c_request_has_no_gap_while_waiting():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)
    tl.sent(req)
    tl.mod(req, LOCAL_DONE)
    assert tl.gap(1.0) == {"writes_not_on_peer_disk": 0, "bytes_not_on_peer_disk": 0,
                           "writes_not_received": 0, "bytes_not_received": 0,
                           "oldest_s": 0.0}


# -- REMOTE requests (a Diskless Primary, on-io-error = detach) ------------------------------
def _remote(r, cookie, kind=WRITE):
    req = Req(kind, cookie * 4096, 4096, r.cb, cookie)
    req.state = REMOTE_NEW
    return req


def test_remote_request_completes_on_the_peer_ack_and_marks_nothing():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = _remote(r, 1)
    tl.sent(req)
    tl.mod(req, LOCAL_DONE, 5)  # a late local completion no longer counts
    assert 1 not in r.completed
    tl.acked(1, PEER_ACK)
    assert r.completed[1] == (0, []) and r.marked == []


@pytest.mark.parametrize("ev", [NEG_ACK, LINK_LOST, NO_PEER])
@pytest.mark.parametrize("kind", [WRITE, FLUSH])
def test_remote_request_without_the_peer_fails_eio_unmarked(ev, kind):
    r = Recorder()
    tl = TransferLog(r.mark)
    req = _remote(r, 1, kind)
    if ev != NO_PEER:
        tl.sent(req)
    tl.mod(req, ev)
    assert r.completed[1] == (5, []) and r.marked == []


def test_detached_local_part_counts_as_done_and_the_peer_decides():
    r = Recorder()
    tl = TransferLog(r.mark)
    running = Req(WRITE, 0, 4096, r.cb, 1)    # local write still running at the detach
    tl.sent(running)
    tl.mod(running, DETACHED)
    assert 1 not in r.completed
    tl.acked(1, PEER_ACK)
    assert r.completed[1] == (0, [])
    tl.mod(running, LOCAL_DONE, 5)  # the thread comes back with the disk's error: ignored
    acked = Req(WRITE, 4096, 4096, r.cb, 2)  # the peer had it, the local write failed
    tl.sent(acked)
    tl.acked(2, PEER_ACK)
    tl.mod(acked, DETACHED)
    assert r.completed[2] == (0, [])
    lost = Req(WRITE, 8192, 4096, r.cb, 3)  # local done, then detached, then link lost
    tl.sent(lost)
    tl.mod(lost, LOCAL_DONE)
    tl.mod(lost, DETACHED)
    tl.link_lost()
    assert r.completed[3][0] == 5  # its only good copy was to be the peer's
    negacked = Req(WRITE, 12288, 4096, r.cb, 4)  # the peer failed it, then the local disk
    tl.sent(negacked)
    tl.acked(4, NEG_ACK)
    tl.mod(negacked, DETACHED)
    assert r.completed[4][0] == 5


def test_detached_before_sending_waits_for_the_peer():
    r = Recorder()
    tl = TransferLog(r.mark)
    req = Req(WRITE, 0, 4096, r.cb, 1)  # the inline local write failed: detach, then send
    tl.mod(req, DETACHED)
    assert 1 not in r.completed and req.state & REMOTE
    tl.sent(req)
    tl.acked(1, PEER_ACK)
    assert r.completed[1] == (0, [])
