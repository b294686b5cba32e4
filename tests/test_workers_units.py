"""``listen.workers`` without processes: the configuration rules, the division of the
per-host budgets, and the supervisor's sums of metrics and digests."""

from __future__ import annotations

import os
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, parse_config
from proxy.supervisor_admin import merge_digests, merge_metrics
from proxy.worker import share, worker_config

UPSTREAM = {"uri": "mongodb://127.0.0.1:27017/"}


def test_workers_option_is_validated() -> None:
    assert parse_config({"upstream": UPSTREAM}).listen.worker_count() == 1
    auto = parse_config({"upstream": UPSTREAM, "listen": {"workers": "auto"}})
    assert auto.listen.worker_count() == len(os.sched_getaffinity(0))
    for bad, message in [
        ({"listen": {"workers": 0}}, "listen.workers"),
        ({"listen": {"workers": "many"}}, "listen.workers"),
        ({"listen": {"workers": 2, "port": 0}}, "listen.port: 0 cannot be shared"),
        ({"listen": {"workers": 3}, "upstream": {**UPSTREAM, "pool": {"max_size": 2}}},
         "upstream.pool.max_size (2) is divided among listen.workers (3)"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config({"upstream": UPSTREAM, **bad})


@pytest.mark.parametrize(("total", "count"), [(7, 2), (100, 3), (2, 2), (0, 4), (5, 5)])
def test_shares_add_up_to_the_total(total: int, count: int) -> None:
    parts = [share(total, i, count) for i in range(count)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1


def test_worker_config_divides_the_pool_and_sends_the_slow_log_to_the_supervisor() -> None:
    config = parse_config({
        "upstream": {**UPSTREAM, "pool": {"max_size": 7, "min_size": 3}},
        "listen": {"workers": 2, "max_connections": 5, "max_buffered_bytes": 100_000_001},
        "observability": {"slow_log": "/var/log/slow.log"},
    })
    first, second = (worker_config(config, i, 2) for i in range(2))
    assert (first.upstream.pool.max_size, second.upstream.pool.max_size) == (4, 3)
    # The host's limits on clients are divided too (the hardening limits: security.md).
    assert (first.listen.max_connections, second.listen.max_connections) == (3, 2)
    assert first.listen.max_buffered_bytes + second.listen.max_buffered_bytes == 100_000_001
    assert (first.upstream.pool.min_size, second.upstream.pool.min_size) == (2, 1)
    assert first.observability.slow_log == "-"
    assert first.routing == config.routing and first.upstream.uri == config.upstream.uri


def _families(text: bytes) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(family.name, {})[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _worker_text(ops: int, up: int, rtt: float, created: float) -> str:
    return f"""# HELP mongoproxy_operations_total Operations
# TYPE mongoproxy_operations_total counter
mongoproxy_operations_total{{command="find",error_code="0"}} {ops}
# HELP mongoproxy_operations_created Operations
# TYPE mongoproxy_operations_created gauge
mongoproxy_operations_created{{command="find",error_code="0"}} {created}
# HELP mongoproxy_member_up up
# TYPE mongoproxy_member_up gauge
mongoproxy_member_up{{member="a:1",role="primary"}} {up}
# HELP mongoproxy_member_rtt_seconds rtt
# TYPE mongoproxy_member_rtt_seconds gauge
mongoproxy_member_rtt_seconds{{member="a:1"}} {rtt}
# HELP mongoproxy_pool_wait_seconds wait
# TYPE mongoproxy_pool_wait_seconds histogram
mongoproxy_pool_wait_seconds_bucket{{member="a:1",le="0.001"}} {ops - 1}
mongoproxy_pool_wait_seconds_bucket{{member="a:1",le="+Inf"}} {ops}
mongoproxy_pool_wait_seconds_count{{member="a:1"}} {ops}
mongoproxy_pool_wait_seconds_sum{{member="a:1"}} 0.5
"""


def test_metrics_are_summed_except_shared_facts() -> None:
    merged = _families(merge_metrics([_worker_text(10, 1, 0.002, 100.0),
                                      _worker_text(5, 0, 0.004, 90.0)]))
    find = (("command", "find"), ("error_code", "0"))
    assert merged["mongoproxy_operations"][("mongoproxy_operations_total", find)] == 15
    assert merged["mongoproxy_operations_created"][
        ("mongoproxy_operations_created", find)] == 90.0
    member = (("member", "a:1"), ("role", "primary"))
    assert merged["mongoproxy_member_up"][("mongoproxy_member_up", member)] == 0
    assert merged["mongoproxy_member_rtt_seconds"][
        ("mongoproxy_member_rtt_seconds", (("member", "a:1"),))] == 0.004
    wait = merged["mongoproxy_pool_wait_seconds"]
    assert wait[("mongoproxy_pool_wait_seconds_bucket", (("le", "+Inf"), ("member", "a:1")))] == 15
    assert wait[("mongoproxy_pool_wait_seconds_count", (("member", "a:1"),))] == 15
    assert wait[("mongoproxy_pool_wait_seconds_sum", (("member", "a:1"),))] == 1.0


def _row(shape: str, count: int, p95: float, last_seen: float, who: str) -> dict[str, Any]:
    return {"shape_hash": shape, "command": "find", "count": count, "errors": 1,
            "total_ms": 2.0 * count, "avg_ms": 2.0, "p50_ms": 1.0, "p95_ms": p95,
            "p99_ms": p95, "max_ms": p95, "docs_returned": count, "reply_bytes": 10 * count,
            "cache_hits": count, "cache_misses": count, "cache_bypasses": 0,
            "cache_hit_ratio": 0.5, "first_seen": last_seen - 10, "last_seen": last_seen,
            "last_example": {"app_name": who}}


def test_digests_merge_by_shape_hash() -> None:
    one = {"shapes": 2, "max_shapes": 1000, "evicted": 1, "operations": 13, "since": 5.0,
           "top": [_row("a", 10, 3.0, 100.0, "one"), _row("b", 3, 1.0, 50.0, "one")]}
    two = {"shapes": 1, "max_shapes": 1000, "evicted": 0, "operations": 20, "since": 4.0,
           "top": [_row("b", 20, 9.0, 60.0, "two")]}
    merged = merge_digests([one, two], limit=1, order="count")
    assert (merged["operations"], merged["evicted"], merged["since"]) == (33, 1, 4.0)
    assert merged["shapes"] == 2 and merged["workers"] == 2
    [b] = merged["top"]  # the limit applies after the merge: b has 23, a 10
    assert (b["shape_hash"], b["count"], b["errors"], b["total_ms"]) == ("b", 23, 2, 46.0)
    assert (b["avg_ms"], b["p95_ms"], b["max_ms"]) == (2.0, 9.0, 9.0)
    assert b["cache_hit_ratio"] == 0.5 and b["reply_bytes"] == 230
    assert b["first_seen"] == 40.0 and b["last_example"] == {"app_name": "two"}


def test_foreign_cursors_are_bounded_and_owned_by_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.route import cursors as module

    monkeypatch.setattr(module, "MAX_FOREIGN", 3)
    table = module.CursorTable()
    for cursor_id in (11, 12, 13, 14):
        table.add_foreign(cursor_id, ("db", 27017), "d.c", tenant="acme")
    assert table.get(11) is None  # the oldest was forgotten
    assert table.tenant_of(14) == (True, "acme")
    assert table.release_owner(1) == {}  # no client connection of this worker owns them
    table.remove(12)
    table.add_foreign(15, ("db", 27017), "d.c")
    assert [i for i in (12, 13, 14, 15) if table.get(i)] == [13, 14, 15]


def test_the_supervisors_slow_log_stream_writes_every_line_whole(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from proxy.supervisor import _LineStream

    text = "".join(f"{i:04d}{'x' * (i * 97 % 3000)}\n" for i in range(40)) + "y" * 9000 + "\n"
    _LineStream().write(text)
    assert capfd.readouterr().out == text


def test_digest_percentiles_come_from_the_merged_sketches() -> None:
    from proxy.observe.sketch import LatencySketch

    def row(values: list[float], last_seen: float) -> dict[str, Any]:
        sketch = LatencySketch()
        for v in values:
            sketch.add(v)
        base = _row("s", len(values), max(values), last_seen, "w")
        return {**base, "total_ms": sum(values), "min_ms": min(values),
                "p50_ms": sketch.quantile(0.5), "sketch": sketch.state()}

    merged = merge_digests([{"top": [row([1.0] * 30, 10.0)]},
                            {"top": [row([10.0] * 10 + [40.0] * 2, 20.0)]}], 5, "count")
    [only] = merged["top"]
    assert only["count"] == 42 and only["min_ms"] == 1.0 and only["max_ms"] == 40.0
    # 30 values of 1 ms, 10 of 10 ms, 2 of 40 ms: p50 is 1 ms, p95 10 ms, p99 40 ms
    # (within the sketch's 1 %), where the workers' own p50s were 1 and 10.
    assert only["p50_ms"] == pytest.approx(1.0, rel=0.01)
    assert only["p95_ms"] == pytest.approx(10.0, rel=0.01)
    assert only["p99_ms"] == pytest.approx(40.0, rel=0.01)
    assert "sketch" not in only
