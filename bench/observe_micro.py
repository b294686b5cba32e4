"""Micro-benchmark of the per-operation observability costs (no I/O).

    python -m bench.observe_micro          # prints µs per call, writes bench/results/

Measures, for a typical driver ``find`` (3-field filter, sort, limit, full envelope):
shape (query_shape + text + hash), one ``Timer.mark``, a whole Timer with 8 marks and
its record, ``QueryDigest.record``, ``Metrics.observe`` and the full
``Observer.finish`` (digest + metrics + slow-log decision, nothing written).
"""

from __future__ import annotations

import datetime
import io
import json
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bson import Int64, ObjectId

from proxy.observe.config import ObservabilityConfig
from proxy.observe.digest import QueryDigest
from proxy.observe.hub import Observer
from proxy.observe.metrics import Metrics
from proxy.observe.record import PHASES, OperationRecord, Timer
from proxy.observe.shape import describe

FIND: dict[str, Any] = {
    "find": "orders",
    "filter": {"tenant_id": "acme", "status": {"$in": ["open", "pending"]},
               "created": {"$gte": datetime.datetime(2024, 1, 1)}},
    "sort": {"created": -1},
    "limit": 20,
    "lsid": {"id": ObjectId()},
    "$clusterTime": {"clusterTime": Int64(1), "signature": {"hash": b"x", "keyId": Int64(0)}},
    "$db": "app",
    "$readPreference": {"mode": "primaryPreferred"},
}


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def measure() -> dict[str, float]:
    shape = describe(FIND)
    op = OperationRecord(
        start_time=1.7e9, duration_ms=1.234, command="find", database="app",
        collection="orders", phases_ns={p: 100_000 for p in PHASES}, shape_hash=shape.hash,
        shape_text=shape.text, tenant="acme", app_name="billing", route_class="oltp",
        member="db1:27017", member_role="primary", cache="miss", docs_returned=20,
        reply_bytes=4000, connection_id=1,
    )
    digest = QueryDigest(1000)
    metrics = Metrics(ObservabilityConfig())
    observer = Observer(ObservabilityConfig(), slow_log_stream=io.StringIO())
    timer = Timer()

    def whole_timer() -> None:
        t = Timer()
        for phase in PHASES:
            t.mark(phase)
        t.record("find", database="app", collection="orders")

    return {
        "shape_describe_us": _per_call_us(lambda: describe(FIND), 20_000),
        "timer_mark_us": _per_call_us(lambda: timer.mark("upstream"), 200_000),
        "timer_8_marks_and_record_us": _per_call_us(whole_timer, 50_000),
        "digest_record_us": _per_call_us(lambda: digest.record(op), 100_000),
        "metrics_observe_us": _per_call_us(lambda: metrics.observe(op), 100_000),
        "observer_finish_us": _per_call_us(lambda: observer.finish(op), 100_000),
    }


def main() -> int:
    results = measure()
    for name, value in results.items():
        print(f"{name:32s} {value:8.3f}")
    out = Path(__file__).parent / "results" / "observe_micro.json"
    out.write_text(json.dumps({
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "results_us": {k: round(v, 3) for k, v in results.items()},
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
