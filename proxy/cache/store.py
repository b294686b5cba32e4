"""The one module that talks to Redis: entries, generation tokens, the circuit breaker.

Keys (``P`` = ``key_prefix``; ``{...}`` is a Redis Cluster hash tag)::

    P{db.coll}:g            the namespace's generation token (8 random bytes, with a TTL)
    P{db.coll}:e:<digest>   an entry: token it was read under + the reply (proxy.cache.entry)
    P{db}:ns                the namespaces of db that have had a token (for dropDatabase)

A namespace's token and all its entries share the hash tag ``{db.coll}``, so they live
in one slot: a lookup is a single ``MGET token entry`` on one node, also on a Redis
Cluster, and a hit is that one round trip plus a header.

Invalidation protocol, and why it is free of the fill/write race
----------------------------------------------------------------
* **Read (miss)**: the lookup's ``MGET`` returns the current token ``T`` *before* the
  read is sent to MongoDB. The reply is stored tagged with ``T`` (never with a token
  read later). An entry answers a lookup only if its tag equals the current token.
* **Write**: after MongoDB has answered the write (acknowledged or failed: a failed or
  timed-out write may still have been applied) and *before* the proxy sends the reply
  to the client, the namespace's token is replaced by fresh random bytes (``SET``).

Claim: once a client has the proxy's acknowledgement of write W, no lookup through any
instance returns a result read before W was applied. Proof: such a stale result R was
read from MongoDB before W was applied, so the token R is tagged with was read even
earlier, hence before W's token replacement (which follows W's reply from MongoDB). A
lookup that starts after the client has W's acknowledgement starts after that
replacement, so it sees the new token (or a later one; tokens are random, never reused)
and R's tag cannot equal it. A result read *after* W was applied may be tagged with the
pre-W token and be discarded by the replacement: a lost store, never a stale hit.
Concurrent reads that overlap W may see either state, as with MongoDB itself.

**Why not also bump before forwarding a write.** It is not needed for the claim above,
and it does not close the windows that remain: readers filling between the early bump
and W's application would tag pre-W results with the early token, so the late bump is
required anyway. It would only narrow the case where the proxy dies between MongoDB's
reply and the late bump (the client then has no acknowledgement, so no
read-your-writes promise is broken; other readers see the old result until the
entry's TTL). That is not worth a Redis round trip on every write.

**Tokens are random, not counters**: a token key that expires, is evicted, or vanishes
with a restarted Redis (no persistence) is recreated with new random bytes, which no
existing entry carries. A counter starting again at 0 would resurrect old entries.
Creating a token (``SET NX GET``) first records the namespace in ``P{db}:ns`` so
``dropDatabase`` can replace the token of every namespace of the database. That set has
no TTL: run the cache's Redis with a ``volatile-*`` eviction policy (or none) and
without persistence (a restored snapshot would bring back old tokens with old entries).

**Redis failures** (the full argument and the limits: docs/cache.md). Lookups and
invalidations are separate paths:

* *Lookups* (and stores, token creation) wait for Redis at most the lookup budget
  (:class:`~proxy.cache.budget.LatencyBudget`: 4 x Redis's recent p99, between
  ``timeout_ms`` and ``timeout_max_ms``), measured so that the proxy's own busy loop does
  not count (:class:`~proxy.cache.deadline.PolledTimeout`, the lane's watchdog). A
  lookup past its budget is a bypass (``redis_timeout``), *not* a failure: a loaded
  host delays a healthy Redis now and then. Failures are Redis failing: refused, reset,
  garbage, any exception of the client; ``breaker.failures`` consecutive ones open the
  lookup circuit, and so does Redis answering *nothing at all* for ``breaker.stall_ms``
  while lookups time out. While open, lookups bypass at once and a probe (PING) runs
  every ``probe_interval_ms``; the first good probe closes it. One log line per change.
* *Invalidations* (proxy.cache.pending) ignore the lookup circuit: a write's
  invalidation is always attempted within ``invalidate_timeout_ms``; if it cannot land,
  the namespace is pending (not served by this instance, retried every
  ``probe_interval_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from proxy.cache.budget import LatencyBudget
from proxy.cache.config import CacheConfig
from proxy.cache.deadline import PolledTimeout
from proxy.cache.eligibility import WriteTargets
from proxy.cache.entry import TOKEN_BYTES
from proxy.cache.lane import LookupLane, lane_for
from proxy.cache.metrics import CacheMetrics
from proxy.cache.pending import Invalidator

__all__ = ["CircuitOpen", "InvalidationPending", "RedisStore", "StoreGarbage",
           "StoreTimeout", "StoreUnavailable"]

log = logging.getLogger("mongoproxy.cache")

T = TypeVar("T")
WARM_CONNECTIONS = 4
CONFIRM_STEPS = 20  # a silence is confirmed over this many loop passes ...
CONFIRM_STEP_S = 0.01  # ... this far apart at least
State = Literal["connecting", "ok", "down"]


class StoreUnavailable(Exception):
    """Redis is not used right now (circuit open) or the operation failed; ``reason``
    is the lookup's bypass reason."""

    reason = "redis_error"


