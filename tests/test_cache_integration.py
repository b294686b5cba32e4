"""The result cache end to end: real FerretDB, real redis-server, proxies as subprocesses,
pymongo clients.

1. a second identical find is a hit, and FerretDB (``--log-level=DEBUG``, which logs
   every request it receives) never saw it;
2. two proxy instances sharing one Redis: after a write through B, a read through A
   returns the new data (it is a miss), for every write command;
3. stress: writers and readers on the same documents through both instances; every read
   that starts after a write's acknowledgement sees that write (>= 10,000 operations);
4. Redis SIGKILLed mid-run: no client error, bounded latency, hits resume after restart;
5. inject-mode tenancy with SCRAM users: tenant A's cached result never reaches tenant B;
6. ineligible reads (transaction, tailable, too large, multi-batch) are never cached.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import CursorType, InsertOne, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from proxy.identity.credentials import hash_password
from tests.support import FerretDBProcess, ProxyProcess, RedisFactory, RedisProcess
from tests.test_routing_integration import DebugFerretDB

Doc = dict[str, Any]
# Generous for a shared 2-core machine: these tests check behaviour, not Redis speed.
TIMEOUT_MS = 200
MAX_ENTRY_BYTES = 65_536


def cache_section(redis_url: str, **extra: Any) -> Doc:
    return {
        "redis_url": redis_url, "timeout_ms": TIMEOUT_MS,
        "max_entry_bytes": MAX_ENTRY_BYTES,
        "breaker": {"failures": 3, "probe_interval_ms": 200},
        # every test database is named t_<test>_<hash> (the db_name fixture)
        "rules": [{"match": {"database": "t_*"}, "ttl_s": 300}],
        **extra,
    }


def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def cache_ops(proxy: ProxyProcess) -> dict[str, float]:
    """``hit``, ``miss`` and ``bypass:<reason>`` counts."""
    found: dict[str, float] = {}
    for (name, labels), value in metrics(proxy).items():
        if name == "mongoproxy_cache_operations_total":
            lab = dict(labels)
            key = lab["result"] + (f":{lab['reason']}" if lab["reason"] else "")
            found[key] = value
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def assert_counts(proxy: ProxyProcess, before: dict[str, float],
                  expected: dict[str, float]) -> None:
    """The cache counts changed by exactly ``expected`` since ``before``. Waits up to 3 s:
    an operation is recorded after its reply was written (and after a miss's store), so
    a client can read /metrics a moment before its last operation is counted."""
    deadline = time.monotonic() + 3
    while True:
        now = delta(before, cache_ops(proxy))
        if now == expected:
            return
        assert time.monotonic() < deadline, f"cache counts changed by {now}, not {expected}"
        time.sleep(0.02)


def client(uri: str, **kwargs: Any) -> MongoClient[Doc]:
    return MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=5000,
                       retryWrites=False, retryReads=False, **kwargs)


@pytest.fixture(scope="module")
def pair(
    ferretdb: FerretDBProcess, redis_server: RedisProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxy instances, one FerretDB, one Redis."""
    procs = [ProxyProcess(ferretdb.uri, {"cache": cache_section(redis_server.url)},
                          workdir=tmp_path_factory.mktemp("cache-proxy")).start()
             for _ in range(2)]
    yield procs[0], procs[1]
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def clients(
    pair: tuple[ProxyProcess, ProxyProcess], ferretdb: FerretDBProcess
) -> Iterator[tuple[MongoClient[Doc], MongoClient[Doc], MongoClient[Doc]]]:
    a, b, d = client(pair[0].uri), client(pair[1].uri), client(ferretdb.uri)
    yield a, b, d
    for c in (a, b, d):
        c.close()


# ----------------------------------------------------------------- 1. hits skip FerretDB


def test_second_identical_find_is_a_hit_that_ferretdb_never_sees(
    redis_server: RedisProcess, proxy_factory: Any, tmp_path: Path, db_name: str,
) -> None:
    fdb = DebugFerretDB(tmp_path / "fdb").start()
    try:
        proxy = proxy_factory(fdb.uri, {"cache": cache_section(redis_server.url)})
        with client(fdb.uri) as direct, client(proxy.uri) as c:
            direct[db_name].users.insert_many([{"_id": f"u{i}", "n": i} for i in range(5)])
            since = fdb.log_offset()
            before = cache_ops(proxy)
            first = list(c[db_name].users.find({"n": {"$gte": 2}}).sort("n", 1))
            second = list(c[db_name].users.find({"n": {"$gte": 2}}).sort("n", 1))
            assert first == second == [{"_id": f"u{i}", "n": i} for i in range(2, 5)]
            assert_counts(proxy, before, {"miss": 1, "hit": 1})
            seen = [r for r in fdb.requests(since) if '"find"' in r and db_name in r]
            assert len(seen) == 1, seen
            # the same query from another driver's envelope shares the entry
            raw = c[db_name].command({"find": "users", "sort": {"n": 1},
                                      "filter": {"n": {"$gte": 2}}, "comment": "x"})
            assert raw["cursor"]["firstBatch"] == first
            assert "$clusterTime" not in raw and "operationTime" not in raw
            assert len([r for r in fdb.requests(since)
                        if '"find"' in r and db_name in r]) == 1
        slow = proxy.log_text()
        assert "Traceback" not in slow
    finally:
        fdb.stop()


# ------------------------------------------------- 2. a write through B, a read through A


Writer = Callable[[Collection[Doc], MongoClient[Doc], str], None]


def _out(coll: Collection[Doc], _c: MongoClient[Doc], _db: str) -> None:
    # FerretDB v1.24 has no $out (NotImplemented): the proxy must invalidate anyway.
    with contextlib.suppress(PyMongoError):
        list(coll.aggregate([{"$match": {}}, {"$out": "c"}]))


WRITES: dict[str, Writer] = {
    "insert_one": lambda c, _m, _d: c.insert_one({"_id": "new", "n": 99}) and None,
    "insert_many": lambda c, _m, _d: c.insert_many([{"_id": "x1"}, {"_id": "x2"}]) and None,
    "update_one": lambda c, _m, _d: c.update_one({"_id": "k1"}, {"$set": {"n": 50}}) and None,
    "update_many": lambda c, _m, _d: c.update_many({}, {"$inc": {"n": 1}}) and None,
    "replace_one": lambda c, _m, _d: c.replace_one({"_id": "k2"}, {"n": -1}) and None,
    "delete_one": lambda c, _m, _d: c.delete_one({"_id": "k0"}) and None,
    "delete_many": lambda c, _m, _d: c.delete_many({"n": {"$gt": 0}}) and None,
    "find_one_and_update": lambda c, _m, _d: c.find_one_and_update(
        {"_id": "k1"}, {"$set": {"n": 7}}) and None,
    "find_one_and_delete": lambda c, _m, _d: c.find_one_and_delete({"_id": "k1"}) and None,
    "bulk_write": lambda c, _m, _d: c.bulk_write(
        [InsertOne({"_id": "b1"}), UpdateOne({"_id": "k0"}, {"$set": {"n": 42}})]) and None,
    "drop": lambda c, _m, _d: c.drop(),
    "drop_database": lambda _c, m, d: m.drop_database(d),
    "rename_collection": lambda c, _m, _d: c.rename("renamed") and None,
    "create_index": lambda c, _m, _d: c.create_index("n") and None,
    "drop_index": lambda c, _m, _d: c.drop_index("n_1"),
    "aggregate_out": _out,
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_through_b_is_seen_by_a_read_through_a(
    write: str, pair: tuple[ProxyProcess, ProxyProcess],
    clients: tuple[MongoClient[Doc], MongoClient[Doc], MongoClient[Doc]], db_name: str,
) -> None:
    proxy_a, _ = pair
    a, b, direct = clients
    direct.drop_database(db_name)
    direct[db_name].c.insert_many([{"_id": f"k{i}", "n": i} for i in range(3)])
    if write == "drop_index":
        direct[db_name].c.create_index("n")

    def read() -> list[Doc]:
        return list(a[db_name].c.find({}).sort("_id", 1))

    assert read() == read()  # the second one a hit
    before = cache_ops(proxy_a)
    assert read() == list(direct[db_name].c.find({}).sort("_id", 1))
    assert_counts(proxy_a, before, {"hit": 1})

    WRITES[write](b[db_name].c, b, db_name)

    before = cache_ops(proxy_a)
    assert read() == list(direct[db_name].c.find({}).sort("_id", 1))
    assert_counts(proxy_a, before, {"miss": 1})
    if write == "rename_collection":  # the target namespace is invalidated too
        assert [d["_id"] for d in a[db_name].renamed.find().sort("_id", 1)] == ["k0", "k1", "k2"]


# ------------------------------------------------------------------------- 3. stress


STRESS_OPS = 10_000
KEYS_PER_WRITER = 3
WRITERS = 2
READERS = 6


def test_stress_zero_stale_reads_across_two_instances(
    pair: tuple[ProxyProcess, ProxyProcess], ferretdb: FerretDBProcess, db_name: str,
) -> None:
    """Each key has one writer that sets ``v`` to 1, 2, 3, ... and publishes ``v`` once
    the proxy acknowledged it. A reader notes the published value before it starts a
    read; the value it reads must be at least that (never older than an acknowledged
    write). Readers and writers alternate between the two instances."""
    with client(ferretdb.uri) as direct:
        direct.drop_database(db_name)
        keys = [f"w{w}-{k}" for w in range(WRITERS) for k in range(KEYS_PER_WRITER)]
        direct[db_name].s.insert_many([{"_id": key, "v": 0} for key in keys])
    acked = dict.fromkeys(keys, 0)
    ops = [0]
    stale: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    instances = [client(p.uri, maxPoolSize=4) for p in pair]
    before = [cache_ops(p) for p in pair]

    def count() -> None:
        with lock:
            ops[0] += 1
            if ops[0] >= STRESS_OPS:
                stop.set()

    def writer(w: int) -> None:
        try:
            value = 0
            while not stop.is_set():
                value += 1
                for k in range(KEYS_PER_WRITER):
                    key = f"w{w}-{k}"
                    coll = instances[(value + k) % 2][db_name].s
                    coll.update_one({"_id": key}, {"$set": {"v": value}})
                    acked[key] = value  # published only after the acknowledgement
                    count()
                time.sleep(0.004)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def reader(r: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                key = keys[(i * 7 + r) % len(keys)]
                floor = acked[key]
                doc = instances[(i + r) % 2][db_name].s.find_one({"_id": key})
                assert doc is not None
                if doc["v"] < floor:
                    stale.append(f"{key}: read v={doc['v']} after v={floor} was acknowledged")
                count()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(READERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    elapsed = time.monotonic() - started
    for c in instances:
        c.close()
    assert not errors, errors[:3]
    assert ops[0] >= STRESS_OPS
    assert not stale, f"{len(stale)} stale reads of {ops[0]}: {stale[:5]}"
    totals: dict[str, float] = {}
    for proc, was in zip(pair, before, strict=True):
        for key, value in delta(was, cache_ops(proc)).items():
            totals[key] = totals.get(key, 0) + value
    print(f"\nstress: {ops[0]} ops in {elapsed:.1f} s, cache {totals}")
    assert totals.get("hit", 0) > 1000, totals  # the cache really answered


# -------------------------------------------------------------- 4. Redis SIGKILL mid-run


def test_redis_killed_mid_run_no_client_error_and_hits_resume(
    redis_factory: RedisFactory, proxy_factory: Any, ferretdb: FerretDBProcess, db_name: str,
) -> None:
    redis_proc = redis_factory()
    proxy = proxy_factory(ferretdb.uri, {"cache": cache_section(redis_proc.url)})
    with client(ferretdb.uri) as direct:
        direct[db_name].c.insert_many([{"_id": f"k{i}", "n": i} for i in range(20)])
    latencies: dict[str, list[float]] = {"before": [], "outage": [], "after": []}
    phase = ["before"]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(r: int) -> None:
        with client(proxy.uri) as c:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.perf_counter()
                try:
                    doc = c[db_name].c.find_one({"_id": f"k{(i + r) % 20}"})
                    assert doc is not None
                except BaseException as exc:
                    errors.append(exc)
                    return
                latencies[phase[0]].append(time.perf_counter() - started)

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        hits_before = cache_ops(proxy).get("hit", 0)
        assert hits_before > 0
        phase[0] = "outage"
        redis_proc.kill()
        time.sleep(1.5)
        outage = cache_ops(proxy)
        assert outage.get("bypass:redis_unavailable", 0) > 0, outage
        redis_proc.start()
        phase[0] = "after"
        deadline = time.monotonic() + 10
        while cache_ops(proxy).get("hit", 0) <= outage.get("hit", 0):
            assert time.monotonic() < deadline, "no hits after Redis came back"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert latencies["outage"] and latencies["after"]
    worst = max(latencies["outage"])
    p50 = sorted(latencies["outage"])[len(latencies["outage"]) // 2]
    print(f"\noutage: {len(latencies['outage'])} reads, p50 {p50 * 1e3:.2f} ms, "
          f"max {worst * 1e3:.1f} ms")
    assert worst < 2.0, f"a read took {worst:.3f} s while Redis was down"
    log = proxy.log_text()
    assert log.count("Redis circuit open") == 1 and log.count("circuit closed") == 1, log


# -------------------------------------------------------------------- 5. tenants


PASSWORDS = {"acme_app": "acme-secret", "globex_app": "globex-secret"}
TENANT_OF = {"acme_app": "acme", "globex_app": "globex"}


def test_tenant_a_result_is_never_served_to_tenant_b(
    redis_server: RedisProcess, proxy_factory: Any, ferretdb: FerretDBProcess, db_name: str,
) -> None:
    users = [{"username": u, "password_sha256": hash_password(p, iterations=4096),
              "tenant": TENANT_OF[u]} for u, p in PASSWORDS.items()]
    proxy = proxy_factory(ferretdb.uri, {
        "cache": cache_section(redis_server.url),
        "tenancy": {"mode": "inject", "users": users,
                    "exempt": ["system.*", "admin.*", "config.*", "local.*"]},
    })
    with client(ferretdb.uri) as direct:
        direct[db_name].tasks.insert_many([
            {"_id": f"{t}-{i}", "tenant_id": t, "status": "open"}
            for t in ("acme", "globex") for i in range(3)])

    def login(user: str) -> MongoClient[Doc]:
        return client(proxy.uri, username=user, password=PASSWORDS[user],
                      authSource="admin", authMechanism="SCRAM-SHA-256")

    with login("acme_app") as acme, login("globex_app") as globex:
        before = cache_ops(proxy)
        for _ in range(2):
            got = list(acme[db_name].tasks.find({"status": "open"}))
            assert {d["tenant_id"] for d in got} == {"acme"} and len(got) == 3
        assert_counts(proxy, before, {"miss": 1, "hit": 1})
        before = cache_ops(proxy)
        got = list(globex[db_name].tasks.find({"status": "open"}))  # identical filter
        assert {d["tenant_id"] for d in got} == {"globex"} and len(got) == 3
        assert_counts(proxy, before, {"miss": 1})
        # and a write of one tenant invalidates (its namespace) for the other as well
        globex[db_name].tasks.insert_one({"_id": "g-new", "status": "open"})
        assert len(list(acme[db_name].tasks.find({"status": "open"}))) == 3
        assert len(list(globex[db_name].tasks.find({"status": "open"}))) == 4


# -------------------------------------------------------------------- 6. never cached


def test_ineligible_reads_are_never_cached(
    pair: tuple[ProxyProcess, ProxyProcess],
    clients: tuple[MongoClient[Doc], MongoClient[Doc], MongoClient[Doc]], db_name: str,
) -> None:
    proxy_a, _ = pair
    a, _, direct = clients
    direct.drop_database(db_name)
    direct[db_name].big.insert_many([{"_id": i, "s": "x" * 10_000} for i in range(10)])
    direct[db_name].many.insert_many([{"_id": i} for i in range(10)])

    def stores() -> float:
        return metrics(proxy_a)[("mongoproxy_cache_stores_total", (("result", "ok"),))]

    before, stored = cache_ops(proxy_a), stores()
    for _ in range(2):
        assert len(list(a[db_name].big.find())) == 10  # > max_entry_bytes
        assert len(list(a[db_name].many.find(batch_size=3))) == 10  # getMore still works
        with a.start_session() as session:
            try:
                with session.start_transaction():
                    a[db_name].many.find_one({"_id": 1}, session=session)
            except PyMongoError:
                pass  # FerretDB v1.24 has no transactions: its answer does not matter here
        # Not a capped collection: FerretDB refuses; the proxy never looked it up.
        with contextlib.suppress(PyMongoError):
            list(a[db_name].many.find(cursor_type=CursorType.TAILABLE))
    expected = {"bypass:too_large": 2, "bypass:multi_batch": 2, "bypass:transaction": 2,
                "bypass:tailable": 2}
    assert_counts(proxy_a, before, expected)
    assert stores() == stored
