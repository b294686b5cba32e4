"""The digest's latency sketch (DDSketch): relative accuracy against exact percentiles
of known distributions, exactness for a single value, merging, and the digest rows that
use it (p95 never below min or above max)."""

from __future__ import annotations

import json
import math
import random

import pytest

from proxy.observe.digest import QueryDigest
from proxy.observe.record import OperationRecord
from proxy.observe.sketch import DEFAULT_ALPHA, LatencySketch

QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def exact(values: list[float], q: float) -> float:
    """The value at rank floor(q * (n - 1)) (0-based), the rank DDSketch targets."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def sketch_of(values: list[float]) -> LatencySketch:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    return sketch


_RNG = random.Random(7)
DISTRIBUTIONS = {
    "uniform 1..1000 ms": [float(i) for i in range(1, 1001)],
    "lognormal (median 2 ms, heavy tail)": [
        _RNG.lognormvariate(math.log(2.0), 1.5) for _ in range(20_000)],
    "bimodal (cache hits 0.3 ms, misses 40 ms)": [
        *(_RNG.uniform(0.25, 0.35) for _ in range(9_000)),
        *(_RNG.uniform(30, 50) for _ in range(1_000))],
    "sub-microsecond and zero": [0.0, 0.0004, 0.0009, 0.002, 0.5, 3.0],
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_quantiles_within_relative_error(name: str) -> None:
    values = DISTRIBUTIONS[name]
    sketch = sketch_of(values)
    for q in QUANTILES:
        want, got = exact(values, q), sketch.quantile(q)
        if want > 1e-6:
            assert abs(got - want) <= DEFAULT_ALPHA * want * (1 + 1e-9), (q, want, got)
        else:  # everything at or below 1 ns shares the first bucket
            assert got <= 2e-6, (q, want, got)
        assert min(values) <= got <= max(values)
    assert sketch.quantile(0.0) == min(values) and sketch.quantile(1.0) == max(values)
    assert sketch.count == len(values)
    assert sketch.total == pytest.approx(sum(values))


def test_quantiles_are_monotonic() -> None:
    sketch = sketch_of(DISTRIBUTIONS["lognormal (median 2 ms, heavy tail)"])
    answers = [sketch.quantile(q / 1000) for q in range(1001)]
    assert answers == sorted(answers)


@pytest.mark.parametrize("value", [0.0, 0.0005, 0.31, 1.0, 1706.0, 1688.7, 123456.789])
def test_one_value_is_exact(value: float) -> None:
    """The issue's case: a shape run once showed p95 1,688.7 ms below its max 1,706.0."""
    sketch = sketch_of([value])
    for q in QUANTILES:
        assert sketch.quantile(q) == value


def test_merge_equals_the_sketch_of_the_union() -> None:
    values = DISTRIBUTIONS["bimodal (cache hits 0.3 ms, misses 40 ms)"]
    left, right = sketch_of(values[::2]), sketch_of(values[1::2])
    left.merge(right)
    whole = sketch_of(values)
    assert left.buckets == whole.buckets
    assert (left.count, left.min, left.max) == (whole.count, whole.min, whole.max)
    assert left.total == pytest.approx(whole.total)
    for q in QUANTILES:
        assert left.quantile(q) == whole.quantile(q)
    with pytest.raises(ValueError, match="alpha"):
        left.merge(LatencySketch(0.02))


def test_state_round_trips_through_json() -> None:
    sketch = sketch_of(DISTRIBUTIONS["uniform 1..1000 ms"])
    copy = LatencySketch.from_state(json.loads(json.dumps(sketch.state())))
    assert [copy.quantile(q) for q in QUANTILES] == [sketch.quantile(q) for q in QUANTILES]
    empty = LatencySketch.from_state(json.loads(json.dumps(LatencySketch().state())))
    assert empty.count == 0 and empty.quantile(0.5) == 0.0
    empty.add(2.0)
    assert empty.min == 2.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        LatencySketch(0.0)
    with pytest.raises(ValueError):
        sketch_of([1.0]).quantile(1.5)


def op(shape: str, ms: float) -> OperationRecord:
    return OperationRecord(start_time=1_700_000_000.0, duration_ms=ms, command="find",
                           database="app", collection="t", shape_hash=shape,
                           shape_text=json.dumps({"cmd": "find", "s": shape}))


def test_digest_row_percentiles_stay_between_min_and_max() -> None:
    digest = QueryDigest(10)
    digest.record(op("once", 1706.0))
    for value in DISTRIBUTIONS["lognormal (median 2 ms, heavy tail)"][:2000]:
        digest.record(op("many", value))
    rows = {r["shape_hash"]: r for r in digest.top(10)}
    once = rows["once"]
    assert once["p50_ms"] == once["p95_ms"] == once["p99_ms"] == once["max_ms"] == 1706.0
    assert once["min_ms"] == once["avg_ms"] == 1706.0
    many = rows["many"]
    assert many["min_ms"] <= many["p50_ms"] <= many["p95_ms"] <= many["p99_ms"] \
        <= many["max_ms"]
    assert once["shape"] == {"cmd": "find", "s": "once"}  # an object, not JSON text
