"""The query digest: an in-memory table of statistics per query shape.

Memory is bounded twice:

* **Shapes**: at most ``max_shapes`` rows. When a new shape arrives and the table is
  full, the least-used tenth of the rows (LFU: lowest ``count``, ties broken by the
  oldest ``last_seen``) is evicted in one pass. Batch eviction keeps the amortised cost
  of an insert O(log n) even when an application generates a new shape per request
  (one O(n log n) sort per n/10 new shapes), where evicting one row at a time would scan
  the whole table on every new shape. LFU rather than LRU because the digest exists to
  show the heavy hitters: a shape seen 50 000 times an hour ago must survive a burst of
  one-off ad-hoc queries. ``evicted`` counts the rows dropped.
* **Latency distribution per shape**: a :class:`~proxy.observe.sketch.LatencySketch`
  (DDSketch, 1 % relative error, exact min and max, a sparse dict of the occupied
  buckets: a handful per shape in practice). Percentiles are always between the
  shape's min and max, and exact for a shape run once. Sketches merge, so digests of
  several worker processes can be combined.

Everything is updated from the event loop thread only; no locks.
"""

from __future__ import annotations

import json
import time
from typing import Any

from proxy.observe.record import OperationRecord
from proxy.observe.sketch import LatencySketch

__all__ = ["ORDERS", "QueryDigest"]

# /digest?order=... -> the key rows are sorted by (descending).
ORDERS: dict[str, str] = {
    "total_time": "total_ms",
    "count": "count",
    "avg_time": "avg_ms",
    "p95": "p95_ms",
    "max_time": "max_ms",
    "errors": "errors",
    "docs": "docs_returned",
    "bytes": "reply_bytes",
}


_LAST_FIELDS = ("tenant", "user", "app_name", "route_class", "route_rule", "member",
                "duration_ms", "error_code")


class _Row:
    __slots__ = (
        "bytes", "cache_bypasses", "cache_hits", "cache_misses", "collection", "command",
        "database", "docs", "errors", "example", "first_seen", "last", "last_seen",
        "latency", "shape_text",
    )

    def __init__(self, op: OperationRecord, now: float) -> None:
        self.command = op.command
        self.database = op.database
        self.collection = op.collection
        self.shape_text = op.shape_text or json.dumps({"cmd": op.command})
        self.latency = LatencySketch()
        self.errors = 0
        self.docs = 0
        self.bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_bypasses = 0
        self.first_seen = now
        self.last_seen = now
        self.last: tuple[Any, ...] = ()
        self.example: Any = None

    @property
    def count(self) -> int:
        return self.latency.count

    @property
    def total_ms(self) -> float:
        return self.latency.total


class QueryDigest:
    """Statistics per query shape; ``record`` is called once per operation."""

    def __init__(self, max_shapes: int = 1000, log_values: bool = False) -> None:
        if max_shapes < 1:
            raise ValueError("max_shapes must be at least 1")
        self.max_shapes = max_shapes
        self.log_values = log_values
        self.rows: dict[str, _Row] = {}
        self.evicted = 0
        self.operations = 0
        self.started = time.time()

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, op: OperationRecord) -> None:
        key = op.shape_hash or op.command
        now = op.start_time
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_shapes:
                self._evict()
            row = self.rows[key] = _Row(op, now)
        ms = op.duration_ms
        row.latency.add(ms)
        if op.error_code is not None:
            row.errors += 1
        if op.docs_returned:
            row.docs += op.docs_returned
        row.bytes += op.reply_bytes
        cache = op.cache
        if cache is not None:
            if cache == "hit":
                row.cache_hits += 1
            elif cache == "miss":
                row.cache_misses += 1
            else:
                row.cache_bypasses += 1
        if now > row.last_seen:
            row.last_seen = now
        # The last example's context (not the record: it may reference a large command).
        row.last = (op.tenant, op.user, op.app_name, op.route_class, op.route_rule,
                    op.member, ms, op.error_code)
        if self.log_values and op.raw_command is not None:
            row.example = op.raw_command
        self.operations += 1

    def _evict(self) -> None:
        drop = max(1, len(self.rows) // 10)
        victims = sorted(self.rows.items(),
                         key=lambda kv: (kv[1].latency.count, kv[1].last_seen))
        for key, _row in victims[:drop]:
            del self.rows[key]
        self.evicted += drop

    def _describe(self, key: str, row: _Row) -> dict[str, Any]:
        cache_lookups = row.cache_hits + row.cache_misses
        latency = row.latency
        shape = _shape_object(row.shape_text)
        example: dict[str, Any] = {"shape": shape}
        example.update(zip(_LAST_FIELDS, row.last, strict=True))
        example["duration_ms"] = round(example["duration_ms"], 3)
        if not self.log_values:  # who ran it is a value too
            del example["tenant"], example["user"]
        if self.log_values and row.example is not None:
            from bson import json_util  # only with log_values

            example["command"] = json.loads(
                json_util.dumps(row.example, json_options=json_util.RELAXED_JSON_OPTIONS)
            )
        namespace = row.database
        if namespace is not None and row.collection:
            namespace = f"{namespace}.{row.collection}"
        return {
            "shape_hash": key,
            "command": row.command,
            "namespace": namespace,
            "shape": shape,
            "count": latency.count,
            "errors": row.errors,
            "total_ms": round(latency.total, 3),
            "avg_ms": round(latency.total / latency.count, 3) if latency.count else 0.0,
            "min_ms": round(latency.min, 3) if latency.count else 0.0,
            "p50_ms": round(latency.quantile(0.50), 3),
            "p95_ms": round(latency.quantile(0.95), 3),
            "p99_ms": round(latency.quantile(0.99), 3),
            "max_ms": round(latency.max, 3),
            "docs_returned": row.docs,
            "reply_bytes": row.bytes,
            "cache_hits": row.cache_hits,
            "cache_misses": row.cache_misses,
            "cache_bypasses": row.cache_bypasses,
            "cache_hit_ratio": round(row.cache_hits / cache_lookups, 4) if cache_lookups else None,
            "first_seen": row.first_seen,
            "last_seen": row.last_seen,
            "last_example": example,
        }

    def top(self, limit: int = 20, order: str = "total_time",
            sketches: bool = False) -> list[dict[str, Any]]:
        """The ``limit`` rows with the highest ``order`` (a key of :data:`ORDERS`);
        with ``sketches``, each row carries its latency sketch's state (``"sketch"``),
        which the supervisor of ``listen.workers`` merges across workers."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}")
        field = ORDERS[order]
        rows = [self._describe(k, r) for k, r in self.rows.items()]
        # Ties: more frequent first, then the hash, so the order is deterministic.
        rows.sort(key=lambda d: (-d[field], -d["count"], d["shape_hash"]))
        rows = rows[:max(0, limit)]
        if sketches:
            for row in rows:
                row["sketch"] = self.rows[row["shape_hash"]].latency.state()
        return rows

    def reset(self) -> dict[str, Any]:
        """Forget every row (``POST /digest/reset``); returns the summary before it."""
        before = self.summary()
        self.rows.clear()
        self.evicted = 0
        self.operations = 0
        self.started = time.time()
        return before

    def summary(self) -> dict[str, Any]:
        return {
            "shapes": len(self.rows),
            "max_shapes": self.max_shapes,
            "evicted": self.evicted,
            "operations": self.operations,
            "since": self.started,
        }


def _shape_object(text: str) -> Any:
    """The shape as a JSON value for /digest (its text is compact JSON of a document)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
