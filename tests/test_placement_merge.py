"""The fan-out merge (proxy.placement.merge): BSON order, sort keys, k-way merge, counts
and distinct unions; tables, Hypothesis properties, and the order checked against a
real FerretDB's own sort of mixed-type values."""

from __future__ import annotations

import datetime
import itertools
import re
import uuid
from typing import Any

import pymongo
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.placement.merge import (
    Unmergeable,
    count_total,
    merge_sorted,
    ordering,
    parse_sort,
    per_cluster_limit,
    pick,
    sort_key,
    union_values,
    value_key,
)
from tests.support import FerretDBProcess

# One value of each type, in MongoDB's documented order (ascending).
ORDERED = [
    MinKey(),
    None,
    float("nan"),
    -2,
    Int64(1),
    1.5,
    Decimal128("1.75"),
    2,
    "",
    "B",
    "a",
    "é",
    {},
    {"a": 1},
    {"b": 0},
    {"a": "x"},  # an element's type decides before its name
    [],
    [1],
    [1, 2],
    b"\xff",
    Binary(b"\x00", 5),
    b"\x00\x00",
    ObjectId("000000000000000000000000"),
    ObjectId("ffffffffffffffffffffffff"),
    False,
    True,
    datetime.datetime(1960, 1, 1),
    datetime.datetime(2020, 1, 1),
    Timestamp(1, 5),
    Timestamp(2, 0),
    Regex("a"),
    Regex("a", re.IGNORECASE),
    Regex("b"),
    Code("x"),
    Code("x", {"s": 1}),
    MaxKey(),
]


def test_value_key_orders_every_type_as_mongodb() -> None:
    keys = [value_key(v) for v in ORDERED]
    for left, right, a, b in zip(keys, keys[1:], ORDERED, ORDERED[1:], strict=False):
        assert left < right, (a, b)


@pytest.mark.parametrize(("a", "b"), [
    (1, 1.0), (1, Int64(1)), (1, Decimal128("1.0")), (0, -0.0), (Decimal128("-0"), 0),
    (float("nan"), Decimal128("NaN")), (float("inf"), Decimal128("Infinity")),
    ({"a": 1}, {"a": 1.0}), ([1, "x"], [1.0, "x"]),
    (uuid.UUID(int=7), Binary(uuid.UUID(int=7).bytes, 4)),
])
def test_bson_equal_values_have_equal_keys(a: Any, b: Any) -> None:
    assert value_key(a) == value_key(b)
    assert hash(value_key(a)) == hash(value_key(b))


@pytest.mark.parametrize(("a", "b"), [
    ({"a": 1}, {"b": 1}), ({"a": 1}, {"a": 1, "b": 1}), ("a", "b"), (1, 2),
    ({"a": 5}, {"a": "5"}),  # the element's type decides before its value
])
def test_smaller_first(a: Any, b: Any) -> None:
    assert value_key(a) < value_key(b)


@pytest.mark.parametrize(("doc", "path", "direction", "expected"), [
    ({"a": 1}, "a", 1, 1),
    ({}, "a", 1, None),
    ({"a": {"b": 3}}, "a.b", 1, 3),
    ({"a": {"c": 3}}, "a.b", 1, None),
    ({"a": [3, 1, 2]}, "a", 1, 1),
    ({"a": [3, 1, 2]}, "a", -1, 3),
    ({"a": [{"b": 2}, {"b": 7}]}, "a.b", 1, 2),
    ({"a": [{"b": 2}, {"b": 7}]}, "a.b", -1, 7),
    ({"a": [{"b": 2}, {}]}, "a.b", 1, None),
    ({"a": [5, 6]}, "a.1", 1, 6),
    ({"a": [1, "x"]}, "a", -1, "x"),
])
def test_sort_key_paths(doc: dict[str, Any], path: str, direction: int, expected: Any) -> None:
    assert sort_key(doc, ((path, direction),)) == (value_key(expected),)


def test_empty_array_sorts_before_null() -> None:
    spec = (("a", 1),)
    docs = [{"a": None}, {"a": []}, {"a": 0}, {}]
    assert next(d.get("a", "missing") for d in sorted(docs, key=ordering(spec))) == []


@pytest.mark.parametrize(("sort", "reason"), [
    ({"$natural": 1}, "$natural"), ({"s": {"$meta": "textScore"}}, "$meta"),
    ({"a": 2}, "1 or -1"), ({"a": True}, "1 or -1"), ([("a", 1)], "document"),
])
def test_unmergeable_sorts(sort: Any, reason: str) -> None:
    with pytest.raises(Unmergeable, match=re.escape(reason)):
        parse_sort(sort)


