"""``proxy.cache.store`` and ``proxy.cache.layer`` against a real redis-server (no proxy):
the generation protocol, dropDatabase through the namespace registry, garbage in Redis,
the circuit breaker with its probe and pending invalidations, single flight through the
layer, and a transaction's writes invalidated at its commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
from typing import Any

import bson
import pytest
import redis
from bson.binary import Binary
from bson.int64 import Int64

from proxy.cache.config import CacheConfig
from proxy.cache.eligibility import WriteTargets
from proxy.cache.entry import encode_entry
from proxy.cache.layer import ResultCache
from proxy.cache.store import StoreUnavailable
from proxy.classify import classify
from proxy.route.readpref import PRIMARY
from proxy.route.rules import RouteDecision
from tests.support import RedisFactory, RedisProcess

Doc = dict[str, Any]
PROBE_MS = 100
INVALIDATE_MS = 1000  # 10 x the default: an invalidation that must land, lands


def _config(server: RedisProcess, **extra: Any) -> CacheConfig:
    return CacheConfig.model_validate({
        # generous connect timeout: the start's PING must not fail on a loaded host
        "redis_url": server.url, "timeout_ms": 200, "key_prefix": "t:",
        "connect_timeout_ms": 2000, "invalidate_timeout_ms": INVALIDATE_MS,
        "breaker": {"failures": 2, "probe_interval_ms": PROBE_MS},
        "rules": [{"match": {"collection": "users|orders"}, "ttl_s": 60}], **extra,
    })


def _body(docs: list[Doc]) -> bytes:
    doc = {"cursor": {"firstBatch": docs, "id": Int64(0), "ns": "app.users"}, "ok": 1.0}
    return struct.pack("<I", 0) + b"\x00" + bson.encode(doc)


@pytest.fixture
def server(redis_factory: RedisFactory) -> RedisProcess:
    return redis_factory()


async def test_tokens_entries_and_invalidation(server: RedisProcess) -> None:
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        assert cache.state == "ok"
        token, entry = await store.lookup("app.users", "d1")
        assert len(token) == 8 and entry is None
        assert (await store.lookup("app.users", "d1"))[0] == token  # stable
        body = _body([{"_id": 1}])
        await store.store("app.users", "d1", encode_entry(token, body, 4096), 60)
        again, raw = await store.lookup("app.users", "d1")
        assert again == token and raw is not None
        # keys of one namespace share a hash tag (one cluster slot)
        with redis.Redis.from_url(server.url) as r:
            keys = sorted(k.decode() for k in r.keys("t:*"))
            assert keys == ["t:{app.users}:e:d1", "t:{app.users}:g", "t:{app}:ns"]
            assert 0 < r.pttl("t:{app.users}:e:d1") <= 60_000
        assert await store.invalidate(WriteTargets(("app.users",)))
        fresh, raw = await store.lookup("app.users", "d1")
        assert fresh != token and raw is not None  # still there, but tagged with the old token
    finally:
        await cache.close()


async def test_drop_database_reaches_every_namespace_of_the_database(
    server: RedisProcess,
) -> None:
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        before = {ns: (await store.lookup(ns, "d"))[0]
                  for ns in ("app.users", "app.orders", "other.users")}
        assert await store.invalidate(WriteTargets(databases=("app",)))
        after = {ns: (await store.lookup(ns, "d"))[0] for ns in before}
        assert after["app.users"] != before["app.users"]
        assert after["app.orders"] != before["app.orders"]
        assert after["other.users"] == before["other.users"]
    finally:
        await cache.close()


async def test_a_missing_token_is_recreated_never_reused(server: RedisProcess) -> None:
    """A counter restarting at 0 would resurrect old entries; random tokens do not."""
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        token, _ = await store.lookup("app.users", "d")
        await store.store("app.users", "d", encode_entry(token, _body([]), 4096), 60)
        with redis.Redis.from_url(server.url) as r:
            r.delete("t:{app.users}:g")  # expired or evicted
        new, raw = await store.lookup("app.users", "d")
        assert new != token and raw is None
    finally:
        await cache.close()


def _access(cache: ResultCache, command: Doc, tenants: tuple[Any, ...] = (None, None)) -> Any:
    return cache.begin(command, classify(command), RouteDecision("default", None, None, PRIMARY),
                       tenants, has_sequences=False, rules=cache.config)


FIND = {"find": "users", "filter": {"a": 1}, "$db": "app"}


async def test_layer_miss_store_hit_and_garbage(server: RedisProcess) -> None:
    cache = ResultCache(_config(server))
    await cache.start()
    try:
        body = _body([{"_id": 1, "a": 1}])
        first = _access(cache, FIND)
        assert await first.lookup() is None and first.result == "miss"
        await first.replied(body)
        await first.store()
        second = _access(cache, FIND)
        assert await second.lookup() == body and second.result == "hit"
        # another tenant, same filter: its own key
        other = _access(cache, FIND, ("globex", "globex"))
        assert await other.lookup() is None and other.result == "miss"
        other.abandon()
        # garbage under the entry's key: a bypass, never a reply
        with redis.Redis.from_url(server.url) as r:
            (key,) = [k for k in r.keys("t:{app.users}:e:*")]
            r.set(key, b"\x00" * 40)
        third = _access(cache, FIND)
        assert await third.lookup() is None and third.result == "bypass:redis_garbage"
    finally:
        await cache.close()


async def test_single_flight_through_the_layer(server: RedisProcess) -> None:
    cache = ResultCache(_config(server))
    await cache.start()
    try:
        leader = _access(cache, FIND)
        assert await leader.lookup() is None
        followers = [_access(cache, FIND) for _ in range(5)]
        waiting = [asyncio.create_task(f.lookup()) for f in followers]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting)
        body = _body([{"_id": 1}])
        await leader.replied(body)
        assert await asyncio.gather(*waiting) == [body] * 5
        assert all(f.result == "hit" for f in followers)
        # a leader whose reply cannot be shared (a cursor left open) releases its waiters
        leader2 = _access(cache, {**FIND, "filter": {"a": 2}})
        assert await leader2.lookup() is None
        follower = asyncio.create_task(_access(cache, {**FIND, "filter": {"a": 2}}).lookup())
        await asyncio.sleep(0.02)
        multi = struct.pack("<I", 0) + b"\x00" + bson.encode(
            {"cursor": {"firstBatch": [], "id": Int64(42), "ns": "app.users"}, "ok": 1.0})
        await leader2.replied(multi)
        assert leader2.result == "bypass:multi_batch"
        assert await follower is None
    finally:
        await cache.close()


async def test_transaction_writes_are_invalidated_at_commit(server: RedisProcess) -> None:
    cache = ResultCache(_config(server))
    await cache.start()
    try:
        token, _ = await cache.store.lookup("app.orders", "d")
        txn = {"lsid": {"id": Binary(b"\x02" * 16, 4)}, "txnNumber": Int64(3),
               "autocommit": False}
        assert _access(cache, {"insert": "orders", "$db": "app", **txn,
                               "startTransaction": True}) is None
        assert (await cache.store.lookup("app.orders", "d"))[0] == token  # not yet
        commit = _access(cache, {"commitTransaction": 1, "$db": "admin", **txn})
        await commit.replied(_body([]))
        assert (await cache.store.lookup("app.orders", "d"))[0] != token
    finally:
        await cache.close()


async def test_breaker_opens_bypasses_probes_and_flushes_pending(
    server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mongoproxy.cache")
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        token, _ = await store.lookup("app.users", "d")
        server.kill()
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.lookup("app.orders", "d")
        assert cache.state == "down" and not store.available
        started = asyncio.get_running_loop().time()
        bypass = _access(cache, {**FIND, "find": "orders"})
        assert await bypass.lookup() is None and bypass.result == "bypass:redis_unavailable"
        assert asyncio.get_running_loop().time() - started < 0.01  # nothing is attempted
        # a write while Redis is down: attempted for its whole budget, then pending
        started = asyncio.get_running_loop().time()
        assert not await store.invalidate(WriteTargets(("app.users",)))
        assert asyncio.get_running_loop().time() - started >= INVALIDATE_MS / 1000
        assert store.invalidations.blocks("app.users")
        server.start()
        for _ in range(100):
            if store.available and not store.invalidations:
                break
            await asyncio.sleep(PROBE_MS / 1000)
        assert store.available and cache.state == "ok" and not store.invalidations
        # a restarted Redis (no persistence) lost everything; the pending bump was applied
        with redis.Redis.from_url(server.url) as r:
            assert r.exists("t:{app.users}:g")
        assert (await store.lookup("app.users", "d"))[0] != token
        changes = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
        assert len(changes) == 2, changes  # one line per state change
        assert "open" in changes[0] and "closed" in changes[1]
    finally:
        await cache.close()


async def test_a_failed_invalidation_is_pending_and_not_served_here(
    server: RedisProcess,
) -> None:
    """The lookup circuit does not open for it (other namespaces are unaffected), but
    this instance serves nothing of the pending namespace until its bump landed."""
    cache = ResultCache(_config(server, breaker={"failures": 100,
                                                 "probe_interval_ms": PROBE_MS}))
    store = cache.store
    await cache.start()
    try:
        body = _body([{"_id": 1, "a": 1}])
        first = _access(cache, FIND)
        assert await first.lookup() is None
        await first.replied(body)
        await first.store()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # reachable, but silent
        try:
            assert not await store.invalidate(WriteTargets(("app.users",)))
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert store.available  # lookups were not the problem
        held = _access(cache, FIND)
        assert await held.lookup() is None and held.result == "bypass:pending_invalidation"
        other = _access(cache, {**FIND, "find": "orders"})
        assert await other.lookup() is None and other.result == "miss"
        other.abandon()
        for _ in range(100):  # retried every probe_interval_ms
            if not store.invalidations:
                break
            await asyncio.sleep(PROBE_MS / 1000)
        assert not store.invalidations
        again = _access(cache, FIND)
        assert await again.lookup() is None and again.result == "miss"  # new token
        again.abandon()
    finally:
        await cache.close()


async def _answered_lookup(store: Any, ns: str) -> bytes:
    """A lookup Redis answered: with a 5 ms budget on a loaded host, one may time out
    (a bypass); try again for up to 10 s."""
    for _ in range(1000):
        try:
            token, _ = await store.lookup(ns, "d")
            return bytes(token)
        except StoreUnavailable as exc:
            assert exc.reason == "redis_timeout", exc
            await asyncio.sleep(0.01)
    raise AssertionError("Redis never answered a lookup within 10 s")


async def test_an_invalidation_lands_while_the_lookup_circuit_is_open(
    server: RedisProcess,
) -> None:
    """Slow or failed lookups never stop a write's invalidation: Redis stalled until the
    lookup circuit opened, then answers again before the (slow) probe closed it."""
    cache = ResultCache(_config(server, timeout_ms=5, invalidate_timeout_ms=2000, breaker={
        "failures": 3, "stall_ms": 200, "probe_interval_ms": 60_000}))
    store = cache.store
    await cache.start()
    try:
        assert store.available
        token = await _answered_lookup(store, "app.users")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(200):
                if not store.available:
                    break
                with pytest.raises(StoreUnavailable) as caught:
                    await store.lookup("app.users", "d")
                assert caught.value.reason == "redis_timeout"  # a bypass, not a failure
                await asyncio.sleep(0.01)
            assert not store.available  # silent for stall_ms: open
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert await store.invalidate(WriteTargets(("app.users",)))
        assert not store.invalidations
        with redis.Redis.from_url(server.url) as r:
            assert r.get("t:{app.users}:g") not in (None, token)
    finally:
        await cache.close()


async def test_lookup_timeouts_alone_do_not_open_the_circuit(server: RedisProcess) -> None:
    """Redis late (stopped for less than stall_ms, as a loaded host may hold it): every
    lookup meanwhile is a bypass, and the circuit stays closed even at failures: 1."""
    cache = ResultCache(_config(server, timeout_ms=5, breaker={
        "failures": 1, "stall_ms": 2000, "probe_interval_ms": PROBE_MS}))
    store = cache.store
    await cache.start()
    try:
        await _answered_lookup(store, "app.users")
        assert server.proc is not None
        timeouts = 0
        for _ in range(3):
            server.proc.send_signal(signal.SIGSTOP)
            try:
                for _ in range(5):
                    with pytest.raises(StoreUnavailable) as caught:
                        await store.lookup("app.users", "d")
                    timeouts += caught.value.reason == "redis_timeout"
            finally:
                server.proc.send_signal(signal.SIGCONT)
            await _answered_lookup(store, "app.users")  # answered again
        assert timeouts == 15 and store.available and cache.state == "ok"
    finally:
        await cache.close()


async def test_a_slow_invalidation_waits_while_redis_answers(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its budget, a write's invalidation keeps waiting while Redis answers other
    commands (here: lookups every 10 ms): Redis is reachable, the slowness is the
    proxy's (stood in for by a SET that takes 250 ms to send). Acknowledging with a
    pending invalidation would break read-your-writes across instances."""
    cache = ResultCache(_config(server, invalidate_timeout_ms=100))
    store = cache.store
    await cache.start()
    try:
        await _answered_lookup(store, "app.users")
        real_set = store.client.set

        async def slow_set(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.25)
            return await real_set(*args, **kwargs)

        monkeypatch.setattr(store.client, "set", slow_set)
        stop = asyncio.Event()

        async def reads() -> None:
            while not stop.is_set():
                with contextlib.suppress(StoreUnavailable):
                    await store.lookup("app.orders", "d")
                await asyncio.sleep(0.01)

        reader = asyncio.create_task(reads())
        try:
            started = asyncio.get_running_loop().time()
            assert await store.invalidate(WriteTargets(("app.users",)))
            assert asyncio.get_running_loop().time() - started >= 0.25
            assert not store.invalidations
        finally:
            stop.set()
            await reader
    finally:
        await cache.close()


