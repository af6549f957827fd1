"""blockrep.digest: per-block digests for checksum-mode resync and verify, checked against
hashlib / xxhash called on each block by hand; the differing-block search; the names."""

from __future__ import annotations

import hashlib
import os

import pytest
import xxhash

from blockrep import digest
from blockrep.bitmap import BLOCK

REFERENCE = {
    "xxh3-128": lambda b: xxhash.xxh3_128(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
    "blake2b-256": lambda b: hashlib.blake2b(b, digest_size=32).digest(),
}


def test_every_algorithm_has_a_reference_and_at_least_128_bits():
    assert set(digest.ALGORITHMS) == set(REFERENCE)
    assert digest.DEFAULT in digest.ALGORITHMS
    for name in digest.ALGORITHMS:
        assert digest.size(name) >= 16
        assert len(REFERENCE[name](b"x")) == digest.size(name)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17,
                                    64 * BLOCK])
def test_block_digests_match_the_reference(name, length):
    data = os.urandom(length)
    want = b"".join(REFERENCE[name](data[i:i + BLOCK]) for i in range(0, length, BLOCK))
    got = digest.block_digests(name, data)
    assert got == want
    assert len(got) == digest.count(name, length)
    assert digest.block_digests(name, memoryview(bytearray(data))) == want  # any buffer


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_differing_finds_exactly_the_changed_blocks(name):
    data = bytearray(os.urandom(32 * BLOCK))
    mine = digest.block_digests(name, data)
    assert digest.differing(name, mine, mine) == []
    changed = [0, 5, 6, 7, 31]
    for i in changed:
        data[i * BLOCK + 100] ^= 0x01  # one bit per block
    theirs = digest.block_digests(name, data)
    assert digest.differing(name, mine, theirs) == changed
    assert digest.differing(name, mine, memoryview(theirs)) == changed


def test_blocks_crc32c_cannot_tell_apart_are_told_apart():
    """Two different blocks with the same CRC32C (found by construction: CRC is linear, so
    appending the 4 bytes that restore the CRC of the original gives a collision); every
    digest here tells them apart."""
    from blockrep import native
    a = bytes(BLOCK)
    b = bytearray(a)
    b[0] = 1
    target = native.crc32c(a)
    # brute force the last 4 bytes of b so that CRC32C(b) == CRC32C(a): solve linearly
    b[-4:] = _crc_fix(bytes(b[:-4]), target)
    assert bytes(b) != a and native.crc32c(bytes(b)) == target
    for name in digest.ALGORITHMS:
        assert digest.differing(name, digest.block_digests(name, a),
                                digest.block_digests(name, bytes(b))) == [0]


def _crc_fix(prefix: bytes, target: int) -> bytes:
    """4 bytes x such that CRC32C(prefix + x) == target (CRC is affine in x over GF(2))."""
    from blockrep import native
    base = native.crc32c(prefix + bytes(4))
    cols = [native.crc32c(prefix + (1 << k).to_bytes(4, "little")) ^ base for k in range(32)]
    want = base ^ target
    # Gaussian elimination over GF(2): find bits k with XOR of cols[k] == want
    rows = [(c, 1 << k) for k, c in enumerate(cols)]
    basis: list[tuple[int, int]] = []
    for c, m in rows:
        for bc, bm in basis:
            if c ^ bc < c:
                c, m = c ^ bc, m ^ bm
        if c:
            basis.append((c, m))
            basis.sort(reverse=True)
    x, w = 0, want
    for bc, bm in basis:
        if w ^ bc < w:
            w, x = w ^ bc, x ^ bm
    assert w == 0
    return x.to_bytes(4, "little")


@pytest.mark.parametrize("name, fragment", [
    ("crc32c", "too weak"), ("CRC32C", "too weak"), ("md5", "too weak"),
    ("none", "too weak"), ("xxh3", "unknown digest 'xxh3'"), (None, "unknown digest None"),
    (16, "unknown digest 16")])
def test_check_refuses_unknown_and_weak(name, fragment):
    with pytest.raises(ValueError) as ei:
        digest.check(name)
    assert fragment in str(ei.value) and "\n" not in str(ei.value)


def test_check_accepts_every_algorithm():
    for name in digest.ALGORITHMS:
        assert digest.check(name) == name
