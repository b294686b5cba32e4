"""Tenant placement end to end: three real FerretDB processes as clusters (home, eu,
big), one proxy, pymongo clients of several tenants (SCRAM users bound to a tenant, and
a ``"*"`` operator). Every outcome is read back over direct connections to each cluster.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from proxy.identity.credentials import hash_password
from tests.support import FerretDBProcess, ProxyProcess
from tests.test_driver_node import run_crud

Doc = dict[str, Any]
DB = "placement_e2e"
PASSWORDS = {"acme_app": "a-secret", "globex_app": "g-secret", "initech_app": "i-secret",
             "ops": "o-secret"}
TENANT_OF = {"acme_app": "acme", "globex_app": "globex", "initech_app": "initech",
             "ops": "*"}
# The directory under test: acme on eu, globex on big, initech unlisted (home).
HOME_OF = {"acme": "eu", "globex": "big", "initech": "home"}


def _users() -> list[Doc]:
    return [{"username": u, "password_sha256": hash_password(p, iterations=4096),
             "tenant": TENANT_OF[u]} for u, p in PASSWORDS.items()]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FerretDBProcess]]:
    started = {name: FerretDBProcess(tmp_path_factory.mktemp(f"ferretdb-{name}")).start()
               for name in ("home", "eu", "big")}
    yield started
    for proc in started.values():
        proc.stop()


@pytest.fixture(scope="module")
def direct(clusters: dict[str, FerretDBProcess]) -> Iterator[dict[str, MongoClient[Doc]]]:
    clients: dict[str, MongoClient[Doc]] = {n: MongoClient(p.uri) for n, p in clusters.items()}
    yield clients
    for client in clients.values():
        client.close()


def _placement_config(clusters: dict[str, FerretDBProcess]) -> Doc:
    return {
        "tenancy": {"mode": "enforce", "users": _users()},
        "placement": {
            "clusters": {n: {"uri": clusters[n].uri, "server_selection_timeout_ms": 2000}
                         for n in ("eu", "big")},
            "tenants": {"acme": "eu", "globex": "big"},
        },
    }


@pytest.fixture(scope="module")
def proxy(clusters: dict[str, FerretDBProcess], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(clusters["home"].uri, _placement_config(clusters),
                        workdir=tmp_path_factory.mktemp("proxy")).start()
    yield proc
    proc.stop()


def _client(proxy: ProxyProcess, user: str) -> MongoClient[Doc]:
    return MongoClient(proxy.uri, username=user, password=PASSWORDS[user],
                       authMechanism="SCRAM-SHA-256", serverSelectionTimeoutMS=5000)


@pytest.fixture(autouse=True)
def _clean(direct: dict[str, MongoClient[Doc]]) -> None:
    for client in direct.values():
        client.drop_database(DB)


def _where(direct: dict[str, MongoClient[Doc]], coll: str, query: Doc) -> dict[str, int]:
    return {n: c[DB][coll].count_documents(query) for n, c in direct.items()}


def test_each_tenant_reads_and_writes_only_its_own_cluster(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    for user, tenant in TENANT_OF.items():
        if tenant == "*":
            continue
        with _client(proxy, user) as client:
            tasks = client[DB].tasks
            tasks.insert_many([{"tenant_id": tenant, "n": i} for i in range(20)])
            tasks.update_many({"tenant_id": tenant, "n": {"$lt": 5}}, {"$set": {"low": True}})
            tasks.delete_one({"tenant_id": tenant, "n": 19})
            assert tasks.count_documents({"tenant_id": tenant}) == 19
            assert tasks.count_documents({"tenant_id": tenant, "low": True}) == 5
            assert sorted(tasks.distinct("n", {"tenant_id": tenant})) == list(range(19))
            found = tasks.find_one_and_update({"tenant_id": tenant, "n": 7},
                                              {"$set": {"seen": 1}})
            assert found is not None and found["n"] == 7
    for tenant, cluster in HOME_OF.items():
        counts = _where(direct, "tasks", {"tenant_id": tenant})
        assert counts == {n: (19 if n == cluster else 0) for n in direct}, tenant
        assert direct[cluster][DB].tasks.count_documents(
            {"tenant_id": tenant, "low": True, "seen": {"$exists": False}}) == 5


def test_a_cursor_is_continued_on_its_tenants_cluster(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    direct["eu"][DB].tasks.insert_many([{"tenant_id": "acme", "n": i} for i in range(250)])
    direct["big"][DB].tasks.insert_many([{"tenant_id": "globex", "n": i} for i in range(7)])
    with _client(proxy, "acme_app") as client:
        cursor = client[DB].tasks.find({"tenant_id": "acme"}, batch_size=10).sort("n", 1)
        assert [d["n"] for d in cursor] == list(range(250))
        cursor = client[DB].tasks.aggregate(
            [{"$match": {"tenant_id": "acme"}}, {"$sort": {"n": -1}}], batchSize=7)
        assert [d["n"] for d in cursor] == list(range(249, -1, -1))
        # An abandoned cursor is killed on its own cluster (killCursors routed there).
        cursor = client[DB].tasks.find({"tenant_id": "acme"}, batch_size=5)
        next(cursor)
        cursor.close()


def test_the_operator_is_routed_by_the_tenant_it_names(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    with _client(proxy, "ops") as client:
        tasks = client[DB].tasks
        tasks.insert_one({"tenant_id": "globex", "n": 1})
        tasks.insert_many([{"tenant_id": "acme", "n": i} for i in range(3)])
        assert tasks.count_documents({"tenant_id": "acme"}) == 3
        assert [d["n"] for d in tasks.find({"tenant_id": "globex"})] == [1]
        tasks.update_one({"tenant_id": "globex"}, {"$set": {"by": "ops"}})
        # Exempt collections (the tenants list) are home's.
        client[DB].tenants.insert_one({"_id": "acme", "plan": "gold"})
    assert _where(direct, "tasks", {"tenant_id": "globex", "by": "ops"}) == {
        "home": 0, "eu": 0, "big": 1}
    assert _where(direct, "tasks", {"tenant_id": "acme"}) == {"home": 0, "eu": 3, "big": 0}
    assert _where(direct, "tenants", {}) == {"home": 1, "eu": 0, "big": 0}


def test_an_operator_write_across_tenants_is_refused_and_changes_nothing(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    direct["eu"][DB].tasks.insert_one({"tenant_id": "acme", "n": 1})
    direct["big"][DB].tasks.insert_one({"tenant_id": "globex", "n": 1})
    with _client(proxy, "ops") as client:
        with pytest.raises(OperationFailure) as caught:
            client[DB].tasks.update_many({}, {"$set": {"n": 2}})
        assert caught.value.code == 13
        assert "spans tenants on several clusters" in str(caught.value)
        with pytest.raises(OperationFailure) as caught:
            client[DB].tasks.insert_many([{"tenant_id": "acme"}, {"tenant_id": "globex"}])
        assert caught.value.code == 13
    assert _where(direct, "tasks", {"n": 2}) == {"home": 0, "eu": 0, "big": 0}
    assert _where(direct, "tasks", {}) == {"home": 0, "eu": 1, "big": 1}


def test_an_operators_index_command_runs_on_every_cluster(
        proxy: ProxyProcess, direct: dict[str, MongoClient[Doc]]) -> None:
    with _client(proxy, "ops") as client:
        client[DB].tasks.create_index([("tenant_id", 1), ("n", 1)], name="by_n")
        for name, cluster in direct.items():
            assert "by_n" in cluster[DB].tasks.index_information(), name
        client[DB].tasks.drop_index("by_n")
        for name, cluster in direct.items():
            assert "by_n" not in cluster[DB].tasks.index_information(), name


def _get(proxy: ProxyProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{proxy.admin_url}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_operators_see_the_directory_health_and_per_cluster_metrics(
        proxy: ProxyProcess) -> None:
    with _client(proxy, "acme_app") as client:
        client[DB].tasks.insert_one({"tenant_id": "acme"})
    status, body = _get(proxy, "/placement")
    assert status == 200
    report = json.loads(body)
    assert report["clusters"] == ["home", "eu", "big"]
    assert report["tenants"] == {"acme": "eu", "globex": "big"}
    assert all(report["health"][n]["primary"] for n in ("home", "eu", "big"))
    assert report["commands"]["eu"] >= 1
    status, body = _get(proxy, "/readyz")
    assert status == 200
    assert json.loads(body)["clusters"] == {"home": True, "eu": True, "big": True}
    _, metrics = _get(proxy, "/metrics")
    assert 'mongoproxy_placement_cluster_up{cluster="eu"} 1.0' in metrics
    assert 'mongoproxy_placement_directory_tenants{cluster="big"} 1.0' in metrics
    assert 'mongoproxy_placement_commands_total{cluster="eu"}' in metrics


def test_a_directory_change_is_reloaded_live(
        clusters: dict[str, FerretDBProcess], direct: dict[str, MongoClient[Doc]],
        tmp_path: Path) -> None:
    proc = ProxyProcess(clusters["home"].uri, _placement_config(clusters),
                        workdir=tmp_path).start()
    try:
        with _client(proc, "initech_app") as client:
            client[DB].tasks.insert_one({"tenant_id": "initech", "n": 1})
            config = yaml.safe_load(proc.config_path.read_text())
            config["placement"]["tenants"]["initech"] = "big"
            proc.config_path.write_text(yaml.safe_dump(config))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while json.loads(_get(proc, "/placement")[1])["tenants"].get("initech") != "big":
                assert time.monotonic() < deadline, proc.log_text()
                time.sleep(0.1)
            client[DB].tasks.insert_one({"tenant_id": "initech", "n": 2})
        assert direct["home"][DB].tasks.find_one({"n": 1}, {"_id": 0}) == {
            "tenant_id": "initech", "n": 1}
        assert direct["big"][DB].tasks.find_one({"n": 2}, {"_id": 0}) == {
            "tenant_id": "initech", "n": 2}
    finally:
        proc.stop()


def test_a_cluster_down_fails_only_its_tenants(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    started = {name: FerretDBProcess(tmp_path_factory.mktemp(f"fdb-{name}")).start()
               for name in ("home", "eu", "big")}
    proc = ProxyProcess(started["home"].uri, _placement_config(started),
                        workdir=tmp_path_factory.mktemp("proxy")).start()
    try:
        with _client(proc, "acme_app") as acme, _client(proc, "globex_app") as globex:
            acme[DB].tasks.insert_one({"tenant_id": "acme"})
            globex[DB].tasks.insert_one({"tenant_id": "globex"})
            started["big"].kill()
            with pytest.raises(PyMongoError):
                globex[DB].tasks.insert_one({"tenant_id": "globex"})
            for _ in range(20):
                acme[DB].tasks.insert_one({"tenant_id": "acme"})
            assert acme[DB].tasks.count_documents({"tenant_id": "acme"}) == 21
        status, body = _get(proc, "/readyz")
        assert status == 200  # home is up: the other tenants are served
        assert json.loads(body)["clusters"]["big"] is False
    finally:
        proc.stop()
        for p in started.values():
            p.stop()


def test_the_node_driver_of_an_unaware_application_lands_on_its_tenants_cluster(
        clusters: dict[str, FerretDBProcess], direct: dict[str, MongoClient[Doc]],
        tmp_path: Path) -> None:
    """tests/node/crud.js never mentions a tenant: in inject mode, as acme_app, the
    proxy adds the tenant and sends everything to acme's cluster (eu)."""
    config = _placement_config(clusters)
    config["tenancy"]["mode"] = "inject"
    proc = ProxyProcess(clusters["home"].uri, config, workdir=tmp_path).start()
    try:
        uri = (f"mongodb://acme_app:{PASSWORDS['acme_app']}@{proc.address}/"
               "?authMechanism=SCRAM-SHA-256&authSource=admin")
        via_proxy = run_crud(uri, DB)
        reference = run_crud(f"{clusters['home'].uri}?directConnection=true", f"{DB}_ref")
    finally:
        proc.stop()
    del via_proxy["hello"], reference["hello"]
    assert via_proxy["findOne"].pop("tenant_id") == "acme"
    assert via_proxy == reference
    counts = _where(direct, "items", {})
    assert counts == {"home": 0, "eu": 120, "big": 0}
    assert direct["eu"][DB].items.count_documents({"tenant_id": "acme"}) == 120
    direct["home"].drop_database(f"{DB}_ref")


