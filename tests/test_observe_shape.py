"""Query shape normalisation: commands that must share a shape, and ones that must not."""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp

from proxy.observe.shape import describe, placeholder, query_shape, shape_hash, shape_text

ENVELOPE: dict[str, Any] = {
    "lsid": {"id": Binary(uuid.uuid4().bytes, 4)},
    "$clusterTime": {"clusterTime": Timestamp(1, 1), "signature": {"hash": b"x",
                                                                   "keyId": Int64(0)}},
    "$readPreference": {"mode": "secondaryPreferred"},
    "txnNumber": Int64(7),
    "readConcern": {"level": "majority"},
    "writeConcern": {"w": "majority"},
    "comment": "a comment with a value",
    "maxTimeMS": 5000,
    "batchSize": 101,
    "singleBatch": False,
    "apiVersion": "1",
}


def cmd(*pairs: tuple[str, Any], db: str = "app", **extra: Any) -> dict[str, Any]:
    doc = dict(pairs)
    doc.update(extra)
    doc["$db"] = db
    return doc


def h(command: dict[str, Any], sequences: dict[str, Any] | None = None) -> str:
    return shape_hash(query_shape(command, sequences))


SAME: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("values differ",
     cmd(("find", "orders"), filter={"tenant_id": "a", "status": "open"}),
     cmd(("find", "orders"), filter={"tenant_id": "b", "status": "closed"})),
    ("filter field order ignored",
     cmd(("find", "orders"), filter={"tenant_id": "a", "status": "open"}),
     cmd(("find", "orders"), filter={"status": "x", "tenant_id": "b"})),
    ("envelope noise dropped",
     cmd(("find", "orders"), filter={"a": 1}),
     cmd(("find", "orders"), filter={"a": 2}, **ENVELOPE)),
    ("envelope order ignored",
     {"find": "orders", "filter": {"a": 1}, "sort": {"b": 1}, "$db": "app", "limit": 3},
     {"find": "orders", "$db": "app", "limit": 50, "sort": {"b": 1}, "filter": {"a": 9}}),
    ("$in lists collapsed",
     cmd(("find", "orders"), filter={"status": {"$in": ["a", "b", "c"]}}),
     cmd(("find", "orders"), filter={"status": {"$in": ["z"]}})),
    ("$nin lists collapsed",
     cmd(("find", "orders"), filter={"n": {"$nin": [1, 2]}}),
     cmd(("find", "orders"), filter={"n": {"$nin": [3, 4, 5, 6]}})),
    ("int32 and int64 are both ?int",
     cmd(("find", "orders"), filter={"n": 1}),
     cmd(("find", "orders"), filter={"n": Int64(2**40)})),
    ("operator order inside a field ignored",
     cmd(("find", "orders"), filter={"n": {"$gte": 1, "$lt": 9}}),
     cmd(("find", "orders"), filter={"n": {"$lt": 3, "$gte": 0}})),
    ("$or branches sorted and de-duplicated",
     cmd(("find", "t"), filter={"$or": [{"a": 1}, {"b": "x"}]}),
     cmd(("find", "t"), filter={"$or": [{"b": "y"}, {"a": 2}, {"a": 3}]})),
    ("limit and skip values ignored",
     cmd(("find", "orders"), filter={}, limit=1, skip=10),
     cmd(("find", "orders"), filter={}, limit=100, skip=0)),
    ("projection values ignored, keys kept",
     cmd(("find", "orders"), projection={"a": 1, "b": 1}),
     cmd(("find", "orders"), projection={"b": True, "a": True})),
    ("insert documents are not part of the shape",
     cmd(("insert", "orders"), documents=[{"a": 1}], ordered=True),
     cmd(("insert", "orders"), documents=[{"x": "y", "z": [1]}] * 5)),
    ("aggregate literals replaced",
     cmd(("aggregate", "orders"), pipeline=[{"$match": {"tenant_id": "a"}},
                                           {"$group": {"_id": "$status", "n": {"$sum": 1}}},
                                           {"$limit": 10}], cursor={}),
     cmd(("aggregate", "orders"), pipeline=[{"$match": {"tenant_id": "b"}},
                                           {"$group": {"_id": "$status", "n": {"$sum": 5}}},
                                           {"$limit": 99}], cursor={"batchSize": 5})),
    ("update values and batch size ignored",
     cmd(("update", "orders"), updates=[{"q": {"_id": ObjectId()}, "u": {"$set": {"a": 1}}}]),
     cmd(("update", "orders"), updates=[{"q": {"_id": ObjectId()}, "u": {"$set": {"a": 2}}},
                                        {"q": {"_id": ObjectId()}, "u": {"$set": {"a": 3}}}])),
    ("update $set field order ignored",
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1, "y": 2}}}]),
     cmd(("update", "t"), updates=[{"q": {"a": 2}, "u": {"$set": {"y": 1, "x": 2}}}])),
    ("delete values ignored",
     cmd(("delete", "t"), deletes=[{"q": {"a": "x"}, "limit": 1}]),
     cmd(("delete", "t"), deletes=[{"q": {"a": "y"}, "limit": 1}])),
    ("count query values ignored",
     cmd(("count", "t"), query={"a": 1}),
     cmd(("count", "t"), query={"a": 7})),
    ("distinct query values ignored",
     cmd(("distinct", "t"), key="k", query={"a": "x"}),
     cmd(("distinct", "t"), key="k", query={"a": "y"})),
    ("getMore cursor ids ignored",
     cmd(("getMore", Int64(123)), collection="t", batchSize=10),
     cmd(("getMore", Int64(456)), collection="t")),
    ("regex patterns ignored",
     cmd(("find", "t"), filter={"name": Regex("^a")}),
     cmd(("find", "t"), filter={"name": re.compile("^bc")})),
    ("unanchored regex patterns ignored",
     cmd(("find", "t"), filter={"name": Regex("a$"), "x": {"$regex": "b"}}),
     cmd(("find", "t"), filter={"name": re.compile("b", re.I), "x": {"$regex": "^.c"}})),
    ("embedded document equality is a literal",
     cmd(("find", "t"), filter={"addr": {"city": "x", "zip": "1"}}),
     cmd(("find", "t"), filter={"addr": {"zip": "2"}})),
    ("findAndModify values ignored",
     cmd(("findAndModify", "t"), query={"a": 1}, update={"$inc": {"n": 1}}, new=True),
     cmd(("findAndModify", "t"), query={"a": 2}, update={"$inc": {"n": 5}}, new=True)),
]

