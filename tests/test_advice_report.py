"""The advice document from a real digest fed with operation records, against index
catalog entries set directly (the fetching is covered end to end in
``tests/test_advice_integration.py``): ranking by time at stake, consolidation of
shapes under one index, windows, and that literal values never appear."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.advice.advisor import Advisor
from proxy.advice.catalog import CatalogEntry
from proxy.advice.compare import IndexInfo
from proxy.advice.config import AdviceConfig
from proxy.observe.digest import QueryDigest
from proxy.observe.record import OperationRecord
from proxy.observe.shape import describe

NS = "app.tasks"


async def _never(_db: str, _command: dict[str, Any]) -> Mapping[str, Any]:
    raise AssertionError("the report must not run commands")


def _record(digest: QueryDigest, command: dict[str, Any], ms: float, times: int = 1) -> str:
    shape = describe({**command, "$db": "app"})
    for _ in range(times):
        digest.record(OperationRecord(
            start_time=time.time(), duration_ms=ms, command=next(iter(command)),
            database="app", collection=command[next(iter(command))],
            shape_hash=shape.hash, shape_text=shape.text))
    return shape.hash


@pytest.fixture
def advisor() -> Advisor:
    found = Advisor(AdviceConfig(), QueryDigest(), _never, tenant_field="tenant_id")
    found.catalog.entries[NS] = CatalogEntry(
        time.time(), (IndexInfo.from_document({"name": "_id_", "key": {"_id": 1}}),),
        usage=None, usage_error="$indexStats: not implemented")
    return found


def test_ranked_by_time_at_stake_and_consolidated(advisor: Advisor) -> None:
    digest = advisor.digest
    # Cheap but frequent: 100 x 1 ms = 100 ms.
    a = _record(digest, {"find": "tasks", "filter": {"tenant_id": "acme-secret",
                                                     "user_id": 9}}, 1.0, 100)
    # Same index serves it (prefix of the next one's): joins it.
    b = _record(digest, {"find": "tasks", "filter": {"tenant_id": "x", "user_id": 4},
                         "sort": {"date": -1}}, 5.0, 10)
    # Rare but slow: 2 x 400 ms = 800 ms.
    c = _record(digest, {"find": "tasks", "filter": {"tenant_id": "x", "status": "s"},
                         "sort": {"priority": -1}}, 400.0, 2)
    _record(digest, {"insert": "tasks", "documents": [{"tenant_id": "acme-secret"}]}, 1.0)
    report = advisor.report()
    assert "acme-secret" not in json.dumps(report)
    first, second = report["missing"]
    assert first["key"] == {"tenant_id": 1, "status": 1, "priority": -1}
    assert (first["count"], first["total_ms"]) == (2, 800.0)
    assert [s["shape_hash"] for s in first["shapes"]] == [c]
    assert second["key"] == {"tenant_id": 1, "user_id": 1, "date": -1}
    assert (second["count"], second["total_ms"]) == (110, 150.0)
    assert [s["shape_hash"] for s in second["shapes"]] == [a, b]  # 100 ms, 50 ms
    statuses = {s["shape_hash"]: s["status"] for s in report["shapes"]}
    assert statuses == {a: "missing", b: "missing", c: "missing"}
    assert report["usage_unknown"] == [{"namespace": NS, "unused": "unknown",
                                        "why": "$indexStats: not implemented"}]


def test_unknown_until_the_indexes_are_fetched(advisor: Advisor) -> None:
    h = _record(advisor.digest, {"find": "other", "filter": {"a": 1}}, 1.0)
    report = advisor.report()
    [row] = report["shapes"]
    assert (row["shape_hash"], row["status"]) == (h, "unknown")
    assert report["missing"] == [] and report["catalog"]["app.other"] == {"state": "pending"}


def test_window_counts_only_recent_operations(advisor: Advisor) -> None:
    digest = advisor.digest
    digest.started -= 1000  # as if the proxy had run for a while before the copy
    old = _record(digest, {"find": "tasks", "filter": {"a": 1}}, 10.0, 50)
    rows = [(k, r.count, r.total_ms) for k, r in digest.rows.items()]
    advisor.snapshots.maybe_take(time.time() - 120, rows)
    new = _record(digest, {"find": "tasks", "filter": {"b": 1}}, 1.0, 3)
    _record(digest, {"find": "tasks", "filter": {"a": 2}}, 2.0, 1)  # one more of `old`
    windowed = advisor.report(window_s=60)
    assert 119 <= windowed["window_s"] < 200  # the copy it had: 120 s old
    counts = {m["shapes"][0]["shape_hash"]: (m["count"], m["total_ms"])
              for m in windowed["missing"]}
    assert counts == {new: (3, 3.0), old: (1, 2.0)}
    whole = advisor.report()
    assert whole["window_s"] is None
    assert {m["shapes"][0]["shape_hash"]: m["count"] for m in whole["missing"]} == {
        new: 3, old: 51}


MARK = "zq7x"  # in every literal value; field names never contain it


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filters=st.lists(st.dictionaries(
    st.sampled_from(["tenant_id", "a", "b", "c"]),
    st.one_of(
        st.text(max_size=4).map(lambda s: MARK + s),
        st.text(max_size=4).map(lambda s: {"$gt": MARK + s}),
        st.text(max_size=4).map(lambda s: {"$in": [MARK + s, MARK]}),
        st.text(max_size=4).map(lambda s: {"$regex": "^" + MARK + s}),
        st.text(max_size=4).map(lambda s: {"$ne": MARK + s}),
    ), min_size=1, max_size=4), min_size=1, max_size=5))
def test_literal_values_never_appear(advisor: Advisor, filters: list[dict[str, Any]]) -> None:
    for filter_ in filters:
        _record(advisor.digest, {"find": "tasks", "filter": filter_, "sort": {"a": -1}}, 3.0)
    assert MARK not in json.dumps(advisor.report())
