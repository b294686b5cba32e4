"""UpstreamPool on its own, against the session's real FerretDB: bounds, fairness,
timeouts, cancellation, clearing, idle reaping (which must spare connections that own
open cursors) and connect failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from bson.int64 import Int64

from proxy.config import PoolConfig
from proxy.errors import ProxyError
from proxy.pool.connection import UpstreamConnection
from proxy.pool.pool import UpstreamPool
from tests.support import FerretDBProcess, free_port

Doc = dict[str, Any]
MakePool = Callable[..., UpstreamPool]
TIMEOUT_S = 5.0


@pytest.fixture
async def make_pool(ferretdb: FerretDBProcess) -> AsyncIterator[MakePool]:
    pools: list[UpstreamPool] = []

    def make(address: tuple[str, int] | None = None, **config: Any) -> UpstreamPool:
        pool = UpstreamPool(address or (ferretdb.host, ferretdb.port), PoolConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def run(conn: UpstreamConnection, command: Doc) -> Doc:
    reply = await conn.command(command, TIMEOUT_S)
    assert reply.get("ok") == 1, reply
    return reply


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def seed(pool: UpstreamPool, db: str, count: int = 10) -> None:
    conn = await pool.checkout()
    try:
        await run(conn, {"insert": "c", "documents": [{"_id": i} for i in range(count)],
                         "$db": db})
    finally:
        pool.checkin(conn, True)


async def open_cursor(conn: UpstreamConnection, db: str) -> int:
    reply = await run(conn, {"find": "c", "filter": {}, "batchSize": 2, "$db": db})
    cursor_id = reply["cursor"]["id"]
    assert cursor_id != 0
    return int(cursor_id)


def get_more(cursor_id: int, db: str) -> Doc:
    return {"getMore": Int64(cursor_id), "collection": "c", "batchSize": 2, "$db": db}


async def test_max_size_respected_under_50_concurrent_checkouts(make_pool: MakePool) -> None:
    pool = make_pool(max_size=5)
    peak = {"size": 0, "in_use": 0}
    connections: set[int] = set()

    async def one(i: int) -> None:
        conn = await pool.checkout()
        connections.add(id(conn))
        peak["size"] = max(peak["size"], pool.size)
        peak["in_use"] = max(peak["in_use"], pool.in_use)
        try:
            await run(conn, {"ping": 1, "$db": "admin"})
            await asyncio.sleep(0.01)
        finally:
            pool.checkin(conn, True)

    await asyncio.gather(*(one(i) for i in range(50)))
    assert peak == {"size": 5, "in_use": 5}
    assert len(connections) == 5
    assert pool.stats() == {"size": 5, "in_use": 0, "idle": 5, "waiting": 0}


async def test_waiters_are_served_first_come_first_served(make_pool: MakePool) -> None:
    pool = make_pool(max_size=1)
    held = await pool.checkout()
    served: list[int] = []

    async def waiter(i: int) -> None:
        conn = await pool.checkout()
        served.append(i)
        await asyncio.sleep(0)
        pool.checkin(conn, True)

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(waiter(i)))
        await until(lambda i=i: pool.waiting == i + 1)  # type: ignore[misc]
    assert pool.stats()["waiting"] == 8
    pool.checkin(held, True)
    await asyncio.gather(*tasks)
    assert served == list(range(8))
    assert pool.stats() == {"size": 1, "in_use": 0, "idle": 1, "waiting": 0}


async def test_wait_queue_timeout_is_network_timeout_promptly(make_pool: MakePool) -> None:
    pool = make_pool(max_size=1, wait_queue_timeout_ms=200)
    held = await pool.checkout()
    start = time.monotonic()
    with pytest.raises(ProxyError) as err:
        await pool.checkout()
    elapsed = time.monotonic() - start
    assert err.value.code == 89
    assert err.value.code_name == "NetworkTimeout"
    assert "200 ms" in err.value.errmsg
    assert 0.19 <= elapsed < 1.0
    assert pool.waiting == 0
    pool.checkin(held, True)
    conn = await pool.checkout()  # the pool still works
    assert conn is held
    pool.checkin(conn, True)


@pytest.mark.parametrize("when", ["while waiting", "in the same iteration as the handover"])
async def test_cancelled_waiter_does_not_leak_a_slot(make_pool: MakePool, when: str) -> None:
    pool = make_pool(max_size=1, wait_queue_timeout_ms=1000)
    held = await pool.checkout()
    task = asyncio.create_task(pool.checkout())
    await until(lambda: pool.waiting == 1)
    if when == "while waiting":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool.checkin(held, True)
    else:
        pool.checkin(held, True)  # handed to the waiter's future...
        task.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pool.stats() == {"size": 1, "in_use": 0, "idle": 1, "waiting": 0}
    # The one slot is usable at once (a leak would make this wait and time out).
    async with asyncio.timeout(0.5):
        conn = await pool.checkout()
    assert conn is held
    pool.checkin(conn, True)


async def test_cancelled_waiter_after_a_discard_does_not_leak_a_slot(
    make_pool: MakePool,
) -> None:
    # A discarded connection hands its *slot* to the waiter (it opens a new one).
    pool = make_pool(max_size=1, wait_queue_timeout_ms=1000)
    held = await pool.checkout()
    task = asyncio.create_task(pool.checkout())
    await until(lambda: pool.waiting == 1)
    pool.checkin(held, False)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.size == 0
    assert pool.in_use == 0
    async with asyncio.timeout(2):
        conn = await pool.checkout()
    assert pool.size == 1
    pool.checkin(conn, True)


async def test_clear_closes_idle_connections(make_pool: MakePool) -> None:
    pool = make_pool(max_size=5)
    conns = [await pool.checkout() for _ in range(3)]
    busy = await pool.checkout()
    for conn in conns:
        pool.checkin(conn, True)
    assert pool.stats() == {"size": 4, "in_use": 1, "idle": 3, "waiting": 0}
    pool.clear()
    assert pool.stats() == {"size": 1, "in_use": 1, "idle": 0, "waiting": 0}
    assert all(conn.closed_by_peer() for conn in conns)  # closed (our end)
    assert not busy.closed_by_peer()
    pool.checkin(busy, True)
    fresh = await pool.checkout()
    assert fresh is busy
    pool.checkin(fresh, True)


async def test_clear_keeps_a_live_connection_that_owns_cursors(
    make_pool: MakePool, db_name: str
) -> None:
    pool = make_pool(max_size=5)
    await seed(pool, db_name)
    owner, other = await pool.checkout(), await pool.checkout()
    cursor_id = await open_cursor(owner, db_name)
    owner.cursor_opened()
    pool.checkin(owner, True)
    pool.checkin(other, True)
    pool.clear()
    assert pool.stats()["idle"] == 1
    assert other.closed_by_peer()
    conn = await pool.checkout()
    assert conn is owner
    reply = await run(conn, get_more(cursor_id, db_name))
    assert len(reply["cursor"]["nextBatch"]) == 2
    pool.checkin(conn, True)


async def test_closing_the_opening_connection_kills_its_cursors(
    make_pool: MakePool, db_name: str
) -> None:
    """The premise of cursor_opened(): FerretDB kills a cursor with its connection."""
    pool = make_pool(max_size=5)
    await seed(pool, db_name)
    a = await pool.checkout()
    cursor_id = await open_cursor(a, db_name)
    pool.checkin(a, False)  # discarded: closed
    b = await pool.checkout()
    try:
        reply = await b.command(get_more(cursor_id, db_name), TIMEOUT_S)
    finally:
        pool.checkin(b, True)
    assert reply["ok"] == 0
    assert reply["code"] == 43  # CursorNotFound


async def test_idle_reaping_spares_connections_with_open_cursors(
    make_pool: MakePool, db_name: str
) -> None:
    pool = make_pool(max_size=5, max_idle_ms=100)
    await seed(pool, db_name)
    owner = await pool.checkout()
    others = [await pool.checkout() for _ in range(2)]
    cursor_id = await open_cursor(owner, db_name)
    owner.cursor_opened()
    for conn in [owner, *others]:
        pool.checkin(conn, True)
    assert pool.size == 3
    # The reaper task (started by the first checkout) closes the two idle ones.
    await until(lambda: pool.size == 1)
    assert all(conn.closed_by_peer() for conn in others)
    assert not owner.closed_by_peer()
    await asyncio.sleep(0.3)  # well past max_idle_ms: still spared
    assert pool.stats() == {"size": 1, "in_use": 0, "idle": 1, "waiting": 0}
    # The cursor is alive: read it to the end through the pool.
    conn = await pool.checkout()
    assert conn is owner
    total = 2
    while cursor_id:
        reply = await run(conn, get_more(cursor_id, db_name))
        total += len(reply["cursor"]["nextBatch"])
        cursor_id = reply["cursor"]["id"]
    assert total == 10
    conn.cursor_closed()
    assert conn.open_cursors == 0
    pool.checkin(conn, True)
    # No cursors left: now it is reaped like any other.
    await until(lambda: pool.size == 0)
    assert owner.closed_by_peer()


async def test_reap_respects_min_size_and_age(make_pool: MakePool) -> None:
    # A long max_idle_ms: the background reaper stays out of the way; reap() is driven
    # with an explicit clock.
    pool = make_pool(max_size=6, min_size=2, max_idle_ms=60_000)
    await pool.fill()
    assert pool.stats() == {"size": 2, "in_use": 0, "idle": 2, "waiting": 0}
    conns = [await pool.checkout() for _ in range(5)]
    for conn in conns:
        pool.checkin(conn, True)
    assert pool.size == 5
    now = time.monotonic()
    assert pool.reap(now) == 0  # nothing is 60 s old
    conns[0].last_used -= 120  # one is old: reaped
    assert pool.reap(now) == 1
    assert conns[0].closed_by_peer()
    for conn in conns:
        conn.last_used -= 120  # all old: reaped down to min_size, no further
    assert pool.reap(now) == 2
    assert pool.stats() == {"size": 2, "in_use": 0, "idle": 2, "waiting": 0}
    assert pool.reap(now + 1000) == 0


async def test_reap_is_off_by_default(make_pool: MakePool) -> None:
    pool = make_pool(max_size=2)
    assert pool.config.max_idle_ms == 0
    conn = await pool.checkout()
    pool.checkin(conn, True)
    conn.last_used -= 10**6
    assert pool.reap() == 0
    assert pool.size == 1


async def test_connect_failure_releases_the_slot(make_pool: MakePool) -> None:
    dead = ("127.0.0.1", free_port())  # nothing listens here
    pool = make_pool(dead, max_size=2, wait_queue_timeout_ms=5_000)
    start = time.monotonic()
    results = await asyncio.gather(*(pool.checkout() for _ in range(10)),
                                   return_exceptions=True)
    # Every caller (including those that waited for a slot) gets HostUnreachable
    # promptly, not a wait-queue timeout: a failed connect frees its slot.
    assert all(isinstance(r, ProxyError) and r.code == 6 for r in results), results
    assert time.monotonic() - start < 2.0
    assert pool.stats() == {"size": 0, "in_use": 0, "idle": 0, "waiting": 0}


async def test_connect_timeout_releases_the_slot(make_pool: MakePool) -> None:
    # A listener that accepts but never answers the handshake.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = make_pool(("127.0.0.1", port), max_size=1, connect_timeout_ms=200)
        for _ in range(2):
            with pytest.raises(ProxyError) as err:
                await pool.checkout()
            assert err.value.code == 89
            assert pool.size == 0
    finally:
        server.close()


async def test_cancelled_connect_releases_the_slot(make_pool: MakePool) -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = make_pool(("127.0.0.1", port), max_size=1)
        task = asyncio.create_task(pool.checkout())
        await until(lambda: pool.size == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.size == 0
    finally:
        gate.set()
        server.close()


async def test_close_fails_waiters_and_discards_returned_connections(
    make_pool: MakePool,
) -> None:
    pool = make_pool(max_size=1)
    held = await pool.checkout()
    waiter = asyncio.create_task(pool.checkout())
    await until(lambda: pool.waiting == 1)
    await pool.close()
    with pytest.raises(ProxyError) as err:
        await waiter
    assert err.value.code == 6
    pool.checkin(held, True)
    assert held.closed_by_peer()
    assert pool.stats() == {"size": 0, "in_use": 0, "idle": 0, "waiting": 0}


def test_cursor_counter_never_goes_negative() -> None:
    conn = UpstreamConnection.__new__(UpstreamConnection)
    conn.open_cursors = 0
    conn.cursor_opened()
    conn.cursor_opened()
    conn.cursor_closed()
    assert conn.open_cursors == 1
    conn.cursor_closed()
    conn.cursor_closed()
    assert conn.open_cursors == 0