DIFFERENT: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("a left-anchored regex can use an index, an unanchored one cannot",
     cmd(("find", "t"), filter={"name": Regex("^a")}),
     cmd(("find", "t"), filter={"name": Regex("a")})),
    ("the same for the $regex operator",
     cmd(("find", "t"), filter={"name": {"$regex": "^a"}}),
     cmd(("find", "t"), filter={"name": {"$regex": "a"}})),
    ("different field",
     cmd(("find", "orders"), filter={"status": "a"}),
     cmd(("find", "orders"), filter={"state": "a"})),
    ("extra field",
     cmd(("find", "orders"), filter={"status": "a"}),
     cmd(("find", "orders"), filter={"status": "a", "tenant_id": "t"})),
    ("different operator",
     cmd(("find", "orders"), filter={"n": {"$gt": 1}}),
     cmd(("find", "orders"), filter={"n": {"$gte": 1}})),
    ("equality vs operator",
     cmd(("find", "orders"), filter={"n": 1}),
     cmd(("find", "orders"), filter={"n": {"$eq": 1}})),
    ("different value type",
     cmd(("find", "orders"), filter={"n": 1}),
     cmd(("find", "orders"), filter={"n": "1"})),
    ("$in vs $nin",
     cmd(("find", "orders"), filter={"n": {"$in": [1]}}),
     cmd(("find", "orders"), filter={"n": {"$nin": [1]}})),
    ("$in element types",
     cmd(("find", "orders"), filter={"n": {"$in": [1]}}),
     cmd(("find", "orders"), filter={"n": {"$in": ["1"]}})),
    ("different collection",
     cmd(("find", "orders"), filter={"a": 1}),
     cmd(("find", "invoices"), filter={"a": 1})),
    ("different database",
     cmd(("find", "orders"), filter={"a": 1}, db="app"),
     cmd(("find", "orders"), filter={"a": 1}, db="other")),
    ("different command",
     cmd(("find", "orders"), filter={"a": 1}),
     cmd(("count", "orders"), query={"a": 1})),
    ("sort direction",
     cmd(("find", "orders"), sort={"a": 1}),
     cmd(("find", "orders"), sort={"a": -1})),
    ("sort key order matters",
     cmd(("find", "orders"), sort={"a": 1, "b": 1}),
     cmd(("find", "orders"), sort={"b": 1, "a": 1})),
    ("limit present or not",
     cmd(("find", "orders"), filter={}),
     cmd(("find", "orders"), filter={}, limit=1)),
    ("projection keys",
     cmd(("find", "orders"), projection={"a": 1}),
     cmd(("find", "orders"), projection={"b": 1})),
    ("$exists true vs false",
     cmd(("find", "t"), filter={"a": {"$exists": True}}),
     cmd(("find", "t"), filter={"a": {"$exists": False}})),
    ("$or vs $and",
     cmd(("find", "t"), filter={"$or": [{"a": 1}, {"b": 1}]}),
     cmd(("find", "t"), filter={"$and": [{"a": 1}, {"b": 1}]})),
    ("pipeline stage order",
     cmd(("aggregate", "t"), pipeline=[{"$match": {"a": 1}}, {"$limit": 5}]),
     cmd(("aggregate", "t"), pipeline=[{"$limit": 5}, {"$match": {"a": 1}}])),
    ("group by a different field",
     cmd(("aggregate", "t"), pipeline=[{"$group": {"_id": "$a"}}]),
     cmd(("aggregate", "t"), pipeline=[{"$group": {"_id": "$b"}}])),
    ("$lookup target collection",
     cmd(("aggregate", "t"), pipeline=[{"$lookup": {"from": "x", "localField": "a",
                                                    "foreignField": "b", "as": "j"}}]),
     cmd(("aggregate", "t"), pipeline=[{"$lookup": {"from": "y", "localField": "a",
                                                    "foreignField": "b", "as": "j"}}])),
    ("update operator",
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1}}}]),
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$inc": {"x": 1}}}])),
    ("update field",
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1}}}]),
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"y": 1}}}])),
    ("update multi",
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1}}}]),
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1}}, "multi": True}])),
    ("replacement vs operator update",
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"x": 1}}]),
     cmd(("update", "t"), updates=[{"q": {"a": 1}, "u": {"$set": {"x": 1}}}])),
    ("delete one vs many",
     cmd(("delete", "t"), deletes=[{"q": {"a": 1}, "limit": 1}]),
     cmd(("delete", "t"), deletes=[{"q": {"a": 1}, "limit": 0}])),
    ("delete filter field",
     cmd(("delete", "t"), deletes=[{"q": {"a": 1}, "limit": 1}]),
     cmd(("delete", "t"), deletes=[{"q": {"b": 1}, "limit": 1}])),
    ("distinct key",
     cmd(("distinct", "t"), key="a"),
     cmd(("distinct", "t"), key="b")),
    ("insert into another collection",
     cmd(("insert", "a"), documents=[{}]),
     cmd(("insert", "b"), documents=[{}])),
    ("hint",
     cmd(("find", "t"), filter={"a": 1}, hint="a_1"),
     cmd(("find", "t"), filter={"a": 1}, hint="a_1_b_1")),
    ("$elemMatch inner field",
     cmd(("find", "t"), filter={"items": {"$elemMatch": {"sku": "x"}}}),
     cmd(("find", "t"), filter={"items": {"$elemMatch": {"qty": 1}}})),
]


