"""The query digest: per-shape statistics, ordering, bounded size, and the /digest and
/readyz handlers and `mongoproxy top` rendering."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.observe.digest import QueryDigest
from proxy.observe.endpoints import ReadinessFacts, digest_handler, readyz_handler
from proxy.observe.record import OperationRecord, Timer
from proxy.observe.top import main as top_main
from proxy.observe.top import render_table


def op(shape: str, ms: float, **fields: Any) -> OperationRecord:
    defaults: dict[str, Any] = {
        "command": "find", "database": "app", "collection": "orders",
        "shape_hash": shape, "shape_text": json.dumps({"cmd": "find", "s": shape}),
        "start_time": 1_700_000_000.0,
    }
    defaults.update(fields)
    return OperationRecord(duration_ms=ms, **defaults)


def test_counts_totals_and_ordering() -> None:
    digest = QueryDigest(100)
    for _ in range(10):
        digest.record(op("a", 1.0, docs_returned=2, reply_bytes=100, cache="hit"))
    for _ in range(3):
        digest.record(op("b", 50.0, error_code=11600, cache="miss"))
    digest.record(op("c", 5.0, cache="bypass:txn"))
    top = digest.top(10)
    assert [r["shape_hash"] for r in top] == ["b", "a", "c"]  # by total time
    b, a, c = top
    assert (a["count"], a["total_ms"], a["avg_ms"], a["max_ms"]) == (10, 10.0, 1.0, 1.0)
    assert (a["docs_returned"], a["reply_bytes"], a["errors"]) == (20, 1000, 0)
    assert (a["cache_hits"], a["cache_misses"], a["cache_hit_ratio"]) == (10, 0, 1.0)
    assert (b["count"], b["errors"], b["total_ms"], b["cache_hit_ratio"]) == (3, 3, 150.0, 0.0)
    assert (c["cache_bypasses"], c["cache_hit_ratio"]) == (1, None)
    assert a["namespace"] == "app.orders" and a["command"] == "find"
    assert [r["shape_hash"] for r in digest.top(10, order="count")] == ["a", "b", "c"]
    assert [r["shape_hash"] for r in digest.top(1)] == ["b"]
    assert digest.summary()["operations"] == 14
    with pytest.raises(ValueError):
        digest.top(10, order="nonsense")


def test_p95_is_close() -> None:
    digest = QueryDigest(10)
    for i in range(1, 1001):  # 1..1000 ms: p95 = 950
        digest.record(op("a", float(i)))
    row = digest.top(1)[0]
    assert row["p95_ms"] == pytest.approx(950, rel=0.05)
    assert row["p50_ms"] == pytest.approx(500, rel=0.05)
    assert row["max_ms"] == 1000.0
    digest.record(op("z", 0.0))  # zero and sub-microsecond durations are fine
    assert digest.top(1, order="count")[0]["p95_ms"] <= 1000


def test_evicts_least_used_when_full() -> None:
    digest = QueryDigest(10)
    for i in range(10):
        for _ in range(i + 1):
            digest.record(op(f"s{i}", 1.0, start_time=1_700_000_000.0 + i))
    digest.record(op("new", 1.0))
    assert len(digest) <= 10
    assert "s0" not in digest.rows  # used once: evicted first
    assert "new" in digest.rows and "s9" in digest.rows
    assert digest.summary()["evicted"] == 1
    for i in range(1000):
        digest.record(op(f"flood{i}", 1.0))
    assert len(digest) <= 10
    assert "s9" in digest.rows  # the heavy hitters survive a flood of one-off shapes


def test_values_only_with_log_values() -> None:
    raw = {"find": "users", "filter": {"email": "x@example.com"}}
    hidden = QueryDigest(10)
    hidden.record(op("a", 1.0, raw_command=raw, tenant="acme", user="alice"))
    example = hidden.top(1)[0]["last_example"]
    # Without log_values neither the command's values nor who ran it are shown.
    assert "x@example.com" not in json.dumps(hidden.top(1))
    assert "acme" not in json.dumps(hidden.top(1)) and "alice" not in json.dumps(hidden.top(1))
    assert "tenant" not in example and "user" not in example and example["shape"]
    shown = QueryDigest(10, log_values=True)
    shown.record(op("a", 1.0, raw_command=raw, tenant="acme", user="alice"))
    shown_example = shown.top(1)[0]["last_example"]
    assert shown_example["command"] == raw
    assert shown_example["tenant"] == "acme" and shown_example["user"] == "alice"


def test_record_without_shape_uses_command_name() -> None:
    digest = QueryDigest(10)
    digest.record(OperationRecord(start_time=0.0, duration_ms=1.0, command="ping"))
    assert digest.top(1)[0]["shape_hash"] == "ping"


def test_digest_handler() -> None:
    digest = QueryDigest(10)
    for i, shape in enumerate(["a", "b", "c"]):
        for _ in range(i + 1):
            digest.record(op(shape, (50.0, 20.0, 5.0)[i]))  # totals 50, 40, 15
    handler = digest_handler(digest)
    status, ctype, body = handler({"limit": ["2"]})
    document = json.loads(body)
    assert (status, ctype) == (200, "application/json")
    assert [r["shape_hash"] for r in document["top"]] == ["a", "b"]
    assert document["shapes"] == 3 and document["operations"] == 6
    status, _, body = handler({"order": ["count"]})
    assert [r["shape_hash"] for r in json.loads(body)["top"]] == ["c", "b", "a"]
    assert handler({"limit": ["x"]})[0] == 400
    assert handler({"limit": ["-1"]})[0] == 400
    assert handler({"order": ["x"]})[0] == 400


@pytest.mark.parametrize(("facts", "status"), [
    (ReadinessFacts(primary=True), 200),
    (ReadinessFacts(primary=False), 503),
    (ReadinessFacts(primary=True, redis="down"), 200),
    (ReadinessFacts(primary=True, redis="down", redis_required=True), 503),
    (ReadinessFacts(primary=True, redis="ok", redis_required=True), 200),
    (ReadinessFacts(primary=True, shutting_down=True), 503),
    (ReadinessFacts(primary=True, data_path=True), 200),
    (ReadinessFacts(primary=True, data_path=False), 503),  # the monitor lags: proof wins
])
def test_readyz(facts: ReadinessFacts, status: int) -> None:
    got, ctype, body = readyz_handler(lambda: facts)({})
    document = json.loads(body)
    assert got == status and ctype == "application/json"
    assert document["ready"] is (status == 200)
    assert document["primary"] == ("yes" if facts.primary else "no")
    assert document["redis"] == facts.redis


def test_top_renders_table() -> None:
    digest = QueryDigest(10)
    digest.record(op("abcdef0123456789", 12.5, docs_returned=3, cache="hit"))
    _, _, body = digest_handler(digest)({})
    text = render_table(json.loads(body), width=200)
    lines = text.splitlines()
    assert "HASH" in lines[2] and "P95 ms" in lines[2]
    assert lines[3].startswith("abcdef0123456789 find")
    assert "12.50" in lines[3] and "100" in lines[3]
    assert all(len(line) <= 80 for line in render_table(json.loads(body), 80).splitlines())


def test_top_once_unreachable_fails() -> None:
    out = io.StringIO()
    assert top_main(["--admin", "http://127.0.0.1:9", "--once"], out=out) == 1


def test_timer_phases_add_up() -> None:
    timer = Timer()
    for phase in ("read", "decode", "upstream", "write"):
        timer.mark(phase)
    timer.mark("upstream")
    record = timer.record("find", database="app", collection="t", connection_id=3)
    assert set(record.phases) == {"read", "decode", "upstream", "write"}
    assert sum(record.phases.values()) <= record.duration_ms
    assert record.namespace == "app.t" and record.connection_id == 3
