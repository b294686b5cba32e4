"""Property: whatever the tenancy policy allows in enforce mode for tenant "a" returns,
run directly on a real FerretDB, only documents of tenant "a".

The data set has three tenants and documents that must never leak: no tenant field,
``null``, an array (without "a"), an embedded document holding "a", "A", "a " and a
number. Each document has a unique ``_id`` and a ``leak`` marker (0 for tenant "a", 1
for every other document). Results are checked by ``_id`` when no ``$group`` ran, and by
``leak == 0`` always: projections keep ``leak`` and every ``$group`` sums it, so a group
fed by any foreign document shows it (FerretDB v1.24 has no ``$push``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from proxy.tenancy import TenancyConfig, TenantPolicy
from tests.support import FerretDBProcess

FIELD = "tenant_id"
POLICY = TenantPolicy(TenancyConfig(mode="enforce"))
ODD_VALUES: list[Any] = [None, ["b", "c"], {"x": "a"}, "A", "a ", 1, ["c"], ""]


def _dataset() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    i = 0
    for tenant in ("a", "b", "c"):
        for k in range(4):
            docs.append({"_id": i, FIELD: tenant, "k": k, "n": i % 5, "s": f"s{k}",
                         "leak": int(tenant != "a")})
            i += 1
    for v in ODD_VALUES:
        for k in range(2):
            docs.append({"_id": i, FIELD: v, "k": k, "n": i % 5, "s": f"s{k}", "leak": 1})
            i += 1
    for k in range(2):
        docs.append({"_id": i, "k": k, "n": i % 5, "s": f"s{k}", "leak": 1})  # no field
        i += 1
    return docs


DOCS = _dataset()
A_IDS = frozenset(d["_id"] for d in DOCS if type(d.get(FIELD)) is str and d[FIELD] == "a")


@pytest.fixture(scope="module")
def coll(ferretdb: FerretDBProcess) -> Iterator[Collection[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(ferretdb.uri)
    c = client["t_tenancy_property"]["docs"]
    c.drop()
    c.insert_many(DOCS)
    yield c
    client.drop_database("t_tenancy_property")
    client.close()


# --- strategies -----------------------------------------------------------------------

tenant_values = st.sampled_from(["a", "b", "c", *ODD_VALUES])
ints = st.integers(min_value=-1, max_value=5)
cmp_ops = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"])


def _field_conds(field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        values,
        st.builds(lambda op, v: {op: v}, cmp_ops, values),
        st.builds(lambda vs: {"$in": vs}, st.lists(values, min_size=1, max_size=3)),
        st.builds(lambda vs: {"$nin": vs}, st.lists(values, min_size=1, max_size=3)),
        st.builds(lambda b: {"$exists": b}, st.booleans()),
        st.builds(lambda op, v: {"$not": {op: v}}, cmp_ops, values),
        st.builds(lambda v, w: {"$eq": v, "$ne": w}, values, values),
    )


leaf = st.one_of(
    st.builds(lambda c: {FIELD: c}, _field_conds(FIELD, tenant_values)),
    st.builds(lambda c: {"k": c}, _field_conds("k", ints)),
    st.builds(lambda c: {"n": c}, _field_conds("n", ints)),
    st.builds(lambda c: {"s": c}, _field_conds("s", st.sampled_from(["s0", "s1", "a"]))),
    st.builds(lambda c: {f"{FIELD}.x": c}, st.sampled_from(["a", "b"])),
)


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        out.update(p)
    return out


filters = st.recursive(
    leaf,
    lambda sub: st.one_of(
        st.builds(lambda xs: {"$and": xs}, st.lists(sub, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$or": xs}, st.lists(sub, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$nor": xs}, st.lists(sub, min_size=1, max_size=3)),
        st.builds(_merge, st.lists(sub, min_size=1, max_size=3)),
    ),
    max_leaves=8,
)
# Filters the policy will often accept: a tenant equality ANDed with anything (mostly
# "a", sometimes another or an odd value, which the policy must refuse).
eq_values = st.sampled_from(["a"] * 8 + ["b", None, "A", ["b", "c"], {"x": "a"}])
tenant_eq = st.one_of(
    st.builds(lambda v: {FIELD: v}, eq_values),
    st.builds(lambda v: {FIELD: {"$eq": v}}, eq_values),
    st.builds(lambda v: {FIELD: {"$in": [v]}}, eq_values),
    st.builds(lambda v, op, w: {FIELD: {"$eq": v, op: w}}, eq_values, cmp_ops, tenant_values),
)
confined = st.one_of(
    st.builds(lambda t, f: {"$and": [t, f]}, tenant_eq, filters),
    st.builds(lambda t, f: {**f, **t}, tenant_eq, filters),
    st.builds(lambda f, t: {"$and": [f, {"$and": [t]}]}, filters, tenant_eq),
    st.builds(lambda t, f: {**t, "$or": [f, t]}, tenant_eq, filters),
    st.builds(lambda t, f: {**t, "$nor": [f]}, tenant_eq, filters),
)
any_filter = st.one_of(confined, confined, confined, filters)

stages = st.one_of(
    st.builds(lambda f: {"$match": f}, any_filter),
    st.sampled_from([{"$project": {"k": 1, "n": 1, "leak": 1, FIELD: 1}},
                     {"$project": {"k": 1, "leak": 1}}, {"$project": {FIELD: 0}},
                     {"$project": {"s": 0, "n": 0}}]),
    st.builds(lambda n: {"$limit": n}, st.integers(min_value=1, max_value=30)),
    st.just({"$group": {"_id": "$k", "leak": {"$sum": "$leak"}, "n": {"$sum": 1}}}),
    st.just({"$group": {"_id": "$tenant_id", "leak": {"$sum": "$leak"}}}),
    st.just({"$group": {"_id": None, "leak": {"$sum": "$leak"}, "k": {"$sum": "$k"}}}),
    st.just({"$sort": {"_id": 1}}),
    st.builds(lambda n: {"$skip": n}, st.integers(min_value=0, max_value=3)),
)
pipelines = st.one_of(
    st.builds(lambda f, rest: [{"$match": f}, *rest], any_filter,
              st.lists(stages, max_size=4)),
    st.builds(lambda f, rest: [{"$match": f}, *rest], confined,
              st.lists(stages, max_size=4)),
    st.lists(stages, min_size=1, max_size=4),
)


def _leaks(results: list[dict[str, Any]], grouped: bool) -> list[Any]:
    """The results that show a document of another tenant."""
    return [d for d in results
            if d.get("leak") != 0 or (not grouped and d["_id"] not in A_IDS)]



_SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@_SETTINGS
@given(flt=any_filter)
def test_allowed_filters_return_only_tenant_a(
    coll: Collection[dict[str, Any]], flt: dict[str, Any]
) -> None:
    db = coll.database.name
    for command, run in (
        ({"find": "docs", "filter": flt, "$db": db}, lambda: list(coll.find(flt))),
        ({"count": "docs", "query": flt, "$db": db}, None),
        ({"delete": "docs", "deletes": [{"q": flt, "limit": 0}], "$db": db}, None),
    ):
        verdict = POLICY.check(command, {}, "a", False)
        if not verdict.allowed:
            continue
        assert verdict.tenant == "a"
        if run is None:
            # count/delete share find's filter rules: count on the server must not
            # exceed tenant a's documents matched by the same filter.
            try:
                n = coll.count_documents(flt)
            except OperationFailure:
                continue
            assert n <= len(A_IDS)
            continue
        try:
            results = run()
        except OperationFailure:
            continue  # the server refused it: nothing returned
        leaked = _leaks(results, False)
        assert not leaked, f"filter {flt!r} returned documents of other tenants: {leaked}"


@_SETTINGS
@given(pipeline=pipelines)
def test_allowed_pipelines_return_only_tenant_a(
    coll: Collection[dict[str, Any]], pipeline: list[dict[str, Any]]
) -> None:
    command = {"aggregate": "docs", "pipeline": pipeline, "cursor": {},
               "$db": coll.database.name}
    verdict = POLICY.check(command, {}, "a", False)
    if not verdict.allowed:
        return
    assert verdict.tenant == "a"
    try:
        results = list(coll.aggregate(pipeline))
    except OperationFailure:
        return
    grouped = any("$group" in stage for stage in pipeline)
    leaked = _leaks(results, grouped)
    assert not leaked, f"pipeline {pipeline!r} returned documents of other tenants: {leaked}"


def test_dataset_detects_leaks(coll: Collection[dict[str, Any]]) -> None:
    """The oracle works: unconfined queries do return other tenants' documents, the
    policy refuses them, and plain tenant equality returns exactly tenant a."""
    assert len(A_IDS) == 4
    assert {d["_id"] for d in coll.find({FIELD: "a"})} == A_IDS
    wide = [{FIELD: {"$ne": "b"}}, {"$or": [{FIELD: "a"}, {"k": 1}]}, {f"{FIELD}.x": "a"},
            {FIELD: {"$in": ["a", "b"]}}, {FIELD: {"$gte": "a"}}]
    for flt in wide:
        assert _leaks(list(coll.find(flt)), False), flt
        assert not POLICY.check({"find": "docs", "filter": flt, "$db": "x"}, {}, "a",
                                False).allowed
    grouped = list(coll.aggregate([{"$group": {"_id": None, "leak": {"$sum": "$leak"}}}]))
    assert _leaks(grouped, True)
    confined: list[dict[str, Any]] = [{"$match": {FIELD: "a"}}, {"$project": {"s": 0}},
                {"$group": {"_id": "$k", "leak": {"$sum": "$leak"}}}]
    assert len(list(coll.aggregate(confined))) == 4
    assert not _leaks(list(coll.aggregate(confined)), True)