@pytest.mark.parametrize(("why", "a", "b"), SAME, ids=[s[0] for s in SAME])
def test_same_shape(why: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    assert query_shape(a) == query_shape(b), why
    assert h(a) == h(b)


@pytest.mark.parametrize(("why", "a", "b"), DIFFERENT, ids=[s[0] for s in DIFFERENT])
def test_different_shape(why: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    assert h(a) != h(b), why


def test_find_shape_exactly() -> None:
    command = cmd(
        ("find", "orders"),
        filter={"tenant_id": "acme", "status": {"$in": ["open", "pending"]},
                "created": {"$gte": datetime.datetime(2024, 1, 1)}},
        projection={"total": 1, "_id": 0}, sort={"created": -1}, limit=20, **ENVELOPE,
    )
    assert query_shape(command) == {
        "cmd": "find", "db": "app", "coll": "orders",
        "filter": {"created": {"$gte": "?date"}, "status": {"$in": ["?str"]},
                   "tenant_id": "?str"},
        "projection": ["_id", "total"],
        "sort": {"created": -1},
        "limit": True,
    }


def test_no_values_in_text() -> None:
    secret = "s3cr3t-value"
    command = cmd(("find", "users"), filter={"email": secret, "n": {"$in": [secret]},
                                             "$or": [{"x": secret}]}, comment=secret)
    assert secret not in shape_text(query_shape(command))
    agg = cmd(("aggregate", "users"), pipeline=[
        {"$match": {"email": secret}},
        {"$project": {"x": {"$concat": ["$a", secret]}, "y": {"$literal": secret}}},
    ])
    assert secret not in shape_text(query_shape(agg))


def test_update_statements_from_document_sequence() -> None:
    body = {"update": "t", "ordered": True, "$db": "app"}
    statements = [{"q": {"a": 1}, "u": {"$set": {"b": 2}}}]
    assert query_shape(body, {"updates": statements}) == query_shape(
        {**body, "updates": statements})
    assert query_shape(body, {"updates": statements}) != query_shape(body)


def test_hash_is_stable_and_short() -> None:
    command = cmd(("find", "orders"), filter={"tenant_id": "a", "status": "open"})
    # A constant: the hash must not change between processes or releases silently.
    assert h(command) == shape_hash(json.loads(shape_text(query_shape(command))))
    assert re.fullmatch(r"[0-9a-f]{16}", h(command))
    d = describe(command)
    assert d.hash == h(command)
    assert d.text == shape_text(d.shape)
    assert "\n" not in d.text


@pytest.mark.parametrize(("value", "expected"), [
    ("x", "?str"), (1, "?int"), (Int64(1), "?int"), (1.5, "?double"),
    (Decimal128("1.5"), "?decimal"), (True, "?bool"), (None, "?null"),
    (datetime.datetime(2024, 1, 1), "?date"), (ObjectId(), "?oid"),
    (Binary(b"x"), "?binary"), (b"x", "?binary"), (uuid.uuid4(), "?uuid"),
    (Regex("a"), "?regex"), (Regex("^a"), "?regex:prefix"), (Regex("^a", "i"), "?regex"),
    (re.compile(r"\Ax"), "?regex:prefix"), (Regex("^(a|b)"), "?regex"),
    (Timestamp(1, 1), "?timestamp"), ([1], "?array"),
    ({"a": 1}, "?object"),
])
def test_placeholders(value: Any, expected: str) -> None:
    assert placeholder(value) == expected


def test_other_commands_keep_name_and_namespace() -> None:
    assert query_shape({"ping": 1, "$db": "admin", **ENVELOPE}) == {
        "cmd": "ping", "db": "admin", "coll": None}
    assert query_shape({"createIndexes": "t", "indexes": [], "$db": "app"}) == {
        "cmd": "createIndexes", "db": "app", "coll": "t"}
    assert query_shape({"aggregate": 1, "pipeline": [{"$currentOp": {}}], "$db": "admin"})[
        "coll"] is None


@pytest.mark.parametrize(("why", "a", "b"), SAME + DIFFERENT)
def test_cached_text_and_hash_equal_a_fresh_computation(
    why: str, a: dict[str, Any], b: dict[str, Any]
) -> None:
    """describe() looks text and hash up by the shape's marshal bytes: whatever is in the
    table, the answer equals computing them afresh."""
    for command in (a, b, a):
        found = describe(command)
        assert found.text == shape_text(query_shape(command))
        assert found.hash == shape_hash(query_shape(command))


def test_a_non_dict_mapping_is_a_literal_object() -> None:
    """Shapes treat only dicts (what bson decodes) as documents."""
    from types import MappingProxyType

    shape = query_shape({"find": "c", "filter": {"a": MappingProxyType({"$gt": 1})}})
    assert shape["filter"] == {"a": "?object"}


def test_structural_operators_keep_no_string_values() -> None:
    """``$exists``, ``$type``, ``$options``, ``$meta`` and ``sort`` arguments are kept only
    when they are numbers, booleans or the operator's own keywords: a string argument
    is customer data (issue 15: ``{$exists: "SECRET"}`` reached the slow log)."""
    command = cmd(("find", "t"), filter={
        "a": {"$exists": "SECRET_EXISTS"},
        "b": {"$type": ["string", "SECRET_TYPE"]},
        "c": {"$regex": "x", "$options": "SECRET_OPTIONS"},
        "d": {"$exists": 1}, "e": {"$type": "string"}, "f": {"$regex": "y", "$options": "i"},
    }, sort={"g": "SECRET_SORT", "h": {"$meta": "textScore"}}, hint="index_name_1")
    text = describe(command).text
    assert "SECRET" not in text, text
    for kept in ('"$exists":1', '"$type":"string"', '"$options":"i"', '"textScore"',
                 '"index_name_1"'):
        assert kept in text, (kept, text)
