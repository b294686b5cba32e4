"""A latency sketch with a relative-error guarantee (DDSketch, Masson et al., VLDB 2019).

A value ``x > 0`` goes to bucket ``ceil(log_gamma(x))`` with ``gamma = (1 + a) / (1 - a)``;
a bucket is reported as ``2 * gamma**i / (gamma + 1)``, which is within ``a`` (relative)
of every value in it. So the q-quantile is within ``a`` of the true value at rank
``floor(q * (n - 1))`` whatever the distribution, with a sparse dict of occupied
buckets (a handful per query shape in practice; at most ~1,900 from 1 µs to one hour at
1 %). The exact ``min`` and ``max`` are kept too (the 0- and 1-quantiles) and every
answer is clamped to them: a sketch of one value answers that value for every quantile,
and percentiles never fall outside what was observed (p95 <= max).

Mergeable: :meth:`merge` adds another sketch's buckets (same ``alpha``), so per-worker
sketches combine into one without losing the guarantee. :meth:`state` /
:meth:`from_state` give a plain-JSON form of it.

Why not HdrHistogram: its dense counts array costs tens of kilobytes per shape at two
significant digits, times ``digest_max_shapes``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_ALPHA", "LatencySketch"]

DEFAULT_ALPHA = 0.01
# Values at or below this (ms) share one bucket (1 ns; zero durations are fine).
_FLOOR = 1e-6
_log = math.log
_ceil = math.ceil


class LatencySketch:
    """Quantiles of non-negative values (milliseconds) within ``alpha`` relative error."""

    __slots__ = ("_gamma_log", "_multiplier", "alpha", "buckets", "count", "max", "min",
                 "total")

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0 < alpha < 1:
            raise ValueError("alpha must be between 0 and 1")
        self.alpha = alpha
        self._gamma_log = math.log((1 + alpha) / (1 - alpha))
        self._multiplier = 1 / self._gamma_log
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, value: float) -> None:
        # Called once per operation: module-level names, one multiplication.
        index = _ceil(_log(value if value > _FLOOR else _FLOOR) * self._multiplier)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    def _value(self, index: int) -> float:
        gamma_log = self._gamma_log
        return 2 * math.exp(index * gamma_log) / (math.exp(gamma_log) + 1)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1); 0.0 for an empty sketch."""
        if not self.count:
            return 0.0
        if not 0 <= q <= 1:
            raise ValueError("q must be between 0 and 1")
        if q == 0:
            return self.min
        if q == 1:
            return self.max
        rank = q * (self.count - 1)
        seen = 0
        value = self.max
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen > rank:
                value = self._value(index)
                break
        return min(max(value, self.min), self.max)

    def merge(self, other: LatencySketch) -> None:
        """Add ``other``'s values to this sketch (both must have the same alpha)."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of alpha {other.alpha} and {self.alpha}")
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable copy (bucket keys as strings, as JSON needs)."""
        return {
            "alpha": self.alpha,
            "buckets": {str(i): n for i, n in self.buckets.items()},
            "count": self.count,
            "total": self.total,
            "min": self.min if self.count else None,
            "max": self.max,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LatencySketch:
        sketch = cls(float(state["alpha"]))
        sketch.buckets = {int(i): int(n) for i, n in state["buckets"].items()}
        sketch.count = int(state["count"])
        sketch.total = float(state["total"])
        sketch.max = float(state["max"])
        sketch.min = math.inf if state["min"] is None else float(state["min"])
        return sketch