async def test_a_cancelled_invalidation_is_pending(server: RedisProcess) -> None:
    """The request goes away (client gone, shutdown) while its write's invalidation
    waits: the write may have been applied, so the namespace is pending all the same."""
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            task = asyncio.create_task(store.invalidate(WriteTargets(("app.users",))))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert store.invalidations.blocks("app.users")
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        await cache.close()


async def test_an_invalidation_after_a_redis_restart_lands(server: RedisProcess) -> None:
    """The connections a killed Redis left behind are dead; the invalidation is retried
    on a new one within its budget instead of being marked pending."""
    cache = ResultCache(_config(server))
    store = cache.store
    await cache.start()
    try:
        await store.lookup("app.users", "d")
        assert await store.invalidate(WriteTargets(("app.users",)))
        server.kill()
        server.start()
        assert await store.invalidate(WriteTargets(("app.users",)))
        assert not store.invalidations
    finally:
        await cache.close()


async def test_any_exception_of_the_redis_client_is_a_redis_failure(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen under load: redis-py raised AttributeError ('NoneType' object has no
    attribute 'writelines') for a command on a connection the breaker had just closed,
    and the write whose invalidation it was got an InternalError although MongoDB had
    applied it. Whatever the client raises is a Redis failure, never the request's."""
    cache = ResultCache(_config(server))
    await cache.start()
    try:
        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

        monkeypatch.setattr(cache.store.client, "set", broken)
        assert not await cache.store.invalidate(WriteTargets(("app.users",)))
        assert cache.store.invalidations.blocks("app.users")  # pending, not served here
        with pytest.raises(StoreUnavailable):
            await cache.store.store("app.users", "d", b"v", 60)
    finally:
        await cache.close()


async def test_redis_down_at_start_is_not_an_error(redis_factory: RedisFactory) -> None:
    server = redis_factory(start=False)
    cache = ResultCache(_config(server))
    await cache.start()
    try:
        assert cache.state == "down"
        access = _access(cache, FIND)
        assert await access.lookup() is None
        assert access.result == "bypass:redis_unavailable"
    finally:
        await cache.close()
