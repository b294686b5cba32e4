"""Prometheus metrics, on a registry of their own (tests can run several proxies).

Metric names (all prefixed ``mongoproxy_``), the alert rules in
``config/prometheus/alerts.yml`` and the dashboard ``config/grafana/mongoproxy.json``
use exactly these:

==========================================  ==========  ===================================
name                                        type        labels
==========================================  ==========  ===================================
operation_duration_seconds                  histogram   command, route_class, member_role,
                                                        cache (hit/miss/bypass/none)
operations_total                            counter     command, error_code ("0" when ok)
slow_operations_total                       counter     command (duration >= slow_query_ms)
tenant_operations_total                     counter     tenant (listed tenants, else _other)
client_connections                          gauge       -
client_connections_opened_total             counter     -
pool_connections / pool_in_use /            gauge       member (from the pools' stats())
pool_idle / pool_waiting / pool_max_size
pool_wait_seconds                           histogram   member (checkout_wait phase)
member_up                                   gauge       member, role
member_rtt_seconds                          gauge       member
member_replication_lag_seconds              gauge       member (secondaries, when known)
primary_available                           gauge       -
tenancy_violations_total                    counter     collection, reason, mode
                                                        (enforce/audit), tenant
cache_operations_total                      counter     result (hit/miss/bypass), reason
config_reloads_total                        counter     result (ok/failed)
config_last_reload_successful               gauge       -
build_info                                  gauge       version, python (always 1)
process_* (ProcessCollector)
==========================================  ==========  ===================================

**Bounded label cardinality.** No label ever takes a per-tenant, per-shape, per-user or
per-connection value unless an operator opts in: ``tenant`` values are only the tenants
listed in ``observability.tenant_labels`` (others become ``_other``, or ``""`` on the
violation counter). ``command`` is one of the commands MongoDB defines (a client can
send any name; unknown names become ``other``). Every other free-form label
(``route_class``, ``member``, ``member_role``, ``collection``, ``reason``,
``error_code``) admits at most ``label_limit`` (default 100) distinct values per metric
family; later values become ``other``. With the defaults the op histogram is therefore
bounded by ~60 commands x classes x ~4 roles x 4 cache results.

Cost: :meth:`Metrics.observe` resolves label children through a dict keyed by the
label tuple, then one histogram observe and one counter inc on the lock-free families
of :mod:`proxy.observe.families` (the per-operation ones; the rest are prometheus-client's).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.observe.config import ObservabilityConfig
from proxy.observe.families import LoopCounter, LoopHistogram
from proxy.observe.record import OperationRecord

__all__ = [
    "CONTENT_TYPE",
    "KNOWN_COMMANDS",
    "LATENCY_BUCKETS",
    "MemberState",
    "Metrics",
    "topology_facts",
]

try:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # prometheus-client < 0.22: the latest was 0.0.4
    from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

# 0.1 ms .. 10 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

KNOWN_COMMANDS = frozenset({
    "abortTransaction", "aggregate", "authenticate", "buildInfo", "bulkWrite", "collMod",
    "collStats", "commitTransaction", "connectionStatus", "count", "create",
    "createIndexes", "createUser", "currentOp", "dbStats", "delete", "distinct", "drop",
    "dropDatabase", "dropIndexes", "endSessions", "explain", "find", "findAndModify",
    "findandmodify", "getCmdLineOpts", "getLog", "getMore", "getParameter", "hello",
    "hostInfo", "insert", "isMaster", "ismaster", "killAllSessions", "killCursors",
    "killOp", "killSessions", "listCollections", "listDatabases", "listIndexes",
    "listSearchIndexes", "logout", "mapReduce", "ping", "refreshSessions",
    "renameCollection", "saslContinue", "saslStart", "serverStatus", "setParameter",
    "startSession", "update", "validate", "whatsmyuri", "shardCollection",
    "createSearchIndexes", "dropSearchIndexes", "updateSearchIndex", "usersInfo",
    "rolesInfo", "dropUser", "updateUser", "getLastError", "replSetGetStatus",
})

OTHER = "other"


class _Bounded:
    """Admits at most ``limit`` distinct label values; later ones map to ``other``."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


