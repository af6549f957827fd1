"""blockrep.bitmap: bit arithmetic on edge cases, and runs() against a pure-Python model.

The reference model is a plain list of booleans, one per 4 KiB block; every Bitmap
operation is mirrored on it and the two must agree bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep import bitmap
from blockrep.bitmap import BLOCK, Bitmap

SETTINGS = settings(max_examples=150, deadline=None)


# -- helpers -----------------------------------------------------------------------------------

def bits_of(bm: Bitmap) -> list[bool]:
    """Every bit of bm as a list, read word by word (independent of runs())."""
    out = []
    for i in range(bm.nbits):
        out.append(bool((int(bm.words[i >> 6]) >> (i & 63)) & 1))
    return out


def ref_runs(bits: list[bool], start: int = 0, end: int | None = None):
    end = len(bits) if end is None else min(end, len(bits))
    out = []
    i = max(start, 0)
    while i < end:
        if bits[i]:
            j = i
            while j < end and bits[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def set_blocks(bm: Bitmap, blocks) -> None:
    for b in blocks:
        bm.set_range(b * BLOCK, BLOCK)


def set_bits(bm: Bitmap) -> set[int]:
    return {i for i, v in enumerate(bits_of(bm)) if v}


# -- construction ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, nbits, nwords", [
    (0, 0, 0),
    (1, 1, 1),
    (BLOCK, 1, 1),
    (BLOCK + 1, 2, 1),
    (64 * BLOCK, 64, 1),
    (64 * BLOCK + 1, 65, 2),
    (128 * BLOCK, 128, 2),
])
def test_geometry(size, nbits, nwords):
    bm = Bitmap(size)
    assert bm.nbits == nbits
    assert bm.words.size == nwords
    assert bm.words.dtype == np.uint64
    assert bm.count() == 0


def test_words_of_wrong_length_rejected():
    with pytest.raises(ValueError):
        Bitmap(65 * BLOCK, np.zeros(1, dtype=np.uint64))


def test_words_are_adopted():
    w = np.array([0b1011, 1 << 63], dtype=np.uint64)
    bm = Bitmap(128 * BLOCK, w)
    assert set_bits(bm) == {0, 1, 3, 127}
    assert bm.count() == 4


# -- set_range ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, length, expected", [
    (0, 1, {0}),                                  # one byte -> its block
    (0, BLOCK, {0}),                              # exactly one block
    (1, BLOCK, {0, 1}),                           # unaligned: touches two blocks
    (BLOCK - 1, 2, {0, 1}),                       # straddles a block boundary
    (5 * BLOCK, 3 * BLOCK, {5, 6, 7}),            # within one word
    (60 * BLOCK, 8 * BLOCK, set(range(60, 68))),  # across a word boundary
    (0, 64 * BLOCK, set(range(64))),              # exactly one full word
    (64 * BLOCK, 64 * BLOCK, set(range(64, 128))),  # exactly the second word
    (63 * BLOCK, 66 * BLOCK, set(range(63, 129))),  # partial, full, partial word
    (10 * BLOCK, 0, set()),                       # zero length
])
def test_set_range(offset, length, expected):
    bm = Bitmap(200 * BLOCK)
    bm.set_range(offset, length)
    assert set_bits(bm) == expected
    assert bm.count() == len(expected)


def test_set_range_clamps_at_device_end():
    bm = Bitmap(70 * BLOCK)
    bm.set_range(68 * BLOCK, 10 * BLOCK)
    assert set_bits(bm) == {68, 69}
    # the unused tail of the last word stays clear
    assert int(bm.words[1]) == 0b110000


def test_set_range_whole_device():
    size = 130 * BLOCK + 7
    bm = Bitmap(size)
    bm.set_range(0, size)
    assert bm.count() == bm.nbits == 131
    assert bm.count_bytes() == size
    assert int(bm.words[0]) == int(bm.words[1]) == 0xFFFFFFFFFFFFFFFF
    assert int(bm.words[2]) == 0b111


def test_last_partial_block():
    size = 10 * BLOCK + 100  # 11 blocks, the last one is 100 bytes long
    bm = Bitmap(size)
    assert bm.nbits == 11
    bm.set_range(size - 1, 1)
    assert set_bits(bm) == {10}
    assert bm.test(size - 1)
    assert bm.test(10 * BLOCK)
    assert not bm.test(10 * BLOCK - 1)
    assert bm.count() == 1
    assert bm.count_bytes() == 100


def test_set_all_and_clear_all():
    bm = Bitmap(100 * BLOCK + 1)
    bm.set_all()
    assert bm.count() == 101
    assert int(bm.words[1]) == (1 << 37) - 1  # no bits past nbits
    bm.clear_all()
    assert bm.count() == 0
    assert not bm.words.any()


# -- test / count / count_bytes ----------------------------------------------------------------

def test_test_per_offset():
    bm = Bitmap(200 * BLOCK)
    bm.set_range(64 * BLOCK, BLOCK)
    assert bm.test(64 * BLOCK)
    assert bm.test(65 * BLOCK - 1)
    assert not bm.test(64 * BLOCK - 1)
    assert not bm.test(65 * BLOCK)
    bm.set_range(199 * BLOCK, BLOCK)
    assert bm.test(200 * BLOCK - 1)


@pytest.mark.parametrize("size", [200 * BLOCK, 200 * BLOCK - 1000, 1])
def test_count_bytes(size):
    bm = Bitmap(size)
    assert bm.count_bytes() == 0
    bm.set_range(0, 1)
    assert bm.count_bytes() == min(BLOCK, size)
    if size > 3 * BLOCK:
        bm.set_range(2 * BLOCK, 1)
        assert bm.count_bytes() == 2 * BLOCK
        # the last (possibly partial) block counts only its real bytes
        bm.set_range(size - 1, 1)
        last = size - (bm.nbits - 1) * BLOCK
        assert bm.count_bytes() == 2 * BLOCK + last


def test_count_bytes_without_last_block_counts_full_blocks():
    bm = Bitmap(3 * BLOCK + 5)
    bm.set_range(0, 3 * BLOCK)
    assert bm.count_bytes() == 3 * BLOCK


# -- clear_range -------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, length, remaining", [
    (0, BLOCK, set(range(1, 10))),               # exactly one block
    (0, BLOCK - 1, set(range(10))),              # not wholly covered: nothing cleared
    (1, BLOCK, set(range(10))),                  # covers parts of two blocks: nothing
    (100, 2 * BLOCK, {0} | set(range(2, 10))),   # block 1 wholly covered, 0 and 2 not
    (2 * BLOCK, 3 * BLOCK, {0, 1} | set(range(5, 10))),
    (3 * BLOCK, 0, set(range(10))),              # zero length
    (BLOCK + 1, BLOCK - 2, set(range(10))),      # strictly inside one block
])
def test_clear_range_only_whole_blocks(offset, length, remaining):
    bm = Bitmap(100 * BLOCK)
    bm.set_range(0, 10 * BLOCK)
    bm.clear_range(offset, length)
    assert set_bits(bm) == remaining


def test_clear_range_across_words():
    bm = Bitmap(300 * BLOCK)
    bm.set_all()
    bm.clear_range(10 * BLOCK, 200 * BLOCK)
    assert set_bits(bm) == set(range(10)) | set(range(210, 300))


def test_clear_range_partial_last_block_at_device_end():
    size = 10 * BLOCK + 100
    bm = Bitmap(size)
    bm.set_all()
    # the range reaches the end of the device: the partial last block is cleared too
    bm.clear_range(9 * BLOCK, BLOCK + 100)
    assert set_bits(bm) == set(range(9))
    bm.set_all()
    # the same but ending one byte short of the device end: block 10 stays set
    bm.clear_range(9 * BLOCK, BLOCK + 99)
    assert set_bits(bm) == set(range(9)) | {10}
    bm.set_all()
    # a range beyond the device end is clamped
    bm.clear_range(10 * BLOCK, 10 * BLOCK)
    assert set_bits(bm) == set(range(10))


def test_clear_range_whole_device():
    size = 1000 * BLOCK + 17
    bm = Bitmap(size)
    bm.set_all()
    bm.clear_range(0, size)
    assert bm.count() == 0


def test_clear_range_unaligned_end_inside_device():
    bm = Bitmap(10 * BLOCK)
    bm.set_all()
    bm.clear_range(0, 3 * BLOCK + 1)
    assert set_bits(bm) == set(range(3, 10))


# -- model-based: random set/clear sequences ----------------------------------------------------

sizes = st.integers(1, 400 * BLOCK)


@st.composite
def bitmap_ops(draw):
    size = draw(sizes)
    n = draw(st.integers(0, 12))
    ops = []
    for _ in range(n):
        off = draw(st.integers(0, size - 1))
        ln = draw(st.integers(0, size - off + BLOCK))
        ops.append((draw(st.booleans()), off, ln))
    return size, ops


def model_apply(bits, size, setting, off, ln):
    nbits = len(bits)
    if setting:
        if ln > 0:
            for b in range(off // BLOCK, min((off + ln - 1) // BLOCK + 1, nbits)):
                bits[b] = True
    else:
        for b in range(nbits):
            bs, be = b * BLOCK, min((b + 1) * BLOCK, size)
            if bs >= off and (be <= off + ln):
                bits[b] = False


@SETTINGS
@given(bitmap_ops())
def test_set_and_clear_match_model(case):
    size, ops = case
    bm = Bitmap(size)
    bits = [False] * bm.nbits
    for setting, off, ln in ops:
        (bm.set_range if setting else bm.clear_range)(off, ln)
        model_apply(bits, size, setting, off, ln)
        assert bits_of(bm) == bits
    assert bm.count() == sum(bits)
    # no stray bits beyond nbits
    assert bm.count() == sum(bits_of(bm))


@st.composite
def random_bitmaps(draw):
    """(Bitmap, reference bit list) built from a random set of block ranges."""
    nbits = draw(st.integers(0, 600))
    size = nbits * BLOCK - draw(st.integers(0, BLOCK - 1)) if nbits else 0
    bm = Bitmap(size)
    bits = [False] * bm.nbits
    for _ in range(draw(st.integers(0, 15))):
        if not nbits:
            break
        s = draw(st.integers(0, nbits - 1))
        n = draw(st.one_of(st.integers(1, 3), st.integers(1, nbits - s)))
        n = min(n, nbits - s)
        bm.set_range(s * BLOCK, n * BLOCK)
        for b in range(s, s + n):
            bits[b] = True
    return bm, bits


@SETTINGS
@given(random_bitmaps())
def test_runs_match_reference(case):
    bm, bits = case
    assert list(bm.runs()) == ref_runs(bits)
    assert bm.count() == sum(bits)


@SETTINGS
@given(random_bitmaps(), st.integers(0, 700), st.integers(0, 700))
def test_runs_window_match_reference(case, a, b):
    bm, bits = case
    got = list(bm.runs(a, b))
    assert got == ref_runs(bits, a, b)
    for s, n in got:
        assert n > 0 and a <= s and s + n <= min(b, bm.nbits)


def test_runs_examples():
    bm = Bitmap(256 * BLOCK)
    set_blocks(bm, [0, 1, 2, 63, 64, 65, 127, 128, 200])
    assert list(bm.runs()) == [(0, 3), (63, 3), (127, 2), (200, 1)]
    assert list(bm.runs(1, 64)) == [(1, 2), (63, 1)]
    assert list(bm.runs(64, 128)) == [(64, 2), (127, 1)]
    assert list(bm.runs(201)) == []
    assert list(bm.runs(50, 50)) == []
    assert list(bm.runs(100, 10)) == []


def test_run_spanning_many_full_words():
    bm = Bitmap(1000 * BLOCK)
    bm.set_range(5 * BLOCK, 500 * BLOCK)
    assert list(bm.runs()) == [(5, 500)]
    assert list(bm.runs(64, 128)) == [(64, 64)]


def test_runs_end_clamped_to_nbits():
    bm = Bitmap(70 * BLOCK)
    bm.set_all()
    assert list(bm.runs(0, 10_000)) == [(0, 70)]


# -- byte_runs ---------------------------------------------------------------------------------

def test_byte_runs_plain():
    bm = Bitmap(100 * BLOCK)
    set_blocks(bm, [1, 2, 3, 10])
    assert list(bm.byte_runs()) == [(BLOCK, 3 * BLOCK), (10 * BLOCK, BLOCK)]


def test_byte_runs_split_at_max_len():
    bm = Bitmap(100 * BLOCK)
    bm.set_range(0, 10 * BLOCK)
    assert list(bm.byte_runs(4 * BLOCK)) == [
        (0, 4 * BLOCK), (4 * BLOCK, 4 * BLOCK), (8 * BLOCK, 2 * BLOCK)]
    assert list(bm.byte_runs(5 * BLOCK)) == [(0, 5 * BLOCK), (5 * BLOCK, 5 * BLOCK)]
    # max_len need not be block-aligned
    runs = list(bm.byte_runs(3000))
    assert all(ln <= 3000 for _, ln in runs)
    assert runs[0] == (0, 3000) and runs[1] == (3000, 3000)
    assert sum(ln for _, ln in runs) == 10 * BLOCK


def test_byte_runs_last_partial_block():
    size = 5 * BLOCK + 123
    bm = Bitmap(size)
    bm.set_range(4 * BLOCK, 2 * BLOCK)
    assert list(bm.byte_runs()) == [(4 * BLOCK, BLOCK + 123)]
    assert list(bm.byte_runs(BLOCK)) == [(4 * BLOCK, BLOCK), (5 * BLOCK, 123)]


@SETTINGS
@given(random_bitmaps(), st.one_of(st.none(), st.integers(1, 20 * BLOCK)))
def test_byte_runs_cover_exactly_the_dirty_bytes(case, max_len):
    bm, bits = case
    covered = 0
    prev_end = -1
    for off, ln in bm.byte_runs(max_len):
        assert ln > 0
        if max_len is not None:
            assert ln <= max_len
        assert off >= prev_end
        assert off + ln <= bm.size
        for b in range(off // BLOCK, (off + ln - 1) // BLOCK + 1):
            assert bits[b]
        covered += ln
        prev_end = off + ln
    assert covered == bm.count_bytes()


# -- P_BITMAP chunks ---------------------------------------------------------------------------

def _round_trip(bm: Bitmap) -> Bitmap:
    back = Bitmap(bm.size)
    for w0, n, payload in bm.encode_chunks():
        back.or_chunk(w0, n, payload)
    return back


@SETTINGS
@given(random_bitmaps())
def test_chunks_round_trip(case):
    bm, bits = case
    back = _round_trip(bm)
    assert bits_of(back) == bits
    assert np.array_equal(back.words, bm.words)


def test_chunks_skip_clean_parts_and_merge_by_or():
    size = 3 * bitmap.CHUNK_WORDS * 64 * BLOCK  # three chunks
    bm = Bitmap(size)
    assert list(bm.encode_chunks()) == []
    bm.set_range(2 * bitmap.CHUNK_WORDS * 64 * BLOCK + 5 * BLOCK, BLOCK)
    chunks = list(bm.encode_chunks())
    assert [(w0, n) for w0, n, _ in chunks] == [(2 * bitmap.CHUNK_WORDS, bitmap.CHUNK_WORDS)]
    assert len(chunks[0][2]) < 8192  # compressed (1 MiB of words)
    other = Bitmap(size)
    other.set_range(0, BLOCK)
    assert other.or_chunk(*chunks[0]) == 1
    assert set_bits(other) == {0, 2 * bitmap.CHUNK_WORDS * 64 + 5}


def test_chunk_cannot_set_bits_past_the_end():
    bm = Bitmap(100 * BLOCK)
    payload = zlib.compress(b"\xff" * 16)
    assert bm.or_chunk(0, 2, payload) == 100
    assert bm.count() == 100


@pytest.mark.parametrize("w0,n,payload", [
    (0, 3, zlib.compress(bytes(24))),        # more words than the bitmap has
    (2, 1, zlib.compress(bytes(8))),         # starts past the end
    (-1, 1, zlib.compress(bytes(8))),
    (0, 0, zlib.compress(b"")),
    (0, 2, zlib.compress(bytes(8))),         # too short
    (0, 1, zlib.compress(bytes(16))),        # too long (a decompression bomb stops here)
    (0, 1, b"not zlib at all"),
    (0, 1, zlib.compress(bytes(8))[:-3]),    # truncated stream
    (0, 1, zlib.compress(bytes(8)) + b"x"),  # trailing garbage
])
def test_bad_chunks_rejected(w0, n, payload):
    bm = Bitmap(100 * BLOCK)
    with pytest.raises(ValueError):
        bm.or_chunk(w0, n, payload)
    assert bm.count() == 0


# -- runs at scale, dirty pages ----------------------------------------------------------------

def test_runs_merge_across_windows_and_split_at_max_bits():
    nbits = 3 * bitmap.RUN_WINDOW * 64
    bm = Bitmap(nbits * BLOCK)
    a = bitmap.RUN_WINDOW * 64 - 10  # crosses the first window boundary
    bm.set_range(a * BLOCK, 30 * BLOCK)
    bm.set_range((nbits - 1) * BLOCK, BLOCK)
    assert list(bm.runs()) == [(a, 30), (nbits - 1, 1)]
    assert list(bm.runs(max_bits=8)) == [(a, 8), (a + 8, 8), (a + 16, 8), (a + 24, 6),
                                         (nbits - 1, 1)]
    assert list(bm.runs(a + 12, a + 14)) == [(a + 12, 2)]


def test_full_bitmap_first_run_comes_without_scanning_everything():
    bm = Bitmap(1 << 40)  # 1 TiB: 2**28 bits
    bm.set_all()
    it = bm.byte_runs(1 << 20)
    assert next(it) == (0, 1 << 20)
    assert next(it) == (1 << 20, 1 << 20)


def test_dirty_pages_track_changes():
    bm = Bitmap(4 * bitmap.PAGE_WORDS * 64 * BLOCK)  # four pages
    assert len(bm.take_dirty_pages()) == 1  # new: everything, as one piece
    assert bm.take_dirty_pages() == []
    bm.set_range(2 * bitmap.PAGE_WORDS * 64 * BLOCK + BLOCK, BLOCK)
    pages = bm.take_dirty_pages()
    assert [(off, len(raw)) for off, raw in pages] == [(2 * 4096, 4096)]
    assert np.frombuffer(pages[0][1], "<u8")[0] == 2
    bm.clear_range(0, BLOCK)
    bm.set_range(3 * bitmap.PAGE_WORDS * 64 * BLOCK, BLOCK)
    assert [off for off, _ in bm.take_dirty_pages()] == [0, 3 * 4096]


# -- union and generation ----------------------------------------------------------------------

def test_ior_union():
    a = Bitmap(200 * BLOCK)
    b = Bitmap(200 * BLOCK)
    set_blocks(a, [1, 64, 150])
    set_blocks(b, [2, 64, 199])
    ga = a.generation
    res = a.__ior__(b)
    assert res is a
    assert set_bits(a) == {1, 2, 64, 150, 199}
    assert set_bits(b) == {2, 64, 199}  # the operand is untouched
    assert a.generation > ga
    a |= Bitmap(200 * BLOCK)
    assert set_bits(a) == {1, 2, 64, 150, 199}


def test_generation_counts_changes():
    bm = Bitmap(100 * BLOCK)
    g = bm.generation
    bm.set_range(0, BLOCK)
    assert bm.generation > g
    g = bm.generation
    bm.clear_range(0, BLOCK)
    assert bm.generation > g
    g = bm.generation
    bm.set_all()
    assert bm.generation > g
    g = bm.generation
    bm.clear_all()
    assert bm.generation > g


def test_generation_unchanged_by_noops():
    bm = Bitmap(100 * BLOCK)
    bm.set_range(0, 3 * BLOCK)
    g = bm.generation
    bm.set_range(5 * BLOCK, 0)
    bm.clear_range(BLOCK + 1, 10)     # covers no whole block
    bm.clear_range(5 * BLOCK, 0)
    list(bm.runs())
    bm.count()
    bm.count_bytes()
    list(bm.encode_chunks())
    bm.test(0)
    assert bm.generation == g
    assert set_bits(bm) == {0, 1, 2}
