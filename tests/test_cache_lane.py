"""``proxy.cache.lane``: the pipelined MGET connection of cache lookups, against a real
redis-server (stalled with SIGSTOP, restarted, with a password and a database number)
and against a peer that answers garbage."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvloop
from redis.exceptions import RedisError

from proxy.cache.config import CacheConfig
from proxy.cache.deadline import MAX_MOVES, PolledTimeout
from proxy.cache.lane import LookupLane, lane_for
from proxy.cache.layer import ResultCache
from proxy.cache.store import StoreUnavailable
from tests.support import RedisFactory, RedisProcess
from tests.support.procs import HOST, find_redis_server, free_port

PASSWORD = "lane-secret"


def _cache(server: RedisProcess, url: str | None = None) -> ResultCache:
    return ResultCache(CacheConfig.model_validate({
        "redis_url": url or server.url, "timeout_ms": 200, "key_prefix": "l:",
        "breaker": {"failures": 3, "probe_interval_ms": 100},
        "rules": [{"match": {"collection": "users"}, "ttl_s": 60}],
    }))


async def test_replies_stay_matched_after_a_lookup_timed_out(
    redis_factory: RedisFactory,
) -> None:
    """The reply to a lookup the timeout gave up on arrives later; it must not be taken
    for the answer to the next lookup (which asks about another namespace)."""
    server = redis_factory()
    cache = _cache(server)
    store = cache.store
    await cache.start()
    try:
        token_a, _ = await store.lookup("app.a", "d")
        token_b, _ = await store.lookup("app.b", "d")
        assert token_a != token_b
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.lookup("app.a", "d")
            assert time.monotonic() - started < 1.0  # bounded by timeout_ms
        finally:
            server.proc.send_signal(signal.SIGCONT)
        for _ in range(3):  # the late reply for app.a is dropped, not handed out
            assert (await store.lookup("app.b", "d"))[0] == token_b
            assert (await store.lookup("app.a", "d"))[0] == token_a
    finally:
        await cache.close()


async def test_concurrent_lookups_on_one_connection_get_their_own_replies(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    with redis.Redis.from_url(server.url) as r:
        r.mset({f"k{i}": f"v{i}" for i in range(200)})
    lane = lane_for(server.url, 1.0, 1.0)
    assert lane is not None
    try:
        replies = await asyncio.gather(*(lane.mget(f"k{i}", "missing") for i in range(200)))
        assert replies == [[f"v{i}".encode(), None] for i in range(200)]
    finally:
        lane.close()


async def test_a_restarted_redis_gets_a_new_connection(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    lane = lane_for(server.url, 1.0, 1.0)
    assert lane is not None
    try:
        assert await lane.mget("x", "y") == [None, None]
        server.kill()
        with pytest.raises((OSError, RedisError)):
            await asyncio.wait_for(lane.mget("x", "y"), 2)
        server.start()
        with redis.Redis.from_url(server.url) as r:
            r.set("x", "1")
        assert await lane.mget("x", "y") == [b"1", None]
    finally:
        lane.close()


class _PasswordRedis(RedisProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--requirepass", PASSWORD]


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[_PasswordRedis]:
    server = _PasswordRedis(tmp_path, binary=find_redis_server())
    server.start()
    yield server
    server.stop()


async def test_password_and_database_from_the_url(password_redis: _PasswordRedis) -> None:
    url = f"redis://:{PASSWORD}@{HOST}:{password_redis.port}/2"
    with redis.Redis.from_url(url) as r:
        r.set("only-in-db-2", "yes")
    lane = lane_for(url, 1.0, 1.0)
    assert lane is not None and lane.db == 2
    try:
        assert await lane.mget("only-in-db-2", "nothing") == [b"yes", None]
    finally:
        lane.close()
    wrong = lane_for(f"redis://:wrong@{HOST}:{password_redis.port}/0", 1.0, 1.0)
    assert wrong is not None
    with pytest.raises(RedisError):
        await wrong.mget("only-in-db-2", "nothing")
    wrong.close()


async def test_a_peer_answering_garbage_is_an_error_not_a_hang() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"this is not RESP\r\n")
        await writer.drain()

    port = free_port()
    server = await asyncio.start_server(garbage, HOST, port)
    lane = LookupLane(HOST, port, 1.0, 1.0)
    try:
        with pytest.raises(RedisError):
            await asyncio.wait_for(lane.mget("a", "b"), 2)
    finally:
        lane.close()
        server.close()
        await server.wait_closed()


def test_only_tcp_urls_get_a_lane() -> None:
    assert lane_for("redis://127.0.0.1:6379/0", 1.0, 1.0) is not None
    secure = lane_for("rediss://127.0.0.1:6379/0", 1.0, 1.0)  # tests/test_cache_tls.py
    assert secure is not None and secure.ssl is not None
    assert lane_for("unix:///tmp/redis.sock", 1.0, 1.0) is None



class _SlowReplies:
    """A TCP relay in front of a real redis-server that holds every reply ``delay_s``
    (settable) before passing it on: Redis answering within the budget, but not at once.
    Runs its own event loop in a thread, so the loop under test can be busy meanwhile."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.delay_s = upstream_port, 0.0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        task = asyncio.ensure_future(requests())
        while data := await up_reader.read(65536):
            await asyncio.sleep(self.delay_s)
            writer.write(data)
        writer.close()
        task.cancel()

    def __enter__(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, HOST, self.port), self._loop).result(5)
        return f"redis://{HOST}:{self.port}/0"

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _lookup_and_store_while_the_loop_is_busy(
    relay: _SlowReplies, url: str, loop_kind: str,
) -> tuple[int, int]:
    """Lookups (lane) and stores (redis-py) with a 5 ms budget, Redis answering each in
    3 ms, while the event loop is held for 100 ms by other work 1 ms after each request
    went out: the reply is in the socket before the deadline, but the loop reads it only
    after. Returns (failures, successes)."""
    async def scenario() -> tuple[int, int]:
        cache = ResultCache(CacheConfig.model_validate({
            "redis_url": url, "timeout_ms": 5, "key_prefix": "busy:",
            "breaker": {"failures": 100, "probe_interval_ms": 100},
            "rules": [{"match": {"collection": "users"}, "ttl_s": 60}],
        }))
        await cache.start()
        store = cache.store
        failures = successes = 0
        try:
            await store.lookup("app.users", "warm")  # connects the lane, creates the token
            await store.store("app.users", "warm", b"v", 60)  # connects redis-py
            relay.delay_s = 0.003
            for i in range(10):
                asyncio.get_running_loop().call_later(0.001, time.sleep, 0.1)  # busy
                try:
                    if i % 2:
                        await store.store("app.users", f"d{i}", b"v", 60)
                    else:
                        await store.lookup("app.users", f"d{i}")
                    successes += 1
                except StoreUnavailable:
                    failures += 1
        finally:
            await cache.close()
        return failures, successes

    if loop_kind == "uvloop":
        return uvloop.run(scenario())
    return asyncio.run(scenario())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_busy_event_loop_is_not_taken_for_a_slow_redis(
    redis_factory: RedisFactory, loop_kind: str,
) -> None:
    server = redis_factory()
    relay = _SlowReplies(server.port)
    with relay as url:
        assert _lookup_and_store_while_the_loop_is_busy(relay, url, loop_kind) == (0, 10)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_polled_timeout_still_expires(loop_kind: str) -> None:
    """Nothing answers: the call fails after the budget (plus the one-poll grace); when
    the loop was busy past the deadline, after a second budget; and when the loop never
    stops being busy, after at most MAX_MOVES moves."""
    async def wait(busy_s: float, *, forever: bool = False) -> float:
        loop = asyncio.get_running_loop()
        busy = True

        def block() -> None:
            time.sleep(busy_s)
            if forever and busy:
                loop.call_soon(block)

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with PolledTimeout(0.02):
                if busy_s:
                    loop.call_soon(block)
                await asyncio.sleep(10)
        busy = False
        return time.monotonic() - started

    async def all_three() -> tuple[float, float, float]:
        return await wait(0), await wait(0.05), await wait(0.01, forever=True)

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    idle, busy, always_busy = run(all_three())
    assert 0.02 <= idle < 0.5
    assert 0.07 <= busy < 0.6  # 50 ms busy, then a second budget of 20 ms
    # a budget the loop reaches late is moved (up to MAX_MOVES times), never for good
    assert 0.02 <= always_busy < (1 + MAX_MOVES) * (0.02 + 0.01) + 0.5
