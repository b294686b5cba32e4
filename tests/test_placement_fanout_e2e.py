"""Fan-out reads end to end: three real FerretDB processes as clusters (home, eu, big),
one proxy in tenancy enforce mode with SCRAM users, and a ``"*"`` operator's pymongo
client reading across tenants. Every answer is compared with direct reads of each
cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from proxy.identity.credentials import hash_password
from tests import test_placement_routing
from tests.support import FerretDBProcess, ProxyProcess

Doc = dict[str, Any]
DB = "fanout_e2e"
PASSWORDS = {"acme_app": "a-secret", "ops": "o-secret"}
TENANT_OF = {"acme_app": "acme", "ops": "*"}
# The three clusters of the routing tests (home, eu, big), started once for this module.
clusters = test_placement_routing.clusters
CLUSTER_OF = {"acme": "eu", "globex": "big", "initech": "home", "umbrella": "eu"}


@pytest.fixture(scope="module")
def direct(clusters: dict[str, FerretDBProcess]) -> Iterator[dict[str, MongoClient[Doc]]]:
    """Direct clients of each cluster, each holding its tenants' tasks (60 a tenant)."""
    opened: dict[str, MongoClient[Doc]] = {}
    for name, proc in clusters.items():
        opened[name] = MongoClient(proc.uri)
        opened[name].drop_database(DB)
    for index, (tenant, cluster) in enumerate(CLUSTER_OF.items()):
        opened[cluster][DB].tasks.insert_many([
            {"tenant_id": tenant, "n": (i * 37 + index) % 101, "i": i,
             "status": ("open", "done")[i % 2]} for i in range(60)])
    yield opened
    for client in opened.values():
        client.drop_database(DB)
        client.close()


@pytest.fixture(scope="module")
def proxy(clusters: dict[str, FerretDBProcess], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ProxyProcess]:
    users = [{"username": u, "password_sha256": hash_password(p, iterations=4096),
              "tenant": TENANT_OF[u]} for u, p in PASSWORDS.items()]
    config = {
        "tenancy": {"mode": "enforce", "users": users},
        "placement": {
            "clusters": {n: {"uri": clusters[n].uri, "server_selection_timeout_ms": 2000}
                         for n in ("eu", "big")},
            "tenants": {"acme": "eu", "globex": "big", "umbrella": "eu"},
            "fanout_batch_size": 16,  # getMores on every cluster within one client batch
        },
    }
    proc = ProxyProcess(clusters["home"].uri, config,
                        workdir=tmp_path_factory.mktemp("proxy")).start()
    yield proc
    proc.stop()


@pytest.fixture
def ops(proxy: ProxyProcess) -> Iterator[MongoClient[Doc]]:
    client: MongoClient[Doc] = MongoClient(
        proxy.uri, username="ops", password=PASSWORDS["ops"], authMechanism="SCRAM-SHA-256",
        serverSelectionTimeoutMS=5000)
    yield client
    client.close()


def _all(direct: dict[str, MongoClient[Doc]], query: Doc | None = None) -> list[Doc]:
    return [d for c in direct.values() for d in c[DB].tasks.find(query or {})]


def test_find_sorted_with_skip_and_limit_over_the_clusters(
        ops: MongoClient[Doc], direct: dict[str, MongoClient[Doc]]) -> None:
    got = list(ops[DB].tasks.find({"status": "open"}).sort([("n", -1), ("tenant_id", 1),
                                                            ("i", 1)]).skip(5).limit(30))
    expected = sorted(_all(direct, {"status": "open"}),
                      key=lambda d: (-d["n"], d["tenant_id"], d["i"]))[5:35]
    assert [d["_id"] for d in got] == [d["_id"] for d in expected]
    assert {d["tenant_id"] for d in got} >= {"acme", "globex", "initech"}


def test_a_cursor_over_the_clusters_continues_across_batches(
        ops: MongoClient[Doc], direct: dict[str, MongoClient[Doc]]) -> None:
    cursor = ops[DB].tasks.find({}, batch_size=7).sort([("i", 1), ("tenant_id", 1)])
    got = [(d["i"], d["tenant_id"]) for d in cursor]
    assert got == sorted((d["i"], d["tenant_id"]) for d in _all(direct))
    assert len(got) == 60 * len(CLUSTER_OF)
    # abandoned half-way: its killCursors is answered (the proxy kills the upstream ones)
    cursor = ops[DB].tasks.find({}, batch_size=5).sort("n", 1)
    first = next(cursor)
    assert cursor.cursor_id is not None and cursor.cursor_id > 2**40
    cursor.close()
    assert first["n"] == min(d["n"] for d in _all(direct))


def test_counts_distinct_and_a_grouped_aggregate(
        ops: MongoClient[Doc], direct: dict[str, MongoClient[Doc]]) -> None:
    tasks = ops[DB].tasks
    everything = _all(direct)
    assert tasks.count_documents({}) == len(everything)
    assert tasks.count_documents({"status": "done"}, skip=10, limit=50) == 50
    assert tasks.count_documents({"n": {"$lt": 10}}) == sum(d["n"] < 10 for d in everything)
    assert sorted(tasks.distinct("n")) == sorted({d["n"] for d in everything})
    assert sorted(tasks.distinct("tenant_id")) == sorted(CLUSTER_OF)
    grouped = list(tasks.aggregate([
        {"$match": {"status": "open"}},
        {"$group": {"_id": "$tenant_id", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]))
    assert grouped == [{"_id": t, "n": 30} for t in sorted(CLUSTER_OF)]


def test_what_spans_tenants_otherwise_is_refused(
        ops: MongoClient[Doc], direct: dict[str, MongoClient[Doc]]) -> None:
    tasks = ops[DB].tasks
    with pytest.raises(OperationFailure) as caught:
        tasks.update_many({}, {"$set": {"seen": True}})
    assert caught.value.code == 13 and "spans tenants" in str(caught.value)
    with pytest.raises(OperationFailure) as caught:
        list(tasks.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}]))
    assert caught.value.code == 13 and "does not group by the tenant" in str(caught.value)
    with pytest.raises(OperationFailure) as caught:
        list(tasks.aggregate([{"$unwind": "$status"}]))
    assert caught.value.code == 13 and "$unwind" in str(caught.value)
    assert sum(c[DB].tasks.count_documents({"seen": True}) for c in direct.values()) == 0


def test_a_tenant_user_still_reads_only_its_cluster(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    with MongoClient(proxy.uri, username="acme_app", password=PASSWORDS["acme_app"],
                     authMechanism="SCRAM-SHA-256", serverSelectionTimeoutMS=5000) as client:
        got = list(client[DB].tasks.find({"tenant_id": "acme"}).sort("i", 1))
    assert [d["i"] for d in got] == list(range(60))