# What the topology callback returns per member ("host:port"): up (bool), role (str),
# and optionally rtt_s and lag_s (floats or None).
MemberState = Mapping[str, Any]

_ROLES = {
    "RSPrimary": "primary",
    "RSSecondary": "secondary",
    "RSArbiter": "arbiter",
    "RSOther": "other",
    "RSGhost": "ghost",
    "Standalone": "standalone",
    "Mongos": "mongos",
    "LoadBalancer": "loadbalancer",
    "Unknown": "unknown",
}


def topology_facts(description: Any) -> dict[str, dict[str, Any]]:
    """Member states from a pymongo ``TopologyDescription``, for ``Metrics(topology=)``.

    Replication lag of a secondary is the primary's ``lastWrite`` minus its own (only
    known in discovery mode against a replica set).
    """
    servers = list(description.server_descriptions().values())
    primary_write: float | None = None  # pymongo keeps lastWrite as epoch seconds
    for sd in servers:
        if sd.server_type_name == "RSPrimary":
            primary_write = sd.last_write_date
    facts: dict[str, dict[str, Any]] = {}
    for sd in servers:
        host, port = sd.address
        role = _ROLES.get(sd.server_type_name, "unknown")
        lag: float | None = None
        if role == "secondary" and primary_write is not None and sd.last_write_date:
            lag = max(0.0, float(primary_write - sd.last_write_date))
        rtt = sd.round_trip_time
        facts[f"{host}:{port or 27017}"] = {
            "up": bool(sd.is_server_type_known),
            "role": role,
            "writable": bool(sd.is_writable),
            "rtt_s": rtt,
            "lag_s": lag,
        }
    return facts


class _CallbackCollector(Collector):
    """Gauges read at scrape time from the pools and the topology."""

    def __init__(
        self,
        pool_stats: Callable[[], Mapping[str, Mapping[str, int]]] | None,
        pool_max_size: int | None,
        topology: Callable[[], Mapping[str, MemberState]] | None,
        member_label: _Bounded,
    ) -> None:
        self.pool_stats = pool_stats
        self.pool_max_size = pool_max_size
        self.topology = topology
        self.member_label = member_label

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only; names checked by the tests

    def collect(self) -> Iterable[Metric]:
        yield from self._pools()
        yield from self._topology()

    def _pools(self) -> Iterable[Metric]:
        if self.pool_stats is None:
            return
        families = {
            "size": GaugeMetricFamily("mongoproxy_pool_connections",
                                      "Upstream connections open or opening", labels=["member"]),
            "in_use": GaugeMetricFamily("mongoproxy_pool_in_use",
                                        "Upstream connections checked out", labels=["member"]),
            "idle": GaugeMetricFamily("mongoproxy_pool_idle",
                                      "Idle upstream connections", labels=["member"]),
            "waiting": GaugeMetricFamily("mongoproxy_pool_waiting",
                                         "Requests waiting for a connection", labels=["member"]),
            "max_size": GaugeMetricFamily("mongoproxy_pool_max_size",
                                          "Pool size limit", labels=["member"]),
        }
        for member, stats in self.pool_stats().items():
            label = [self.member_label(member)]
            for key, family in families.items():
                value = stats.get(key, self.pool_max_size if key == "max_size" else None)
                if value is not None:
                    family.add_metric(label, float(value))
        yield from families.values()

    def _topology(self) -> Iterable[Metric]:
        if self.topology is None:
            return
        up = GaugeMetricFamily("mongoproxy_member_up", "1 if the member answers its health "
                               "checks, by its current role", labels=["member", "role"])
        rtt = GaugeMetricFamily("mongoproxy_member_rtt_seconds",
                                "Moving average of the health-check round trip",
                                labels=["member"])
        lag = GaugeMetricFamily("mongoproxy_member_replication_lag_seconds",
                                "Replication lag behind the primary, when known",
                                labels=["member"])
        primary = 0.0
        for member, state in self.topology().items():
            label = self.member_label(member)
            up.add_metric([label, str(state.get("role", "unknown"))],
                          1.0 if state.get("up") else 0.0)
            if state.get("rtt_s") is not None:
                rtt.add_metric([label], float(state["rtt_s"]))
            if state.get("lag_s") is not None:
                lag.add_metric([label], float(state["lag_s"]))
            if state.get("up") and (state.get("writable") or state.get("role") == "primary"):
                primary = 1.0
        yield up
        yield rtt
        yield lag
        yield GaugeMetricFamily("mongoproxy_primary_available",
                                "1 if a usable (writable) member is up", value=primary)


