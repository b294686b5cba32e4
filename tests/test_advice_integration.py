"""Index advice end to end: a real proxy (subprocess) in front of a real FerretDB,
driven by pymongo; ``/advice`` read over HTTP, ``mongoproxy advise`` and
``mongoproxy top`` run as commands.

FerretDB has no ``$indexStats``: unused indexes must be reported "unknown" there; the
server that has it is played by mockupdb in ``tests/test_advice_usage.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from pymongo import ASCENDING, DESCENDING, MongoClient

from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess
from tests.support.factories import ProxyFactory

Doc = dict[str, Any]
SECRET = "s3cr3t-user-4711"  # a filter value that must never appear in the advice
TIMEOUTS: Doc = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 5_000}


def advice(proxy: ProxyProcess, query: str = "") -> Doc:
    with urllib.request.urlopen(f"{proxy.admin_url}/advice{query}", timeout=5) as reply:
        assert reply.status == 200
        body = reply.read()
    assert SECRET.encode() not in body
    document: Doc = json.loads(body)
    return document


def wait_for(proxy: ProxyProcess, check: Callable[[Doc], bool], what: str,
             timeout: float = 30.0) -> Doc:
    deadline = time.monotonic() + timeout
    while True:
        document = advice(proxy)
        if check(document):
            return document
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(document)[:3000]}")
        time.sleep(0.1)


def missing_keys(document: Doc, namespace: str) -> list[Doc]:
    return [m["key"] for m in document["missing"] if m["namespace"] == namespace]


def cli(proxy: ProxyProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--admin", proxy.admin_url],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout
    return done.stdout


def test_missing_then_created_then_redundant(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    # refresh_s is far beyond the test: only the createIndexes seen through the proxy
    # can make the catalog fetch the indexes again.
    proxy = proxy_factory(ferretdb.uri, {"advice": {"poll_s": 0.2, "refresh_s": 3600}})
    ns = f"{db_name}.timesheets"
    with MongoClient(proxy.uri, **TIMEOUTS) as client:
        coll = client[db_name]["timesheets"]
        day = datetime.datetime(2024, 5, 1)
        coll.insert_many([{"tenant_id": f"t{i % 3}", "user_id": SECRET if i == 0 else f"u{i}",
                           "date": day + datetime.timedelta(days=i), "hours": i % 8,
                           "name": f"n{i}"} for i in range(60)])
        # The shape without an index: a user's timesheets, newest first (12 times).
        for i in range(12):
            list(coll.find({"tenant_id": "t0", "user_id": SECRET if i == 0 else f"u{i}"})
                 .sort("date", DESCENDING).limit(10))
        # A shape no index serves: an unanchored regex.
        for _ in range(3):
            list(coll.find({"name": {"$regex": "7"}}))

        wanted = {"tenant_id": 1, "user_id": 1, "date": -1}
        document = wait_for(proxy, lambda d: wanted in missing_keys(d, ns),
                            "the missing index to be suggested")
        [item] = [m for m in document["missing"] if m["namespace"] == ns]
        assert list(item["key"].items()) == [("tenant_id", 1), ("user_id", 1), ("date", -1)]
        assert item["count"] == 12 and item["total_ms"] > 0
        assert item["reason"] == "equality on tenant_id, user_id; sort by date desc"
        [shape] = item["shapes"]
        assert shape["count"] == 12 and shape["command"] == "find"
        assert item["js"] == (f'db.getSiblingDB("{db_name}").timesheets.createIndex('
                              "{tenant_id: 1, user_id: 1, date: -1})")
        [bad] = [u for u in document["unindexable"] if u["namespace"] == ns]
        assert bad["count"] == 3 and "unanchored" in bad["problems"][0]
        assert document["catalog"][ns]["state"] == "ok"
        assert [i["name"] for i in document["catalog"][ns]["indexes"]] == ["_id_"]
        # FerretDB has no $indexStats: unused is "unknown", not a guess.
        assert document["unused"] == []
        [unknown] = [u for u in document["usage_unknown"] if u["namespace"] == ns]
        assert unknown["unused"] == "unknown" and "indexStats" in unknown["why"]

        js = cli(proxy, "advise", "--format", "js")
        assert (f'db.getSiblingDB("{db_name}").timesheets.createIndex('
                "{tenant_id: 1, user_id: 1, date: -1});") in js.splitlines()
        assert "// equality on tenant_id, user_id; sort by date desc: 1 shape(s), " \
               "12 operations" in js
        text = cli(proxy, "advise")
        assert f"{ns} {json.dumps(wanted)}" in text and "unanchored" in text
        as_json = json.loads(cli(proxy, "advise", "--format", "json"))
        assert missing_keys(as_json, ns) == [wanted]
        top = cli(proxy, "top", "--once")
        header = next(line for line in top.splitlines() if line.startswith("HASH"))
        assert "INDEX" in header
        assert any(shape["shape_hash"] in line and "MISSING" in line
                   for line in top.splitlines())
        assert any(bad["shape_hash"] in line and "no-index" in line
                   for line in top.splitlines())

        # The index, created through the proxy: the suggestion is gone.
        name = coll.create_index([("tenant_id", ASCENDING), ("user_id", ASCENDING),
                                  ("date", DESCENDING)])
        document = wait_for(proxy, lambda d: not missing_keys(d, ns),
                            "the suggestion to go once the index exists")
        [row] = [s for s in document["shapes"] if s["shape_hash"] == shape["shape_hash"]]
        assert row["status"] == "served" and row["served_by"] == [name]
        assert document["redundant"] == []

        # A prefix of it, created through the proxy: reported redundant.
        short = coll.create_index([("tenant_id", ASCENDING), ("user_id", ASCENDING)])
        document = wait_for(proxy, lambda d: bool(d["redundant"]), "the redundant index")
        [item] = document["redundant"]
        assert (item["namespace"], item["index"], item["covered_by"]) == (ns, short, name)
        assert item["key"] == {"tenant_id": 1, "user_id": 1}
        text = cli(proxy, "advise")
        assert f"- {ns} {short} " in text
        js = cli(proxy, "advise", "--format", "js")
        assert f'// db.getSiblingDB("{db_name}").timesheets.dropIndex("{short}");' in js

        # Dropped through the proxy: no longer redundant.
        coll.drop_index(short)
        wait_for(proxy, lambda d: not d["redundant"], "the dropped index to be forgotten")


def test_indexes_made_elsewhere_are_seen_at_the_refresh(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, {"advice": {"poll_s": 0.2, "refresh_s": 1}})
    ns = f"{db_name}.costs"
    with MongoClient(proxy.uri, **TIMEOUTS) as client:
        coll = client[db_name]["costs"]
        coll.insert_many([{"tenant_id": "a", "project_id": i % 4, "cost_date": i}
                          for i in range(20)])
        for i in range(5):
            list(coll.find({"tenant_id": "a", "project_id": i}).sort("cost_date", -1))
        wanted = {"tenant_id": 1, "project_id": 1, "cost_date": -1}
        wait_for(proxy, lambda d: wanted in missing_keys(d, ns), "the suggestion")
    # Created directly on the server, behind the proxy's back.
    with MongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS) as direct:
        direct[db_name]["costs"].create_index([("tenant_id", 1), ("project_id", 1),
                                                ("cost_date", -1)])
    wait_for(proxy, lambda d: not missing_keys(d, ns), "the refresh to see the index")


@pytest.mark.parametrize(("query", "word"), [
    ("limit=-1", "limit"), ("limit=x", "limit"), ("window=0", "window"), ("window=x", "window"),
])
def test_parameters_are_validated(ferretdb: FerretDBProcess, proxy: ProxyProcess,
                                  query: str, word: str) -> None:
    try:
        urllib.request.urlopen(f"{proxy.admin_url}/advice?{query}", timeout=5)
    except urllib.error.HTTPError as err:
        assert err.code == 400
        assert word in json.loads(err.read())["error"]
    else:
        raise AssertionError(f"{query} was accepted")
    document = advice(proxy, "?window=3600&limit=5")
    assert document["window_s"] is not None and document["window_s"] >= 0


def test_explain_confirms_the_collection_scan(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, {"advice": {
        "poll_s": 0.2, "explain": True, "explain_interval_s": 0.2, "explain_min_ms": 0}})
    ns = f"{db_name}.audit"
    with MongoClient(proxy.uri, **TIMEOUTS) as client:
        coll = client[db_name]["audit"]
        coll.insert_many([{"tenant_id": "a", "resource_type": "task", "action": "update",
                           "timestamp": i} for i in range(10)])
        for _ in range(4):
            list(coll.find({"tenant_id": "a", "resource_type": SECRET, "action": "update"})
                 .sort("timestamp", -1))

    def explained(d: Doc) -> bool:
        return any(s["namespace"] == ns and "explain" in s for s in d["shapes"])

    document = wait_for(proxy, explained, "an explain of the shape")
    [row] = [s for s in document["shapes"] if s["namespace"] == ns and "explain" in s]
    # FerretDB's SQLite plan of a filter it cannot push down: a full table scan.
    assert row["status"] == "missing" and row["explain"]["collscan"] is True, row
    assert "SCAN" in row["explain"]["plan"]
    [item] = [m for m in document["missing"] if m["namespace"] == ns]
    assert item["shapes"][0]["explain"]["collscan"] is True
    assert "explain: collection scan" in cli(proxy, "advise")
