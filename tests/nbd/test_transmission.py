"""RequestRules.check (transmission-phase request validation) and the errno -> NBD error map."""

from __future__ import annotations

import errno

import pytest

from blockrep.nbd.constants import CmdFlag as F, NbdCmd as C, NbdErr as E, TransmissionFlag as TF
from blockrep.nbd.transmission import PAYLOAD_CMDS, RequestRules, nbd_error

SIZE = 1 << 20
MAX_BLOCK = 64 * 1024
ALL = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
       | TF.SEND_DF | TF.SEND_CACHE | TF.SEND_FAST_ZERO)
DATA_CMDS = [C.READ, C.WRITE, C.TRIM, C.CACHE, C.WRITE_ZEROES, C.BLOCK_STATUS]


def rules(tflags=ALL, structured=True, meta=True, size=SIZE, max_block=MAX_BLOCK):
    return RequestRules(size, tflags, structured, meta, max_block)


# -- everything advertised: valid requests pass ------------------------------------------------

@pytest.mark.parametrize("cmd", DATA_CMDS)
def test_valid_requests(cmd):
    r = rules()
    assert r.check(cmd, 0, 0, 4096) == 0
    assert r.check(cmd, 0, SIZE - 1, 1) == 0
    assert r.check(cmd, 0, SIZE - MAX_BLOCK, MAX_BLOCK) == 0


@pytest.mark.parametrize("cmd", [C.FLUSH, C.DISC])
def test_flush_and_disc(cmd):
    assert rules().check(cmd, 0, 0, 0) == 0
    assert rules().check(cmd, F.FUA, 0, 0) == 0


@pytest.mark.parametrize("cmd,flags", [
    (C.READ, F.FUA), (C.READ, F.DF), (C.READ, F.FUA | F.DF),
    (C.WRITE, F.FUA), (C.TRIM, F.FUA), (C.CACHE, F.FUA),
    (C.WRITE_ZEROES, F.FUA | F.NO_HOLE | F.FAST_ZERO),
    (C.BLOCK_STATUS, F.REQ_ONE), (C.BLOCK_STATUS, F.REQ_ONE | F.FUA),
])
def test_valid_flags(cmd, flags):
    assert rules().check(cmd, flags, 0, 4096) == 0


# -- past the end ------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [C.WRITE, C.WRITE_ZEROES])
@pytest.mark.parametrize("offset,length", [(SIZE - 4095, 4096), (SIZE, 1), (SIZE + 4096, 512),
                                           (2**64 - 1, 4096)])
def test_write_past_end_is_enospc(cmd, offset, length):
    assert rules().check(cmd, 0, offset, length) == E.ENOSPC


@pytest.mark.parametrize("cmd", [C.READ, C.TRIM, C.BLOCK_STATUS, C.CACHE])
@pytest.mark.parametrize("offset,length", [(SIZE - 4095, 4096), (SIZE, 1), (2**64 - 1, 4096)])
def test_other_past_end_is_einval(cmd, offset, length):
    assert rules().check(cmd, 0, offset, length) == E.EINVAL


def test_last_byte_is_in_range():
    r = rules(size=SIZE + 1)
    assert r.check(C.WRITE, 0, SIZE, 1) == 0
    assert r.check(C.WRITE, 0, SIZE, 2) == E.ENOSPC


# -- flags -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,flags", [
    (C.WRITE, F.DF), (C.WRITE, F.NO_HOLE), (C.WRITE, F.REQ_ONE), (C.WRITE, F.FAST_ZERO),
    (C.READ, F.NO_HOLE), (C.READ, F.FAST_ZERO), (C.READ, F.PAYLOAD_LEN),
    (C.TRIM, F.NO_HOLE), (C.TRIM, F.DF), (C.CACHE, F.DF),
    (C.WRITE_ZEROES, F.DF), (C.BLOCK_STATUS, F.DF), (C.BLOCK_STATUS, F.NO_HOLE),
    (C.FLUSH, F.DF), (C.DISC, F.NO_HOLE), (C.FLUSH, F.REQ_ONE),
])
def test_flag_not_valid_for_command(cmd, flags):
    assert rules().check(cmd, flags, 0, 0 if cmd in (C.FLUSH, C.DISC) else 4096) == E.EINVAL


@pytest.mark.parametrize("cmd", [C.READ, C.WRITE, C.TRIM, C.WRITE_ZEROES, C.FLUSH])
def test_fua_not_advertised(cmd):
    r = rules(tflags=ALL & ~TF.SEND_FUA)
    length = 0 if cmd == C.FLUSH else 4096
    assert r.check(cmd, F.FUA, 0, length) == E.EINVAL
    assert r.check(cmd, 0, 0, length) == 0


def test_fast_zero_not_advertised():
    r = rules(tflags=ALL & ~TF.SEND_FAST_ZERO)
    assert r.check(C.WRITE_ZEROES, F.FAST_ZERO, 0, 4096) == E.EINVAL
    assert r.check(C.WRITE_ZEROES, F.NO_HOLE, 0, 4096) == 0


def test_df_not_advertised():
    r = rules(tflags=ALL & ~TF.SEND_DF)
    assert r.check(C.READ, F.DF, 0, 4096) == E.EINVAL


def test_df_without_structured_replies():
    r = rules(structured=False, meta=False)
    assert r.check(C.READ, F.DF, 0, 4096) == E.EINVAL
    assert r.check(C.READ, 0, 0, 4096) == 0


@pytest.mark.parametrize("cmd", [C.READ, C.WRITE, C.TRIM, C.CACHE, C.WRITE_ZEROES])
def test_req_one_only_for_block_status(cmd):
    assert rules().check(cmd, F.REQ_ONE, 0, 4096) == E.EINVAL


