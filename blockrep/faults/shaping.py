"""The link model of the proxy (sans-IO): when may a chunk of bytes leave the far end.

A direction of a link is a bottleneck of `rate` bytes per second followed by a propagation
delay of `delay` seconds plus a random extra of up to `jitter` seconds. A chunk that arrives
at `now` is serialised once the link is free (FIFO), then travels; its release time is never
earlier than the previous chunk's (TCP keeps order, so jitter cannot reorder bytes).
Must not: touch sockets or clocks (time is passed in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


QUEUE_S = 0.02  # a rate-limited direction's bottleneck queue, in seconds at its rate
MIN_HOLD = 64 * 1024


@dataclass
class Shape:
    """How one direction of a link behaves. Zero means "no limit" / "no delay"."""
    delay: float = 0.0    # seconds, one way
    jitter: float = 0.0   # seconds, uniform extra in [0, jitter]
    rate: float = 0.0     # bytes per second; 0 = unlimited

    def describe(self) -> dict:
        return {"delay_ms": round(self.delay * 1000, 3), "jitter_ms": round(self.jitter * 1000, 3),
                "rate_bps": self.rate * 8}

    def holds(self) -> int:
        """Bytes a rate-limited direction holds at most: what is in flight (rate x delay)
        plus a bottleneck queue of QUEUE_S at the rate (a router's buffer), at least
        MIN_HOLD; 0 for a direction without a rate (the proxy's own bound applies). More
        would be buffering no real link has, and would hide a slow link from the sender."""
        if self.rate <= 0:
            return 0
        return max(MIN_HOLD, int(self.rate * (self.delay + self.jitter + QUEUE_S)))


@dataclass
class Schedule:
    """Release times for the chunks of one direction."""
    shape: Shape = field(default_factory=Shape)
    rng: random.Random = field(default_factory=random.Random)
    link_free_at: float = 0.0   # when the bottleneck has serialised everything so far
    last_release: float = 0.0

    def release_time(self, now: float, nbytes: int) -> float:
        s = self.shape
        start = max(now, self.link_free_at)
        done = start + (nbytes / s.rate if s.rate > 0 else 0.0)
        self.link_free_at = done
        extra = self.rng.uniform(0.0, s.jitter) if s.jitter > 0 else 0.0
        release = max(done + s.delay + extra, self.last_release)
        self.last_release = release
        return release

    def reset(self) -> None:
        """Forget queued work (after the queue was dropped)."""
        self.link_free_at = self.last_release = 0.0


def parse_rate(text: str | float | int) -> float:
    """'100M' / '1G' / '2500k' (bits per second, as links are quoted) or a number of bits/s
    -> bytes per second. '0' is unlimited."""
    if isinstance(text, (int, float)):
        return float(text) / 8
    t = text.strip().lower().removesuffix("bit").removesuffix("bps").removesuffix("b")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], 1.0) if t else 1.0
    if t and t[-1] in "kmg":
        t = t[:-1]
    try:
        bits = float(t) * mult
    except ValueError:
        raise ValueError(f"bad rate {text!r} (expected e.g. 100M, 1G, 0)") from None
    if bits < 0:
        raise ValueError(f"bad rate {text!r}: negative")
    return bits / 8
