"""The cache hit's one Redis command, ``MGET token entry``, on a pipelined connection.

A hit costs one Redis round trip, and through redis-py's client that round trip cost the
proxy more CPU than the rest of the hit (connection-pool checkout and release, retry
wrapper, observability hooks, argument encoding in Python, read-timeout scopes). The
lane keeps one connection per proxy process as an asyncio Protocol and pipelines every
lookup on it (Redis answers in order, so replies are matched to a FIFO of waiters);
hiredis, redis-py's C companion, encodes the command and parses the replies. Every
other command (stores, token creation, invalidation, probes) stays on redis-py, and so
does everything on a Redis Cluster or over TLS/unix sockets (see :func:`lane_for`).

The lookups of one loop pass go out in one write. Each is bounded by the lookup budget
(:class:`proxy.cache.budget.LatencyBudget`, fed here with every reply's round trip,
late ones included), counted from that write, by one watchdog timer per connection
rather than a timer per lookup; like :class:`proxy.cache.deadline.PolledTimeout` it
does not take a busy proxy for a slow Redis. A lookup that timed out
(:class:`ReplyTimeout`: a bypass, not a failure) keeps its place in the FIFO; its reply
is dropped when it arrives, so later replies still match. A lost connection fails every
waiting lookup (each becomes a Redis error for the circuit breaker) and the next lookup
opens a new one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from itertools import repeat
from ssl import SSLContext
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from proxy.cache.budget import LatencyBudget
from proxy.cache.deadline import GRACE_S
from proxy.tls.client import redis_ssl_context

__all__ = ["LookupLane", "ReplyTimeout", "lane_for"]


class ReplyTimeout(TimeoutError):
    """No reply within the budget: the lookup is a bypass; Redis may just be slow."""


class _Pipeline(asyncio.Protocol):
    def __init__(self, budget: LatencyBudget) -> None:
        self.loop = asyncio.get_running_loop()
        self.budget = budget
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        # When each sent command went out, in the order of `waiters` (a command still
        # in `outgoing` has a waiter but no send time yet).
        self.sent: deque[float] = deque()
        self.outgoing: list[bytes] = []
        self.lost: BaseException | None = None
        self._watchdog: asyncio.Handle | None = None
        self._cutoff = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        now = time.monotonic()
        budget = self.budget
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisError(f"unparsable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self.sent:
                self._fail(RedisError("a reply from Redis that nothing asked for"))
                return
            waiter = self.waiters.popleft()
            budget.add(now - self.sent.popleft())
            budget.answered_at = now
            if waiter.done():
                continue  # it timed out or its request was cancelled; the reply is dropped
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else ConnectionError("Redis closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.outgoing.clear()
        self.sent.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)

    def send(self, *args: str | bytes) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply, or :class:`ReplyTimeout` when
        none was read within the budget of sending it (see :meth:`_flush`)."""
        if self.lost is not None:
            raise ConnectionError(f"Redis connection lost: {self.lost}")
        waiter: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append(waiter)
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing.append(hiredis.pack_command(cast(Any, args)))  # the stub is too narrow
        return waiter

    def _flush(self) -> None:
        # The commands of every request that ran in this loop pass go out in one write
        # (one system call instead of one per lookup), each timed from now.
        if self.lost is not None or not self.outgoing:
            return
        assert self.transport is not None
        batch, self.outgoing = self.outgoing, []
        self.transport.write(b"".join(batch))
        now = time.monotonic()  # not the loop's clock: uvloop's has a 1 ms resolution
        self.sent.extend(repeat(now, len(batch)))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.sent[0] + self.budget.value - now,
                                                  self._due)

    # One watchdog per connection instead of a timer per lookup. Like
    # proxy.cache.deadline.PolledTimeout, it lets a deadline pass only after the loop
    # has read its sockets once more and resumed the tasks that were ready, so a busy
    # proxy is not taken for a slow Redis.

    def _due(self) -> None:
        self._cutoff = time.monotonic()
        self._watchdog = self.loop.call_later(GRACE_S, self._polled)

    def _polled(self) -> None:
        self._watchdog = self.loop.call_soon(self._expire)

    def _expire(self) -> None:
        self._watchdog = None
        budget = self.budget.value
        # Not strict: the waiters of commands still in `outgoing` have no send time yet.
        for waiter, sent in zip(self.waiters, self.sent, strict=False):
            deadline = sent + budget
            if deadline > self._cutoff:
                self._watchdog = self.loop.call_later(deadline - time.monotonic(), self._due)
                return
            if not waiter.done():
                # It keeps its place: its late reply is dropped when it comes.
                waiter.set_exception(ReplyTimeout(
                    f"no reply from Redis within {budget * 1000:.3g} ms"))


