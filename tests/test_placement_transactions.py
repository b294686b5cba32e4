"""Transactions under tenant placement: a transaction stays on one cluster.

FerretDB v1.24 has no transactions, so two ``mockupdb`` servers (playing ``mongos``
routers, as in tests/test_pinning.py) stand in for the clusters ``home`` and ``eu``.
Each records the commands it receives with their ``lsid``/``txnNumber``, so a test
can tell which cluster got each statement. The clients are real pymongo clients
logged in as proxy users (SCRAM-SHA-256, answered by the proxy itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from proxy.identity.credentials import hash_password
from tests.support import ProxyFactory, ProxyProcess
from tests.test_pinning import Mongos, _eventually

pytestmark = pytest.mark.timeout(120)

PASSWORDS = {"acme_app": "a-secret", "globex_app": "g-secret", "ops": "o-secret"}
TENANTS = {"acme_app": "acme", "globex_app": "globex", "ops": "*"}


@pytest.fixture
def mocks() -> Iterator[dict[str, Mongos]]:
    started = {"home": Mongos("A"), "eu": Mongos("B")}
    try:
        yield started
    finally:
        for mock in started.values():
            mock.stop()


def _proxy(mocks: dict[str, Mongos], proxy_factory: ProxyFactory) -> ProxyProcess:
    users = [{"username": u, "password_sha256": hash_password(p, iterations=4096),
              "tenant": TENANTS[u]} for u, p in PASSWORDS.items()]
    fast = {"heartbeat_ms": 500, "server_selection_timeout_ms": 5000}
    proxy = proxy_factory(f"mongodb://{mocks['home'].address}/", {
        "upstream": fast,
        "tenancy": {"mode": "enforce", "users": users},
        "placement": {"clusters": {"eu": {"uri": f"mongodb://{mocks['eu'].address}/",
                                          **fast}},
                      "tenants": {"acme": "eu"}},
    })
    _eventually(lambda: all(m.hellos >= 2 for m in mocks.values()),
                "the proxy's monitors have checked both clusters")
    return proxy


def _client(proxy: ProxyProcess, user: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(proxy.uri, username=user, password=PASSWORDS[user],
                       authMechanism="SCRAM-SHA-256", retryWrites=False, retryReads=False,
                       serverSelectionTimeoutMS=5000)


def _in_transactions(mock: Mongos) -> list[str]:
    return [s.name for s in mock.seen() if s.autocommit is False]


def test_each_tenants_transaction_runs_whole_on_its_cluster(
        mocks: dict[str, Mongos], proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(mocks, proxy_factory)
    for user in ("acme_app", "globex_app"):
        tenant = TENANTS[user]
        with _client(proxy, user) as client, client.start_session() as s:
            coll = client.db.tasks
            with s.start_transaction():
                coll.insert_one({"tenant_id": tenant, "n": 1}, session=s)
                coll.update_one({"tenant_id": tenant}, {"$set": {"n": 2}}, session=s)
                coll.find_one({"tenant_id": tenant}, session=s)
            with s.start_transaction():
                coll.insert_one({"tenant_id": tenant, "n": 3}, session=s)
                s.abort_transaction()
    statements = ["insert", "update", "find", "commitTransaction", "insert",
                  "abortTransaction"]
    assert _in_transactions(mocks["eu"]) == statements  # acme's
    assert _in_transactions(mocks["home"]) == statements  # globex's
    assert {s.doc["documents"][0]["tenant_id"] for s in mocks["eu"].seen("insert")} == {
        "acme"}


def test_a_transaction_may_not_cross_clusters(
        mocks: dict[str, Mongos], proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(mocks, proxy_factory)
    with _client(proxy, "ops") as client, client.start_session() as s:
        coll = client.db.tasks
        s.start_transaction()
        coll.insert_one({"tenant_id": "globex", "n": 1}, session=s)  # home
        with pytest.raises(OperationFailure) as caught:
            coll.insert_one({"tenant_id": "acme", "n": 1}, session=s)  # eu: refused
        assert caught.value.code == 263
        assert "a transaction stays on one cluster" in str(caught.value)
        s.abort_transaction()
    assert _in_transactions(mocks["home"]) == ["insert", "abortTransaction"]
    assert _in_transactions(mocks["eu"]) == []
