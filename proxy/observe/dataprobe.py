"""The data-path half of ``/readyz``: can a command reach the primary and come back?

The topology monitor's view lags: a server that hangs (SIGSTOP, a full disk, a wedged
backend) keeps its "primary" role until a heartbeat times out, tens of seconds later,
while every request through the proxy hangs. So readiness also wants a *proof*: a
``ping`` round trip on a pooled connection to the primary, within ``timeout_s``.

The proof is cached for ``interval_s`` so frequent probes do not load the server, and
concurrent ``/readyz`` requests share one round trip. Client traffic counts as proof
too: when a pooled connection to the primary came back healthy within the interval
(``UpstreamPool.last_reply``), no ping is sent; this also keeps a saturated pool, whose
checkout would wait, from reading as "not ready" while it serves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.errors import ProxyError
from proxy.pool.connection import UpstreamProtocolError
from proxy.pool.pool import UpstreamPool

__all__ = ["DataPathProbe", "DataPathState"]

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class DataPathState:
    ok: bool
    checked_at: float  # time.monotonic()
    how: str  # "ping", "traffic", or what failed
    rtt_ms: float | None = None
    error: str | None = None

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "proof": self.how,
            "age_ms": round(max(0.0, now - self.checked_at) * 1000, 1),
            "rtt_ms": self.rtt_ms,
            "error": self.error,
        }


class DataPathProbe:
    """``await check()``: the cached or fresh :class:`DataPathState` of the primary."""

    def __init__(
        self,
        select_primary: Callable[[], Awaitable[Address]],
        pool_for: Callable[[Address], UpstreamPool],
        primary_address: Callable[[], Address | None],
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._select = select_primary
        self._pool_for = pool_for
        self._primary_address = primary_address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._last: DataPathState | None = None
        self._running: asyncio.Task[DataPathState] | None = None

    async def check(self) -> DataPathState:
        now = time.monotonic()
        last = self._last
        if last is not None and now - last.checked_at < self.interval_s:
            return last
        address = self._primary_address()
        if address is not None:
            replied = self._pool_for(address).last_reply
            if replied and now - replied < self.interval_s:
                self._last = DataPathState(True, replied, "traffic")
                return self._last
        if self._running is None:
            self._running = asyncio.create_task(self._ping())
            self._running.add_done_callback(self._finished)
        # shield: a /readyz client that hangs up must not cancel the shared probe.
        return await asyncio.shield(self._running)

    def _finished(self, task: asyncio.Task[DataPathState]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._last = task.result()

    async def _ping(self) -> DataPathState:
        started = time.monotonic()
        step = "server selection"
        try:
            async with asyncio.timeout(self.timeout_s):
                address = await self._select()
                pool = self._pool_for(address)
                step = f"checkout from {pool.label}"
                conn = await pool.checkout()
                step = f"ping on {pool.label}"
                ok = False
                try:
                    reply = await conn.command({"ping": 1, "$db": "admin"}, self.timeout_s)
                    ok = True
                finally:
                    pool.checkin(conn, ok)
        except TimeoutError:
            return DataPathState(False, time.monotonic(), "timeout",
                                 error=f"{step}: no answer within "
                                       f"{self.timeout_s * 1000:.0f} ms")
        except ProxyError as exc:
            return DataPathState(False, time.monotonic(), "error", error=f"{step}: {exc.errmsg}")
        except (OSError, asyncio.IncompleteReadError, UpstreamProtocolError) as exc:
            return DataPathState(False, time.monotonic(), "error",
                                 error=f"{step}: {type(exc).__name__}: {exc}")
        finished = time.monotonic()
        rtt = round((finished - started) * 1000, 3)
        if not reply.get("ok"):
            return DataPathState(False, finished, "error", rtt,
                                 error=f"ping refused: {reply.get('errmsg')}")
        return DataPathState(True, finished, "ping", rtt)
