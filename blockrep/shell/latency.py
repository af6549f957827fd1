"""Latency histograms that cost (almost) nothing on the request path.

Owns: `LatencyHistogram` (sampled observations, folded into fixed buckets in batches with
numpy), the bucket bounds every blockrep latency uses, and `IoStats`, a front end's counters
(bytes read and written, request latency by operation).
Must not: know about Prometheus (shell/metrics.py turns a histogram into a metric family)
or decide which requests are sampled (the caller does: every SAMPLE_EVERY-th, counted with
one integer it already touches).

The hot path pays one list append per sampled request; the buckets are updated when
BATCH samples have piled up or when someone asks (a scrape, a status), never per request.
"""

from __future__ import annotations

import numpy as np

from ..peer.requests import KIND_NAMES

SAMPLE_EVERY = 16  # one request in this many is timed (NBD requests, peer acks)
ACK_SAMPLE_MASK = SAMPLE_EVERY - 1  # packet ids with these bits zero are timed
BATCH = 4096  # samples kept raw before they are folded into the buckets

# upper bounds in seconds (Prometheus `le`), 10 µs .. 10 s; the last bucket is +Inf
BOUNDS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
_BOUNDS = np.array(BOUNDS)


class LatencyHistogram:
    """Observations in seconds. `observe` appends; `snapshot` folds and returns the
    cumulative bucket counts, the count and the sum (Prometheus' histogram form)."""

    __slots__ = ("_raw", "_counts", "_sum")

    def __init__(self):
        self._raw: list[float] = []
        self._counts = np.zeros(len(BOUNDS) + 1, dtype=np.int64)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        raw = self._raw
        raw.append(seconds)
        if len(raw) >= BATCH:
            self._fold()

    def _fold(self) -> None:
        raw, self._raw = self._raw, []
        if not raw:
            return
        values = np.array(raw)
        # bucket i holds BOUNDS[i-1] < v <= BOUNDS[i] (`le` is inclusive)
        idx = np.searchsorted(_BOUNDS, values, side="left")
        self._counts += np.bincount(idx, minlength=len(BOUNDS) + 1)
        self._sum += float(values.sum())

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """([(upper bound, cumulative count), ..., (inf, count)], count, sum)."""
        self._fold()
        cum = np.cumsum(self._counts)
        buckets = [(b, int(c)) for b, c in zip(BOUNDS, cum[:-1])]
        buckets.append((float("inf"), int(cum[-1])))
        return buckets, int(cum[-1]), self._sum


class IoStats:
    """What the NBD front end counts for metrics: client bytes read (served) and written
    (answered without error), and the latency of one request in SAMPLE_EVERY per operation
    (`latency`: "read", "write", "trim", "zero", "flush"; `by_kind`: the write-type ones in
    request-kind order, for the hot path)."""

    __slots__ = ("read_bytes", "written_bytes", "latency", "read_latency", "by_kind")

    def __init__(self):
        self.read_bytes = 0
        self.written_bytes = 0
        self.latency = {op: LatencyHistogram() for op in
                        ("read", *(k.lower() for k in KIND_NAMES))}
        self.read_latency = self.latency["read"]
        self.by_kind = [self.latency[k.lower()] for k in KIND_NAMES]
