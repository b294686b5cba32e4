"""Operator controls end to end: a real proxy process in front of a real FerretDB (and
redis-server for the cache rules), driven by pymongo, its admin endpoints read over
real HTTP: ``GET /``, ``POST /digest/reset`` and ``mongoproxy top --reset``, digest
percentiles, ``/rules`` and ``mongoproxy_rule_hits_total``, ``/connections``, ``/readyz``
with a hung upstream, duplicate YAML keys, and ``explain-route`` with tenancy and cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from proxy.identity.credentials import hash_password
from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess, RedisProcess
from tests.support.clients import strict_client
from tests.support.factories import FerretDBFactory, ProxyFactory

Doc = dict[str, Any]
Client = MongoClient[Doc]
SECRET = "s3cr3t-literal-0815"  # a filter value no admin endpoint may show


def request(url: str, method: str = "GET") -> tuple[int, Doc]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(proxy: ProxyProcess, path: str) -> Doc:
    status, body = request(f"{proxy.admin_url}{path}")
    assert status == 200, (path, status, body)
    return body


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def rule_hits(proxy: ProxyProcess) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.labels["kind"], s.labels["rule"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples if s.name == "mongoproxy_rule_hits_total"
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "COLUMNS": "300"})


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(uri: str, **kwargs: Any) -> Client:
        client = strict_client(uri, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- GET / and the digest ------------------------------------------------------------------


def test_index_lists_every_endpoint(proxy: ProxyProcess) -> None:
    body = get(proxy, "/")
    listed = {(e["method"], e["path"]) for e in body["endpoints"]}
    assert {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
            ("GET", "/digest"), ("POST", "/digest/reset"), ("GET", "/rules"),
            ("GET", "/connections")} <= listed
    assert all(e["description"] for e in body["endpoints"])
    for method, path in listed:
        if method == "GET" and path != "/metrics":  # every JSON endpoint listed answers
            assert request(f"{proxy.admin_url}{path}")[0] in (200, 503), path
    status, answer = request(f"{proxy.admin_url}/digest/reset")  # GET of a POST endpoint
    assert status == 405 and "POST" in answer["error"]
    status, answer = request(f"{proxy.admin_url}/nothing-here")
    assert status == 404 and "GET /" in answer["error"]


def test_digest_percentiles_reset_and_top_reset(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, clients: Callable[..., Client],
    db_name: str,
) -> None:
    proxy = proxy_factory(ferretdb.uri)
    coll = clients(proxy.uri)[db_name]["events"]
    coll.insert_many([{"_id": i, "kind": "a" if i % 2 else "b", "n": i} for i in range(50)])
    assert len(list(coll.find({"n": {"$gte": 10}}))) == 40  # this shape runs once
    for i in range(30):  # this one 30 times
        coll.count_documents({"kind": "a", "n": {"$lt": i}})

    wait_until(lambda: get(proxy, "/digest")["operations"] >= 32, what="32 operations")
    rows = get(proxy, "/digest?limit=100")["top"]
    (once,) = [r for r in rows if r["command"] == "find"]
    (many,) = [r for r in rows if r["command"] == "aggregate" or r["command"] == "count"]
    assert once["count"] == 1
    for key in ("min_ms", "avg_ms", "p50_ms", "p95_ms", "p99_ms"):
        assert once[key] == once["max_ms"], (key, once)  # one run: every percentile is it
    assert many["count"] == 30
    assert many["min_ms"] <= many["p50_ms"] <= many["p95_ms"] <= many["p99_ms"] \
        <= many["max_ms"]
    assert isinstance(once["shape"], dict) and once["shape"]["filter"] == {
        "n": {"$gte": "?int"}}
    assert isinstance(once["last_example"]["shape"], dict)

    status, answer = request(f"{proxy.admin_url}/digest/reset", "POST")
    assert status == 200 and answer["reset"] is True
    assert answer["before"]["operations"] >= 32 and answer["before"]["shapes"] >= 3
    after = get(proxy, "/digest")
    assert after["shapes"] == 0 and after["top"] == [] and after["operations"] == 0

    list(coll.find({"kind": "b"}))
    wait_until(lambda: get(proxy, "/digest")["operations"] == 1, what="1 new operation")
    done = run_cli("top", "--admin", proxy.admin_url, "--reset")
    assert done.returncode == 0, done.stderr
    assert "digest reset: 1 shapes, 1 operations forgotten" in done.stdout
    assert get(proxy, "/digest")["operations"] == 0
    done = run_cli("top", "--admin", "http://127.0.0.1:9", "--reset")
    assert done.returncode == 1 and "cannot reset" in done.stderr


# -- rule hit counters ---------------------------------------------------------------------


def test_rule_hits_after_known_traffic(
    ferretdb: FerretDBProcess, redis_server: RedisProcess, proxy_factory: ProxyFactory,
    clients: Callable[..., Client], db_name: str,
) -> None:
    proxy = proxy_factory(ferretdb.uri, {
        "routing": {
            "classes": {"reports": {}, "hot": {}},
            "rules": [
                {"match": {"collection": "orders"}, "class": "hot"},
                {"match": {"app_name": "reporter"}, "class": "reports", "name": "by_app"},
            ],
        },
        "cache": {"redis_url": redis_server.url, "timeout_ms": 200, "rules": [
            {"match": {"collection": "orders", "command": "find"}, "ttl_s": 30,
             "name": "orders_find"},
            {"match": {"class": "reports"}, "ttl_s": 5},
        ]},
    })
    before = rule_hits(proxy)
    assert before[("routing", "0")] == before[("routing", "by_app")] == 0
    assert before[("cache", "orders_find")] == before[("cache", "1")] == 0
    app = clients(proxy.uri, appname="webapp")[db_name]
    reporter = clients(proxy.uri, appname="reporter")[db_name]
    app["orders"].insert_one({"_id": 1})          # routing 0 (a write: no cache rule)
    for _ in range(3):
        list(app["orders"].find({"_id": 1}))      # routing 0, cache orders_find
    app["users"].count_documents({})              # no routing rule: (default)
    for _ in range(2):
        list(reporter["users"].find({}))          # routing by_app, cache 1
    wait_until(lambda: get(proxy, "/digest")["operations"] >= 7, what="7 operations")

    hits = rule_hits(proxy)
    assert hits[("routing", "0")] == 4
    assert hits[("routing", "by_app")] == 2
    assert hits[("routing", "(default)")] >= 1  # + the drivers' own commands (endSessions)
    assert hits[("cache", "orders_find")] == 3
    assert hits[("cache", "1")] == 2
    rules = get(proxy, "/rules")
    routing = {r["rule"]: r for r in rules["routing"]}
    assert routing["0"]["hits"] == 4 and routing["0"]["class"] == "hot"
    assert routing["0"]["match"] == {"collection": "orders"}
    assert routing["by_app"]["hits"] == 2 and routing["by_app"]["index"] == 1
    assert routing["(default)"]["hits"] == hits[("routing", "(default)")]
    cache = {r["rule"]: r for r in rules["cache"]}
    assert cache["orders_find"]["hits"] == 3 and cache["orders_find"]["ttl_s"] == 30
    assert cache["1"]["hits"] == 2 and cache["1"]["match"] == {"class": "reports"}


# -- /connections and /readyz with a hung upstream ----------------------------------------


def test_connections_and_readyz_with_a_hung_upstream(
    ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory,
    clients: Callable[..., Client], db_name: str,
) -> None:
    """FerretDB is SIGSTOPped: the monitor still calls it primary (its heartbeat times
    out only after connectTimeoutMS, 20 s), but /readyz's ping finds the data path dead;
    /connections shows the find hanging in flight, by name, without its values."""
    upstream = ferretdb_factory()
    proxy = proxy_factory(upstream.uri, {
        "admin": {"ready_probe_interval_ms": 200, "ready_probe_timeout_ms": 500},
        "tenancy": {"mode": "off", "users": [{
            "username": "ana", "tenant": "acme",
            "password_sha256": hash_password("pw", iterations=4096)}]},
    })
    ready_url = f"{proxy.admin_url}/readyz"
    wait_until(lambda: request(ready_url)[0] == 200, what="/readyz 200")
    status, ready = request(ready_url)
    assert ready["ready"] is True and ready["data_path"]["ok"] is True
    assert ready["data_path"]["proof"] in ("ping", "traffic")

    client = clients(proxy.uri, appname="billing", username="ana", password="pw",
                     authMechanism="SCRAM-SHA-256", socketTimeoutMS=30_000)
    coll = client[db_name]["invoices"]
    coll.insert_one({"_id": 1, "ref": SECRET})
    idle = clients(proxy.uri, appname="idle-app")
    idle.admin.command("ping")

    listing = get(proxy, "/connections")
    rows = [r for r in listing["connections"] if r["app_name"] in ("billing", "idle-app")]
    assert {r["app_name"] for r in rows} == {"billing", "idle-app"}
    # The driver's monitoring connections carry the appName but do not authenticate.
    (billing,) = [r for r in rows if r["app_name"] == "billing" and r["user"] is not None]
    assert billing["user"] == "ana" and billing["tenant"] == "acme"
    assert billing["peer"].startswith("127.0.0.1:") and billing["age_s"] >= 0
    assert listing["total"] >= 2

    result: list[Any] = []
    finder = threading.Thread(
        target=lambda: result.append(coll.find_one({"ref": SECRET})), daemon=True)
    upstream.send_signal(signal.SIGSTOP)
    try:
        finder.start()

        def find_in_flight() -> Doc | None:
            for row in get(proxy, "/connections?active=1")["connections"]:
                if row["command"] == "find" and row["app_name"] == "billing":
                    return row
            return None

        wait_until(lambda: find_in_flight() is not None, what="the find in flight")
        first = find_in_flight()
        assert first is not None
        time.sleep(0.3)
        later = find_in_flight()
        assert later is not None and later["running_ms"] > first["running_ms"] >= 0
        status, raw = request(f"{proxy.admin_url}/connections?active=1")
        assert SECRET not in json.dumps(raw)
        assert all(r["command"] is not None for r in raw["connections"])
        assert raw["in_flight"] >= 1
        limited = get(proxy, "/connections?limit=1")
        assert len(limited["connections"]) == 1 and limited["total"] >= 2
        assert limited["connections"][0]["command"] == "find"  # the longest-running first
        assert request(f"{proxy.admin_url}/connections?limit=x")[0] == 400

        wait_until(lambda: request(ready_url)[0] == 503, timeout=10, what="/readyz 503")
        status, ready = request(ready_url)
        assert status == 503 and ready["ready"] is False
        assert ready["primary"] == "yes"  # the monitor has not noticed
        assert ready["data_path"]["ok"] is False and "within 500 ms" in ready["data_path"][
            "error"]
    finally:
        upstream.send_signal(signal.SIGCONT)
    finder.join(timeout=30)
    assert result == [{"_id": 1, "ref": SECRET}]
    wait_until(lambda: request(ready_url)[0] == 200, what="/readyz 200 again")
    wait_until(lambda: not any(r["app_name"] == "billing"
                               for r in get(proxy, "/connections?active=1")["connections"]),
               what="the find to finish")

    upstream.stop()  # killed: refused connections, the monitor notices too
    wait_until(lambda: request(ready_url)[0] == 503, timeout=10, what="/readyz 503")


# -- configuration and explain-route -------------------------------------------------------


def test_duplicate_yaml_key_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text('listen: {port: 27016}\nupstream: {uri: "mongodb://127.0.0.1:1/"}\n'
                    "admin: {port: 9216}\nlisten:\n  port: 27017\n")
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        done = run_cli(*args)
        assert done.returncode == 2, done
        assert str(path) in done.stderr and "duplicate key 'listen'" in done.stderr
        assert "line 4" in done.stderr and "<unicode string>" not in done.stderr
    nested = tmp_path / "nested.yaml"
    nested.write_text('upstream:\n  uri: "mongodb://127.0.0.1:1/"\n  pool: {max_size: 5, '
                      "max_size: 6}\n")
    done = run_cli("check-config", str(nested))
    assert done.returncode == 2 and "duplicate key 'max_size'" in done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstream: {uri: [\n")
    done = run_cli("check-config", str(broken))
    assert done.returncode == 2 and f'in "{broken}"' in done.stderr


def test_dev_config_logs_cache_hits() -> None:
    """config/dev.yaml says a second identical find shows "cache": "hit" in the slow log:
    only true if every operation is logged."""
    config = yaml.safe_load((REPO_ROOT / "config" / "dev.yaml").read_text())
    assert config["observability"]["slow_query_ms"] == 0
    assert run_cli("check-config", str(REPO_ROOT / "config" / "dev.yaml")).returncode == 0


def test_explain_route_shows_tenancy_and_cache(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "upstream": {"uri": "mongodb://127.0.0.1:1/"},
        "tenancy": {"mode": "enforce", "users": [{
            "username": "ana", "tenant": "acme",
            "password_sha256": hash_password("pw", iterations=4096)}]},
        "routing": {"classes": {"hot": {}},
                    "rules": [{"match": {"collection": "orders"}, "class": "hot",
                               "name": "orders"}]},
        "cache": {"redis_url": "redis://127.0.0.1:1", "rules": [
            {"match": {"class": "hot"}, "ttl_s": 45, "name": "hot_reads"}]},
    }))

    def explain(command: Doc, *extra: str) -> dict[str, str]:
        done = run_cli("explain-route", "--config", str(path), "--offline",
                       json.dumps(command), *extra)
        assert done.returncode == 0, done.stderr
        return {k: v.strip() for k, _, v in
                (line.partition(":") for line in done.stdout.splitlines() if line)}

    found = explain({"find": "orders", "filter": {"tenant_id": "acme"}, "$db": "app"},
                    "--user", "ana")
    assert found["tenancy"] == "allowed as 'ana' (tenant 'acme'), mode enforce"
    assert found["class"] == "hot"
    assert found["cache"].startswith("looked up: rule #0 (hot_reads), TTL 45 s")
    found = explain({"aggregate": "orders", "pipeline": [
        {"$match": {"tenant_id": "acme"}}, {"$sample": {"size": 1}}], "cursor": {},
        "$db": "app"}, "--user", "ana")
    assert found["cache"] == "rule #0 (hot_reads) matches, but bypass:stage (not looked up)"
    found = explain({"insert": "orders", "documents": [{"tenant_id": "acme"}], "$db": "app"},
                    "--user", "ana")
    assert found["cache"] == "a write: invalidates app.orders before the reply"
    found = explain({"find": "orders", "filter": {}, "$db": "app"}, "--user", "ana")
    assert found["tenancy"].startswith("refused as 'ana' (tenant 'acme'): code 13")
    assert "class" not in found and "cache" not in found
    found = explain({"find": "orders", "filter": {"tenant_id": "acme"}, "$db": "app"})
    assert found["tenancy"].startswith("refused unauthenticated")
    done = run_cli("explain-route", "--config", str(path), "--offline", "--user", "bob",
                   '{"find": "orders", "$db": "app"}')
    assert done.returncode == 2 and "'bob' is not a configured proxy user" in done.stderr


def test_post_body_is_read_and_bounded(proxy: ProxyProcess) -> None:
    """A POST body is read before the answer (no connection reset) and bounded."""
    for size in (0, 10, 60_000):
        req = urllib.request.Request(f"{proxy.admin_url}/digest/reset", method="POST",
                                     data=b"x" * size)
        with urllib.request.urlopen(req, timeout=10) as reply:
            assert reply.status == 200 and json.loads(reply.read())["reset"] is True
    req = urllib.request.Request(f"{proxy.admin_url}/digest/reset", method="POST",
                                 headers={"Content-Length": "10000000"}, data=b"")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 413


def test_rule_names_must_be_unique_per_list(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    base: Doc = {"upstream": {"uri": "mongodb://127.0.0.1:1/"},
                 "routing": {"classes": {"a": {}}, "rules": [
                     {"match": {"collection": "x"}, "class": "a", "name": "same"},
                     {"match": {"collection": "y"}, "class": "a", "name": "same"}]}}
    path.write_text(yaml.safe_dump(base))
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert "routing.rules.1.name: name 'same' is already used by rule 0" in done.stderr
    base["routing"]["rules"][1]["name"] = "other"
    base["cache"] = {"redis_url": "redis://127.0.0.1:1", "rules": [
        {"match": {"collection": "x"}, "ttl_s": 1, "name": "same"},
        {"match": {"collection": "y"}, "ttl_s": 1, "name": "same"}]}
    path.write_text(yaml.safe_dump(base))
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert "cache.rules.1.name: name 'same' is already used by rule 0" in done.stderr
    base["cache"]["rules"][1]["name"] = "1 bad"
    path.write_text(yaml.safe_dump(base))
    done = run_cli("check-config", str(path))
    assert done.returncode == 2 and "cache.rules.1.name" in done.stderr
    base["cache"]["rules"][1]["name"] = "other"
    path.write_text(yaml.safe_dump(base))  # routing and cache may share a name
    assert run_cli("check-config", str(path)).returncode == 0


def test_readyz_reuses_its_proof_within_the_interval(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    """Probes within ``ready_probe_interval_ms`` reuse one ping's result: the same round
    trip time, an age that grows; no round trip per probe."""
    proxy = proxy_factory(ferretdb.uri, {"admin": {"ready_probe_interval_ms": 60_000}})
    url = f"{proxy.admin_url}/readyz"
    wait_until(lambda: request(url)[0] == 200, what="/readyz 200")
    first = request(url)[1]["data_path"]
    assert first["ok"] is True and first["proof"] in ("ping", "traffic")
    ages = []
    for _ in range(20):
        status, body = request(url)
        assert status == 200
        assert body["data_path"]["rtt_ms"] == first["rtt_ms"]
        assert body["data_path"]["proof"] == first["proof"]
        ages.append(body["data_path"]["age_ms"])
    assert ages == sorted(ages) and ages[-1] > first["age_ms"]
