"""Index advice, the pure part: the ideal index of a query (ESR, tenant first), whether
an existing index serves it, redundant indexes, consolidation of missing ones.

Queries go through the real shape function (:func:`proxy.observe.shape.query_shape`),
so what is tested is what the digest hands the advisor.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from bson import Regex
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.advice.compare import IndexInfo, consolidate, redundant, serves, serving_index
from proxy.advice.derive import Need, derive
from proxy.advice.explain import collection_scan, example_command
from proxy.advice.render import create_index_js, render_js
from proxy.observe.shape import query_shape

T = "tenant_id"
NOW = datetime.datetime(2024, 5, 6)
Key = list[tuple[str, int]]


def find(filter_: dict[str, Any], sort: dict[str, Any] | None = None, coll: str = "c"
         ) -> dict[str, Any]:
    command: dict[str, Any] = {"find": coll, "filter": filter_, "$db": "app",
                               "lsid": {"id": 1}, "limit": 20}
    if sort is not None:
        command["sort"] = sort
    return query_shape(command)


def needs(shape: dict[str, Any]) -> list[Need]:
    found = derive(shape, T)
    assert found is not None
    return list(found.needs)


def equivalent(need: Need, expected: Key) -> bool:
    """Same index up to the order inside the equality block (the shape sorts filter
    fields by name; any order of equality fields serves the query alike)."""
    n = len(need.equality)
    return (set(need.equality) == {f for f, _ in expected[:n]}
            and all(d == 1 for _, d in expected[:n])
            and list(need.key[n:]) == expected[n:])


# -- the design documents' cases: query -> the index they prescribe ---------------------

DESIGN: list[tuple[str, dict[str, Any], Key]] = [
    ("tasks of one assignee due this week, active ones, highest priority first",
     find({T: "acme", "assignee_id": 7, "status": "active",
           "due_date": {"$gte": NOW, "$lt": NOW}}, {"priority": -1}),
     [(T, 1), ("assignee_id", 1), ("status", 1), ("priority", -1), ("due_date", 1)]),
    ("timesheets of a user, newest first",
     find({T: "acme", "user_id": 3}, {"date": -1}),
     [(T, 1), ("user_id", 1), ("date", -1)]),
    ("costs of a project by date",
     find({T: "acme", "project_id": 9}, {"cost_date": -1}),
     [(T, 1), ("project_id", 1), ("cost_date", -1)]),
    ("audit log by resource type and action, newest first",
     find({T: "acme", "resource_type": "task", "action": "update"}, {"timestamp": -1}),
     [(T, 1), ("resource_type", 1), ("action", 1), ("timestamp", -1)]),
    ("a login by username (unique)",
     find({T: "acme", "username": "ann"}),
     [(T, 1), ("username", 1)]),
]


@pytest.mark.parametrize(("why", "shape", "expected"), DESIGN, ids=[d[0] for d in DESIGN])
def test_design_document_cases(why: str, shape: dict[str, Any], expected: Key) -> None:
    [need] = needs(shape)
    assert equivalent(need, expected), (why, need.key)
    assert need.key[0] == (T, 1)
    # The prescribed index itself serves the query, and nothing shorter does.
    assert serves(expected, need)
    assert not serves(expected[:-1], need)


def test_existing_compound_index_serves_its_prefix() -> None:
    """With {tenant_id: 1, status: 1, role: 1} existing, a query on {tenant_id, status}
    is served (prefix)."""
    [need] = needs(find({T: "acme", "status": "active"}))
    existing = IndexInfo.from_document(
        {"name": "t_s_r", "key": {T: 1, "status": 1, "role": 1}})
    assert serving_index([existing], need) is existing


# -- more derivation cases ------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], list[Key], list[str]]] = [
    # (why, shape, ideal keys exactly, problem substrings)
    ("equality only, tenant first, others by name",
     find({"b": 1, T: "x", "a": 2}), [[(T, 1), ("a", 1), ("b", 1)]], []),
    ("sort on an equality field is dropped",
     find({T: "x", "s": 1}, {"s": 1, "d": -1}), [[(T, 1), ("s", 1), ("d", -1)]], []),
    ("a sorted range field stays in the sort",
     find({T: "x", "d": {"$gt": NOW}}, {"d": -1}), [[(T, 1), ("d", -1)]], []),
    ("$in is equality without a sort",
     find({T: "x", "k": {"$in": [1, 2]}, "a": 1}), [[(T, 1), ("a", 1), ("k", 1)]], []),
    ("$in is a range with a sort",
     find({T: "x", "k": {"$in": [1, 2]}}, {"d": 1}), [[(T, 1), ("d", 1), ("k", 1)]], []),
    ("anchored regex is a range",
     find({T: "x", "name": Regex("^ab")}), [[(T, 1), ("name", 1)]], []),
    ("equality on _id: the _id index",
     find({T: "x", "_id": 5}), [[("_id", 1)]], []),
    ("sort only",
     find({}, {"created": -1}), [[("created", -1)]], []),
    ("compound sort directions kept",
     find({"a": 1}, {"b": 1, "c": -1}), [[("a", 1), ("b", 1), ("c", -1)]], []),
    ("$or: one index per branch, with the outer equality",
     find({T: "x", "$or": [{"a": 1}, {"b": {"$gt": 1}}]}),
     [[(T, 1), ("a", 1)], [(T, 1), ("b", 1)]], []),
    ("$and is flattened",
     find({"$and": [{T: "x"}, {"a": {"$lt": 3}}]}), [[(T, 1), ("a", 1)]], []),
    ("$where beside a tenant: index the tenant, report $where",
     find({T: "x", "$where": "this.a > 1"}), [[(T, 1)]], ["$where"]),
    ("negation beside an equality is not indexed",
     find({T: "x", "s": {"$ne": "gone"}}), [[(T, 1)]], []),
    ("unanchored $regex: nothing to index",
     find({"name": {"$regex": "ann"}}), [], ["unanchored"]),
    ("case-insensitive anchored regex: nothing to index",
     find({"name": {"$regex": "^ann", "$options": "i"}}), [], ["case-insensitive"]),
    ("a regex object with the i flag",
     find({"name": re.compile("^ann", re.I)}), [], ["unanchored or case-insensitive"]),
    ("$where alone", find({"$where": "this.a > 1"}), [], ["$where"]),
    ("$expr alone", find({"$expr": {"$gt": ["$a", "$b"]}}), [], ["$expr"]),
    ("$ne/$nin only",
     find({"s": {"$ne": 1}, "k": {"$nin": [1, 2]}}), [], ["only negations"]),
    ("an $or with an unindexable branch scans",
     find({"$or": [{"a": 1}, {"$where": "x"}]}), [], ["$or branch"]),
    ("$size", find({"tags": {"$size": 2}}), [], ["$size"]),
]


@pytest.mark.parametrize(("why", "shape", "keys", "problems"), CASES,
                         ids=[c[0] for c in CASES])
def test_derivation(why: str, shape: dict[str, Any], keys: list[Key],
                    problems: list[str]) -> None:
    found = derive(shape, T)
    assert found is not None
    assert [list(n.key) for n in found.needs] == keys, why
    for text in problems:
        assert any(text in p for p in found.problems), (text, found.problems)
    if not problems:
        assert found.problems == ()
    if not keys:
        assert found.status == "unindexable"


def test_no_filter_is_not_advice() -> None:
    found = derive(find({}), T)
    assert found is not None and found.status == "no-filter"


@pytest.mark.parametrize(("command", "keys"), [
    ({"count": "c", "query": {T: "x", "a": 1}}, [[(T, 1), ("a", 1)]]),
    ({"distinct": "c", "key": "k", "query": {"a": {"$gt": 1}}}, [[("a", 1)]]),
    ({"findAndModify": "c", "query": {T: "x"}, "sort": {"p": 1}, "update": {"$set": {"a": 1}}},
     [[(T, 1), ("p", 1)]]),
    ({"update": "c", "updates": [{"q": {T: "x", "a": 1}, "u": {"$set": {"b": 1}}},
                                 {"q": {"b": 1}, "u": {"$set": {"c": 1}}}]},
     [[("b", 1)], [(T, 1), ("a", 1)]]),
    ({"delete": "c", "deletes": [{"q": {T: "x", "d": {"$lt": NOW}}, "limit": 0}]},
     [[(T, 1), ("d", 1)]]),
    ({"aggregate": "c", "pipeline": [{"$match": {T: "x"}}, {"$match": {"a": 1}},
                                     {"$sort": {"t": -1}}, {"$group": {"_id": "$a"}}],
      "cursor": {}},
     [[(T, 1), ("a", 1), ("t", -1)]]),
    ({"aggregate": "c", "pipeline": [{"$group": {"_id": "$a"}}], "cursor": {}}, []),
])
def test_other_commands(command: dict[str, Any], keys: list[Key]) -> None:
    found = derive(query_shape({**command, "$db": "app"}), T)
    assert found is not None
    # A batch's statements come in the shape's order (sorted), not the batch's.
    assert sorted(list(n.key) for n in found.needs) == keys


def test_commands_without_queries() -> None:
    for command in ({"insert": "c", "documents": []}, {"ping": 1},
                    {"getMore": 1, "collection": "c"}):
        assert derive(query_shape({**command, "$db": "app"}), T) is None


# -- serving and redundancy ------------------------------------------------------------

def _idx(name: str, key: dict[str, Any], **options: Any) -> IndexInfo:
    return IndexInfo.from_document({"name": name, "key": key, **options})


SERVES: list[tuple[str, Key, dict[str, Any], bool]] = [
    ("exact", [(T, 1), ("a", 1), ("d", -1)], {T: 1, "a": 1, "d": -1}, True),
    ("equality block in another order", [(T, 1), ("a", 1), ("d", -1)],
     {"a": 1, T: -1, "d": -1}, True),
    ("sort read backwards", [(T, 1), ("a", 1), ("d", -1)], {T: 1, "a": 1, "d": 1}, True),
    ("longer index", [(T, 1), ("a", 1)], {T: 1, "a": 1, "z": 1}, True),
    ("sort before equality", [(T, 1), ("a", 1), ("d", -1)], {T: 1, "d": -1, "a": 1}, False),
    ("too short", [(T, 1), ("a", 1)], {T: 1}, False),
]


@pytest.mark.parametrize(("why", "need_key", "index", "expected"), SERVES,
                         ids=[s[0] for s in SERVES])
def test_serves(why: str, need_key: Key, index: dict[str, Any], expected: bool) -> None:
    need = Need(tuple(f for f, _ in need_key[:2]), tuple(need_key[2:]), ())
    assert serves(tuple(index.items()), need) is expected, why


def test_mixed_sort_directions_must_all_flip() -> None:
    need = Need((), (("a", 1), ("b", -1)), ())
    assert serves((("a", -1), ("b", 1)), need)
    assert not serves((("a", 1), ("b", 1)), need)


def test_hidden_and_partial_indexes_do_not_serve() -> None:
    need = Need((T,), (), ())
    assert serving_index([_idx("h", {T: 1}, hidden=True),
                          _idx("p", {T: 1}, partialFilterExpression={"a": 1})], need) is None


def test_redundant() -> None:
    indexes = [
        _idx("_id_", {"_id": 1}),
        _idx("t", {T: 1}),
        _idx("t_s", {T: 1, "s": 1}),
        _idx("t_s_r", {T: 1, "s": 1, "r": -1}),
        _idx("u", {"email": 1}, unique=True),
        _idx("u_x", {"email": 1, "x": 1}),
        _idx("ttl", {"at": 1}, expireAfterSeconds=60),
        _idx("at_x", {"at": 1, "x": 1}),
        _idx("rev", {"q": -1}),
        _idx("q_w", {"q": 1, "w": 1}),
    ]
    found = {short.name: long.name for short, long in redundant(indexes)}
    assert found == {"t": "t_s", "t_s": "t_s_r", "rev": "q_w"}


def test_consolidate_joins_needs_one_index_serves() -> None:
    long = Need((T, "a"), (("d", -1),), ())
    short = Need((T,), (), ())
    other = Need((T, "b"), (), ())
    joined = consolidate([short, long, other])
    assert joined == {long: long, short: long, other: other}


def test_javascript_is_ready_to_paste() -> None:
    assert create_index_js("app.tasks", [(T, 1), ("due.date", -1)]) == (
        'db.getSiblingDB("app").tasks.createIndex({tenant_id: 1, "due.date": -1})')
    assert create_index_js("app.my-coll", [("a", 1)]) == (
        'db.getSiblingDB("app").getCollection("my-coll").createIndex({a: 1})')
    text = render_js({"missing": [{"namespace": "app.c", "key": {"a": 1}, "reason": "r",
                                   "shapes": [{}], "count": 3, "total_ms": 12.5}]})
    assert text == ('// r: 1 shape(s), 3 operations, 12.5 ms at stake\n'
                    'db.getSiblingDB("app").c.createIndex({a: 1});\n')


# -- invariants -------------------------------------------------------------------------

FIELDS = st.sampled_from(["a", "b", "c", "d", "e", T])
EQ_VALUES = st.one_of(st.integers(), st.text(max_size=3), st.just({"$eq": 1}),
                      st.just({"$in": [1, 2]}), st.just({"$all": [1]}))
RANGE_VALUES = st.sampled_from([{"$gt": 1}, {"$lte": NOW}, {"$gte": 1, "$lt": 9},
                                {"$exists": True}, Regex("^a")])
OTHER_VALUES = st.sampled_from([{"$ne": 1}, {"$nin": [1]}, Regex("a"), {"$size": 1}])
VALUES = st.one_of(EQ_VALUES, RANGE_VALUES, OTHER_VALUES)
SORTS = st.dictionaries(FIELDS, st.sampled_from([1, -1]), max_size=3)


@settings(max_examples=300, deadline=None)
@given(filter_=st.dictionaries(FIELDS, VALUES, max_size=5), sort=SORTS)
def test_invariants(filter_: dict[str, Any], sort: dict[str, int]) -> None:
    shape = find(filter_, sort or None)
    found = derive(shape, T)
    assert found is not None
    for need in found.needs:
        key = [f for f, _ in need.key]
        assert len(key) == len(set(key)), "a field appears once"
        # Tenant first whenever the filter bounds it (equality or range).
        tenant = filter_.get(T)
        if tenant is not None and not any(
                tenant == v for v in (Regex("a"), {"$ne": 1}, {"$nin": [1]}, {"$size": 1})):
            assert key[0] == T
        # Equality, then sort (in order and direction), then range.
        n_eq, n_sort = len(need.equality), len(need.sort)
        kinds = ["eq"] * n_eq + ["sort"] * n_sort + ["range"] * len(need.range)
        assert kinds == sorted(kinds, key=["eq", "sort", "range"].index)
        assert list(need.sort) == [(f, d) for f, d in sort.items() if f not in need.equality]
        assert not set(need.range) & set(need.equality)
        # Literal values never appear: only field names and directions.
        assert all(isinstance(d, int) and d in (1, -1) for _f, d in need.key)
        # Its own index serves it; dropping the last field does not (unless empty).
        assert serves(need.key, need)
        assert not serves(need.key[:-1], need)


# -- explain: the example command and the reading of plans ------------------------------

def test_example_command_has_neutral_values_only() -> None:
    shape = find({T: "acme-secret", "n": {"$gte": 5, "$in": [1, 2]},
                  "s": {"$regex": "^se", "$options": "i"}, "e": {"$exists": True}},
                 {"d": -1})
    command = example_command(shape)
    assert command == {"find": "c", "filter": {
        "e": {"$exists": True}, "n": {"$gte": 0, "$in": [0]},
        T: "", "s": {"$options": "i", "$regex": "^a"}}, "sort": {"d": -1}}
    assert example_command(query_shape({"count": "c", "query": {}, "$db": "app"})) is None


PLANS: list[tuple[str, dict[str, Any], bool | None]] = [
    ("MongoDB classic, collection scan",
     {"queryPlanner": {"winningPlan": {"stage": "SORT", "inputStage": {"stage": "COLLSCAN"}}}},
     True),
    ("MongoDB classic, index",
     {"queryPlanner": {"winningPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN"}}}},
     False),
    ("MongoDB 7 SBE", {"queryPlanner": {"winningPlan": {"queryPlan": {
        "stage": "COLLSCAN"}, "slotBasedPlan": {}}}}, True),
    ("FerretDB SQLite full scan",
     {"queryPlanner": {"Plan": ["id=2 parent=0 notused=0 detail=SCAN t_f10c3da3"]}}, True),
    ("FerretDB SQLite index",
     {"queryPlanner": {"Plan": ["id=3 parent=0 notused=0 detail=SEARCH t USING INDEX i (a=?)"]}},
     False),
    ("nothing to read", {"ok": 1}, None),
]


@pytest.mark.parametrize(("why", "reply", "expected"), PLANS, ids=[p[0] for p in PLANS])
def test_collection_scan(why: str, reply: dict[str, Any], expected: bool | None) -> None:
    assert collection_scan(reply)[0] is expected, why
