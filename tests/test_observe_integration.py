"""Observability end to end: a real proxy (subprocess, real config file) in front of a
real FerretDB, driven by pymongo; the slow log read from its file, ``/metrics``,
``/digest``, ``/readyz`` and ``/healthz`` scraped over real HTTP, ``mongoproxy top`` run
as a command.

What the proxy records is compared with what the driver sent: a pymongo
``CommandListener`` sees every command the driver issues (the handshake/heartbeat
``hello`` commands travel on monitoring connections and are not operations for the
proxy), so "exactly one line per operation" is checked one to one, in order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient
from pymongo.errors import OperationFailure
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from proxy.identity.credentials import hash_password
from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess, RedisProcess
from tests.support.factories import FerretDBFactory, ProxyFactory

Doc = dict[str, Any]
Client = MongoClient[Doc]
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

TIMEOUTS: Doc = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 5_000}

# The routing rules used to produce a rejected command (code 13 Unauthorized).
DENY_ROUTING: Doc = {
    "classes": {"blocked": {"deny": "no"}},
    "rules": [{"match": {"app_name": "blocked-app"}, "class": "blocked"}],
}

# Every slow-log line carries exactly these keys (``command_values`` only with
# ``log_values: true``).
LINE_KEYS = {
    "ts", "duration_ms", "slow", "phases", "command", "ns", "db", "collection",
    "shape_hash", "shape", "tenant", "user", "app_name", "route_class", "route_rule",
    "member", "member_role", "cache", "docs_returned", "reply_bytes", "error_code",
    "connection_id",
}  # fmt: skip
PHASES = {"read", "decode", "policy", "cache", "select", "checkout_wait", "upstream", "write"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SECRET = "s3cr3t-literal-4711"  # a filter value that must never reach the log by default


# -- helpers -------------------------------------------------------------------------


class Recorder(CommandListener):
    """The commands the driver sent (hello/handshake excluded, as the proxy does)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def started(self, event: CommandStartedEvent) -> None:
        if event.command_name.lower() not in ("hello", "ismaster"):
            self.sent.append(event.command_name)

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        pass

    def names(self) -> list[str]:
        return list(self.sent)


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_lines(path: Path) -> list[Doc]:
    """Every line must be one JSON object (well-formed, newline-terminated)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "a slow-log line is not newline-terminated"
    return [json.loads(line) for line in text.splitlines()]


def settled_lines(path: Path, expected: int) -> list[Doc]:
    """The log once it holds ``expected`` lines, after a pause to catch extra ones (the
    proxy writes the line right after the reply, so the client can be ahead of it)."""
    wait_until(lambda: len(read_lines(path)) >= expected, what=f"{expected} slow-log lines")
    time.sleep(0.3)
    return read_lines(path)


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def scrape(proxy: ProxyProcess) -> Samples:
    status, ctype, body = http_get(f"{proxy.admin_url}/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def total(found: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v for (n, lab), v in found.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )  # fmt: skip


def digest(proxy: ProxyProcess, query: str = "") -> Doc:
    status, _, body = http_get(f"{proxy.admin_url}/digest{query}")
    assert status == 200, body
    document: Doc = json.loads(body)
    return document


def obs_proxy(
    proxy_factory: ProxyFactory, upstream_uri: str, log: Path, **extra: Any
) -> ProxyProcess:
    observability: Doc = {"slow_log": str(log), **extra.pop("observability", {})}
    return proxy_factory(upstream_uri, {"observability": observability, **extra})


@pytest.fixture
def client_for() -> Iterator[Callable[..., tuple[Client, Recorder]]]:
    made: list[Client] = []

    def make(proxy: ProxyProcess, appname: str = "obs-test") -> tuple[Client, Recorder]:
        recorder = Recorder()
        client: Client = MongoClient(
            proxy.uri, appname=appname, event_listeners=[recorder], **TIMEOUTS
        )
        made.append(client)
        return client, recorder

    yield make
    for client in made:
        client.close()


def check_line(line: Doc, log_values: bool = False, tenant: str | None = None,
               user: str | None = None, cache: str | None = None) -> None:
    """Well-formed: every field present, with the right types."""
    keys = LINE_KEYS | ({"command_values"} if log_values else set())
    assert set(line) == keys, set(line) ^ keys
    assert TS_RE.match(line["ts"]), line["ts"]
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert isinstance(line["phases"], dict) and set(line["phases"]) <= PHASES
    assert all(isinstance(v, (int, float)) and v >= 0 for v in line["phases"].values())
    # Phases never overlap and add up to (at most) the duration; rounding to 3 decimals.
    assert sum(line["phases"].values()) <= line["duration_ms"] + 0.001 * (
        len(line["phases"]) + 1)
    assert isinstance(line["shape_hash"], str) and re.fullmatch(r"[0-9a-f]{16}",
                                                                line["shape_hash"])
    assert isinstance(line["shape"], dict) and line["shape"]["cmd"] == line["command"]
    assert isinstance(line["reply_bytes"], int) and isinstance(line["connection_id"], int)
    # Null unless the proxy has client users, a tenancy policy or a result cache.
    assert (line["tenant"], line["user"], line["cache"]) == (tenant, user, cache)


# -- slow log ------------------------------------------------------------------------


def test_every_operation_type_logs_one_complete_line_at_threshold_zero(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    """find, insert, aggregate, getMore, a command refused by a routing ``deny`` class
    (code 13) and ``saslStart`` (code 18, the proxy has no client users) each produce
    exactly one well-formed JSON line with every field.

    Without client users, tenancy or a cache, ``tenant``, ``user`` and ``cache`` are
    present and null; the next test covers a cache hit and a bound tenant.
    """
    log = tmp_path / "slow.log"
    proxy = obs_proxy(proxy_factory, ferretdb.uri, log,
                      observability={"slow_query_ms": 0}, routing=DENY_ROUTING)
    client, recorder = client_for(proxy)
    coll = client[db_name]["orders"]
    member = ferretdb.address

    coll.insert_many([{"_id": f"k{i}", "n": i, "status": "open"} for i in range(5)])
    assert len(list(coll.find({"status": "open", "label": SECRET}))) == 0
    assert len(list(coll.find({"status": "open"}, batch_size=2))) == 5  # find + getMores
    assert [d["c"] for d in coll.aggregate([{"$match": {"n": {"$gte": 1}}},
                                            {"$count": "c"}])] == [4]
    with pytest.raises(OperationFailure) as sasl:
        client.admin.command("saslStart", mechanism="PLAIN", payload=b"\0u\0p")
    assert sasl.value.code == 18

    blocked, blocked_rec = client_for(proxy, appname="blocked-app")
    with pytest.raises(OperationFailure) as denied:
        blocked[db_name]["orders"].find_one({"status": "open"})
    assert denied.value.code == 13

    sent = recorder.names() + blocked_rec.names()
    assert sent.count("getMore") >= 1, sent
    lines = settled_lines(log, len(sent))
    # Exactly one line per operation, in order per connection.
    assert [ln["command"] for ln in lines] == sent

    for line in lines:
        check_line(line)
        assert line["slow"] is True  # threshold 0: every operation is "slow"
        assert SECRET not in json.dumps(line)  # values are never logged by default

    by_cmd: dict[str, list[Doc]] = {}
    for line in lines:
        by_cmd.setdefault(line["command"], []).append(line)

    ins = by_cmd["insert"][0]
    assert ins["ns"] == f"{db_name}.orders" and ins["db"] == db_name
    assert ins["collection"] == "orders" and ins["app_name"] == "obs-test"
    assert ins["member"] == member and ins["member_role"] in ("standalone", "mongos")
    assert ins["error_code"] is None and ins["reply_bytes"] > 0
    assert ins["docs_returned"] is None  # an insert returns no documents
    assert {"read", "decode", "policy", "select", "checkout_wait", "upstream",
            "write"} <= set(ins["phases"])
    assert ins["route_class"] == "default" and ins["route_rule"] is None

    secret_find, cursor_find, deny_line = by_cmd["find"]
    assert secret_find["docs_returned"] == 0
    assert secret_find["shape"]["filter"] == {"label": "?str", "status": "?str"}
    assert cursor_find["docs_returned"] == 2  # the first batch
    more = by_cmd["getMore"]
    assert sum(g["docs_returned"] for g in more) == 3
    for g in more:
        assert g["ns"] == f"{db_name}.orders" and g["member"] == member
        assert g["error_code"] is None

    agg = by_cmd["aggregate"][0]
    assert agg["docs_returned"] == 1 and agg["member"] == member
    assert agg["shape"]["pipeline"][0] == {"$match": {"n": {"$gte": "?int"}}}

    sasl_line = by_cmd["saslStart"][0]
    assert sasl_line["error_code"] == 18 and sasl_line["ns"] == "admin"
    assert sasl_line["member"] is None and sasl_line["docs_returned"] is None
    assert "upstream" not in sasl_line["phases"]

    assert deny_line["app_name"] == "blocked-app"
    assert deny_line["error_code"] == 13 and deny_line["member"] is None
    assert {"select", "upstream"}.isdisjoint(deny_line["phases"])
    assert "policy" in deny_line["phases"]


def test_cache_hit_and_tenant_lines(
    ferretdb: FerretDBProcess,
    redis_server: RedisProcess,
    proxy_factory: ProxyFactory,
    db_name: str,
    tmp_path: Path,
) -> None:
    """A proxy user bound to a tenant, a tenancy policy and a result cache: the insert,
    the first find (a miss, answered by FerretDB) and the second (a hit, answered from
    Redis without a member) are one complete line each, with tenant, user and cache."""
    log = tmp_path / "slow.log"
    proxy = obs_proxy(
        proxy_factory, ferretdb.uri, log, observability={"slow_query_ms": 0},
        tenancy={"mode": "enforce", "users": [{
            "username": "acme_app", "tenant": "acme",
            "password_sha256": hash_password("pw", iterations=4096)}]},
        cache={"redis_url": redis_server.url, "timeout_ms": 200,
               "rules": [{"match": {"database": db_name}, "ttl_s": 60}]},
    )
    recorder = Recorder()
    client: Client = MongoClient(proxy.uri, username="acme_app", password="pw",
                                 authMechanism="SCRAM-SHA-256", appname="obs-cache",
                                 event_listeners=[recorder], **TIMEOUTS)
    try:
        coll = client[db_name]["orders"]
        coll.insert_one({"_id": "o1", "tenant_id": "acme", "status": "open"})
        for _ in range(2):
            assert [d["_id"] for d in coll.find({"tenant_id": "acme"})] == ["o1"]
        sent = recorder.names()
    finally:
        client.close()
    lines = [ln for ln in settled_lines(log, len(sent))
             if ln["command"] not in ("saslStart", "saslContinue", "endSessions")]
    assert [ln["command"] for ln in lines] == ["insert", "find", "find"], sent
    insert, miss, hit = lines
    check_line(insert, tenant="acme", user="acme_app")
    check_line(miss, tenant="acme", user="acme_app", cache="miss")
    check_line(hit, tenant="acme", user="acme_app", cache="hit")
    assert miss["member"] == ferretdb.address and "upstream" in miss["phases"]
    assert hit["member"] is None and hit["docs_returned"] == 1
    assert {"select", "checkout_wait", "upstream"}.isdisjoint(hit["phases"])
    assert "cache" in hit["phases"] and hit["shape_hash"] == miss["shape_hash"]
    assert hit["reply_bytes"] > 0  # cluster-time fields removed: not always the same size


def test_rejected_command_line_names_the_class_and_rule_that_refused_it(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    """A command refused by a ``deny`` class was classified: its line must say which
    class and rule refused it (operators grep the slow log for exactly that)."""
    log = tmp_path / "slow.log"
    proxy = obs_proxy(proxy_factory, ferretdb.uri, log,
                      observability={"slow_query_ms": 0}, routing=DENY_ROUTING)
    blocked, _ = client_for(proxy, appname="blocked-app")
    with pytest.raises(OperationFailure) as denied:
        blocked[db_name]["orders"].find_one({"status": "open"})
    assert denied.value.code == 13
    (line,) = settled_lines(log, 1)
    assert line["error_code"] == 13
    assert (line["route_class"], line["route_rule"]) == ("blocked", 0), line


def test_values_logged_only_with_log_values(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    log = tmp_path / "slow.log"
    proxy = obs_proxy(proxy_factory, ferretdb.uri, log,
                      observability={"slow_query_ms": 0, "log_values": True})
    client, recorder = client_for(proxy)
    client[db_name]["orders"].find_one({"label": SECRET})
    (line,) = settled_lines(log, len(recorder.sent))
    check_line(line, log_values=True)
    assert line["command_values"]["filter"] == {"label": SECRET}
    assert line["shape"]["filter"] == {"label": "?str"}  # the shape still has none
    # ... and the digest's example carries the command as well.
    (row,) = digest(proxy)["top"]
    assert row["last_example"]["command"]["filter"] == {"label": SECRET}


def test_default_threshold_logs_no_fast_operation(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    with MongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS) as direct:
        direct[db_name]["orders"].insert_many([{"_id": f"k{i}", "n": i} for i in range(20)])
    log = tmp_path / "slow.log"
    proxy = obs_proxy(proxy_factory, ferretdb.uri, log)  # slow_query_ms: 100 (default)
    client, recorder = client_for(proxy)
    coll = client[db_name]["orders"]
    for i in range(20):
        assert coll.find_one({"_id": f"k{i}"}) is not None
    coll.insert_one({"n": -1})
    n_ops = len(recorder.sent)
    wait_until(lambda: total(scrape(proxy), "mongoproxy_operation_duration_seconds_count")
               == n_ops, what="all operations counted")
    found = scrape(proxy)
    fast = total(found, "mongoproxy_operation_duration_seconds_bucket", le="0.1")
    slow = total(found, "mongoproxy_slow_operations_total")
    lines = read_lines(log)
    # Operations under 100 ms write nothing; only a genuinely slow one (a loaded
    # machine) may appear, and then it is counted as slow in the metrics too.
    assert len(lines) == slow == n_ops - fast
    assert all(ln["duration_ms"] >= 100 and ln["slow"] for ln in lines)
    assert fast >= n_ops - 2, "the machine is too loaded for this test to mean anything"


# -- /metrics --------------------------------------------------------------------------


def test_metrics_match_a_known_workload(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    with MongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS) as direct:
        direct[db_name]["items"].insert_many([{"_id": f"k{i}", "n": i} for i in range(10)])
    log = tmp_path / "slow.log"
    proxy = obs_proxy(proxy_factory, ferretdb.uri, log, observability={"slow_query_ms": 0})
    client, recorder = client_for(proxy)
    coll = client[db_name]["items"]
    for i in range(7):
        assert coll.find_one({"_id": f"k{i}"}) is not None
    for i in range(3):
        coll.insert_one({"_id": f"new{i}"})
    with pytest.raises(OperationFailure) as failed:
        coll.find_one({"n": {"$bogusOperator": 1}})
    code = failed.value.code
    assert code is not None and code != 0
    assert recorder.names() == ["find"] * 7 + ["insert"] * 3 + ["find"]

    wait_until(lambda: total(scrape(proxy), "mongoproxy_operation_duration_seconds_count")
               == 11, what="11 operations counted")
    found = scrape(proxy)
    hist = "mongoproxy_operation_duration_seconds"
    assert total(found, "mongoproxy_operations_total", command="find", error_code="0") == 7
    assert total(found, "mongoproxy_operations_total", command="find",
                 error_code=str(code)) == 1
    assert total(found, "mongoproxy_operations_total", command="insert", error_code="0") == 3
    assert total(found, "mongoproxy_operations_total") == 11
    assert total(found, f"{hist}_count", command="find") == 8
    assert total(found, f"{hist}_count", command="insert") == 3
    assert total(found, f"{hist}_bucket", le="+Inf") == 11
    labels = {dict(lab)["member_role"] for (n, lab) in found if n == f"{hist}_count"}
    assert labels <= {"standalone", "mongos"}, labels
    assert {dict(lab)["cache"] for (n, lab) in found if n == f"{hist}_count"} == {"none"}
    # Every operation was logged (threshold 0) and counted as slow.
    assert total(found, "mongoproxy_slow_operations_total") == 11
    # The histogram's total time is the sum of the logged durations (rounded to µs),
    # and of the digest's totals.
    lines = settled_lines(log, 11)
    assert len(lines) == 11
    seconds = total(found, f"{hist}_sum")
    assert seconds == pytest.approx(sum(ln["duration_ms"] for ln in lines) / 1000,
                                    abs=11 * 1e-6)
    rows = digest(proxy)["top"]
    assert seconds == pytest.approx(sum(r["total_ms"] for r in rows) / 1000,
                                    abs=len(rows) * 1e-6)
    assert sum(r["count"] for r in rows) == 11

    # Pool gauges for the upstream member; the checkout wait of every forwarded op.
    member = ferretdb.address
    for name in ("pool_connections", "pool_in_use", "pool_idle", "pool_waiting",
                 "pool_max_size"):
        assert (f"mongoproxy_{name}", (("member", member),)) in found, name
    assert found[("mongoproxy_pool_max_size", (("member", member),))] == 100
    assert found[("mongoproxy_pool_in_use", (("member", member),))] == 0
    assert found[("mongoproxy_pool_connections", (("member", member),))] >= 1
    assert total(found, "mongoproxy_pool_wait_seconds_count", member=member) == 11
    assert found[("mongoproxy_primary_available", ())] == 1
    assert total(found, "mongoproxy_member_up", member=member) == 1
    assert ("process_cpu_seconds_total", ()) in found


def test_client_connections_gauge(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = obs_proxy(proxy_factory, ferretdb.uri, tmp_path / "slow.log")

    def gauge() -> float:
        return scrape(proxy)[("mongoproxy_client_connections", ())]

    def healthz() -> int:
        status, _, body = http_get(f"{proxy.admin_url}/healthz")
        assert status == 200
        count: int = json.loads(body)["client_connections"]
        return count

    # The fixture's readiness probe (connect, close) is counted until the proxy has seen
    # its close: wait for that rather than race it.
    wait_until(lambda: gauge() == 0, what="the readiness probe's connection to close")
    assert healthz() == 0
    opened_before = scrape(proxy)[("mongoproxy_client_connections_opened_total", ())]
    socks = [socket.create_connection((proxy.host, proxy.port), timeout=5) for _ in range(3)]
    try:
        wait_until(lambda: gauge() == 3, what="3 client connections")
        assert healthz() == 3
        found = scrape(proxy)
        assert found[("mongoproxy_client_connections_opened_total", ())] == opened_before + 3
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: gauge() == 0, what="the gauge back to 0")
    assert healthz() == 0


# -- /digest and mongoproxy top ----------------------------------------------------------


def test_digest_and_top_after_a_known_workload(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    client_for: Callable[..., tuple[Client, Recorder]],
    db_name: str,
    tmp_path: Path,
) -> None:
    with MongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS) as direct:
        direct[db_name]["tickets"].insert_many(
            [{"_id": f"k{i}", "tenant_id": f"t{i % 2}", "status": "open", "n": i}
             for i in range(10)])
    proxy = obs_proxy(proxy_factory, ferretdb.uri, tmp_path / "slow.log")
    client, recorder = client_for(proxy)
    coll = client[db_name]["tickets"]
    # Shape A (3 times): same fields, different values, different field order.
    list(coll.find({"tenant_id": "t0", "status": "open"}))
    list(coll.find({"tenant_id": "t1", "status": "closed"}))
    list(coll.find({"status": "x", "tenant_id": "t9"}))
    # Shape B (once): a different field.
    list(coll.find({"n": 3}))
    assert recorder.names() == ["find"] * 4

    wait_until(lambda: digest(proxy)["operations"] == 4, what="4 operations in the digest")
    document = digest(proxy, "?order=count")
    assert document["shapes"] == 2 and document["evicted"] == 0
    first, second = document["top"]
    assert (first["count"], second["count"]) == (3, 1)
    assert first["namespace"] == second["namespace"] == f"{db_name}.tickets"
    # The shape is a JSON object (not JSON text inside a string).
    assert first["shape"]["filter"] == {"status": "?str", "tenant_id": "?str"}
    assert second["shape"]["filter"] == {"n": "?int"}
    assert first["docs_returned"] == 5 + 0 + 0 and second["docs_returned"] == 1
    assert first["errors"] == second["errors"] == 0
    assert first["cache_hit_ratio"] is None  # no cache yet
    for row in (first, second):
        assert row["total_ms"] >= row["max_ms"] >= row["avg_ms"] > 0
        assert "t0" not in json.dumps(row)  # no values without log_values

    by_time = digest(proxy)["top"]  # default order: total time, descending
    assert by_time[0]["total_ms"] >= by_time[1]["total_ms"]
    assert {r["shape_hash"] for r in by_time} == {first["shape_hash"], second["shape_hash"]}
    limited = digest(proxy, "?limit=1")
    assert len(limited["top"]) == 1 and limited["top"][0] == by_time[0]
    assert limited["shapes"] == 2
    status, _, _ = http_get(f"{proxy.admin_url}/digest?limit=-1")
    assert status == 400

    env = {**os.environ, "COLUMNS": "400"}
    top = subprocess.run(
        [sys.executable, "-m", "proxy", "top", "--admin", proxy.admin_url, "--once"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False, env=env,
    )
    assert top.returncode == 0, top.stderr
    out = top.stdout
    assert "HASH" in out and "SHAPE" in out and "shapes 2/1000" in out
    for row in (first, second):
        line = next(ln for ln in out.splitlines() if ln.startswith(row["shape_hash"]))
        assert f"{db_name}.tickets"[:23] in line
        assert json.dumps(row["shape"], separators=(",", ":")) in line
        assert str(row["count"]) in line.split()


# -- /readyz -----------------------------------------------------------------------------


def test_readyz_follows_the_upstream(
    ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = ferretdb_factory()
    proxy = obs_proxy(proxy_factory, upstream.uri, tmp_path / "slow.log",
                      upstream={"uri": upstream.uri, "heartbeat_ms": 500})
    url = f"{proxy.admin_url}/readyz"
    wait_until(lambda: http_get(url)[0] == 200, what="/readyz 200")
    status, ctype, body = http_get(url)
    assert ctype.startswith("application/json")
    assert json.loads(body)["ready"] is True and json.loads(body)["primary"] == "yes"

    upstream.stop()
    stopped = time.monotonic()
    wait_until(lambda: http_get(url)[0] == 503, timeout=5.0, what="/readyz 503")
    assert time.monotonic() - stopped < 5.0  # within a few heartbeats of 500 ms
    # The data-path probe may see it first (connection refused); the monitor follows.
    wait_until(lambda: json.loads(http_get(url)[2])["primary"] == "no", timeout=5.0,
               what="the monitor to lose the primary")
    status, _, body = http_get(url)
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False and answer["primary"] == "no"
    # The process itself is still up.
    assert http_get(f"{proxy.admin_url}/healthz")[0] == 200
