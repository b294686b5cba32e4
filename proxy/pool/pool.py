"""A bounded pool of upstream connections to one server.

A connection is checked out for one request/reply exchange and returned, so any number
of client connections share at most ``max_size`` upstream connections. Waiters are
served first-come first-served and every wait is bounded by ``wait_queue_timeout_ms``.
A connection that saw a network error is discarded by the caller, never reused.

New connections are authenticated (SCRAM-SHA-256) when the pool has credentials
(``upstream.uri`` names a user); see :mod:`proxy.pool.auth`.

Idle connections are closed after ``max_idle_ms`` without use (0, the default, as in
the drivers' ``maxIdleTimeMS``, means never) by a reaper task that runs while the option
is set (started by the first checkout or fill, stopped by ``close``). Never closed by
the reaper, nor by ``clear`` while the server has not closed it: a connection that still
owns open cursors (``UpstreamConnection.open_cursors`` > 0), because the server kills a
connection's cursors when it closes. The reaper never goes below ``min_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import ssl
import time
from collections import deque
from typing import Any

from proxy.config import PoolConfig
from proxy.errors import HOST_UNREACHABLE, NETWORK_TIMEOUT, ProxyError
from proxy.pool.auth import Credentials
from proxy.pool.connection import UpstreamConnection

log = logging.getLogger("mongoproxy.pool")

HANDSHAKE: dict[str, Any] = {
    "hello": 1,
    "helloOk": True,
    "client": {
        "driver": {"name": "mongoproxy", "version": "0.1.0"},
        "os": {"type": platform.system(), "architecture": platform.machine()},
        "platform": f"CPython {platform.python_version()}",
    },
    "$db": "admin",
}


class ConnectFailed(ProxyError):
    """A new connection to the server could not be opened (the server looks down)."""


class UpstreamPool:
    """Connections to one upstream server, at most ``config.max_size`` of them."""

    def __init__(
        self,
        address: tuple[str, int],
        config: PoolConfig,
        credentials: Credentials | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.config = config
        self.credentials = credentials
        self.tls = tls
        self.label = f"{address[0]}:{address[1]}"
        # Most recently returned last: checkout takes from the end, so the connections
        # at the front are the ones that have been idle longest.
        self._idle: list[UpstreamConnection] = []
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        # Connections that exist or are being opened; never above max_size.
        self.size = 0
        self.in_use = 0
        # time.monotonic() of the last healthy checkin: a proof, for /readyz, that the
        # data path works (proxy.observe.dataprobe); 0.0 before any.
        self.last_reply = 0.0
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        # Requests that may open a cursor hold at most this many connections; the rest
        # are kept for getMore/killCursors. Otherwise a backend that ties a resource to
        # every open cursor (FerretDB's SQLite handler holds one of its 100 SQL
        # connections per cursor) can fill the pool with requests waiting on cursors
        # whose getMores then wait for the pool: a deadlock direct clients never see.
        reserve = max(1, config.max_size // 10) if config.max_size >= 2 else 0
        self.ordinary_slots = asyncio.Semaphore(config.max_size - reserve)

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def idle(self) -> int:
        return len(self._idle)

    def stats(self) -> dict[str, int]:
        """Gauges for metrics: connections open or opening, checked out, idle, waiters."""
        return {
            "size": self.size,
            "in_use": self.in_use,
            "idle": len(self._idle),
            "waiting": self.waiting,
        }

    async def checkout(self) -> UpstreamConnection:
        """An idle connection, a new one, or the next one returned, within the wait limit."""
        if self._closed:
            raise ProxyError(HOST_UNREACHABLE, f"pool for {self.label} is closed")
        self._start_reaper()
        while self._idle and self._idle[-1].closed_by_peer():
            self._discard(self._idle.pop())
        if self._idle:
            conn = self._idle.pop()
        elif self.size < self.config.max_size:
            self.size += 1
            conn = await self._open_reserved()
        else:
            conn = await self._wait_for_connection()
        self.in_use += 1
        return conn

    def checkin(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return a checked-out connection; ``reusable=False`` discards it."""
        self.in_use -= 1
        if not reusable or self._closed:
            self._discard(conn)
            return
        conn.last_used = self.last_reply = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def clear(self) -> None:
        """Close the idle connections (after a network error on this server).

        A connection that owns open cursors is kept unless the server has closed it:
        closing it would kill cursors a client is still reading, and a dead one is
        discarded when it is next checked out anyway.
        """
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.open_cursors and not conn.closed_by_peer():
                self._idle.append(conn)
            else:
                self._discard(conn)

    def reap(self, now: float | None = None) -> int:
        """Close connections idle for ``max_idle_ms`` or more; returns how many.

        Skips connections that own open cursors and never goes below ``min_size``.
        """
        max_idle_ms = self.config.max_idle_ms
        if not max_idle_ms or not self._idle:
            return 0
        deadline = (time.monotonic() if now is None else now) - max_idle_ms / 1000
        reaped = 0
        kept: list[UpstreamConnection] = []
        for conn in self._idle:
            if (
                conn.last_used <= deadline
                and not conn.open_cursors
                and self.size > self.config.min_size
            ):
                self._discard(conn)
                reaped += 1
            else:
                kept.append(conn)
        self._idle = kept
        if reaped:
            log.debug("closed %d idle connection(s) to %s", reaped, self.label)
        return reaped

    def _start_reaper(self) -> None:
        if self.config.max_idle_ms and self._reaper is None and not self._closed:
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_periodically(), name=f"pool reaper {self.label}"
            )

    async def _reap_periodically(self) -> None:
        # Checking twice per max_idle_ms bounds how long past it a connection lingers.
        interval_s = max(0.05, min(self.config.max_idle_ms / 2000, 30.0))
        while not self._closed:
            await asyncio.sleep(interval_s)
            self.reap()

    def _discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self._release_slot()

    async def fill(self) -> None:
        """Open connections up to ``min_size`` (start-up and after failures)."""
        if not self._closed:
            self._start_reaper()
        while not self._closed and self.size < self.config.min_size:
            self.size += 1
            self.checkin(await self._open_reserved(), reusable=True)
            self.in_use += 1  # balance checkin's decrement: this one was never out

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for conn in self._idle:
            conn.close()
        self.size -= len(self._idle)
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ProxyError(HOST_UNREACHABLE, "proxy is shutting down"))

    async def _open_reserved(self) -> UpstreamConnection:
        """Open a connection for a slot already counted in ``size``."""
        timeout_s = self.config.connect_timeout_ms / 1000
        try:
            conn = await UpstreamConnection.open(
                self.address, timeout_s, HANDSHAKE, self.credentials, self.tls
            )
        except TimeoutError:
            self._release_slot()
            raise ConnectFailed(
                NETWORK_TIMEOUT,
                f"connecting to upstream {self.label} timed out after "
                f"{self.config.connect_timeout_ms} ms",
            ) from None
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            self._release_slot()
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ConnectFailed(
                HOST_UNREACHABLE, f"upstream {self.label} is unreachable: {reason}"
            ) from None
        except BaseException:
            self._release_slot()
            raise
        return conn

    def _release_slot(self) -> None:
        """A connection slot became free: let the first live waiter open a connection."""
        self.size -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.size += 1  # reserved on the waiter's behalf
                waiter.set_result(None)
                return

    async def _wait_for_connection(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        timeout_ms = self.config.wait_queue_timeout_ms
        # A timer that fails the future (rather than cancelling the task) cannot lose a
        # connection handed over in the same loop iteration as the timeout.
        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(ProxyError(
                    NETWORK_TIMEOUT,
                    f"timed out after {timeout_ms} ms waiting for a connection to upstream "
                    f"{self.label} (pool max_size {self.config.max_size}, all in use)",
                ))

        timer = loop.call_later(timeout_ms / 1000, expire)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is None:
                    self._release_slot()
                else:
                    self.in_use += 1
                    self.checkin(handed, reusable=True)
            raise
        finally:
            timer.cancel()
        if conn is None:
            return await self._open_reserved()
        return conn
