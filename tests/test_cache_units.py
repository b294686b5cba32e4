"""The result cache's sans-IO core: rules (routing's matcher), eligibility, keys,
entries, reply checks, write targets, single flight and the transaction bookkeeping.
Tables and Hypothesis properties; no servers."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bson
import pytest
import yaml
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.budget import EVERY, PEAK_HALF_LIFE_S, WINDOW, LatencyBudget
from proxy.cache.config import CacheConfig
from proxy.cache.eligibility import (
    WriteTargets,
    read_bypass,
    reply_bypass,
    strip_fields,
    written_namespaces,
)
from proxy.cache.entry import CorruptEntry, decode_entry, encode_entry
from proxy.cache.flight import SingleFlight
from proxy.cache.key import canonical, entry_digest
from proxy.cache.layer import ResultCache
from proxy.classify import ClientContext, classify
from proxy.config import ConfigError, load_config, parse_config
from proxy.observe.metrics import Metrics
from proxy.reload import ConfigReloader
from proxy.route.readpref import PRIMARY, read_preference
from proxy.route.rules import Matcher, RouteDecision

Doc = dict[str, Any]
PRIMARY_DOC = PRIMARY.document
LSID = {"id": Binary(b"\x01" * 16, 4)}


def _cache(rules: list[Doc], **extra: Any) -> CacheConfig:
    return CacheConfig.model_validate({"redis_url": "redis://127.0.0.1:1/0", "rules": rules,
                                       **extra})


# --------------------------------------------------------------------------- rules


def test_rules_reuse_routings_matcher_and_match_the_routing_class() -> None:
    config = _cache([
        {"match": {"collection": "users", "command": "find"}, "ttl_s": 600},
        {"match": {"class": "dashboard"}, "ttl_s": 30},
        {"match": {"app_name": "board*", "comment": {"cache": True}}, "ttl_s": 5},
    ])
    compiled = config.compiled
    assert all(isinstance(m, Matcher) for m, *_ in compiled.rules)
    users = classify({"find": "users", "filter": {}, "$db": "app"})
    assert compiled.ttl_for(users, "default") == (600.0, 0)
    # first match wins, even when a later rule (the class) also fits
    assert compiled.ttl_for(users, "dashboard") == (600.0, 0)
    other = classify({"aggregate": "orders", "pipeline": [], "$db": "app"})
    assert compiled.ttl_for(other, "dashboard") == (30.0, 1)
    assert compiled.ttl_for(other, "default") is None
    board = classify({"find": "x", "comment": {"cache": True, "by": "ana"}, "$db": "a"},
                     ClientContext(app_name="board-7"))
    assert compiled.ttl_for(board, "default") == (5.0, 2)
    assert compiled.ttl_for(classify({"find": "x", "$db": "a"},
                                     ClientContext(app_name="board-7")), "default") is None


@pytest.mark.parametrize(("cache", "error"), [
    ({"rules": []}, "cache.redis_url: Field required"),
    ({"redis_url": "http://x"}, "cache.redis_url: Value error, expected a redis://"),
    ({"redis_url": "redis://x", "rules": [{"match": {"klass": "x"}, "ttl_s": 1}]},
     "cache.rules.0.match.klass: Extra inputs are not permitted"),
    ({"redis_url": "redis://x", "rules": [{"match": {}, "ttl_s": 0}]},
     "cache.rules.0.ttl_s: Input should be greater than 0"),
    ({"redis_url": "redis://x", "rules": [{"match": {"class": "/(/"}, "ttl_s": 1}]},
     "cache.rules.0.match.class"),
    ({"redis_url": "redis://x", "timeout_ms": 0}, "cache.timeout_ms"),
    ({"redis_url": "redis://x", "timeout_ms": 10, "timeout_max_ms": 5},
     "timeout_max_ms must be at least timeout_ms"),
    ({"redis_url": "redis://x", "breaker": {"stall_ms": 0}}, "cache.breaker.stall_ms"),
])
def test_config_errors_name_the_key_path(cache: Doc, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstream": {"uri": "mongodb://127.0.0.1:27017/"}, "cache": cache})
    assert error in str(info.value)


def test_cache_section_is_optional() -> None:
    assert parse_config({"upstream": {"uri": "mongodb://127.0.0.1:27017/"}}).cache is None


# --------------------------------------------------------------------------- eligibility


def _find(**fields: Any) -> Doc:
    return {"find": "users", "filter": {"a": 1}, **fields, "$db": "app"}


@pytest.mark.parametrize(("command", "reason"), [
    (_find(), None),
    ({"count": "users", "query": {"a": 1}, "$db": "app"}, None),
    ({"distinct": "users", "key": "a", "$db": "app"}, None),
    ({"aggregate": "users", "pipeline": [{"$match": {"a": 1}}, {"$group": {"_id": "$b"}}],
      "cursor": {}, "$db": "app"}, None),
    ({"aggregate": "users", "pipeline": [{"$facet": {"x": [{"$count": "n"}]}}],
      "cursor": {}, "$db": "app"}, None),
    (_find(lsid=LSID, txnNumber=Int64(1), autocommit=False, startTransaction=True),
     "transaction"),
    (_find(lsid=LSID, txnNumber=Int64(1), autocommit=False), "transaction"),
    (_find(readConcern={"level": "snapshot"}), "read_concern"),
    (_find(readConcern={"level": "linearizable"}), "read_concern"),
    (_find(readConcern={"level": "majority", "afterClusterTime": Timestamp(1, 1)}),
     "read_concern"),
    (_find(readConcern={"level": "majority"}), None),
    (_find(tailable=True), "tailable"),
    (_find(tailable=True, awaitData=True), "tailable"),
    ({"explain": _find(), "$db": "app"}, "explain"),
    ({"aggregate": "users", "pipeline": [{"$lookup": {"from": "o", "localField": "a",
                                                      "foreignField": "b", "as": "c"}}],
      "cursor": {}, "$db": "app"}, "stage"),
    ({"aggregate": "users", "pipeline": [{"$unionWith": "other"}], "cursor": {}, "$db": "a"},
     "stage"),
    ({"aggregate": "users", "pipeline": [{"$sample": {"size": 1}}], "cursor": {}, "$db": "a"},
     "stage"),
    ({"aggregate": "users", "pipeline": [{"$facet": {"x": [{"$lookup": {}}]}}],
      "cursor": {}, "$db": "a"}, "stage"),
    ({"aggregate": 1, "pipeline": [{"$documents": [{"a": 1}]}], "cursor": {}, "$db": "a"},
     "no_collection"),
    (_find(filter={"$expr": {"$lt": ["$t", "$$NOW"]}}), "nondeterministic"),
    (_find(filter={"$expr": {"$lt": [{"$rand": {}}, 0.5]}}), "nondeterministic"),
    (_find(filter={"$sampleRate": 0.5}), "nondeterministic"),
    ({"listIndexes": "users", "$db": "app"}, "command"),
])
def test_read_bypass_table(command: Doc, reason: str | None) -> None:
    assert read_bypass(command, classify(command), has_sequences=False) == reason


def test_document_sequences_on_a_read_bypass() -> None:
    assert read_bypass(_find(), classify(_find()), has_sequences=True) == "sequences"


# --------------------------------------------------------------------------- replies


def _body(doc: Doc, flags: int = 0) -> bytes:
    return struct.pack("<I", flags) + b"\x00" + bson.encode(doc)


def _cursor(cursor_id: int, docs: list[Doc], **extra: Any) -> Doc:
    return {"cursor": {"firstBatch": docs, "id": Int64(cursor_id), "ns": "app.users"},
            "ok": 1.0, **extra}


@pytest.mark.parametrize(("doc", "reason"), [
    (_cursor(0, [{"_id": 1}]), None),
    (_cursor(0, []), None),
    ({"n": 3, "ok": 1.0}, None),
    ({"values": [1, 2], "ok": 1}, None),
    ({"n": 3, "ok": True}, None),
    (_cursor(123, [{"_id": 1}]), "multi_batch"),
    ({"ok": 0.0, "errmsg": "x", "code": 2}, "error_reply"),
    ({"n": 1}, "error_reply"),
    ({"cursor": "nope", "ok": 1.0}, "malformed"),
])
def test_reply_bypass_table(doc: Doc, reason: str | None) -> None:
    assert reply_bypass(_body(doc), 1_000_000) == reason


def test_reply_bypass_size_flags_and_garbage() -> None:
    big = _body(_cursor(0, [{"s": "x" * 5000}]))
    assert reply_bypass(big, 4000) == "too_large"
    assert reply_bypass(big, 10_000) is None
    assert reply_bypass(_body(_cursor(0, []), flags=1), 10_000) == "malformed"  # checksum
    assert reply_bypass(b"\x00" * 3, 10_000) == "malformed"
    assert reply_bypass(_body({"ok": 1.0})[:-3], 10_000) == "malformed"


def test_strip_fields_removes_cluster_time_only() -> None:
    doc = _cursor(0, [{"_id": 1, "operationTime": "kept inside documents"}],
                  operationTime=Timestamp(5, 1),
                  **{"$clusterTime": {"clusterTime": Timestamp(5, 1), "signature": {}}})
    stripped = strip_fields(_body(doc))
    decoded = bson.decode(stripped[5:])
    assert set(decoded) == {"cursor", "ok"}
    assert decoded["cursor"]["firstBatch"][0]["operationTime"] == "kept inside documents"
    plain = _body(_cursor(0, []))
    assert strip_fields(plain) is plain


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda k: "\x00" not in k),
                      inner, max_size=3),
    max_leaves=10,
)
field_names = st.text(min_size=1, max_size=6).filter(lambda k: "\x00" not in k)


@given(st.dictionaries(field_names, json_values, max_size=6),
       st.sets(st.sampled_from(["$clusterTime", "operationTime"])))
@settings(max_examples=200, deadline=None)
def test_strip_fields_property(doc: Doc, added: set[str]) -> None:
    full = {**{k: v for k, v in doc.items() if k not in ("$clusterTime", "operationTime")},
            **{k: Timestamp(1, 1) for k in added}}
    out = bson.decode(strip_fields(_body(full))[5:])
    assert out == {k: v for k, v in full.items() if k not in added}


# --------------------------------------------------------------------------- entries


@pytest.mark.parametrize("size", [10, 50_000])
def test_entry_round_trip_compressed_above_threshold(size: int) -> None:
    body = _body(_cursor(0, [{"s": "x" * size}]))
    value = encode_entry(b"T" * 8, body, compress_min_bytes=4096)
    assert (len(value) < len(body)) is (size > 4096)
    assert decode_entry(value, 1_000_000) == (b"T" * 8, body)


def test_corrupt_entries_are_refused() -> None:
    body = _body(_cursor(0, [{"s": "x" * 9000}]))
    value = encode_entry(b"T" * 8, body, compress_min_bytes=4096)
    for bad in (b"", b"garbage", value[:-1], value[:13] + b"\x00" + value[14:],
                value[:8] + b"\x80" + value[9:]):
        with pytest.raises(CorruptEntry):
            decode_entry(bad, 1_000_000)
    with pytest.raises(CorruptEntry):  # bigger than allowed once decompressed
        decode_entry(value, 1000)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_decode_to_a_reply(raw: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_entry(raw, 1_000_000)


# --------------------------------------------------------------------------- keys


def _key(command: Doc, tenants: tuple[Any, ...] = (None, None),
         rp: Doc | None = PRIMARY_DOC) -> str:
    return entry_digest(command, rp, tenants)


BASE = {"find": "users", "filter": {"status": "open", "age": {"$gt": 30}},
        "projection": {"name": 1}, "sort": {"age": -1}, "limit": 10, "$db": "app"}


def test_envelope_and_order_do_not_change_the_key() -> None:
    same = [
        {"find": "users", "$db": "app", "limit": 10, "sort": {"age": -1},
         "projection": {"name": 1}, "filter": {"age": {"$gt": 30}, "status": "open"}},
        {**BASE, "lsid": LSID, "$clusterTime": {"clusterTime": Timestamp(9, 9)},
         "txnNumber": Int64(4), "$readPreference": {"mode": "secondary"},
         "comment": "dashboard", "maxTimeMS": 500, "writeConcern": {"w": 1},
         "apiVersion": "1"},
    ]
    for command in same:
        assert _key(command) == _key(BASE)


@pytest.mark.parametrize("change", [
    {"filter": {"status": "closed", "age": {"$gt": 30}}},
    {"filter": {"status": "open", "age": {"$gt": 31}}},
    {"filter": {"status": "open", "age": {"$gte": 30}}},
    {"filter": {"status": "open", "age": {"$gt": 30.0}}},  # typed: a different key
    {"filter": {"status": "open"}},
    {"projection": {"name": 0}},
    {"sort": {"age": 1}},
    {"sort": {"age": -1, "name": 1}},
    {"skip": 1},
    {"limit": 11},
    {"batchSize": 5},
    {"singleBatch": True},
    {"collation": {"locale": "fr"}},
    {"hint": {"age": 1}},
    {"readConcern": {"level": "majority"}},
    {"$db": "other"},
    {"find": "accounts"},
    {"let": {"x": 1}},
])
def test_anything_that_changes_the_result_changes_the_key(change: Doc) -> None:
    assert _key({**BASE, **change}) != _key(BASE)


def test_tenant_and_read_preference_are_part_of_the_key() -> None:
    assert _key(BASE, ("acme", "acme")) != _key(BASE, ("globex", "globex"))
    assert _key(BASE, (None, "acme")) != _key(BASE, (None, None))
    secondary = read_preference("secondary").document
    assert _key(BASE, rp=secondary) != _key(BASE)


def test_embedded_documents_keep_their_order() -> None:
    a = {**BASE, "filter": {"addr": {"city": "x", "zip": "1"}}}
    b = {**BASE, "filter": {"addr": {"zip": "1", "city": "x"}}}
    assert _key(a) != _key(b)  # equality on an embedded document is order-sensitive


@given(st.dictionaries(field_names.filter(lambda k: not k.startswith("$")), json_values,
                       min_size=1, max_size=5),
       st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_key_ignores_top_level_filter_order(filter_: Doc, rnd: Any) -> None:
    items = list(filter_.items())
    rnd.shuffle(items)
    assert _key({**BASE, "filter": dict(items)}) == _key({**BASE, "filter": filter_})


@given(st.dictionaries(field_names, json_values, max_size=4),
       st.dictionaries(field_names, json_values, max_size=4))
@settings(max_examples=300, deadline=None)
def test_different_filters_never_share_a_key(f1: Doc, f2: Doc) -> None:
    c1, c2 = {**BASE, "filter": f1}, {**BASE, "filter": f2}
    same_canonical = (bson.encode(canonical(c1, PRIMARY_DOC, (None, None)))
                      == bson.encode(canonical(c2, PRIMARY_DOC, (None, None))))
    assert (_key(c1) == _key(c2)) is same_canonical


# --------------------------------------------------------------------------- writes


def _targets(command: Doc) -> WriteTargets:
    return written_namespaces(command, classify(command))


@pytest.mark.parametrize(("command", "namespaces", "databases"), [
    ({"insert": "users", "$db": "app"}, ("app.users",), ()),
    ({"update": "users", "$db": "app"}, ("app.users",), ()),
    ({"delete": "users", "$db": "app"}, ("app.users",), ()),
    ({"findAndModify": "users", "$db": "app"}, ("app.users",), ()),
    ({"findandmodify": "users", "$db": "app"}, ("app.users",), ()),
    ({"drop": "users", "$db": "app"}, ("app.users",), ()),
    ({"create": "users", "$db": "app"}, ("app.users",), ()),
    ({"createIndexes": "users", "indexes": [], "$db": "app"}, ("app.users",), ()),
    ({"dropIndexes": "users", "index": "*", "$db": "app"}, ("app.users",), ()),
    ({"renameCollection": "app.users", "to": "app2.people", "$db": "admin"},
     ("app.users", "app2.people"), ()),
    ({"bulkWrite": 1, "ops": [], "nsInfo": [{"ns": "app.a"}, {"ns": "b.c"}], "$db": "admin"},
     ("app.a", "b.c"), ()),
    ({"aggregate": "users", "pipeline": [{"$match": {}}, {"$out": "report"}], "$db": "app"},
     ("app.report", "app.users"), ()),
    ({"aggregate": "users", "pipeline": [{"$out": {"db": "x", "coll": "y"}}], "$db": "app"},
     ("app.users", "x.y"), ()),
    ({"aggregate": "users", "pipeline": [{"$merge": {"into": {"db": "x", "coll": "z"}}}],
      "$db": "app"}, ("app.users", "x.z"), ()),
    ({"aggregate": "users", "pipeline": [{"$merge": "m"}], "$db": "app"},
     ("app.m", "app.users"), ()),
    ({"mapReduce": "users", "out": {"replace": "mr", "db": "o"}, "$db": "app"},
     ("app.users", "o.mr"), ()),
    ({"dropDatabase": 1, "$db": "app"}, (), ("app",)),
    ({"aggregate": 1, "pipeline": [{"$documents": []}, {"$out": "t"}], "$db": "app"},
     ("app.t",), ()),
])
def test_write_targets_table(command: Doc, namespaces: tuple[str, ...],
                             databases: tuple[str, ...]) -> None:
    assert _targets(command) == WriteTargets(namespaces, databases)


@pytest.mark.parametrize("command", [
    {"find": "users", "$db": "app"},
    {"createUser": "u", "pwd": "p", "roles": [], "$db": "admin"},
    {"ping": 1, "$db": "admin"},
    {"aggregate": "users", "pipeline": [{"$match": {}}], "$db": "app"},
])
def test_reads_and_user_admin_invalidate_nothing(command: Doc) -> None:
    assert not _targets(command)


# --------------------------------------------------------------------------- single flight


async def test_single_flight_shares_the_leaders_body() -> None:
    flights = SingleFlight()
    key = ("app.users", b"T" * 8, "d")
    leader = flights.lead(key)
    assert leader is not None and flights.lead(key) is None
    waiters = [asyncio.create_task(flights.wait(key)) for _ in range(3)]
    await asyncio.sleep(0)
    leader.finish(b"body")
    assert await asyncio.gather(*waiters) == [b"body"] * 3
    assert len(flights) == 0 and await flights.wait(key) is None


async def test_single_flight_failed_leader_and_cancelled_waiter() -> None:
    flights = SingleFlight()
    key = ("app.users", b"T" * 8, "d")
    leader = flights.lead(key)
    assert leader is not None
    cancelled = asyncio.create_task(flights.wait(key))
    other = asyncio.create_task(flights.wait(key))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    leader.finish(None)
    leader.finish(b"late")  # idempotent
    assert await other is None
    assert cancelled.cancelled()


# --------------------------------------------------------------------------- layer (no I/O)


def _decision() -> RouteDecision:
    return RouteDecision("default", None, None, PRIMARY)


async def test_begin_reads_writes_and_transactions() -> None:
    config = _cache([{"match": {"collection": "users"}, "ttl_s": 60}])
    cache = ResultCache(config)
    begin = cache.begin

    def access(command: Doc) -> Any:
        return begin(command, classify(command), _decision(), (None, None),
                     has_sequences=False, rules=config)

    read = access(_find())
    assert read.is_read and read.result is None and read.ns == "app.users"
    assert access({"find": "other", "$db": "app"}) is None  # no rule
    txn_read = access(_find(lsid=LSID, txnNumber=Int64(1), autocommit=False))
    assert txn_read.result == "bypass:transaction" and not txn_read.is_read
    write = access({"update": "users", "$db": "app"})
    assert write.targets == WriteTargets(("app.users",))
    # a transaction's writes are remembered, invalidated at its commit only
    txn = {"lsid": LSID, "txnNumber": Int64(7), "autocommit": False}
    assert access({"insert": "a", "$db": "x", **txn, "startTransaction": True}) is None
    assert access({"delete": "b", "$db": "x", **txn}) is None
    commit = access({"commitTransaction": 1, "$db": "admin", **txn})
    assert commit.targets == WriteTargets(("x.a", "x.b"))
    again = access({"commitTransaction": 1, "$db": "admin", **txn})  # a retried commit
    assert again.targets == commit.targets
    assert access({"commitTransaction": 1, "$db": "admin", **txn,
                   "txnNumber": Int64(8)}) is None
    assert access({"insert": "c", "$db": "x", **txn, "txnNumber": Int64(9)}) is None
    assert access({"abortTransaction": 1, "$db": "admin", **txn,
                   "txnNumber": Int64(9)}) is None
    assert access({"commitTransaction": 1, "$db": "admin", **txn,
                   "txnNumber": Int64(9)}) is None


# --------------------------------------------------------------------------- reload


def test_reload_swaps_cache_rules_live_and_keeps_the_redis_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "proxy.yaml"

    def write(redis_url: str, collection: str) -> None:
        path.write_text(yaml.safe_dump({
            "upstream": {"uri": "mongodb://127.0.0.1:27017/"},
            "cache": {"redis_url": redis_url,
                      "rules": [{"match": {"collection": collection}, "ttl_s": 9}]},
        }))

    write("redis://127.0.0.1:6379/0", "users")
    proxy = SimpleNamespace(config=load_config(path),
                            observer=SimpleNamespace(metrics=Metrics(process=False)))
    reloader = ConfigReloader(proxy, path)  # type: ignore[arg-type]
    write("redis://10.0.0.1:6379/0", "orders")
    assert reloader.reload()
    cache = proxy.config.cache
    assert cache.redis_url == "redis://127.0.0.1:6379/0"  # restart-only
    orders = classify({"find": "orders", "$db": "app"})
    assert cache.compiled.ttl_for(orders, "default") == (9.0, 0)
    assert cache.compiled.ttl_for(classify({"find": "users", "$db": "app"}), "default") is None
    assert "cache (except rules)" in caplog.text


# ------------------------------------------------------------------- lookup budget


def test_budget_follows_redis_latency_between_floor_and_ceiling() -> None:
    budget = LatencyBudget(0.005, 0.050)
    assert budget.value == 0.005  # before any sample: the floor
    for _ in range(WINDOW):
        budget.add(0.0001)  # an idle loopback Redis
    assert budget.value == 0.005
    assert _cache([]).lookup_ceiling_ms == 50  # default: 10 x timeout_ms
    busy = LatencyBudget(0.005, 0.050)
    for i in range(WINDOW):
        busy.add(0.003 if i % 50 == 0 else 0.0005)  # 2 % of round trips take 3 ms
    assert busy.value == pytest.approx(4 * 0.003)
    busy.add(0.2)  # one round trip far beyond: the ceiling, never more
    for _ in range(EVERY):
        busy.add(0.0005)
    assert busy.value == 0.050


def test_budget_remembers_a_peak_for_a_while_then_forgets_it() -> None:
    """A scheduler hiccup of 9 ms among fast round trips: the next ones get twice that,
    even after the 512-sample window has moved past it; the peak halves every 10 s."""
    budget = LatencyBudget(0.005, 0.050)
    budget.add(0.009)
    for _ in range(4 * WINDOW - 1):
        budget.add(0.0002)
    assert budget.value == pytest.approx(0.018, rel=0.01)
    budget._decayed_at -= 3 * PEAK_HALF_LIFE_S  # 30 s later
    for _ in range(EVERY):
        budget.add(0.0002)
    assert budget.value == 0.005
