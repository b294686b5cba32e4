"""Which reads may be cached, which replies may be stored, which namespaces a write
invalidates. Pure functions over decoded commands and raw reply bytes (no I/O).

**A read is looked up** when a cache rule matches it and it is one of
:data:`CACHEABLE` (``find``, ``count``, ``distinct``, ``aggregate``) on a collection,
and none of these holds (the bypass reason in metrics and the slow log):

=================  =============================================================
reason             when
=================  =============================================================
transaction        ``autocommit: false`` or ``startTransaction``: a transaction
                   sees its own uncommitted writes and a snapshot
read_concern       ``snapshot``/``linearizable`` level, or ``afterClusterTime``,
                   ``atClusterTime``, ``afterOpTime`` (causal / point-in-time reads)
tailable           ``tailable`` or ``awaitData`` (a stream, not a result)
explain            ``explain`` of anything (plans and execution statistics)
stage              an aggregate stage outside :data:`PURE_STAGES` (``$lookup``,
                   ``$unionWith``, ``$graphLookup`` read other collections,
                   ``$sample`` is random, ``$currentOp``/``$collStats``... are not data)
nondeterministic   ``$$NOW``, ``$$CLUSTER_TIME``, ``$rand`` or ``$sampleRate``
                   anywhere in the command
no_collection      a database-level command (``aggregate: 1``)
command            a read the cache does not handle (``listIndexes``, ``getMore``, ...)
sequences          an OP_MSG document sequence on a read
=================  =============================================================

**A reply is stored** (:func:`reply_bypass`) when it is ``ok: 1``, its cursor (if it
has one) is exhausted in the first batch (``id: 0``), and it is at most
``max_entry_bytes``; otherwise the operation is a bypass ``error_reply``,
``multi_batch``, ``too_large`` or ``malformed``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.cache.key import ENVELOPE
from proxy.classify import Classification
from proxy.commands import FILTERED_READS
from proxy.wire import reply_cursor

__all__ = [
    "CACHEABLE",
    "CLUSTER_TIME_FIELDS",
    "PURE_STAGES",
    "WriteTargets",
    "read_bypass",
    "reply_bypass",
    "strip_fields",
    "written_namespaces",
]

CACHEABLE = FILTERED_READS
# Stages whose output depends only on the input documents of the collection.
PURE_STAGES = frozenset({
    "$match", "$project", "$addFields", "$set", "$unset", "$sort", "$limit", "$skip",
    "$group", "$count", "$unwind", "$replaceRoot", "$replaceWith", "$sortByCount",
    "$bucket", "$bucketAuto", "$facet", "$geoNear", "$redact", "$densify", "$fill",
    "$setWindowFields",
})
_NONDETERMINISTIC_VALUES = frozenset({"$$NOW", "$$CLUSTER_TIME"})
_NONDETERMINISTIC_KEYS = frozenset({"$rand", "$sampleRate"})
_UNSAFE_READ_CONCERN = frozenset({"snapshot", "linearizable"})
_CAUSAL_READ_CONCERN = ("afterClusterTime", "atClusterTime", "afterOpTime")
# Reply fields of a moment in the cluster's history: a stored reply must not carry them
# (a driver would gossip a stale $clusterTime or advance a session to an old time).
CLUSTER_TIME_FIELDS = frozenset({
    "$clusterTime", "operationTime", "$gleStats", "lastCommittedOpTime",
    "$configServerState", "$topologyTime",
})


def read_bypass(command: Mapping[str, Any], c: Classification, has_sequences: bool) -> str | None:
    """Why this read (matched by a rule) must not be looked up, or None when it may."""
    if c.command not in CACHEABLE or c.is_write or c.is_cursor_continuation:
        return "command"
    if c.explain:
        return "explain"
    if c.in_transaction or command.get("startTransaction"):
        return "transaction"
    if c.collection is None:
        return "no_collection"
    if has_sequences:
        return "sequences"
    read_concern = command.get("readConcern")
    if isinstance(read_concern, dict) and (
        read_concern.get("level") in _UNSAFE_READ_CONCERN
        or any(k in read_concern for k in _CAUSAL_READ_CONCERN)
    ):
        return "read_concern"
    if command.get("tailable") or command.get("awaitData"):
        return "tailable"
    if c.command == "aggregate" and not _pure_pipeline(command.get("pipeline")):
        return "stage"
    for key, value in command.items():  # the session envelope cannot hold $$NOW
        if key not in ENVELOPE and isinstance(value, dict | list) and _nondeterministic(
                value):
            return "nondeterministic"
    return None


def _pure_pipeline(pipeline: Any) -> bool:
    if not isinstance(pipeline, list):
        return False
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            return False
        name, spec = next(iter(stage.items()))
        if name not in PURE_STAGES:
            return False
        if name == "$facet":
            if not isinstance(spec, dict):
                return False
            if not all(_pure_pipeline(sub) for sub in spec.values()):
                return False
    return True


def _nondeterministic(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if key in _NONDETERMINISTIC_KEYS:
                    return True
                if isinstance(sub, dict | list):
                    stack.append(sub)
                elif type(sub) is str and sub in _NONDETERMINISTIC_VALUES:  # not Code
                    return True
        elif isinstance(item, list):
            for sub in item:
                if isinstance(sub, dict | list):
                    stack.append(sub)
                elif type(sub) is str and sub in _NONDETERMINISTIC_VALUES:  # not Code
                    return True
    return False


# --- replies ---------------------------------------------------------------------------

_INT32 = struct.Struct("<i")
_BODY_OFFSET = 5  # OP_MSG flagBits + section kind 0
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8,
          0x13: 16, 0x7F: 0, 0xFF: 0}


def _elements(doc: bytes, start: int) -> Iterator[tuple[bytes, int, int, int, int]]:
    """(name, element start, value offset, element end, type) of each top-level element
    of the BSON document at ``start``. Raises ValueError/IndexError/struct.error on
    malformed input."""
    end = start + _INT32.unpack_from(doc, start)[0]
    if end > len(doc) or doc[end - 1] != 0:
        raise ValueError("document length out of bounds")
    pos = start + 4
    while pos < end - 1:
        etype = doc[pos]
        name_end = doc.index(b"\x00", pos + 1, end)
        value = name_end + 1
        if etype in _FIXED:
            nxt = value + _FIXED[etype]
        elif etype in (0x03, 0x04):
            nxt = value + _INT32.unpack_from(doc, value)[0]
        elif etype in (0x02, 0x0D, 0x0E):
            nxt = value + 4 + _INT32.unpack_from(doc, value)[0]
        elif etype == 0x05:
            nxt = value + 5 + _INT32.unpack_from(doc, value)[0]
        elif etype == 0x0B:  # regex: two cstrings
            nxt = doc.index(b"\x00", doc.index(b"\x00", value, end) + 1, end) + 1
        else:
            raise ValueError(f"BSON type {etype:#x} not expected at a reply's top level")
        if nxt > end - 1:
            raise ValueError("element runs past its document")
        yield doc[pos + 1:name_end], pos, value, nxt, etype
        pos = nxt


def _ok(body: bytes, value: int, etype: int) -> bool:
    if etype == 0x01:
        return bool(struct.unpack_from("<d", body, value)[0] == 1.0)
    if etype == 0x10:
        return bool(_INT32.unpack_from(body, value)[0] == 1)
    if etype == 0x12:
        return bool(struct.unpack_from("<q", body, value)[0] == 1)
    if etype == 0x08:
        return body[value] == 1
    return False


def reply_bypass(body: bytes, max_entry_bytes: int) -> str | None:
    """Why a reply body (OP_MSG without its header) must not be stored, else None."""
    if len(body) > max_entry_bytes + _BODY_OFFSET:
        return "too_large"
    try:
        if len(body) < _BODY_OFFSET + 5 or body[:_BODY_OFFSET] != b"\x00\x00\x00\x00\x00":
            return "malformed"  # flag bits (a checksum) or not a lone kind-0 section
        if _BODY_OFFSET + _INT32.unpack_from(body, _BODY_OFFSET)[0] != len(body):
            return "malformed"
        ok = False
        has_cursor = False
        for name, _start, value, _end, etype in _elements(body, _BODY_OFFSET):
            if name == b"ok":
                ok = _ok(body, value, etype)
            elif name == b"cursor":
                has_cursor = True
    except (ValueError, IndexError, struct.error):
        return "malformed"
    if not ok:
        return "error_reply"
    if has_cursor:
        cursor_id, _ = reply_cursor(body)
        if cursor_id is None:
            return "malformed"
        if cursor_id != 0:
            return "multi_batch"
    return None


def strip_fields(body: bytes, names: frozenset[str] = CLUSTER_TIME_FIELDS) -> bytes:
    """The reply body without the named top-level fields (a valid body; see
    :func:`reply_bypass`). Returns ``body`` itself when none is present."""
    wanted = {n.encode() for n in names}
    drop = [(start, end) for name, start, _v, end, _t in _elements(body, _BODY_OFFSET)
            if name in wanted]
    if not drop:
        return body
    parts = []
    pos = _BODY_OFFSET + 4
    for start, end in drop:
        parts.append(body[pos:start])
        pos = end
    parts.append(body[pos:])
    elements = b"".join(parts)
    return body[:_BODY_OFFSET] + _INT32.pack(4 + len(elements)) + elements


# --- writes ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WriteTargets:
    """What a write may have changed: whole namespaces, and whole databases
    (``dropDatabase``, or a write whose collection cannot be told)."""

    namespaces: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.databases)


NOTHING = WriteTargets()


def written_namespaces(command: Mapping[str, Any], c: Classification) -> WriteTargets:
    """The namespaces (``db.coll``) and databases a write command may have changed.

    Every command ``proxy.classify`` calls a write, except user and role management
    (``is_admin``: no collection data). ``renameCollection`` changes its source and
    target, ``bulkWrite`` every namespace of its ``nsInfo``, ``aggregate`` with
    ``$out``/``$merge`` and ``mapReduce`` their output collection (and the source, to
    be safe).
    """
    if not c.is_write or c.is_admin:
        return NOTHING
    db = c.database
    if db is None:
        return NOTHING
    name = c.command
    if name == "dropDatabase":
        return WriteTargets(databases=(db,))
    namespaces: set[str] = set()
    if c.collection is not None:
        namespaces.add(f"{db}.{c.collection}")
    if name == "renameCollection":
        source = command.get("renameCollection")
        target = command.get("to")
        namespaces.update(ns for ns in (source, target) if type(ns) is str and "." in ns)
    elif name == "bulkWrite":
        ns_info = command.get("nsInfo")
        for entry in ns_info if isinstance(ns_info, list) else ():
            ns = entry.get("ns") if isinstance(entry, dict) else None
            if type(ns) is str and "." in ns:
                namespaces.add(ns)
    elif name == "aggregate":
        for stage in command.get("pipeline") or ():
            if isinstance(stage, dict):
                out = _output_namespace(stage.get("$out"), db)
                out = out or _output_namespace(_merge_into(stage.get("$merge")), db)
                if out is not None:
                    namespaces.add(out)
    elif name == "mapReduce":
        out = command.get("out")
        if isinstance(out, dict):
            target = next((out[k] for k in ("replace", "merge", "reduce") if k in out), None)
            out_db = out.get("db") if isinstance(out.get("db"), str) else db
            if isinstance(target, str):
                namespaces.add(f"{out_db}.{target}")
        elif isinstance(out, str):
            namespaces.add(f"{db}.{out}")
    if not namespaces:
        # A write whose collection the proxy cannot tell: the whole database.
        return WriteTargets(databases=(db,))
    return WriteTargets(namespaces=tuple(sorted(namespaces)))


def _merge_into(spec: Any) -> Any:
    return spec.get("into") if isinstance(spec, dict) else spec


def _output_namespace(spec: Any, db: str) -> str | None:
    if isinstance(spec, str):
        return f"{db}.{spec}"
    if isinstance(spec, dict):
        out_db, coll = spec.get("db", db), spec.get("coll")
        if isinstance(out_db, str) and isinstance(coll, str):
            return f"{out_db}.{coll}"
    return None