class Metrics:
    """All proxy metrics; ``observe(op)`` is the per-operation entry point."""

    def __init__(
        self,
        config: ObservabilityConfig | None = None,
        *,
        pool_stats: Callable[[], Mapping[str, Mapping[str, int]]] | None = None,
        pool_max_size: int | None = None,
        topology: Callable[[], Mapping[str, MemberState]] | None = None,
        process: bool = True,
        label_limit: int = 100,
    ) -> None:
        self.config = config if config is not None else ObservabilityConfig()
        self.slow_ms = self.config.slow_query_ms
        self.tenants = frozenset(self.config.tenant_labels)
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # Updated once or more per operation: lock-free families (see families.py).
        self.op_duration = LoopHistogram(
            "mongoproxy_operation_duration_seconds",
            "Operation latency from first byte read to reply written",
            ["command", "route_class", "member_role", "cache"], r, LATENCY_BUCKETS,
        )
        self.ops = LoopCounter("mongoproxy_operations", "Operations by command and error "
                               "code (0 = ok)", ["command", "error_code"], r)
        self.slow_ops = LoopCounter("mongoproxy_slow_operations", "Operations at least "
                                    "slow_query_ms long", ["command"], r)
        self.tenant_ops = LoopCounter("mongoproxy_tenant_operations", "Operations of the "
                                      "tenants listed in tenant_labels (others: _other)",
                                      ["tenant"], r)
        self.client_connections = Gauge("mongoproxy_client_connections",
                                        "Open client connections", registry=r)
        self.client_connections_opened = Counter("mongoproxy_client_connections_opened",
                                                 "Client connections accepted", registry=r)
        self.pool_wait = LoopHistogram("mongoproxy_pool_wait_seconds", "Time waiting for "
                                       "a pooled upstream connection", ["member"], r,
                                       LATENCY_BUCKETS)
        self.tenancy = Counter("mongoproxy_tenancy_violations", "Commands violating tenant "
                               "isolation (mode=enforce: rejected; audit: logged)",
                               ["collection", "reason", "mode", "tenant"], registry=r)
        self.cache_ops = LoopCounter("mongoproxy_cache_operations", "Result-cache lookups "
                                     "by result (hit/miss/bypass) and bypass reason",
                                     ["result", "reason"], r)
        self.reloads = Counter("mongoproxy_config_reloads", "Configuration reloads",
                               ["result"], registry=r)
        self.reload_ok = Gauge("mongoproxy_config_last_reload_successful",
                               "1 if the last configuration reload succeeded", registry=r)
        self.reload_ok.set(1)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        # Which build is running, joinable onto any other series (the `_info` idiom).
        Gauge("mongoproxy_build_info", "The running mongoproxy version (always 1)",
              ["version", "python"], registry=r).labels(
            __version__, platform.python_version()).set(1)
        if process:
            ProcessCollector(registry=r)
        self._member = _Bounded(label_limit)
        r.register(_CallbackCollector(pool_stats, pool_max_size, topology, self._member))
        self._limits: dict[str, _Bounded] = {
            name: _Bounded(label_limit)
            for name in ("route_class", "member_role", "error_code", "collection", "reason",
                         "pool_member", "cache_reason")
        }
        self._op_children: dict[tuple[Any, ...], Any] = {}
        self._count_children: dict[tuple[Any, ...], Any] = {}
        self._wait_children: dict[str | None, Any] = {}
        self._cache_children: dict[str, Any] = {}
        self._slow_children: dict[str, Any] = {}
        self._tenant_children: dict[str, Any] = {}

    # -- per operation -------------------------------------------------------------------

    def observe(self, op: OperationRecord) -> None:
        command = op.command
        if command not in KNOWN_COMMANDS:  # before any dict key: clients choose names
            command = OTHER
        cache = op.cache
        key = (command, op.route_class, op.member_role, cache)
        child = self._op_children.get(key)
        if child is None:
            child = self._op_child(key)
        seconds = op.duration_ms / 1000
        child.observe(seconds)
        ckey = (command, op.error_code)
        counter = self._count_children.get(ckey)
        if counter is None:
            counter = self._count_children[ckey] = self.ops.labels(
                command, self._limits["error_code"](str(op.error_code or 0)))
        counter.inc()
        if op.duration_ms >= self.slow_ms:
            slow = self._slow_children.get(command)
            if slow is None:
                slow = self._slow_children[command] = self.slow_ops.labels(command)
            slow.inc()
        if cache is not None:
            hit = self._cache_children.get(cache)
            if hit is None:
                hit = self._cache_child(cache)
            hit.inc()
        wait = op.phases_ns.get("checkout_wait")
        if wait is not None:
            pool = self._wait_children.get(op.member)
            if pool is None:
                pool = self._wait_children[op.member] = self.pool_wait.labels(
                    self._limits["pool_member"](op.member or "unknown"))
            pool.observe(wait / 1e9)
        if self.tenants and op.tenant is not None:
            name = op.tenant if op.tenant in self.tenants else "_other"
            tenant = self._tenant_children.get(name)
            if tenant is None:
                tenant = self._tenant_children[name] = self.tenant_ops.labels(name)
            tenant.inc()

    def _op_child(self, key: tuple[Any, ...]) -> Any:
        command, route_class, role, cache = key
        child = self.op_duration.labels(
            command,
            self._limits["route_class"](route_class or ""),
            self._limits["member_role"](role or ""),
            _cache_result(cache),
        )
        self._op_children[key] = child
        return child

    def _cache_child(self, cache: str) -> Any:
        result = _cache_result(cache)
        reason = cache.partition(":")[2] if result == "bypass" else ""
        child = self.cache_ops.labels(result, self._limits["cache_reason"](reason))
        self._cache_children[cache] = child
        return child

    # -- events --------------------------------------------------------------------------

    def client_connected(self) -> None:
        self.client_connections.inc()
        self.client_connections_opened.inc()

    def client_disconnected(self) -> None:
        self.client_connections.dec()

    def tenancy_violation(
        self, collection: str, reason: str, *, mode: str = "enforce", tenant: str | None = None
    ) -> None:
        """A command broke tenant isolation: rejected (enforce) or only logged (audit)."""
        self.tenancy.labels(
            self._limits["collection"](collection),
            self._limits["reason"](reason),
            "audit" if mode == "audit" else "enforce",
            tenant if tenant is not None and tenant in self.tenants else "",
        ).inc()

    def config_reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        self.reload_ok.set(1 if ok else 0)

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (0.0.4), as served at ``/metrics``."""
        return generate_latest(self.registry)


def _cache_result(cache: str | None) -> str:
    if cache is None:
        return "none"
    if cache in ("hit", "miss"):
        return cache
    if cache.startswith("bypass"):
        return "bypass"
    return OTHER
