"""The lookup budget: how long a cache lookup (or store) waits for Redis before it is a
bypass, derived from Redis's measured round trips instead of a fixed figure.

A fixed 5 ms is fine for an idle loopback Redis (tens of microseconds) and wrong on a
busy 2-core host, where Redis itself is off the CPU for milliseconds at a time: every
lookup that waits past the budget goes to MongoDB, and (before this module) three of
them in a row opened the circuit with Redis healthy. The budget in force is
``MULTIPLIER`` times the p99 of the last ``WINDOW`` round trips (late replies, the
ones whose lookup had already given up, included: they are exactly what shows Redis
got slower), or ``PEAK_MULTIPLIER`` times the slowest round trip seen lately (a peak
that halves every ``PEAK_HALF_LIFE_S``: 512 lookups are a few tens of milliseconds at
saturation, too short a memory for the scheduler hiccups of a busy host), whichever is
larger, clamped to ``[floor, ceiling]`` (``timeout_ms``, ``timeout_max_ms``).
Recomputed every ``EVERY`` samples: one sort of 512 floats per 64 lookups. Times are
``time.monotonic()`` (uvloop's loop clock has a millisecond resolution).
"""

from __future__ import annotations

import time

__all__ = ["EVERY", "MULTIPLIER", "PEAK_HALF_LIFE_S", "WINDOW", "LatencyBudget"]

WINDOW = 512  # a power of two: the ring index is a mask
EVERY = 64
MULTIPLIER = 4.0
PEAK_MULTIPLIER = 2.0
PEAK_HALF_LIFE_S = 10.0


class LatencyBudget:
    """``budget.value``: seconds; ``budget.add(seconds)`` per Redis round trip.
    ``answered_at`` (``time.monotonic()``) is when Redis last answered anything: what tells a
    slow Redis from a silent one (proxy.cache.store's stall rule)."""

    __slots__ = ("_count", "_decayed_at", "_samples", "answered_at", "ceiling", "floor", "p99",
                 "peak", "value")

    def __init__(self, floor_s: float, ceiling_s: float) -> None:
        self.floor = floor_s
        self.ceiling = max(floor_s, ceiling_s)
        self.value = floor_s
        self.p99 = 0.0
        self.peak = 0.0
        self._decayed_at = time.monotonic()
        self.answered_at = 0.0
        self._samples = [0.0] * WINDOW
        self._count = 0

    def add(self, seconds: float) -> None:
        count = self._count
        self._samples[count & (WINDOW - 1)] = seconds
        if seconds > self.peak:
            self.peak = seconds
        self._count = count = count + 1
        if not count % EVERY:
            self._update()

    def _update(self) -> None:
        n = min(self._count, WINDOW)
        ordered = sorted(self._samples[:n])
        self.p99 = ordered[min(n - 1, int(n * 0.99))]
        now = time.monotonic()
        self.peak *= 0.5 ** ((now - self._decayed_at) / PEAK_HALF_LIFE_S)
        self._decayed_at = now
        wanted = max(self.p99 * MULTIPLIER, self.peak * PEAK_MULTIPLIER)
        self.value = min(self.ceiling, max(self.floor, wanted))