def test_pick_ties_go_to_the_lowest_stream() -> None:
    spec = (("a", 1),)
    heads = [None, sort_key({"a": 1}, spec), sort_key({"a": 1.0}, spec)]
    assert pick(heads, spec) == 1
    assert pick([None, None], spec) == -1


# -- properties ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(-5, 5), st.just(float("nan")),
    st.sampled_from(["", "a", "b", "ab", "é"]),
    st.integers(-5, 5).map(lambda i: Decimal128(str(i))),
    st.integers(0, 3).map(lambda i: datetime.datetime(2020, 1, 1 + i)),
    st.sampled_from([MinKey(), MaxKey(), ObjectId("0" * 24), b"x", Timestamp(1, 1)]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2)), max_leaves=6)
documents = st.fixed_dictionaries({}, optional={"a": values, "b": values})
specs = st.sampled_from([(("a", 1),), (("a", -1),), (("a", 1), ("b", -1)),
                         (("b", -1), ("a", 1)), (("a.b", 1),)])


def _keys(docs: Any, spec: Any) -> list[Any]:
    return [sort_key(d, spec) for d in docs]


@settings(max_examples=300, deadline=None)
@given(st.lists(documents, max_size=30), st.integers(1, 4), specs, st.randoms())
def test_merge_of_sorted_streams_is_the_sorted_union(docs: list[dict[str, Any]], k: int,
                                                    spec: Any, rnd: Any) -> None:
    streams: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    for doc in docs:
        streams[rnd.randrange(k)].append(doc)
    key = ordering(spec)
    merged = list(merge_sorted([sorted(s, key=key) for s in streams], spec))
    assert len(merged) == len(docs)
    assert _keys(merged, spec) == _keys(sorted(docs, key=key), spec)


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=20))
def test_order_is_total_and_consistent(items: list[Any]) -> None:
    keys = [value_key(v) for v in items]
    for a, b in itertools.product(keys, repeat=2):
        assert (a < b) + (b < a) + (a == b) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), st.integers(0, 60),
       st.one_of(st.none(), st.integers(1, 60)))
def test_count_with_skip_and_limit(sizes: list[int], skip: int, limit: int | None) -> None:
    wanted = per_cluster_limit(skip, limit)
    counts = [n if wanted is None else min(n, wanted) for n in sizes]
    everything = list(range(sum(sizes)))
    expected = everything[skip:] if limit is None else everything[skip:skip + limit]
    assert count_total(counts, skip, limit) == len(expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(values, max_size=6), max_size=4))
def test_distinct_union_keeps_one_of_each_equal_value(lists: list[list[Any]]) -> None:
    union = union_values(lists)
    keys = [value_key(v) for v in union]
    assert len(set(keys)) == len(keys)
    assert set(keys) == {value_key(v) for values in lists for v in values}
    assert keys == sorted(keys)


# -- against FerretDB ----------------------------------------------------------------------

# FerretDB v1 stores neither Decimal128, MinKey/MaxKey nor JavaScript code: left out here
# (their places come from MongoDB's documentation, checked by the table above).
FERRET_VALUES = [
    None, -2, Int64(7), 1.5, 2, "", "B", "a", "é", {"a": 1}, {"a": "x"},
    {"b": 0}, b"\xff", b"\x00\x00", Binary(b"\x00", 5), ObjectId("000000000000000000000000"),
    ObjectId("ffffffffffffffffffffffff"), False, True, datetime.datetime(1960, 1, 1),
    datetime.datetime(2020, 1, 1), Timestamp(1, 5), Timestamp(2, 0), Regex("a"),
    Regex("b"),
    [3, -5], ["c", 0.5], [],  # arrays: their least (ascending) or greatest element
]


@pytest.mark.parametrize("direction", [1, -1])
def test_order_matches_ferretdb(ferretdb: FerretDBProcess, db_name: str,
                                direction: int) -> None:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(ferretdb.uri)
    try:
        coll = client[db_name]["mixed"]
        coll.drop()
        coll.insert_many([{"i": i, "v": v} for i, v in enumerate(FERRET_VALUES)]
                         + [{"i": -1}])  # missing sorts as null
        got = list(coll.find({}, {"_id": 0}).sort([("v", direction), ("i", 1)]))
    finally:
        client.close()
    spec = (("v", direction), ("i", 1))
    assert [d["i"] for d in got] == [d["i"] for d in sorted(got, key=ordering(spec))]
