"""Fan-out reads (proxy.placement.fanout) against real FerretDB processes as clusters:
the merged answers equal what direct pymongo reads of every cluster give, merged
cursors continue and die as a server's do, a failed cluster fails the read once, and
what cannot be merged is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import bson
import pymongo
import pytest
from bson import Int64

from proxy.config import UpstreamConfig
from proxy.errors import ProxyError
from proxy.placement.clusters import cluster_roundtrip
from proxy.placement.fanout import FanOut
from proxy.placement.merge import ordering, parse_sort
from proxy.placement.plan import plan
from proxy.route.cursors import CursorTable
from proxy.route.readpref import PRIMARY, read_preference
from proxy.route.rules import RouteDecision
from proxy.upstream.roundtrip import Roundtrip
from proxy.wire import parse_op_msg
from tests.support import FerretDBFactory, FerretDBProcess

DECISION = RouteDecision("default", None, None, PRIMARY)
TENANTS = [f"t{i}" for i in range(6)]
VALUES: list[Any] = [3, 1.5, "x", None, 7, Int64(2), "a", 9.25, {"k": 1}, [4, 0], True, -1]


class Cluster:
    def __init__(self, proc: FerretDBProcess, roundtrip: Roundtrip) -> None:
        self.proc = proc
        self.roundtrip = roundtrip
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(proc.uri)


@pytest.fixture
async def clusters(ferretdb: FerretDBProcess, ferretdb_factory: FerretDBFactory,
                   db_name: str) -> AsyncIterator[list[Cluster]]:
    """Two clusters (the session FerretDB and a private one), each holding half of the
    tenants' documents of ``db_name.docs``; the first also holds all of them in
    ``db_name.all``: what one server answers is what the merge must give."""
    made: list[Cluster] = []
    for index, proc in enumerate([ferretdb, ferretdb_factory()]):
        roundtrip = cluster_roundtrip(f"c{index}", UpstreamConfig(uri=proc.uri), CursorTable())
        await roundtrip.topology.start()
        made.append(Cluster(proc, roundtrip))
    for index, tenant in enumerate(TENANTS):
        cluster = made[index % 2]
        docs = [{"tenant": tenant, "i": i, "v": VALUES[(i + index) % len(VALUES)],
                 "g": i % 3} for i in range(15)]
        cluster.client[db_name]["docs"].insert_many(docs)
        made[0].client[db_name]["all"].insert_many(docs)  # the same, on one server
    yield made
    for cluster in made:
        cluster.client.drop_database(db_name)
        cluster.client.close()
        await cluster.roundtrip.pools.close()
        await cluster.roundtrip.topology.close()


def _everything(clusters: list[Cluster], db_name: str, query: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    return [doc for c in clusters for doc in c.client[db_name]["docs"].find(query or {})]


def _plain(value: Any) -> Any:
    """A value as pymongo decodes it (the merged replies keep documents raw)."""
    return bson.decode(bson.encode({"v": value}))["v"]


def _ids(docs: list[Any]) -> list[Any]:
    return [doc["_id"] for doc in docs]


async def _drain(fanout: FanOut, reply: dict[str, Any], db_name: str, batch: int
                 ) -> list[Any]:
    cursor = reply["cursor"]
    docs = list(cursor["firstBatch"])
    while cursor["id"]:
        assert fanout.owns(cursor["id"])
        reply = await fanout.get_more({"getMore": cursor["id"], "collection": "docs",
                                       "batchSize": batch, "$db": db_name}, owner=1)
        cursor = reply["cursor"]
        assert len(cursor["nextBatch"]) <= batch
        docs.extend(cursor["nextBatch"])
    return docs


@pytest.mark.parametrize(("sort", "skip", "limit"), [
    ({"v": 1, "_id": 1}, 0, 10), ({"v": -1, "_id": 1}, 3, 7), ({"v": 1, "_id": -1}, 25, 0),
    ({"tenant": -1, "i": 1}, 0, 0), ({"i": 1, "tenant": 1}, 40, 100),
])
async def test_find_sorted_across_clusters(clusters: list[Cluster], db_name: str,
                                           sort: dict[str, int], skip: int,
                                           limit: int) -> None:
    fanout = FanOut(4, "tenant")  # small upstream batches: getMores inside the first batch
    command: dict[str, Any] = {"find": "docs", "filter": {"g": {"$ne": 2}}, "sort": sort,
                               "skip": skip, "limit": limit, "batchSize": 20, "$db": db_name}
    reply = await fanout.run("find", command, [c.roundtrip for c in clusters], DECISION, 1)
    got = await _drain(fanout, reply, db_name, 6)
    one_server = clusters[0].client[db_name]["all"].find(
        {"g": {"$ne": 2}}, sort=list(sort.items()), skip=skip, limit=limit)
    expected = sorted(_everything(clusters, db_name, {"g": {"$ne": 2}}),
                      key=ordering(parse_sort(sort)))
    expected = expected[skip:skip + limit] if limit else expected[skip:]
    assert _ids(got) == _ids(list(one_server)) == _ids(expected)
    assert reply["cursor"]["ns"] == f"{db_name}.docs"
    assert len(fanout) == 0
    await fanout.close()


async def test_find_unsorted_concatenates_clusters(clusters: list[Cluster],
                                                   db_name: str) -> None:
    fanout = FanOut(7, "tenant")
    reply = await fanout.run("find", {"find": "docs", "projection": {"v": 0}, "$db": db_name},
                             [c.roundtrip for c in clusters], DECISION, 1)
    got = await _drain(fanout, reply, db_name, 11)
    assert sorted(map(str, _ids(got))) == sorted(map(str, _ids(_everything(clusters,
                                                                           db_name))))
    assert all("v" not in doc for doc in got)
    await fanout.close()


async def test_get_more_kill_and_release(clusters: list[Cluster], db_name: str) -> None:
    fanout = FanOut(3, "tenant")
    targets = [c.roundtrip for c in clusters]
    find = {"find": "docs", "sort": {"i": 1}, "batchSize": 2, "$db": db_name}
    first = (await fanout.run("find", dict(find), targets, DECISION, 1))["cursor"]
    assert len(first["firstBatch"]) == 2 and fanout.owns(first["id"])
    assert first["id"] > 2**40
    more = (await fanout.get_more({"getMore": first["id"], "collection": "docs",
                                   "batchSize": 5, "$db": db_name}, 2))["cursor"]
    assert [d["i"] for d in first["firstBatch"] + more["nextBatch"]] == [0] * 6 + [1]
    streams = _upstream(fanout, first["id"])

    killed = await fanout.kill({"killCursors": "docs", "cursors": [first["id"], 12345]}, 1)
    assert killed["cursorsKilled"] == [first["id"]]
    assert killed["cursorsNotFound"] == [12345]
    assert not fanout.owns(first["id"])
    await _assert_killed_upstream(streams)
    with pytest.raises(ProxyError) as info:
        await fanout.get_more({"getMore": first["id"], "collection": "docs"}, 1)
    assert info.value.code == 43

    # release: the owner's merged cursors die with its connection, another's stay.
    mine = (await fanout.run("find", dict(find), targets, DECISION, 7))["cursor"]["id"]
    other = (await fanout.run("find", dict(find), targets, DECISION, 8))["cursor"]["id"]
    streams = _upstream(fanout, mine)
    fanout.release(7)
    assert not fanout.owns(mine) and fanout.owns(other)
    await _assert_killed_upstream(streams)
    await fanout.close()
    assert not fanout.owns(other)


def _upstream(fanout: FanOut, cursor_id: int) -> list[tuple[Any, ...]]:
    """(roundtrip, server, namespace, upstream id) of each cluster of a merged cursor."""
    return [(s.roundtrip, s.address, s.namespace, s.cursor_id)
            for s in fanout._cursors[cursor_id].streams]


async def _assert_killed_upstream(upstream: list[tuple[Any, ...]]) -> None:
    """Each upstream cursor is gone on its server: a getMore there finds none."""
    assert upstream and all(cursor_id for *_, cursor_id in upstream)
    await asyncio.sleep(0)  # the kills run in the background
    for roundtrip, *_ in upstream:
        for task in list(roundtrip._background):
            await task
    for roundtrip, address, namespace, cursor_id in upstream:
        database, _, collection = namespace.partition(".")
        done = await roundtrip.command_on(database, {
            "getMore": Int64(cursor_id), "collection": collection}, PRIMARY, address)
        reply = bson.decode(parse_op_msg(done.header + done.body).body)
        assert reply["ok"] == 0 and reply["code"] == 43, reply


async def test_kill_during_a_get_more_leaves_nothing_open(clusters: list[Cluster],
                                                         db_name: str) -> None:
    fanout = FanOut(1, "tenant")  # one document per upstream getMore: many in flight
    first = await fanout.run("find", {"find": "docs", "sort": {"i": 1}, "batchSize": 1,
                                      "$db": db_name}, [c.roundtrip for c in clusters],
                             DECISION, 1)
    cursor_id = first["cursor"]["id"]
    merged = fanout._cursors[cursor_id]
    upstream = _upstream(fanout, cursor_id)
    task = asyncio.create_task(fanout.get_more(
        {"getMore": cursor_id, "collection": "docs", "batchSize": 50, "$db": db_name}, 1))
    while not merged.busy:
        await asyncio.sleep(0)
    with pytest.raises(ProxyError) as info:  # a second getMore meanwhile: in use
        await fanout.get_more({"getMore": cursor_id, "collection": "docs",
                               "$db": db_name}, 1)
    assert info.value.code == 143
    killed = await fanout.kill({"killCursors": "docs", "cursors": [cursor_id]}, 1)
    assert killed["cursorsKilled"] == [cursor_id]
    try:
        reply = await task
        assert reply["cursor"]["id"] == 0  # it ended with what it had
    except ProxyError as exc:
        assert exc.code == 43  # or its next upstream getMore found the cursor killed
    assert all(s.cursor_id == 0 and s.conn.open_cursors == 0 for s in merged.streams)
    await _assert_killed_upstream(upstream)
    await fanout.close()


async def test_wrong_namespace_and_busy(clusters: list[Cluster], db_name: str) -> None:
    fanout = FanOut(2, "tenant")
    reply = await fanout.run("find", {"find": "docs", "batchSize": 1, "$db": db_name},
                             [c.roundtrip for c in clusters], DECISION, 1)
    cursor_id = reply["cursor"]["id"]
    with pytest.raises(ProxyError) as info:
        await fanout.get_more({"getMore": cursor_id, "collection": "other", "$db": db_name}, 1)
    assert info.value.code == 13 and "different namespace" in info.value.errmsg
    await fanout.close()


async def test_counts_are_summed(clusters: list[Cluster], db_name: str) -> None:
    fanout = FanOut(5, "tenant")
    targets = [c.roundtrip for c in clusters]
    total = len(_everything(clusters, db_name, {"g": 1}))
    for skip, limit, expected in [(0, 0, total), (4, 0, total - 4), (3, 10, 10),
                                  (total - 2, 10, 2), (0, -5, 5)]:
        reply = await fanout.run("count", {"count": "docs", "query": {"g": 1}, "skip": skip,
                                           "limit": limit, "$db": db_name}, targets,
                                 DECISION, 1)
        assert reply == {"n": expected, "ok": 1.0}
    # pymongo's count_documents pipeline, with and without skip/limit
    for stages, expected in [([], total), ([{"$skip": 2}, {"$limit": 3}], 3),
                             ([{"$skip": total + 1}], None)]:
        pipeline = [{"$match": {"g": 1}}, *stages,
                    {"$group": {"_id": 1, "n": {"$sum": 1}}}]
        reply = await fanout.run("aggregate", {"aggregate": "docs", "pipeline": pipeline,
                                               "cursor": {}, "$db": db_name}, targets,
                                 DECISION, 1)
        batch = reply["cursor"]["firstBatch"]
        assert batch == ([] if expected is None else [{"_id": 1, "n": expected}])
        assert reply["cursor"]["id"] == 0
    reply = await fanout.run("aggregate", {"aggregate": "docs", "pipeline": [
        {"$match": {"g": 1}}, {"$count": "total"}], "cursor": {}, "$db": db_name}, targets,
        DECISION, 1)
    assert reply["cursor"]["firstBatch"] == [{"total": total}]
    assert len(fanout) == 0


async def test_distinct_is_the_union(clusters: list[Cluster], db_name: str) -> None:
    fanout = FanOut(5, "tenant")
    reply = await fanout.run("distinct", {"distinct": "docs", "key": "v",
                                          "query": {"i": {"$lt": 12}}, "$db": db_name},
                             [c.roundtrip for c in clusters], DECISION, 1)
    direct = [c.client[db_name]["docs"].distinct("v", {"i": {"$lt": 12}}) for c in clusters]
    flat = {repr(v) for values in direct for v in values}
    assert reply["ok"] == 1.0
    assert {repr(_plain(v)) for v in reply["values"]} == flat
    assert len(reply["values"]) < sum(map(len, direct))  # values on both were merged
    assert sorted(map(repr, reply["values"])) == sorted(set(map(repr, reply["values"])))


async def test_aggregate_grouped_by_tenant(clusters: list[Cluster], db_name: str) -> None:
    fanout = FanOut(2, "tenant")
    pipeline: list[dict[str, Any]] = [
        {"$match": {"i": {"$lt": 11}}}, {"$project": {"tenant": 1, "g": 1}},
        {"$group": {"_id": {"t": "$tenant", "g": "$g"}, "n": {"$sum": 1}}},
        {"$sort": {"n": 1, "_id.t": -1, "_id.g": 1}}, {"$skip": 1}, {"$limit": 9}]
    reply = await fanout.run("aggregate", {"aggregate": "docs", "pipeline": pipeline,
                                           "cursor": {"batchSize": 2}, "$db": db_name},
                             [c.roundtrip for c in clusters], DECISION, 1)
    got = await _drain(fanout, reply, db_name, 1)
    direct = [doc for c in clusters
              for doc in c.client[db_name]["docs"].aggregate(pipeline[:3])]
    expected = sorted(direct, key=ordering(parse_sort(pipeline[3]["$sort"])))[1:10]
    one_server = list(clusters[0].client[db_name]["all"].aggregate(pipeline))
    assert [_plain(d) for d in got] == expected == one_server
    assert len(got) == 9 and {d["n"] for d in got} == {3, 4}


async def test_one_failed_cluster_fails_the_cursor_once(
        ferretdb: FerretDBProcess, ferretdb_factory: FerretDBFactory, db_name: str
        ) -> None:
    procs = [ferretdb, ferretdb_factory(), ferretdb_factory()]
    roundtrips = []
    for index, proc in enumerate(procs):
        config = UpstreamConfig(uri=proc.uri, server_selection_timeout_ms=2_000)
        roundtrip = cluster_roundtrip(f"c{index}", config, CursorTable())
        await roundtrip.topology.start()
        roundtrips.append(roundtrip)
        with pymongo.MongoClient(proc.uri) as client:
            client[db_name]["docs"].insert_many([{"i": i, "c": index} for i in range(30)])
    fanout = FanOut(3, "tenant")
    try:
        reply = await fanout.run("find", {"find": "docs", "sort": {"i": 1}, "batchSize": 4,
                                          "$db": db_name}, roundtrips, DECISION, 1)
        cursor_id = reply["cursor"]["id"]
        streams = _upstream(fanout, cursor_id)
        procs[2].stop()
        with pytest.raises(ProxyError) as info:
            await _drain(fanout, reply, db_name, 50)
        assert info.value.code in (6, 89)  # HostUnreachable / NetworkTimeout
        assert "upstream" in info.value.errmsg
        assert not fanout.owns(cursor_id)
        # the survivors' cursors are gone
        await _assert_killed_upstream([s for s in streams if s[0] is not roundtrips[2]])
        # a new fan-out fails once, with one error
        with pytest.raises(ProxyError):
            await fanout.run("count", {"count": "docs", "$db": db_name}, roundtrips,
                             DECISION, 1)
    finally:
        await fanout.close()
        for proc, roundtrip in zip(procs, roundtrips, strict=True):
            if proc is not procs[2]:
                with pymongo.MongoClient(proc.uri) as client:
                    client.drop_database(db_name)
            await roundtrip.pools.close()
            await roundtrip.topology.close()


async def test_cursor_limits(clusters: list[Cluster], db_name: str) -> None:
    targets = [c.roundtrip for c in clusters]
    find = {"find": "docs", "sort": {"i": 1}, "batchSize": 1, "$db": db_name}
    fanout = FanOut(2, "tenant", max_cursors=1, idle_timeout_s=0.3)
    first = (await fanout.run("find", dict(find), targets, DECISION, 1))["cursor"]["id"]
    with pytest.raises(ProxyError) as info:
        await fanout.run("find", dict(find), targets, DECISION, 1)
    assert info.value.code == 146 and "max_cursors 1" in info.value.errmsg
    # counts open no merged cursor: not limited
    assert (await fanout.run("count", {"count": "docs", "$db": db_name}, targets,
                             DECISION, 1))["n"] == len(TENANTS) * 15
    streams = _upstream(fanout, first)
    for _ in range(200):  # the idle cursor is reaped (bounded wait, no timing asserted)
        if not fanout.owns(first):
            break
        await asyncio.sleep(0.05)
    assert not fanout.owns(first)
    await _assert_killed_upstream(streams)
    # then a new one may open
    assert (await fanout.run("find", dict(find), targets, DECISION, 1))["cursor"]["id"]
    await fanout.close()
    # two at once with room for one: one cursor, one refusal, nothing left open upstream
    fanout = FanOut(2, "tenant", max_cursors=1)
    results = await asyncio.gather(*(fanout.run("find", dict(find), targets, DECISION, 1)
                                     for _ in range(2)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, ProxyError)]
    assert len(errors) == 1 and errors[0].code == 146 and len(fanout) == 1
    for task in [t for r in targets for t in list(r._background)]:
        await task  # the late one's killCursors: their connections back in the pools
    open_cursors = sum(conn.open_cursors for r in targets for pool in r.pools.all()
                       for conn in pool._idle)
    assert open_cursors == len(targets)  # the one merged cursor's upstream cursors
    await fanout.close()


async def test_a_secondary_read_goes_to_a_secondary_of_each_cluster(
        ferretdb: FerretDBProcess, ferretdb_factory: FerretDBFactory, db_name: str) -> None:
    """Two clusters of declared members (FerretDB does not replicate: each member holds
    its own marker documents, so the answer tells which member each cluster used)."""
    procs = [ferretdb, ferretdb_factory(), ferretdb_factory(), ferretdb_factory()]
    roundtrips = []
    for index in range(2):
        primary, secondary = procs[2 * index], procs[2 * index + 1]
        for role, proc in (("primary", primary), ("secondary", secondary)):
            with pymongo.MongoClient(proc.uri) as client:
                client[db_name]["docs"].insert_many(
                    [{"cluster": index, "role": role, "i": i} for i in range(30)])
        config = UpstreamConfig(members=[
            {"host": primary.address, "role": "primary"},
            {"host": secondary.address, "role": "secondary"}])
        roundtrip = cluster_roundtrip(f"c{index}", config, CursorTable())
        await roundtrip.topology.start()
        roundtrips.append(roundtrip)
    fanout = FanOut(4, "tenant")
    try:
        for mode, role in (("secondaryPreferred", "secondary"), ("primary", "primary")):
            decision = RouteDecision("dashboard", 0, "x", read_preference(mode))
            reply = await fanout.run("find", {"find": "docs", "sort": {"i": -1},
                                              "limit": 40, "$db": db_name},
                                     roundtrips, decision, 1)
            got = await _drain(fanout, reply, db_name, 7)
            assert [d["i"] for d in got] == [i for i in range(29, 9, -1) for _ in (0, 1)]
            assert {(d["cluster"], d["role"]) for d in got} == {(0, role), (1, role)}
    finally:
        await fanout.close()
        for proc in procs:
            with pymongo.MongoClient(proc.uri) as client:
                client.drop_database(db_name)
        for roundtrip in roundtrips:
            await roundtrip.pools.close()
            await roundtrip.topology.close()


# -- what is refused, and why (no server needed) --------------------------------------------

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("update", {"update": "docs", "updates": []}, "not update"),
    ("find", {"find": "docs", "tailable": True}, "tailable"),
    ("find", {"find": "docs", "awaitData": True}, "awaitData"),
    ("find", {"find": "docs", "noCursorTimeout": True}, "noCursorTimeout"),
    ("find", {"find": "docs", "sort": {"$natural": 1}}, "$natural"),
    ("find", {"find": "docs", "sort": {"v": 1}, "projection": {"i": 1}}, "drops the sort key"),
    ("find", {"find": "docs", "sort": {"v": 1}, "projection": {"v": 0}}, "excludes"),
    ("find", {"find": "docs", "sort": {"v.a": 1}, "projection": {"v.b": 1}},
     "drops the sort key"),
    ("find", {"find": "docs", "sort": {"v": 1}, "projection": {"v": {"$slice": 1}}},
     "computes"),
    ("find", {"find": "docs", "sort": {"v": 1}, "collation": {"locale": "fr"}}, "collation"),
    ("find", {"find": "docs", "autocommit": False}, "transaction"),
    ("distinct", {"distinct": "docs", "key": "v", "collation": {"locale": "en"}},
     "collation"),
    ("aggregate", {"aggregate": "docs", "pipeline": [{"$unwind": "$v"}]}, "$unwind"),
    ("aggregate", {"aggregate": "docs", "pipeline": [{"$out": "x"}]}, "$out"),
    ("aggregate", {"aggregate": "docs", "pipeline": [{"$group": {"_id": "$g"}}]},
     "does not group by the tenant"),
    ("aggregate", {"aggregate": "docs", "pipeline": [
        {"$project": {"tenant": "$g"}}, {"$group": {"_id": "$tenant"}}]},
     "does not group by the tenant"),
    ("aggregate", {"aggregate": "docs", "pipeline": [
        {"$sort": {"v": 1}}, {"$match": {}}]}, "$match"),
    ("aggregate", {"aggregate": "docs", "pipeline": [], "explain": True}, "explain"),
    ("aggregate", {"aggregate": 1, "pipeline": []}, "collection"),
]


@pytest.mark.parametrize(("name", "command", "reason"), REFUSED)
async def test_refused(name: str, command: dict[str, Any], reason: str) -> None:
    fanout = FanOut(10, "tenant")
    refusal = fanout.refusal(name, command)
    assert refusal is not None and reason in refusal
    with pytest.raises(ProxyError) as info:
        await fanout.run(name, command, [], DECISION, 1)
    assert info.value.code == 13 and reason in info.value.errmsg


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("find", {"find": "docs", "sort": {"v": 1}, "projection": {"v": 1, "i": 1}}),
    ("find", {"find": "docs", "sort": {"_id": 1}, "projection": {"i": 1}}),
    ("find", {"find": "docs", "sort": {"v.a": 1}, "projection": {"v": 1}}),
    ("find", {"find": "docs", "sort": {"v": 1}, "projection": {"i": 0}, "singleBatch": True}),
    ("find", {"find": "docs", "sort": {"v": 1}, "collation": {"locale": "simple"}}),
    ("count", {"count": "docs", "query": {"x": 1}}),
    ("distinct", {"distinct": "docs", "key": "v"}),
    ("aggregate", {"aggregate": "docs", "pipeline": [
        {"$match": {}}, {"$group": {"_id": "$tenant", "n": {"$sum": 1}}}, {"$count": "c"}]}),
    ("aggregate", {"aggregate": "docs", "pipeline": [
        {"$project": {"tenant": 1}}, {"$group": {"_id": {"a": "$tenant", "b": "$g"}}},
        {"$sort": {"_id": 1}}, {"$limit": 3}, {"$skip": 1}]}),
]


@pytest.mark.parametrize(("name", "command"), ACCEPTED)
def test_accepted(name: str, command: dict[str, Any]) -> None:
    assert FanOut(10, "tenant").refusal(name, command) is None


@pytest.mark.parametrize(("command", "code"), [
    ({"find": "docs", "limit": -1}, 2), ({"find": "docs", "skip": "x"}, 14),
    ({"aggregate": "docs", "pipeline": [{"$match": {}, "$limit": 1}]}, 2),
])
async def test_malformed_is_the_servers_error(command: dict[str, Any], code: int) -> None:
    fanout = FanOut(10, "tenant")
    name = next(iter(command))
    assert fanout.refusal(name, command) is None
    with pytest.raises(ProxyError) as info:
        await fanout.run(name, command, [], DECISION, 1)
    assert info.value.code == code


@pytest.mark.parametrize(("name", "command", "asked", "skip", "limit"), [
    ("find", {"find": "d", "filter": {"a": 1}, "skip": 5, "limit": 10, "batchSize": 3,
              "singleBatch": True, "lsid": {"id": 1}, "$clusterTime": {}, "$db": "x"},
     {"find": "d", "filter": {"a": 1}, "limit": 15}, 5, 10),
    ("find", {"find": "d", "skip": 5, "readConcern": {"level": "local",
                                                      "afterClusterTime": 1}},
     {"find": "d", "readConcern": {"level": "local"}}, 5, None),
    ("count", {"count": "d", "query": {}, "skip": 2, "limit": -3},
     {"count": "d", "query": {}, "limit": 5}, 2, 3),
    ("aggregate", {"aggregate": "d", "pipeline": [
        {"$match": {"a": 1}}, {"$skip": 4}, {"$limit": 6},
        {"$group": {"_id": 1, "n": {"$sum": 1}}}], "cursor": {}},
     {"aggregate": "d", "pipeline": [{"$match": {"a": 1}}, {"$limit": 10},
                                     {"$group": {"_id": 1, "n": {"$sum": 1}}}],
      "cursor": {}}, 4, 6),
    ("aggregate", {"aggregate": "d", "pipeline": [
        {"$group": {"_id": "$tenant", "n": {"$sum": 1}}}, {"$sort": {"n": 1}},
        {"$limit": 9}, {"$skip": 2}], "cursor": {"batchSize": 1}},
     {"aggregate": "d", "pipeline": [{"$group": {"_id": "$tenant", "n": {"$sum": 1}}},
                                     {"$sort": {"n": 1}}, {"$limit": 9}],
      "cursor": {}}, 2, 7),
])
def test_what_each_cluster_is_asked(name: str, command: dict[str, Any],
                                    asked: dict[str, Any], skip: int,
                                    limit: int | None) -> None:
    planned = plan(name, command, "tenant")
    assert planned.command == asked
    assert (planned.skip, planned.limit) == (skip, limit)