class StoreTimeout(StoreUnavailable):
    """No reply within the lookup budget: a bypass, not a failure."""

    reason = "redis_timeout"


class StoreGarbage(StoreUnavailable):
    reason = "redis_garbage"


class CircuitOpen(StoreUnavailable):
    reason = "redis_unavailable"


class InvalidationPending(StoreUnavailable):
    """The namespace's invalidation has not reached Redis: not served here."""

    reason = "pending_invalidation"


_UNSCOPED = contextlib.nullcontext()


def _as_bytes(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "error"


class RedisStore:
    def __init__(self, config: CacheConfig, metrics: CacheMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.prefix = config.key_prefix
        self.timeout_s = config.timeout_ms / 1000
        self.invalidate_timeout_s = config.invalidate_timeout_ms / 1000
        self.stall_s = config.breaker.stall_ms / 1000
        self.gen_ttl_ms = config.generation_ttl_s * 1000
        self.budget = LatencyBudget(self.timeout_s, config.lookup_ceiling_ms / 1000)
        metrics.budget.set_function(lambda: self.budget.value)
        options: dict[str, Any] = {
            "socket_timeout": max(self.budget.ceiling, self.invalidate_timeout_s,
                                  config.connect_timeout_ms / 1000),
            "socket_connect_timeout": config.connect_timeout_ms / 1000,
            # The breaker decides about retrying, not the client.
            "retry": Retry(NoBackoff(), 0),
            # No CLIENT SETINFO on connect: a round trip less before a new connection's
            # first command (a write's invalidation may be that command).
            "driver_info": None,
        }
        self.client: Redis | RedisCluster
        self._lane: LookupLane | None = None
        if config.cluster:
            self.client = RedisCluster.from_url(config.redis_url, **options)
        else:
            self.client = Redis.from_url(config.redis_url, **options)
            # Lookups (the whole of a hit) skip redis-py's client: see proxy.cache.lane.
            self._lane = lane_for(config.redis_url, config.connect_timeout_ms / 1000,
                                  self.timeout_s, self.budget)
        self.state: State = "connecting"
        self._failures = 0
        self._open = False
        # Start of the oldest timed-out operation Redis has not answered anything since.
        self._quiet_since: float | None = None
        self._confirming: asyncio.Task[None] | None = None
        self.invalidations = Invalidator(
            self._bump, metrics, budget_s=self.invalidate_timeout_s,
            retry_interval_s=config.breaker.probe_interval_ms / 1000, kind=_kind,
            answered=lambda since: self.budget.answered_at >= since)
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    # -- keys -------------------------------------------------------------------------

    def token_key(self, ns: str) -> str:
        return f"{self.prefix}{{{ns}}}:g"

    def entry_key(self, ns: str, digest: str) -> str:
        return f"{self.prefix}{{{ns}}}:e:{digest}"

    def registry_key(self, db: str) -> str:
        return f"{self.prefix}{{{db}}}:ns"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """PINGs to learn the state (Redis down at start is not an error), on
        ``WARM_CONNECTIONS`` connections at once: the first burst of writes then finds
        connections in the pool instead of opening them within its invalidation
        budget."""
        if all(await asyncio.gather(*(self._ping() for _ in range(WARM_CONNECTIONS)))):
            self._set_state("ok")
        else:
            self._trip("Redis not reachable at start")

    async def close(self) -> None:
        self._closed = True
        if self._confirming is not None:
            self._confirming.cancel()
        await self.invalidations.close()
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            if self._lane is not None:
                self._lane.close()
            await self.client.aclose()

    @property
    def available(self) -> bool:
        return not self._open

    # -- operations -------------------------------------------------------------------

    async def lookup(self, ns: str, digest: str) -> tuple[bytes, bytes | None]:
        """(current token of ns, raw entry or None). Creates the token when missing."""
        if self.invalidations and self.invalidations.blocks(ns):
            raise InvalidationPending(ns)
        keys = (self.token_key(ns), self.entry_key(ns, digest))
        lane = self._lane
        if lane is not None:  # the lane bounds its own replies
            reply = await self._run("lookup", lambda: lane.mget(*keys), bounded=True)
        else:
            reply = await self._run("lookup", lambda: self.client.mget(*keys))
        if not isinstance(reply, list) or len(reply) != 2:
            self.metrics.error("lookup", "garbage")
            self.failed("MGET returned something else than two values")
            raise StoreGarbage("garbage from MGET")
        token, entry = _as_bytes(reply[0]), _as_bytes(reply[1])
        if token is None or len(token) != TOKEN_BYTES:
            # Missing (never created, expired, evicted, Redis restarted) or foreign.
            return await self._run("token", lambda: self._create_token(ns)), None
        return token, entry

    async def _create_token(self, ns: str) -> bytes:
        db = ns.partition(".")[0]
        # Registered before it exists: dropDatabase must find every namespace whose
        # token a reader may have read (see the module docstring).
        await self.client.sadd(self.registry_key(db), ns)
        fresh = secrets.token_bytes(TOKEN_BYTES)
        old = _as_bytes(await self.client.set(self.token_key(ns), fresh, nx=True, get=True,
                                              px=self.gen_ttl_ms))
        if old is None:
            return fresh  # ours was set
        if len(old) == TOKEN_BYTES:
            return old  # another reader's (or a write's) came first
        # A foreign value under our key: replace it (never a token: that would undo a
        # concurrent write's replacement).
        await self.client.set(self.token_key(ns), fresh, px=self.gen_ttl_ms)
        return fresh

    async def store(self, ns: str, digest: str, value: bytes, ttl_s: float) -> None:
        key = self.entry_key(ns, digest)
        await self._run("store", lambda: self.client.set(key, value, px=int(ttl_s * 1000)))

    async def invalidate(self, targets: WriteTargets) -> bool:
        """Replace the tokens of what a write changed, whatever the lookup circuit's
        state. False: Redis could not be told within ``invalidate_timeout_ms``; the
        targets are pending (proxy.cache.pending)."""
        if not targets:
            return True
        return await self.invalidations.invalidate(targets)

    async def _bump(self, targets: WriteTargets) -> int:
        namespaces = set(targets.namespaces)
        for db in targets.databases:
            members = await self.client.smembers(self.registry_key(db))
            namespaces.update(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        if not namespaces:
            return len(targets.databases)
        if len(namespaces) == 1:
            (ns,) = namespaces
            await self.client.set(self.token_key(ns), secrets.token_bytes(TOKEN_BYTES),
                                  px=self.gen_ttl_ms)
        else:
            # Non-transactional: on a cluster the tokens live in different slots.
            async with self.client.pipeline(transaction=False) as pipe:
                for ns in sorted(namespaces):
                    pipe.set(self.token_key(ns), secrets.token_bytes(TOKEN_BYTES),
                             px=self.gen_ttl_ms)
                await pipe.execute()
        return len(namespaces) + len(targets.databases)

    # -- the breaker ------------------------------------------------------------------

    async def _run(
        self, op: str, call: Callable[[], Awaitable[T]], *, bounded: bool = False,
    ) -> T:
        """``call()`` within the lookup budget (``bounded``: the call bounds itself, the
        lane). A timeout is a bypass, not a failure (see :meth:`_silent`); any other
        exception of the call is a Redis failure: the cache must never fail a request
        (redis-py raises AttributeError, for one, on a connection closed under a
        command in flight)."""
        if self._open:
            raise CircuitOpen("circuit open")
        started = time.monotonic()
        try:
            async with _UNSCOPED if bounded else PolledTimeout(self.budget.value):
                result = await call()
        except (TimeoutError, RedisTimeoutError) as exc:
            self.metrics.error(op, "timeout")
            self._silent(started, time.monotonic())
            raise StoreTimeout(str(exc) or "no reply within the lookup budget") from None
        except Exception as exc:  # any failure, see the docstring
            self.metrics.error(op, _kind(exc))
            self.failed(f"{op}: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(str(exc)) from None
        now = time.monotonic()
        self.metrics.observe_latency(op, now - started)
        if not bounded:  # the lane feeds the budget itself, with every reply
            self.budget.add(now - started)
            if self._lane is None:
                # With a lane, only its replies prove lookups can be answered: a lane
                # connection gone silent must end in the stall rule (a new connection)
                # even while other connections still get answers.
                self.budget.answered_at = now
        self._failures = 0
        if self.state != "ok" and not self._open:
            self._set_state("ok")
        return result

    def _silent(self, started: float, now: float) -> None:
        """A timed-out operation: the circuit opens only when Redis has answered
        nothing at all for ``stall_ms`` (a loaded host delays a healthy Redis; it does
        not silence it). Replies that came after their lookup gave up count as answers.
        The silence is then confirmed over ``CONFIRM_STEPS`` loop passes with a PING
        in flight: a proxy that was off the CPU for a second read no socket meanwhile,
        which does not make Redis silent (seen: a 1.1 s freeze of a proxy process on a
        host at load 12 opened the circuit at once)."""
        quiet = self._quiet_since
        if quiet is None or self.budget.answered_at >= quiet:
            self._quiet_since = started
        elif now - quiet >= self.stall_s and self._confirming is None and not self._open:
            self._confirming = asyncio.get_running_loop().create_task(
                self._confirm_silence(quiet), name="redis silence")

    async def _confirm_silence(self, quiet: float) -> None:
        ping = asyncio.ensure_future(self._ping_for_answer())
        try:
            for _ in range(CONFIRM_STEPS):  # loop passes, each one polls the sockets
                await asyncio.sleep(CONFIRM_STEP_S)
                if self.budget.answered_at >= quiet:
                    return
            self._trip(f"no reply from Redis for {(time.monotonic() - quiet) * 1000:.0f} ms "
                       f"(breaker.stall_ms {self.stall_s * 1000:g})")
        finally:
            ping.cancel()
            self._confirming = None

    async def _ping_for_answer(self) -> None:
        with contextlib.suppress(Exception):
            if self._lane is not None:
                await self._lane.ping()
            else:
                await self.client.ping()
                self.budget.answered_at = time.monotonic()

    def failed(self, why: str) -> None:
        """Count a failure (also for garbage returned by Redis)."""
        self._failures += 1
        if self._failures >= self.config.breaker.failures:
            self._trip(f"{self._failures} consecutive failures (last: {why})")

    def _trip(self, why: str) -> None:
        if self._open or self._closed:
            return
        self._open = True
        self._set_state("down")
        log.warning("result cache: Redis circuit open, requests bypass the cache: %s", why)
        self.metrics.circuit(True)
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop(),
                                                             name="redis probe")

    async def _probe_loop(self) -> None:
        interval = self.config.breaker.probe_interval_ms / 1000
        await self._drop_connections()
        while True:
            await asyncio.sleep(interval)
            if await self._ping():
                break
        self._failures = 0
        self._quiet_since = None
        self._open = False
        self._set_state("ok")
        log.warning("result cache: Redis reachable again, circuit closed")
        self.metrics.circuit(False)

    async def _drop_connections(self) -> None:
        """Close the lookup lane and the client's idle connections: after the failure
        that opened the circuit they are suspect (a restarted Redis leaves the old ones
        dead). Connections in use are left alone: an invalidation may be running on one
        (it has its own budget and retries). New ones are opened on first use. (A Redis
        Cluster client manages its nodes' connections itself.)"""
        if self._lane is not None:
            self._lane.close()
        if isinstance(self.client, Redis):
            with contextlib.suppress(RedisError, OSError):
                await self.client.connection_pool.disconnect(inuse_connections=False)

    async def _ping(self) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(self.timeout_s,
                                           self.config.connect_timeout_ms / 1000)):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.error("probe", _kind(exc))
            return False
        self.metrics.observe_latency("probe", time.perf_counter() - started)
        return True

    def _set_state(self, state: State) -> None:
        self.state = state
