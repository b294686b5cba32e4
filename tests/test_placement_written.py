"""Which documents a write of a moving tenant may touch (proxy.placement.written): the
cases decided from the command alone (no find needed) and from the reply."""

from __future__ import annotations

from typing import Any

import bson
from bson import ObjectId
from bson.int64 import Int64

from proxy.placement.shared import decode_member, full_member
from proxy.placement.written import members_after, members_before, raw_id_doc
from proxy.wire.op_msg import DocumentSequence


async def _no_find(db: str, command: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError(f"no find expected, got {command}")


def _ids(members: list[bytes]) -> list[Any]:
    return [decode_member(m)[1] for m in members]


def test_raw_id_doc_copies_the_first_element_and_decodes_otherwise() -> None:
    oid = ObjectId()
    for value in (oid, "s", 7, Int64(7), 1.5, {"a": 1}):
        assert raw_id_doc(bson.encode({"_id": value, "x": 1})) == bson.encode({"_id": value})
    assert raw_id_doc(bson.encode({"x": 1, "_id": "late"})) == bson.encode({"_id": "late"})
    assert raw_id_doc(bson.encode({"x": 1})) is None


async def test_insert_from_a_document_sequence() -> None:
    payload = b"".join(bson.encode(d) for d in ({"_id": 1, "t": "a"}, {"t": "a", "_id": "x"}))
    members = await members_before("insert", "db", "c", {"insert": "c"},
                                   (DocumentSequence("documents", payload),), _no_find, 10)
    assert _ids(members) == [1, "x"] and decode_member(members[0])[0] == "db.c"
    no_id = DocumentSequence("documents", bson.encode({"t": "a"}))
    assert await members_before("insert", "db", "c", {}, (no_id,), _no_find, 10) == [
        full_member("db.c")]
    many = {"documents": [{"_id": n} for n in range(11)]}
    assert await members_before("insert", "db", "c", many, (), _no_find, 10) == [
        full_member("db.c")]


async def test_filters_by_id_empty_filters_and_merge() -> None:
    command = {"updates": [{"q": {"_id": 5}, "u": {}}, {"q": {"_id": {"x": 1}}, "u": {}}]}
    assert _ids(await members_before("update", "db", "c", command, (), _no_find, 10)) == [
        5, {"x": 1}]
    # The tenant's own condition beside _id (every enforce-mode write has one) needs no
    # lookup: the filter matches that one document at most.
    confined = {"updates": [{"q": {"_id": 7, "tenant_id": "a", "n": {"$gt": 1}}, "u": {}}]}
    assert _ids(await members_before("update", "db", "c", confined, (), _no_find, 10)) == [7]
    assert await members_before("delete", "db", "c", {"deletes": [{"q": {}, "limit": 0}]},
                                (), _no_find, 10) == [full_member("db.c")]
    merge = {"pipeline": [{"$match": {}}, {"$merge": {"into": {"db": "o", "coll": "out"}}}]}
    assert await members_before("aggregate", "db", "c", merge, (), _no_find, 10) == [
        full_member("o.out")]
    assert await members_before("aggregate", "db", "c", {"pipeline": [{"$out": "x"}]}, (),
                                _no_find, 10) == [full_member("db.x")]
    assert await members_before("aggregate", "db", "c", {"pipeline": [{"$match": {}}]}, (),
                                _no_find, 10) == []


def test_upserted_ids_from_the_reply() -> None:
    def body(doc: dict[str, Any]) -> bytes:
        return b"\0\0\0\0\0" + bson.encode(doc)

    oid = ObjectId()
    update = body({"n": 1, "upserted": [{"index": 0, "_id": oid}], "ok": 1.0})
    assert _ids(members_after("update", "db", "c", update)) == [oid]
    fam = body({"lastErrorObject": {"n": 1, "upserted": "u1"}, "value": None, "ok": 1.0})
    assert _ids(members_after("findAndModify", "db", "c", fam)) == ["u1"]
    assert members_after("update", "db", "c", None) == []
    assert members_after("insert", "db", "c", update) == []
