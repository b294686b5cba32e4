"""Which documents a write of a moving tenant may touch, as members of the move's sets
(``proxy.placement.shared``): read from the command before it is forwarded, and from the
reply after (upserted ids). Only writes of a tenant with a move in progress come here.

* insert: the documents' ``_id``s (the raw ``_id`` element when it comes first, as the
  drivers put it; else a decode of that document);
* update, delete, findAndModify: a statement filter that is ``{_id: value}`` names its
  document; the others are resolved by a ``find`` of their ``_id``s on the tenant's
  current cluster (one find for the whole batch, ``$or`` of the filters), bounded: more
  than ``max_ids`` matches, or an empty filter, mark the whole collection instead;
* aggregate with ``$merge``/``$out``: the whole output collection.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import bson

from proxy.placement.shared import full_member, id_member
from proxy.wire.op_msg import DocumentSequence
from proxy.wire.reply import _value_end

__all__ = ["Find", "may_upsert", "members_after", "members_before"]

_INT32 = struct.Struct("<i")
_ID_NAME = b"_id\x00"
# (database, command) -> reply document: a command on the tenant's current cluster.
Find = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]
_STATEMENTS = {"update": ("updates", "q"), "delete": ("deletes", "q")}


def raw_id_doc(raw: bytes) -> bytes | None:
    """BSON ``{_id: value}`` from a raw document, None when it has no ``_id``."""
    if raw[5:9] == _ID_NAME:  # _id is the first element: copy its bytes, no decode
        end = _value_end(raw, raw[4], 9)
        if end is not None:
            element = raw[4:end]
            return _INT32.pack(len(element) + 5) + element + b"\x00"
    doc = bson.decode(raw)
    return bson.encode({"_id": doc["_id"]}) if "_id" in doc else None


def _id_doc(value: Any) -> bytes:
    return bson.encode({"_id": value})


def _statements(command: Mapping[str, Any], sequences: Sequence[DocumentSequence],
                field: str) -> list[Mapping[str, Any]]:
    listed = command.get(field)
    if isinstance(listed, list):
        return [s for s in listed if isinstance(s, Mapping)]
    for sequence in sequences:
        if sequence.identifier == field:
            return [bson.decode(raw) for raw in sequence.documents()]
    return []


def _known_id(query: Any) -> tuple[bool, Any]:
    """(True, v) when the filter has ``_id: v`` at its top level (v a plain value, not
    an operator): it matches that document at most, whatever else it says (other
    conditions, such as the tenant's, only narrow it)."""
    if isinstance(query, Mapping) and "_id" in query:
        value = query["_id"]
        if not isinstance(value, Mapping) or not any(str(k).startswith("$") for k in value):
            return True, value
    return False, None


async def members_before(name: str, db: str, collection: str,
                         command: Mapping[str, Any], sequences: Sequence[DocumentSequence],
                         find: Find, max_ids: int) -> list[bytes]:
    """The members a write of ``name`` on ``db.collection`` may touch (see the module)."""
    ns = f"{db}.{collection}"
    if name == "insert":
        return _insert_members(ns, command, sequences, max_ids)
    if name == "aggregate":
        out = _aggregate_output(db, command)
        return [full_member(out)] if out is not None else []
    if name == "findAndModify":
        queries: list[Any] = [command.get("query") or {}]
    elif name in _STATEMENTS:
        field, key = _STATEMENTS[name]
        queries = [s.get(key) or {} for s in _statements(command, sequences, field)]
    else:
        return []
    members: list[bytes] = []
    unknown: list[Any] = []
    for query in queries:
        known, value = _known_id(query)
        if known:
            members.append(id_member(ns, _id_doc(value)))
        elif not query:
            return [full_member(ns)]
        else:
            unknown.append(query)
    if len(members) > max_ids:
        return [full_member(ns)]
    if unknown:
        found = await _find_ids(find, db, collection, unknown, max_ids - len(members))
        if found is None:
            return [full_member(ns)]
        members.extend(id_member(ns, _id_doc(v)) for v in found)
    return members


def _insert_members(ns: str, command: Mapping[str, Any],
                    sequences: Sequence[DocumentSequence], max_ids: int) -> list[bytes]:
    docs = command.get("documents")
    raws: list[bytes]
    if isinstance(docs, list):
        raws = [bson.encode(d) for d in docs if isinstance(d, Mapping)]
    else:
        raws = next((s.documents() for s in sequences if s.identifier == "documents"), [])
    if len(raws) > max_ids:
        return [full_member(ns)]
    members = []
    for raw in raws:
        id_doc = raw_id_doc(raw)
        if id_doc is None:  # the server will make the _id: not known before the write
            return [full_member(ns)]
        members.append(id_member(ns, id_doc))
    return members


def _aggregate_output(db: str, command: Mapping[str, Any]) -> str | None:
    pipeline = command.get("pipeline")
    if not isinstance(pipeline, list) or not pipeline:
        return None
    last = pipeline[-1]
    if not isinstance(last, Mapping):
        return None
    target = last.get("$merge", last.get("$out"))
    if target is None:
        return None
    if isinstance(target, Mapping):
        into = target.get("into", target)
        if isinstance(into, Mapping):
            return f"{into.get('db', db)}.{into.get('coll')}"
        return f"{target.get('db', db)}.{into}"
    return f"{db}.{target}"


async def _find_ids(find: Find, db: str, collection: str, queries: list[Any],
                    limit: int) -> list[Any] | None:
    """The ``_id``s matching any of ``queries``; None when more than ``limit``."""
    if limit <= 0:
        return None
    query = queries[0] if len(queries) == 1 else {"$or": queries}
    reply = await find(db, {"find": collection, "filter": query, "projection": {"_id": 1},
                            "limit": limit + 1, "batchSize": limit + 1,
                            "singleBatch": True})
    if not reply.get("ok"):
        return None  # the write will most likely fail the same way; be safe anyway
    batch = reply.get("cursor", {}).get("firstBatch", [])
    if len(batch) > limit:
        return None
    return [doc["_id"] for doc in batch if "_id" in doc]


def may_upsert(name: str, command: Mapping[str, Any],
               sequences: Sequence[DocumentSequence]) -> bool:
    """Whether the write may insert a document whose ``_id`` only its reply names."""
    if name == "findAndModify":
        return bool(command.get("upsert"))
    if name == "update":
        return any(s.get("upsert") for s in _statements(command, sequences, "updates"))
    return False


def members_after(name: str, db: str, collection: str, body: bytes | None) -> list[bytes]:
    """Members only the reply names: the ``_id``s an update or findAndModify upserted."""
    if body is None or name not in ("update", "findAndModify") or b"upserted" not in body:
        return []
    try:
        reply = bson.decode(body[5:5 + _INT32.unpack_from(body, 5)[0]])
    except Exception:  # not a plain kind-0 body: nothing to learn from it
        return []
    ns = f"{db}.{collection}"
    if name == "update":
        upserted = reply.get("upserted") or []
        return [id_member(ns, _id_doc(u["_id"])) for u in upserted
                if isinstance(u, Mapping) and "_id" in u]
    last = reply.get("lastErrorObject") or {}
    if isinstance(last, Mapping) and "upserted" in last:
        return [id_member(ns, _id_doc(last["upserted"]))]
    return []