def _consume(attempt: asyncio.Future[Any]) -> None:
    if not attempt.cancelled():
        attempt.exception()


class LookupLane:
    """``await lane.mget(k1, k2)``: the values (bytes or None), or an OSError/RedisError,
    or :class:`ReplyTimeout` when Redis did not answer within the budget (``budget``,
    or a fixed ``reply_timeout_s``).

    Connecting is bounded by ``connect_timeout_s``.
    """

    def __init__(
        self, host: str, port: int, connect_timeout_s: float, reply_timeout_s: float, *,
        db: int = 0, username: str | None = None, password: str | None = None,
        ssl: SSLContext | None = None,
        budget: LatencyBudget | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.ssl = ssl  # rediss://: redis-py's own context for the url (proxy.tls.client)
        self.username, self.password = username, password
        self.connect_timeout_s = connect_timeout_s
        self.budget = (budget if budget is not None
                       else LatencyBudget(reply_timeout_s, reply_timeout_s))
        self._pipeline: _Pipeline | None = None
        self._connecting: asyncio.Future[_Pipeline] | None = None

    async def mget(self, *keys: str) -> Any:
        pipeline = self._pipeline
        if pipeline is None or pipeline.lost is not None:
            pipeline = await self._connected()
        return await pipeline.send("MGET", *keys)

    async def ping(self) -> Any:
        """A PING behind whatever the connection is waiting for (its reply, like every
        reply, sets ``budget.answered_at``)."""
        pipeline = self._pipeline
        if pipeline is None or pipeline.lost is not None:
            pipeline = await self._connected()
        return await pipeline.send("PING")

    async def _connected(self) -> _Pipeline:
        # Concurrent lookups share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            # Its waiters may all have timed out: the outcome is then retrieved here,
            # so a failed attempt is not reported as "never retrieved".
            self._connecting.add_done_callback(_consume)
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _connect(self) -> _Pipeline:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, pipeline = await loop.create_connection(
                lambda: _Pipeline(self.budget), self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None)
            try:
                if self.password is not None:
                    credentials = ((self.username, self.password) if self.username
                                   else (self.password,))
                    await pipeline.send("AUTH", *credentials)
                if self.db:
                    await pipeline.send("SELECT", str(self.db))
            except BaseException:
                assert pipeline.transport is not None
                pipeline.transport.close()
                raise
        self._pipeline = pipeline
        return pipeline

    def close(self) -> None:
        if self._pipeline is not None and self._pipeline.transport is not None:
            self._pipeline.transport.close()
        self._pipeline = None


def lane_for(
    redis_url: str, connect_timeout_s: float, reply_timeout_s: float,
    budget: LatencyBudget | None = None,
) -> LookupLane | None:
    """A lane for a ``redis://`` or ``rediss://`` URL (TCP); None for anything else."""
    if not redis_url.startswith(("redis://", "rediss://")):
        return None
    params = parse_url(redis_url)
    context = redis_ssl_context(params) if redis_url.startswith("rediss://") else None
    if "host" not in params or (context is None and "connection_class" in params):
        return None
    return LookupLane(
        str(params["host"]), int(params.get("port", 6379)), connect_timeout_s, reply_timeout_s,
        db=int(params.get("db") or 0), username=params.get("username"),
        password=params.get("password"), ssl=context, budget=budget,
    )
