"""The result cache's own Prometheus metrics, on the proxy's registry.

Hits, misses and bypasses (by reason) are counted per operation by
``proxy.observe.metrics`` (``mongoproxy_cache_operations_total{result, reason}``, from
the operation record's ``cache`` field). These are the rest:

=========================================  ==========  ================================
name                                       type        labels
=========================================  ==========  ================================
mongoproxy_cache_stores_total              counter     result (ok/error)
mongoproxy_cache_invalidations_total       counter     result (ok/error/pending):
                                                       namespaces (or databases) bumped
mongoproxy_cache_bytes_total               counter     direction (stored/served)
mongoproxy_cache_flight_waits_total        counter     — (misses answered by another
                                                       request's upstream reply)
mongoproxy_redis_errors_total              counter     op, kind (timeout/connection/
                                                       garbage/error)
mongoproxy_redis_latency_seconds           histogram   op (lookup/store/invalidate/
                                                       token/probe)
mongoproxy_redis_circuit_open              gauge       — (1 while Redis is bypassed)
mongoproxy_redis_circuit_changes_total     counter     state (open/closed)
mongoproxy_cache_pending_invalidations     gauge       — (namespaces/databases whose
                                                       invalidation has not reached
                                                       Redis yet: not served here)
mongoproxy_redis_lookup_budget_seconds     gauge       — (the lookup budget in force)
=========================================  ==========  ================================
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.observe.families import LoopCounter, LoopHistogram

__all__ = ["REDIS_BUCKETS", "CacheMetrics"]

# 25 µs .. 1 s: a loopback Redis answers in tens of microseconds.
REDIS_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
)
OPS = ("lookup", "token", "store", "invalidate", "probe")


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=False)
        # Updated per lookup or store: lock-free families (proxy.observe.families).
        self.stores = LoopCounter("mongoproxy_cache_stores", "Results written to the cache",
                                  ["result"], r)
        self.invalidations = Counter(
            "mongoproxy_cache_invalidations", "Generation bumps of namespaces (or "
            "databases) after writes; pending: retried after Redis returns",
            ["result"], registry=r)
        self.bytes = LoopCounter("mongoproxy_cache_bytes", "Reply bytes stored in / served "
                                 "from the cache", ["direction"], r)
        self.flight_waits = Counter(
            "mongoproxy_cache_flight_waits", "Misses answered by a concurrent identical "
            "request's upstream reply (single flight)", registry=r)
        self.errors = Counter("mongoproxy_redis_errors", "Failed Redis operations",
                              ["op", "kind"], registry=r)
        self.latency = LoopHistogram("mongoproxy_redis_latency_seconds", "Redis operation "
                                     "latency (successful operations)", ["op"], r,
                                     REDIS_BUCKETS)
        self.circuit_open = Gauge("mongoproxy_redis_circuit_open", "1 while the circuit "
                                  "breaker bypasses Redis", registry=r)
        self.circuit_changes = Counter("mongoproxy_redis_circuit_changes", "Circuit "
                                       "breaker state changes", ["state"], registry=r)
        self.pending = Gauge("mongoproxy_cache_pending_invalidations", "Namespaces (or "
                             "databases) whose invalidation has not reached Redis yet; "
                             "this instance serves nothing of them", registry=r)
        self.budget = Gauge("mongoproxy_redis_lookup_budget_seconds", "How long a lookup "
                            "waits for Redis before it is a bypass (follows Redis's p99)",
                            registry=r)
        # Children resolved once, off the hot path.
        self._latency: dict[str, Any] = {op: self.latency.labels(op) for op in OPS}
        self._stored = self.bytes.labels("stored")
        self._served = self.bytes.labels("served")
        for result in ("ok", "error"):
            self.stores.labels(result)
        for result in ("ok", "error", "pending"):
            self.invalidations.labels(result)
        for state in ("open", "closed"):
            self.circuit_changes.labels(state)

    def observe_latency(self, op: str, seconds: float) -> None:
        self._latency[op].observe(seconds)

    def error(self, op: str, kind: str) -> None:
        self.errors.labels(op, kind).inc()

    def served(self, size: int) -> None:
        self._served.inc(size)

    def stored(self, size: int) -> None:
        self.stores.labels("ok").inc()
        self._stored.inc(size)

    def circuit(self, is_open: bool) -> None:
        self.circuit_open.set(1 if is_open else 0)
        self.circuit_changes.labels("open" if is_open else "closed").inc()
