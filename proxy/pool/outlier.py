"""Outlier detection: when a failed upstream exchange marks its server down.

A request whose upstream connection drops or times out says little about the server:
one client's command can make a server close the connection it arrived on (FerretDB
drops the connection on ``{ping: 1, x: MinKey()}``), and marking the server failed and
clearing its pool for that would let any client evict a server for everyone. So, as
Envoy's outlier detection does, one failure only discards its own connection, and the
server is ejected (``on_eject``: mark it failed and clear its pool) only when

* ``consecutive`` exchanges with it failed in a row (no success in between, and no
  successful probe since the first of them) on at least ``distinct_clients`` different
  client connections, or
* a health probe fails: after each unconfirmed failure (at most one probe per server
  at a time) ``probe`` runs a ping on a pooled connection; a probe that cannot connect
  or gets no answer confirms the server is down.

A connection that cannot be opened at all is not the client's doing: the caller ejects
at once for that, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

from proxy.errors import ProxyError
from proxy.pool.connection import UpstreamProtocolError
from proxy.pool.pool import ConnectFailed, UpstreamPool

__all__ = ["OutlierDetector", "ping_probe"]

log = logging.getLogger("mongoproxy.outlier")


class _Streak:
    __slots__ = ("clients", "count")

    def __init__(self) -> None:
        self.count = 0
        self.clients: set[int] = set()


class OutlierDetector:
    """Failures and successes per server; ejects a server when they confirm it is down."""

    def __init__(
        self,
        on_eject: Callable[[Hashable], None],
        probe: Callable[[Hashable], Awaitable[bool]],
        *,
        consecutive: int = 5,
        distinct_clients: int = 3,
    ) -> None:
        self._on_eject = on_eject
        self._probe = probe
        self.consecutive = consecutive
        self.distinct_clients = distinct_clients
        self._streaks: dict[Hashable, _Streak] = {}
        self._probing: dict[Hashable, asyncio.Task[None]] = {}
        self.ejections = 0
        self.unconfirmed = 0

    def success(self, server: Hashable) -> None:
        """An exchange with ``server`` succeeded (the hot path: one dict test)."""
        if self._streaks:
            self._streaks.pop(server, None)

    def failure(self, server: Hashable, client_id: int) -> bool:
        """An exchange with ``server`` failed on ``client_id``'s request; True when this
        confirms the server is down (it was ejected)."""
        streak = self._streaks.get(server)
        if streak is None:
            streak = self._streaks[server] = _Streak()
        streak.count += 1
        streak.clients.add(client_id)
        if streak.count >= self.consecutive and len(streak.clients) >= self.distinct_clients:
            self.eject(server, f"{streak.count} consecutive failures on "
                               f"{len(streak.clients)} client connections")
            return True
        self.unconfirmed += 1
        if server not in self._probing:
            task = asyncio.get_running_loop().create_task(self._run_probe(server))
            self._probing[server] = task
        return False

    def eject(self, server: Hashable, reason: str) -> None:
        self._streaks.pop(server, None)
        self.ejections += 1
        log.warning("upstream %s marked down: %s", _label(server), reason)
        self._on_eject(server)

    async def _run_probe(self, server: Hashable) -> None:
        try:
            healthy = await self._probe(server)
        except Exception as exc:  # a probe's own failure is a failed probe
            log.info("health probe of %s failed: %r", _label(server), exc)
            healthy = False
        finally:
            self._probing.pop(server, None)
        if healthy:
            self._streaks.pop(server, None)  # the failures were the requests', not its
        else:
            self.eject(server, "the health probe after a failed exchange failed")

    async def close(self) -> None:
        tasks = list(self._probing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def ping_probe(pool: UpstreamPool) -> bool:
    """Whether the server answers a ping on a pooled connection (a stale idle one is
    replaced once). A full pool is busy, not down: inconclusive, taken as healthy."""
    timeout_s = pool.config.connect_timeout_ms / 1000
    for _attempt in range(2):
        try:
            conn = await pool.checkout()
        except ConnectFailed:
            return False
        except ProxyError:
            return True
        ok = False
        try:
            reply = await conn.command({"ping": 1, "$db": "admin"}, timeout_s)
            ok = True
            return bool(reply.get("ok"))
        except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError,
                UpstreamProtocolError):
            continue
        finally:
            pool.checkin(conn, ok)
    return False


def _label(server: Hashable) -> str:
    if isinstance(server, tuple) and len(server) == 2:
        return f"{server[0]}:{server[1]}"
    return str(server)
