"""Block digests for checksum-mode resync and online verify (`csums-alg`, `verify-alg`).

Owns: the algorithms a block comparison may use, their names as the configuration and the
link spell them, the digest of every 4 KiB block of a range, and which blocks of two digest
lists differ. A digest equal on both sides lets a resync skip a block and lets verify call
it in sync, so each algorithm here has at least 128 bits (an accidental collision is not
expected in the life of any disk); CRC32C, 32 bits, is refused: it only guards data in
flight (blockrep.native). xxh3-128 is fast but not collision resistant against someone who
crafts blocks on purpose; sha256 and blake2b are (docs/security.md).
Must not: do I/O.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import xxhash

from .bitmap import BLOCK


def _blake2b(size: int) -> Callable[[memoryview], bytes]:
    return lambda b: hashlib.blake2b(b, digest_size=size).digest()


# name -> (digest bytes per block, digest function)
ALGORITHMS: dict[str, tuple[int, Callable[[memoryview], bytes]]] = {
    "xxh3-128": (16, xxhash.xxh3_128_digest),
    "sha256": (32, lambda b: hashlib.sha256(b).digest()),
    "blake2b-128": (16, _blake2b(16)),
    "blake2b-256": (32, _blake2b(32)),
}
DEFAULT = "xxh3-128"
_TOO_WEAK = {"crc32c", "crc32", "md4", "md5", "sha1", "none"}


def check(name) -> str:
    """A configured algorithm name -> itself; ValueError (one line) when it is unknown or
    too weak to skip a block on."""
    if isinstance(name, str) and name in ALGORITHMS:
        return name
    known = ", ".join(ALGORITHMS)
    if isinstance(name, str) and name.lower() in _TOO_WEAK:
        raise ValueError(f"{name!r} is too weak to decide that a block is in sync; "
                         f"one of {known}")
    raise ValueError(f"unknown digest {name!r:.40}; one of {known}")


def size(name: str) -> int:
    """Digest bytes per block."""
    return ALGORITHMS[name][0]


def block_digests(name: str, data, block: int = BLOCK) -> bytes:
    """The digests of each `block` bytes of `data` (the last block may be short), in order."""
    fn = ALGORITHMS[name][1]
    mv = memoryview(data).cast("B")
    return b"".join([fn(mv[i:i + block]) for i in range(0, len(mv), block)])


def count(name: str, nbytes: int, block: int = BLOCK) -> int:
    """Bytes of the digest list of a range of `nbytes`."""
    return size(name) * -(-nbytes // block)


def differing(name: str, mine, theirs) -> list[int]:
    """Indexes of the blocks whose digests differ (both lists of the same length)."""
    if mine == theirs:
        return []
    d = size(name)
    a, b = memoryview(mine), memoryview(theirs)
    return [i for i in range(len(a) // d) if a[i * d:(i + 1) * d] != b[i * d:(i + 1) * d]]
