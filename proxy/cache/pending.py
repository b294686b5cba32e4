"""A write's invalidation: always attempted, within its own budget, and what happens when
Redis cannot be told (the whole argument: docs/cache.md).

* A write's invalidation does not depend on the lookup circuit: lookups failing or
  timing out never stop it. It is attempted within ``invalidate_timeout_ms`` (a
  :class:`~proxy.cache.deadline.PolledTimeout`: the proxy's busy loop is not Redis's
  delay); an attempt that fails fast (refused, reset, a connection a restarted Redis
  left dead) is retried every ``RETRY_S`` within that budget. When the budget runs out
  while Redis keeps answering other commands, the write keeps waiting (up to
  ``MAX_BUDGETS`` budgets): a write acknowledged while Redis is reachable has always
  had its invalidation land first.
* When the budget runs out, the written namespaces (databases, for ``dropDatabase``)
  are marked **pending**: this instance serves nothing of them (a lookup there is a
  bypass, ``pending_invalidation``), and a retry every ``probe_interval_ms`` replaces
  their tokens as soon as Redis answers; only then are they unmarked. A later write's
  invalidation that lands also unmarks what was marked before it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from proxy.cache.deadline import PolledTimeout
from proxy.cache.eligibility import WriteTargets
from proxy.cache.metrics import CacheMetrics

__all__ = ["MAX_BUDGETS", "RETRY_S", "Invalidator"]

log = logging.getLogger("mongoproxy.cache")

RETRY_S = 0.005  # between attempts that failed fast, within one write's budget
MAX_BUDGETS = 10  # a write waits this many budgets at most, while Redis answers others

Bump = Callable[[WriteTargets], Awaitable[int]]


class Invalidator:
    def __init__(
        self, bump: Bump, metrics: CacheMetrics, *, budget_s: float, retry_interval_s: float,
        kind: Callable[[BaseException], str], answered: Callable[[float], bool],
    ) -> None:
        self._bump = bump
        self._answered = answered  # did Redis answer anything since (time.monotonic())?
        self._metrics = metrics
        self._budget_s = budget_s
        self._retry_interval_s = retry_interval_s
        self._kind = kind
        # namespace (database) -> the mark number it was marked pending with
        self.namespaces: dict[str, int] = {}
        self.databases: dict[str, int] = {}
        self._marks = 0
        self._retry: asyncio.Task[None] | None = None
        self._closed = False

    def __bool__(self) -> bool:
        """Anything pending."""
        return bool(self.namespaces or self.databases)

    def blocks(self, ns: str) -> bool:
        """A lookup of ``ns`` must not be answered from Redis by this instance."""
        return ns in self.namespaces or ns.partition(".")[0] in self.databases

    async def invalidate(self, targets: WriteTargets) -> bool:
        """Replace the tokens of what a write changed; False (and pending) when Redis
        answered nothing within the budget.

        Past a budget, the wait goes on (up to ``MAX_BUDGETS`` budgets) while Redis is
        answering others since this invalidation started: then Redis is reachable and
        this write is only slow on the proxy's side (a saturated loop resumes a
        redis-py call several times; at 64 clients and 5 % writes, 4 invalidations in
        one bench run took longer than 100 ms with Redis answering lookups all along)."""
        started_at = self._marks
        started = time.monotonic()
        failures: list[BaseException] = []
        attempt = asyncio.ensure_future(self._attempts(targets, failures))
        try:
            for budgets in range(1, MAX_BUDGETS + 1):
                try:
                    async with PolledTimeout(self._budget_s):
                        count = await asyncio.shield(attempt)
                    break
                except TimeoutError:
                    if budgets == MAX_BUDGETS or not self._answered(started):
                        last = failures[-1] if failures else None
                        self._metrics.error("invalidate",
                                            "timeout" if last is None else self._kind(last))
                        why = f"no answer within {self._budget_s * budgets * 1000:g} ms"
                        if last is not None:
                            why += f" (last: {type(last).__name__}: {last})"
                        self._mark(targets, why)
                        return False
        except asyncio.CancelledError:
            # The request is going away (client gone, shutdown), the write may have
            # been applied: retried in the background like any pending invalidation.
            self._mark(targets, "the request was cancelled")
            raise
        finally:
            attempt.cancel()
        self._landed(targets, started_at)
        self._metrics.invalidations.labels("ok").inc(count)
        return True

    async def _attempts(self, targets: WriteTargets, failures: list[BaseException]) -> int:
        while True:
            try:
                return await self._bump(targets)
            except Exception as exc:  # any failure: try again on a new connection
                failures[:] = [exc]
                await asyncio.sleep(RETRY_S)

    def cancelled(self, targets: WriteTargets) -> None:
        """A write whose request was cancelled before its invalidation started (the
        upstream exchange itself was interrupted): it may have been applied, so its
        targets are pending like any invalidation that could not land."""
        if targets:
            self._mark(targets, "the request was cancelled")

    def _mark(self, targets: WriteTargets, why: str) -> None:
        was_empty = not self
        self._marks += 1
        for ns in targets.namespaces:
            self.namespaces[ns] = self._marks
        for db in targets.databases:
            self.databases[db] = self._marks
        self._metrics.invalidations.labels("pending").inc(
            len(targets.namespaces) + len(targets.databases))
        self._metrics.pending.set(len(self.namespaces) + len(self.databases))
        if was_empty:
            log.warning("result cache: an invalidation could not reach Redis (%s); %s stay "
                        "pending: not served here, retried every %g ms", why,
                        ", ".join((*targets.namespaces, *targets.databases)),
                        self._retry_interval_s * 1000)
        if (self._retry is None or self._retry.done()) and not self._closed:
            self._retry = asyncio.get_running_loop().create_task(
                self._retry_loop(), name="cache pending invalidations")

    def _landed(self, targets: WriteTargets, started_at: int) -> None:
        """A bump that started after mark ``started_at`` reached Redis: whatever was
        marked up to then for these targets is done."""
        if not self:
            return
        for ns in targets.namespaces:
            if self.namespaces.get(ns, started_at + 1) <= started_at:
                del self.namespaces[ns]
        for db in targets.databases:
            if self.databases.get(db, started_at + 1) <= started_at:
                del self.databases[db]
            for ns in [n for n, m in self.namespaces.items()
                       if m <= started_at and n.partition(".")[0] == db]:
                del self.namespaces[ns]
        self._metrics.pending.set(len(self.namespaces) + len(self.databases))
        if not self:
            log.warning("result cache: pending invalidations reached Redis")

    async def _retry_loop(self) -> None:
        while self and not self._closed:
            await asyncio.sleep(self._retry_interval_s)
            started_at = self._marks
            targets = WriteTargets(tuple(sorted(self.namespaces)), tuple(sorted(self.databases)))
            try:
                async with PolledTimeout(self._budget_s):
                    count = await self._bump(targets)
            except Exception as exc:  # still unreachable: next interval
                self._metrics.error("invalidate", self._kind(exc))
                continue
            self._metrics.invalidations.labels("ok").inc(count)
            self._landed(targets, started_at)

    async def close(self) -> None:
        """Stop retrying, after one last attempt: pending marks live in this process's
        memory, and once it is gone only the entries' TTL bounds what others serve."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self:
            targets = WriteTargets(tuple(sorted(self.namespaces)), tuple(sorted(self.databases)))
            try:
                async with PolledTimeout(self._budget_s):
                    await self._bump(targets)
            except Exception as exc:
                log.warning("result cache: shutting down with invalidations pending for %s "
                            "(%s: %s); other instances may serve their older entries until "
                            "the entries' ttl_s runs out", ", ".join(
                                (*targets.namespaces, *targets.databases)),
                            type(exc).__name__, exc)
