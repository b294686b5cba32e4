"""Unused indexes from ``$indexStats``, end to end through a real proxy.

FerretDB v1.24 has no ``$indexStats`` (it answers NotImplemented, which the FerretDB
integration test checks is reported as "unknown"), so this test puts a ``mockupdb``
server in its place: a standalone that answers ``listIndexes`` and ``$indexStats`` the
way MongoDB 7 does, and an empty cursor to ``find``.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from mockupdb import MockupDB
from pymongo import MongoClient

from tests.support import REPO_ROOT, ProxyFactory

pytestmark = pytest.mark.timeout(120)
SINCE = datetime.datetime(2024, 5, 1, 12, 0, 0)
INDEXES: list[dict[str, Any]] = [
    {"v": 2, "key": {"_id": 1}, "name": "_id_"},
    {"v": 2, "key": {"tenant_id": 1, "status": 1}, "name": "by_status"},
    {"v": 2, "key": {"tenant_id": 1, "email": 1}, "name": "by_email", "unique": True},
    {"v": 2, "key": {"old_field": 1}, "name": "forgotten"},
]
OPS = {"_id_": 0, "by_status": 42, "by_email": 0, "forgotten": 0}


def _hello() -> dict[str, Any]:
    return {
        "helloOk": True, "isWritablePrimary": True, "ismaster": True,
        "minWireVersion": 0, "maxWireVersion": 21, "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
        "logicalSessionTimeoutMinutes": 30, "connectionId": 1,
        "localTime": datetime.datetime.now(datetime.UTC),
    }


def _handle(request: Any) -> bool:
    name = str(request.command_name or "")
    doc = request.doc
    if name.lower() in ("hello", "ismaster"):
        return bool(request.replies(_hello()))
    namespace = f"{doc.get('$db')}.{doc.get(name)}"
    if name == "listIndexes":
        return bool(request.replies(cursor={"id": 0, "ns": namespace, "firstBatch": INDEXES}))
    if name == "aggregate" and doc.get("pipeline") == [{"$indexStats": {}}]:
        stats = [{"name": i["name"], "key": i["key"], "host": "mock:27017",
                  "accesses": {"ops": OPS[i["name"]], "since": SINCE}} for i in INDEXES]
        return bool(request.replies(cursor={"id": 0, "ns": namespace, "firstBatch": stats}))
    if name == "find":
        return bool(request.replies(cursor={"id": 0, "ns": namespace, "firstBatch": []}))
    return bool(request.replies(ok=1))


@pytest.fixture
def mongod() -> Iterator[MockupDB]:
    server = MockupDB(auto_ismaster=False, request_timeout=5)
    server.autoresponds(_handle)
    server.run()
    try:
        yield server
    finally:
        server.stop()


def test_unused_indexes_where_the_server_counts_accesses(
    mongod: MockupDB, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(f"mongodb://{mongod.address_string}/?directConnection=true",
                          {"advice": {"poll_s": 0.2}})
    with MongoClient(proxy.uri, serverSelectionTimeoutMS=10_000) as client:
        list(client.app.users.find({"tenant_id": "a", "status": "active"}))
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{proxy.admin_url}/advice", timeout=5) as reply:
            document = json.loads(reply.read())
        if document["catalog"].get("app.users", {}).get("state") == "ok":
            break
        assert time.monotonic() < deadline, document
        time.sleep(0.1)
    # _id_ and unique indexes are never "unused" (a constraint is their use).
    assert [(u["index"], u["ops"]) for u in document["unused"]] == [("forgotten", 0)]
    assert document["unused"][0]["since"].startswith("2024-05-01")
    assert document["usage_unknown"] == []
    assert document["catalog"]["app.users"]["usage"] == "known"
    [row] = document["shapes"]
    assert row["status"] == "served" and row["served_by"] == ["by_status"]
    assert document["missing"] == [] and document["redundant"] == []
    text = subprocess.run(
        [sys.executable, "-m", "proxy", "advise", "--admin", proxy.admin_url],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Unused indexes (1 found; unknown for 0 collection(s)):" in text
    assert "- app.users forgotten: 0 operations since 2024-05-01 12:00:00" in text