@pytest.mark.parametrize("cmd", [C.WRITE, C.READ, C.TRIM])
@pytest.mark.parametrize("flag", [1 << 6, 1 << 15])
def test_unknown_flag_bits_are_einval(cmd, flag):
    assert rules().check(cmd, flag, 0, 4096) == E.EINVAL


def test_unknown_flag_bits_without_any_allowed_flag():
    r = rules(tflags=TF.HAS_FLAGS, structured=False, meta=False)
    assert r.check(C.WRITE, 1 << 6, 0, 4096) == E.EINVAL
    assert r.check(C.WRITE, 1 << 15, 0, 4096) == E.EINVAL


# -- commands not advertised / unknown ---------------------------------------------------------

@pytest.mark.parametrize("cmd,tflag", [(C.FLUSH, TF.SEND_FLUSH), (C.TRIM, TF.SEND_TRIM),
                                       (C.CACHE, TF.SEND_CACHE),
                                       (C.WRITE_ZEROES, TF.SEND_WRITE_ZEROES)])
def test_command_not_advertised(cmd, tflag):
    assert rules(tflags=ALL & ~tflag).check(cmd, 0, 0, 4096) == E.EINVAL
    assert rules().check(cmd, 0, 0, 4096) == 0


def test_block_status_needs_meta_context():
    assert rules(meta=False).check(C.BLOCK_STATUS, 0, 0, 4096) == E.EINVAL
    assert rules(meta=False).check(C.BLOCK_STATUS, F.REQ_ONE, 0, 4096) == E.EINVAL
    assert rules(meta=True).check(C.BLOCK_STATUS, 0, 0, 4096) == 0


@pytest.mark.parametrize("cmd", [C.RESIZE, 9, 42, 0xFFFF])
def test_unknown_commands(cmd):
    assert rules().check(cmd, 0, 0, 4096) == E.EINVAL


# -- read-only ---------------------------------------------------------------------------------

RO = ALL | TF.READ_ONLY


@pytest.mark.parametrize("cmd", [C.WRITE, C.TRIM, C.WRITE_ZEROES])
def test_read_only_rejects_writes(cmd):
    assert rules(tflags=RO).check(cmd, 0, 0, 4096) == E.EPERM


@pytest.mark.parametrize("cmd", [C.TRIM, C.WRITE_ZEROES])
def test_read_only_rejects_unadvertised_writes_with_eperm(cmd):
    tflags = TF.HAS_FLAGS | TF.READ_ONLY
    assert rules(tflags=tflags).check(cmd, 0, 0, 4096) == E.EPERM


def test_read_only_write_past_end_is_eperm():
    assert rules(tflags=RO).check(C.WRITE, 0, SIZE, 4096) == E.EPERM


@pytest.mark.parametrize("cmd", [C.READ, C.CACHE, C.BLOCK_STATUS])
def test_read_only_allows_reads(cmd):
    assert rules(tflags=RO).check(cmd, 0, 0, 4096) == 0
    assert rules(tflags=RO).check(C.FLUSH, 0, 0, 0) == 0


# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [C.READ, C.WRITE])
def test_length_over_max_block(cmd):
    r = rules()
    assert r.check(cmd, 0, 0, MAX_BLOCK) == 0
    assert r.check(cmd, 0, 0, MAX_BLOCK + 1) == E.EINVAL


@pytest.mark.parametrize("cmd", [C.TRIM, C.WRITE_ZEROES, C.BLOCK_STATUS])
def test_max_block_does_not_limit_payloadless_commands(cmd):
    assert rules().check(cmd, 0, 0, MAX_BLOCK * 4) == 0


def test_payload_cmds():
    assert PAYLOAD_CMDS == {C.WRITE}


# -- errno mapping -----------------------------------------------------------------------------

@pytest.mark.parametrize("err,expected", [
    (errno.EPERM, E.EPERM), (errno.EROFS, E.EPERM), (errno.EACCES, E.EPERM),
    (errno.EIO, E.EIO), (errno.ENOMEM, E.ENOMEM), (errno.EINVAL, E.EINVAL),
    (errno.ENOSPC, E.ENOSPC), (errno.EDQUOT, E.ENOSPC), (errno.EFBIG, E.ENOSPC),
    (errno.EOVERFLOW, E.EOVERFLOW), (errno.ENOTSUP, E.ENOTSUP),
    (errno.EOPNOTSUPP, E.ENOTSUP), (errno.ESHUTDOWN, E.ESHUTDOWN),
    (errno.EBADF, E.EIO), (errno.ENXIO, E.EIO), (errno.EAGAIN, E.EIO),
])
def test_nbd_error_from_errno(err, expected):
    assert nbd_error(OSError(err, "x")) == expected


def test_nbd_error_subclasses_and_others():
    assert nbd_error(PermissionError(errno.EACCES, "denied")) == E.EPERM
    assert nbd_error(FileNotFoundError(errno.ENOENT, "gone")) == E.EIO
    assert nbd_error(OSError("no errno")) == E.EIO
    assert nbd_error(ValueError("boom")) == E.EIO
    assert nbd_error(RuntimeError()) == E.EIO


def test_nbd_error_values_are_wire_values():
    """NBD error numbers are fixed by the spec, independent of the host errno values."""
    assert (E.EPERM, E.EIO, E.ENOMEM, E.EINVAL, E.ENOSPC, E.EOVERFLOW, E.ENOTSUP,
            E.ESHUTDOWN) == (1, 5, 12, 22, 28, 75, 95, 108)