def test_with_two_workers_a_cursor_hops_workers_and_stays_on_its_cluster(
        clusters: dict[str, FerretDBProcess], direct: dict[str, MongoClient[Doc]],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """listen.workers: 2: a getMore arriving at the worker that did not open the cursor
    learns the cursor's cluster from its sibling; /placement sums the workers."""
    from tests.test_workers import WORKERS, eventually, readyz, workers_of
    from tests.test_workers import client as worker_client

    direct["eu"][DB].tasks.insert_many([{"_id": f"acme-{i:02d}", "tenant_id": "acme"}
                                        for i in range(10)])
    config = {**_placement_config(clusters), **WORKERS}
    proc = ProxyProcess(clusters["home"].uri, config,
                        workdir=tmp_path_factory.mktemp("proxy")).start()
    opened: list[MongoClient[Doc]] = []
    try:
        eventually(lambda: readyz(proc)["ready"], "both workers ready")

        def in_worker(worker: int) -> MongoClient[Doc]:
            for n in range(64):
                app = f"placed-{worker}-{n}"
                mc = worker_client(proc, app, username="acme_app",
                                   password=PASSWORDS["acme_app"],
                                   authMechanism="SCRAM-SHA-256")
                opened.append(mc)
                mc[DB].tasks.find_one({"tenant_id": "acme"})
                if workers_of(proc).get(app) == {worker}:
                    return mc
            raise AssertionError(f"no connection landed in worker {worker}")

        first_worker, other_worker = in_worker(0), in_worker(1)
        first = first_worker[DB].command("find", "tasks", filter={"tenant_id": "acme"},
                                         sort={"_id": 1}, batchSize=4)
        ids = [d["_id"] for d in first["cursor"]["firstBatch"]]
        more = other_worker[DB].command("getMore", first["cursor"]["id"],
                                        collection="tasks")
        ids += [d["_id"] for d in more["cursor"]["nextBatch"]]
        assert ids == [f"acme-{i:02d}" for i in range(10)]
        status, body = _get(proc, "/placement")
        assert status == 200
        report = json.loads(body)
        assert [w["worker"] for w in report["workers"]] == [0, 1]
        assert report["commands"]["eu"] >= 3
        # Nothing went home: the getMore in the other worker went to the cursor's cluster.
        assert "home" not in report["commands"], report["commands"]
    finally:
        for mc in opened:
            mc.close()
        proc.stop()
