"""Advice "within a window": snapshots of the digest's counters, taken off the request
path (by the catalog's poll), so a report can rank by the time spent since then.

Every ``step_s`` the (count, total ms) of each shape is copied; ``keep`` copies are kept
(60 copies 60 s apart: the last hour, about 100 bytes per shape per copy). A window of W seconds
subtracts the newest copy at least W seconds old (or the oldest there is, and the
report says which window it really covers). A shape whose counters went down (the
digest was reset, or the shape evicted and seen again) counts from zero.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["Snapshots"]

Counters = dict[str, tuple[int, float]]


class Snapshots:
    def __init__(self, step_s: float = 60.0, keep: int = 60) -> None:
        self.step_s = step_s
        self._copies: deque[tuple[float, Counters]] = deque(maxlen=max(1, keep))
        self.enabled = keep > 0

    def maybe_take(self, now: float, rows: Iterable[tuple[str, int, float]]) -> None:
        if self.enabled and (not self._copies or now - self._copies[-1][0] >= self.step_s):
            self._copies.append((now, {key: (count, total) for key, count, total in rows}))

    def baseline(self, now: float, window_s: float) -> tuple[float, Counters] | None:
        """(time of the copy, its counters) to subtract for a window ending now."""
        if not self._copies:
            return None
        chosen = self._copies[0]
        for taken, counters in self._copies:
            if now - taken >= window_s:
                chosen = (taken, counters)
            else:
                break
        return chosen

    @staticmethod
    def delta(count: int, total_ms: float, base: tuple[int, float] | None
              ) -> tuple[int, float]:
        if base is None or base[0] > count:
            return count, total_ms
        return count - base[0], max(0.0, total_ms - base[1])
