"""Prometheus metrics: a known list of records, then the exposition parsed back."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.hello import Hello
from pymongo.server_description import ServerDescription
from pymongo.topology_description import TOPOLOGY_TYPE, TopologyDescription

from proxy.observe.config import ObservabilityConfig
from proxy.observe.metrics import LATENCY_BUCKETS, Metrics, topology_facts
from proxy.observe.record import OperationRecord

Labels = tuple[tuple[str, str], ...]


def samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Mapping[tuple[str, Labels], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def op(command: str, ms: float, **fields: Any) -> OperationRecord:
    return OperationRecord(start_time=0.0, duration_ms=ms, command=command, **fields)


WORKLOAD = [
    op("find", 0.5, route_class="oltp", member="a:1", member_role="primary", cache="miss",
       phases_ns={"checkout_wait": 20_000}),
    op("find", 1.5, route_class="oltp", member="a:1", member_role="primary", cache="miss",
       phases_ns={"checkout_wait": 30_000}),
    op("find", 0.2, route_class="oltp", cache="hit"),
    op("find", 120.0, route_class="report", member="b:2", member_role="secondary",
       cache="bypass:txn"),
    op("insert", 3.0, member="a:1", member_role="primary"),
    op("insert", 2.0, member="a:1", member_role="primary", error_code=11000),
    op("aggregate", 2500.0, route_class="report", member="b:2", member_role="secondary",
       error_code=50),
    op("frobnicate", 0.1, error_code=59),
]


def test_operation_counts_and_histogram_sums_exact() -> None:
    metrics = Metrics(ObservabilityConfig())
    for record in WORKLOAD:
        metrics.observe(record)
    found = samples(metrics)
    hist = "mongoproxy_operation_duration_seconds"
    key = {"command": "find", "route_class": "oltp", "member_role": "primary", "cache": "miss"}
    assert value(found, hist + "_count", **key) == 2
    assert value(found, hist + "_sum", **key) == pytest.approx(0.002, abs=1e-12)
    assert value(found, hist + "_bucket", le="0.0005", **key) == 1
    assert value(found, hist + "_bucket", le="0.001", **key) == 1
    assert value(found, hist + "_bucket", le="0.0025", **key) == 2
    assert value(found, hist + "_bucket", le="+Inf", **key) == 2
    hit = {"command": "find", "route_class": "oltp", "member_role": "", "cache": "hit"}
    assert value(found, hist + "_count", **hit) == 1
    slow = {"command": "aggregate", "route_class": "report", "member_role": "secondary",
            "cache": "none"}
    assert value(found, hist + "_sum", **slow) == pytest.approx(2.5)
    assert value(found, hist + "_bucket", le="2.5", **slow) == 1
    assert value(found, hist + "_bucket", le="1.0", **slow) == 0
    total_count = sum(v for (n, _), v in found.items() if n == hist + "_count")
    total_sum = sum(v for (n, _), v in found.items() if n == hist + "_sum")
    assert total_count == len(WORKLOAD)
    assert total_sum == pytest.approx(sum(r.duration_ms for r in WORKLOAD) / 1000)

    ops = "mongoproxy_operations_total"
    assert value(found, ops, command="find", error_code="0") == 4
    assert value(found, ops, command="insert", error_code="0") == 1
    assert value(found, ops, command="insert", error_code="11000") == 1
    assert value(found, ops, command="aggregate", error_code="50") == 1
    assert value(found, ops, command="other", error_code="59") == 1  # unknown name bounded
    assert sum(v for (n, _), v in found.items() if n == ops) == len(WORKLOAD)

    assert value(found, "mongoproxy_slow_operations_total", command="find") == 1
    assert value(found, "mongoproxy_slow_operations_total", command="aggregate") == 1

    cache = "mongoproxy_cache_operations_total"
    assert value(found, cache, result="miss", reason="") == 2
    assert value(found, cache, result="hit", reason="") == 1
    assert value(found, cache, result="bypass", reason="txn") == 1

    wait = "mongoproxy_pool_wait_seconds"
    assert value(found, wait + "_count", member="a:1") == 2
    assert value(found, wait + "_sum", member="a:1") == pytest.approx(0.00005)


def test_buckets_span_100us_to_10s() -> None:
    assert LATENCY_BUCKETS[0] == 0.0001 and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_events_and_callbacks() -> None:
    pools = {"a:1": {"size": 10, "in_use": 9, "idle": 1, "waiting": 2}}
    members = {"a:1": {"up": True, "role": "primary", "writable": True, "rtt_s": 0.001},
               "b:2": {"up": False, "role": "unknown", "lag_s": None},
               "c:3": {"up": True, "role": "secondary", "lag_s": 4.0}}
    metrics = Metrics(ObservabilityConfig(tenant_labels=("acme",)),
                      pool_stats=lambda: pools, pool_max_size=10, topology=lambda: members)
    metrics.client_connected()
    metrics.client_connected()
    metrics.client_disconnected()
    metrics.tenancy_violation("orders", "missing_tenant_filter", tenant="acme")
    metrics.tenancy_violation("orders", "missing_tenant_filter", tenant="globex", mode="audit")
    metrics.config_reloaded(True)
    metrics.config_reloaded(False)
    metrics.observe(op("find", 1.0, tenant="acme"))
    metrics.observe(op("find", 1.0, tenant="globex"))
    metrics.observe(op("find", 1.0, tenant="initech"))
    found = samples(metrics)
    assert value(found, "mongoproxy_client_connections") == 1
    assert value(found, "mongoproxy_client_connections_opened_total") == 2
    tv = "mongoproxy_tenancy_violations_total"
    assert value(found, tv, collection="orders", reason="missing_tenant_filter",
                 mode="enforce", tenant="acme") == 1
    assert value(found, tv, collection="orders", reason="missing_tenant_filter",
                 mode="audit", tenant="") == 1  # unlisted tenant: no label value
    assert value(found, "mongoproxy_config_reloads_total", result="ok") == 1
    assert value(found, "mongoproxy_config_reloads_total", result="failed") == 1
    assert value(found, "mongoproxy_config_last_reload_successful") == 0
    assert value(found, "mongoproxy_tenant_operations_total", tenant="acme") == 1
    assert value(found, "mongoproxy_tenant_operations_total", tenant="_other") == 2
    assert value(found, "mongoproxy_pool_in_use", member="a:1") == 9
    assert value(found, "mongoproxy_pool_connections", member="a:1") == 10
    assert value(found, "mongoproxy_pool_waiting", member="a:1") == 2
    assert value(found, "mongoproxy_pool_max_size", member="a:1") == 10
    assert value(found, "mongoproxy_member_up", member="a:1", role="primary") == 1
    assert value(found, "mongoproxy_member_up", member="b:2", role="unknown") == 0
    assert value(found, "mongoproxy_member_replication_lag_seconds", member="c:3") == 4
    assert value(found, "mongoproxy_member_rtt_seconds", member="a:1") == 0.001
    assert value(found, "mongoproxy_primary_available") == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in found)
    members["a:1"]["up"] = False
    assert value(samples(metrics), "mongoproxy_primary_available") == 0


def test_label_cardinality_is_bounded() -> None:
    metrics = Metrics(ObservabilityConfig(), label_limit=5, process=False)
    for i in range(50):
        metrics.observe(op(f"cmd{i}", 1.0, route_class=f"class{i}", error_code=i))
        metrics.tenancy_violation(f"coll{i}", "r")
    found = samples(metrics)
    classes = {dict(labels)["route_class"] for name, labels in found
               if name == "mongoproxy_operation_duration_seconds_count"}
    assert classes == {"class0", "class1", "class2", "class3", "class4", "other"}
    commands = {dict(labels)["command"] for name, labels in found
                if name == "mongoproxy_operations_total"}
    assert commands == {"other"}
    collections = {dict(labels)["collection"] for name, labels in found
                   if name == "mongoproxy_tenancy_violations_total"}
    assert len(collections) == 6
    assert len(metrics._op_children) <= 50  # keyed after bounding the command name


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe(op("find", 1.0))
    assert value(samples(a), "mongoproxy_operations_total", command="find", error_code="0") == 1
    assert value(samples(b), "mongoproxy_operations_total", command="find", error_code="0") == 0


def test_topology_facts_from_pymongo_description() -> None:
    now = datetime.datetime(2024, 1, 1)  # BSON dates decode naive
    primary = ServerDescription(("a", 1), Hello({
        "ok": 1, "isWritablePrimary": True, "setName": "rs", "hosts": ["a:1", "b:2"],
        "maxWireVersion": 21, "lastWrite": {"lastWriteDate": now}}), round_trip_time=0.002)
    secondary = ServerDescription(("b", 2), Hello({
        "ok": 1, "secondary": True, "setName": "rs", "hosts": ["a:1", "b:2"],
        "maxWireVersion": 21,
        "lastWrite": {"lastWriteDate": now - datetime.timedelta(seconds=3)}}))
    description = TopologyDescription(
        TOPOLOGY_TYPE.ReplicaSetWithPrimary,
        {("a", 1): primary, ("b", 2): secondary}, "rs", None, None, None)
    facts = topology_facts(description)
    assert facts["a:1"]["role"] == "primary" and facts["a:1"]["writable"]
    assert facts["b:2"]["role"] == "secondary" and facts["b:2"]["up"]
    assert facts["b:2"]["lag_s"] == pytest.approx(3.0)
    assert facts["a:1"]["rtt_s"] == 0.002


async def test_metrics_and_digest_over_real_http() -> None:
    import asyncio
    import json
    import urllib.request

    from proxy.admin.http import AdminServer
    from proxy.observe.endpoints import ReadinessFacts
    from proxy.observe.hub import Observer

    observer = Observer(ObservabilityConfig(slow_query_ms=10_000), process=False)
    for record in WORKLOAD:
        observer.finish(record)
    server = AdminServer(observer.routes(lambda: ReadinessFacts(primary=False)))
    await server.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read()

    try:
        status, ctype, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        found: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        counts = sum(v for (n, _), v in found.items()
                     if n == "mongoproxy_operation_duration_seconds_count")
        sums = sum(v for (n, _), v in found.items()
                   if n == "mongoproxy_operation_duration_seconds_sum")
        assert counts == len(WORKLOAD)
        assert sums == pytest.approx(sum(r.duration_ms for r in WORKLOAD) / 1000)
        status, _, body = await asyncio.to_thread(get, "/digest?limit=2")
        digest = json.loads(body)
        assert status == 200 and digest["operations"] == len(WORKLOAD)
        assert [r["command"] for r in digest["top"]] == ["aggregate", "find"]
        status, _, body = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and json.loads(body)["primary"] == "no"
    finally:
        await server.close()
        observer.close()
