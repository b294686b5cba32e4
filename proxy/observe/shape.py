"""Query shapes: a command with its values replaced by type placeholders.

A shape answers "which *kind* of query is this", like a statement digest in SQL
proxies: ``find orders {status: "open", tenant_id: "a"} sort {created: -1} limit 20``
and the same query for another tenant and status are one shape, so the digest can say
that this shape ran 40 000 times, 3 % of them slower than 100 ms.

Rules (the tests in ``tests/test_observe_shape.py`` are the executable version):

* Kept: the command name and the namespace (``$db`` and the collection the command
  names); every field name and every query/update/aggregation operator; sort keys with
  their direction (``{a: 1}`` and ``{a: -1}`` use different index orders); ``hint``;
  field paths (``"$amount"``) and names inside aggregation stages (``$lookup.from``,
  ``$unwind`` paths, ``$out`` targets); ``$exists``, ``$type``, ``$options`` and
  ``$meta`` arguments (they change the plan, not just the data).
* Replaced: every literal value by a type placeholder: ``?str``, ``?int`` (int32 and
  int64 alike: the driver picks the width from the magnitude), ``?double``,
  ``?decimal``, ``?bool``, ``?null``, ``?date``, ``?oid``, ``?binary``, ``?uuid``,
  ``?regex`` (``?regex:prefix`` when left-anchored on a literal, case-sensitive: an
  index can bound it; the ``$regex`` operator's pattern likewise), ``?timestamp``,
  ``?array`` (an array compared as a whole), ``?object`` (an embedded document
  compared as a whole), ``?minkey``, ``?maxkey``, ``?code``.
* Collapsed: ``$in``/``$nin``/``$all`` lists become the sorted list of the distinct
  element types (``{$in: [1, 2, 3]}`` and ``{$in: [7]}`` are both ``{$in: ["?int"]}``);
  the branches of ``$or``/``$and``/``$nor`` are de-duplicated and sorted, so an
  ``$or`` generated with N identical branches is one shape whatever N is; the
  statements of an ``update``/``delete`` batch likewise.
* Dropped: the envelope. Only the parts listed per command below form the shape, so
  ``lsid``, ``$clusterTime``, ``txnNumber``, ``startTransaction``, ``autocommit``,
  ``$readPreference``, ``readConcern``, ``writeConcern``, ``comment``, ``maxTimeMS``,
  ``batchSize``, ``singleBatch``, ``cursor``, ``apiVersion``/``apiStrict``,
  ``allowDiskUse``, ``let``, ``ordered``, ``bypassDocumentValidation``... never change
  a shape, nor does their order.
* Per command: ``find``: filter, projection *keys*, sort, hint, and whether limit/skip
  are present; ``aggregate``: the pipeline stage by stage (``$match`` like a filter,
  ``$limit``/``$skip`` values as ``?int``, expressions with their literals replaced);
  ``update``: per statement the ``q`` filter, the update operators with their field
  names (or ``?replacement``, or the pipeline's shape), ``multi``/``upsert``;
  ``delete``: per statement ``q`` and ``limit``; ``findAndModify``: query, sort,
  update keys, ``remove``/``upsert``/``new``; ``count``: query; ``distinct``: key and
  query; ``insert``: nothing but the collection (documents are data, not query
  shape); ``getMore``: the collection; anything else: the name and namespace.

**Field order inside a filter is ignored** (field names are sorted):
``{tenant_id: "a", status: "open"}`` and ``{status: "x", tenant_id: "b"}`` share a
shape. In a MongoDB filter the top-level clauses are a conjunction: their order
changes neither the result nor the plan the server chooses (the planner matches
predicates to index fields by name, not by position), so two services writing the
same query with different key order want one digest row and one index decision. The
exceptions, where order *is* meaning, are kept in order: sort specifications (a
compound sort is ordered), hints, aggregation pipelines (stages run in order) and
expression argument lists (``$subtract: [a, b]``). An embedded document compared as a
whole (``{address: {city: "x", zip: "y"}}``) is order-sensitive in MongoDB, but it is a
literal value and becomes ``?object`` anyway.

``update``/``delete`` statements usually travel in an OP_MSG document sequence (kind 1
section), not in the command body: pass them as ``sequences={"updates": [...]}``.

Cost: for a typical ``find`` (filter of 3 fields, sort, limit, driver envelope)
:func:`describe` builds the shape (~5 µs) and looks its text and hash up by the shape's
marshal bytes (~1 µs); the JSON text (~4 µs) and hash are computed once per distinct
shape. See ``bench/observe_micro.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import marshal
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import bson
from bson.binary import Binary
from bson.code import Code
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

__all__ = ["Shape", "describe", "placeholder", "query_shape", "shape_hash", "shape_text"]

_PLACEHOLDERS: dict[type, str] = {
    str: "?str",
    int: "?int",
    Int64: "?int",
    float: "?double",
    Decimal128: "?decimal",
    bool: "?bool",
    type(None): "?null",
    datetime.datetime: "?date",
    ObjectId: "?oid",
    Binary: "?binary",
    bytes: "?binary",
    uuid.UUID: "?uuid",
    Timestamp: "?timestamp",
    list: "?array",
    tuple: "?array",
    dict: "?object",
    bson.SON: "?object",
    MinKey: "?minkey",
    MaxKey: "?maxkey",
    Code: "?code",
    DBRef: "?dbref",
}

def _flag_sets(flags: str) -> list[str]:
    """Every non-empty subset of the regex flags, as strings."""
    subsets = [""]
    for flag in flags:
        subsets += [s + flag for s in subsets]
    return subsets[1:]


# Operators whose argument is a list collapsed to its element types.
_LIST_OPS = frozenset({"$in", "$nin", "$all"})
# Operators whose argument is a list of filters.
_LOGICAL_OPS = frozenset({"$and", "$or", "$nor"})
# Operators whose argument is structural, kept as written (when a JSON scalar).
_KEEP_OPS = frozenset({"$exists", "$type", "$options", "$meta"})
# Aggregation stages whose string arguments are names (collections, paths, fields).
_NAMING_STAGES = frozenset({
    "$lookup", "$graphLookup", "$unwind", "$count", "$out", "$merge", "$unionWith",
    "$sortByCount", "$collStats", "$indexStats", "$planCacheStats", "$currentOp",
})
_JSON_SCALARS = (str, int, float, bool, type(None))
# Strings kept by _keep: $type aliases, $meta keywords, regex $options made of flags.
_KEPT_WORDS = frozenset({
    "double", "string", "object", "array", "binData", "undefined", "objectId", "bool",
    "date", "null", "regex", "dbPointer", "javascript", "symbol", "javascriptWithScope",
    "int", "timestamp", "long", "decimal", "minKey", "maxKey", "number",
    "textScore", "indexKey", "searchScore", "searchHighlights", "searchScoreDetails",
    "searchSequenceToken", "vectorSearchScore", "randVal", "recordId", "sortKey",
    "geoNearDistance", "geoNearPoint",
    *("".join(sorted(flags)) for flags in _flag_sets("imxsu")),
})
# Documents are checked with isinstance(x, dict), not the Mapping ABC: bson decodes every
# document as a dict (SON is one too), and an ABC check costs ~0.4 µs per value, which
# was a fifth of the shape's cost. Any other mapping is a literal "?object".
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _regex(pattern: Any, flags: int = 0) -> str:
    """``?regex:prefix`` for a regex an index can bound (``/^abc/``: a left anchor then a
    literal character, case-sensitive, not multi-line), else ``?regex``. The index
    advisor needs the difference; the pattern itself is never kept."""
    if isinstance(pattern, bytes):
        pattern = pattern.decode("utf-8", "replace")
    if not isinstance(pattern, str) or flags & (re.IGNORECASE | re.MULTILINE):
        return "?regex"
    body = pattern[1:] if pattern[:1] == "^" else pattern[2:] if pattern[:2] == "\\A" else None
    if not body or body[0] in _REGEX_SPECIAL:
        return "?regex"
    return "?regex:prefix"


_REGEX_SPECIAL = frozenset(".[]()\\*+?{}|^$")


def placeholder(value: Any) -> str:
    """The type placeholder of one literal value (``"?str"``, ``"?date"``, ...)."""
    found = _PLACEHOLDERS.get(type(value))
    if found is not None:
        return found
    # Regexes are not in the table: their placeholder depends on the anchor (rare, so
    # the common types pay nothing for it).
    if isinstance(value, (Regex, re.Pattern)):
        return _regex(value.pattern, value.flags if isinstance(value.flags, int) else 0)
    if isinstance(value, Mapping):
        return "?object"
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "?array"
    return "?" + type(value).__name__.lower()


def _keep(value: Any) -> Any:
    """A structural value kept as written: numbers, booleans, null, and the strings
    that are names of types or ``$meta`` keywords; any other value (a string is
    customer data as often as not: ``{$exists: "secret"}``) becomes its type."""
    if type(value) is str:  # exactly: bson's Code is a str subclass, and unhashable
        return value if value in _KEPT_WORDS else "?str"
    if isinstance(value, str):
        return placeholder(value)
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, dict):
        return {str(k): _keep(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [_keep(v) for v in value]  # $type: ["string", "null"]
    return placeholder(value)


def _keep_name(value: Any) -> Any:
    """A ``hint``: an index name (a name, not data) or a key pattern."""
    return value if isinstance(value, str) else _keep(value)


def _text(value: Any) -> str:
    return _encode(value)


def _sorted_unique(items: Iterable[Any]) -> list[Any]:
    by_text = {_text(item): item for item in items}
    return [by_text[k] for k in sorted(by_text)]


def _filter(doc: Any) -> Any:
    """The shape of a query filter: field names sorted, values as placeholders."""
    if not isinstance(doc, dict):
        return placeholder(doc)
    out: dict[str, Any] = {}
    for key in sorted(doc):
        value = doc[key]
        if key in _LOGICAL_OPS:
            out[key] = (_sorted_unique(_filter(c) for c in value)
                        if isinstance(value, list) else placeholder(value))
        elif key == "$expr":
            out[key] = _expr(value)
        elif key[:1] == "$":
            out[key] = _operand(key, value)
        else:
            out[key] = _condition(value)
    return out


def _condition(value: Any) -> Any:
    """The value of a field in a filter: an operator document or a literal."""
    if isinstance(value, dict) and value and next(iter(value))[:1] == "$":
        return {op: _operand(op, value[op]) for op in sorted(value)}
    return placeholder(value)


def _operand(op: str, value: Any) -> Any:
    if op in _LIST_OPS:
        if isinstance(value, (list, tuple)):
            return sorted({placeholder(v) for v in value})
        return placeholder(value)
    if op in _KEEP_OPS:
        return _keep(value)
    if op == "$regex":  # its $options sibling is kept: "i" or "m" show there
        return placeholder(value) if not isinstance(value, str) else _regex(value)
    if op == "$elemMatch":
        return _filter(value)
    if op == "$not":
        return _condition(value)
    if op in _LOGICAL_OPS:
        return (_sorted_unique(_filter(c) for c in value)
                if isinstance(value, list) else placeholder(value))
    if op in ("$geoWithin", "$geoIntersects", "$near", "$nearSphere"):
        return _expr(value)
    return placeholder(value)


def _expr(value: Any, names: bool = False) -> Any:
    """An aggregation expression: structure kept, literals replaced.

    Strings starting with ``$`` are field paths or variables and are kept; with
    ``names`` (stages like ``$lookup``) every string is a name and is kept.
    """
    if isinstance(value, str):
        return value if names or value[:1] == "$" else "?str"
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if key == "$literal":
                out[key] = placeholder(sub)
            elif key in ("pipeline",) and isinstance(sub, list):
                out[key] = _pipeline(sub)
            else:
                out[str(key)] = _expr(sub, names)
        return out
    if isinstance(value, (list, tuple)):
        return [_expr(v, names) for v in value]
    return placeholder(value)


def _pipeline(stages: Any) -> Any:
    if not isinstance(stages, (list, tuple)):
        return placeholder(stages)
    out: list[Any] = []
    for stage in stages:
        if not isinstance(stage, dict) or not stage:
            out.append(placeholder(stage))
            continue
        name = next(iter(stage))
        arg = stage[name]
        if name == "$match":
            shaped: Any = _filter(arg)
        elif name in ("$limit", "$skip", "$sample"):
            shaped = placeholder(arg) if name != "$sample" else _expr(arg)
        elif name == "$sort":
            shaped = _keep(arg)
        elif name == "$facet" and isinstance(arg, dict):
            shaped = {str(k): _pipeline(v) for k, v in arg.items()}
        elif name == "$geoNear" and isinstance(arg, dict):
            shaped = {str(k): (_filter(v) if k == "query" else _expr(v)) for k, v in arg.items()}
        else:
            shaped = _expr(arg, names=name in _NAMING_STAGES)
        out.append({name: shaped})
    return out


def _update_spec(u: Any) -> Any:
    if isinstance(u, (list, tuple)):
        return _pipeline(u)
    if isinstance(u, dict) and u and next(iter(u))[:1] == "$":
        return {
            op: sorted(fields) if isinstance(fields, dict) else placeholder(fields)
            for op, fields in sorted(u.items())
        }
    return "?replacement"


def _statements(command: Mapping[str, Any], sequences: Mapping[str, Any] | None,
                key: str) -> Sequence[Any]:
    found = command.get(key)
    if found is None and sequences is not None:
        found = sequences.get(key)
    return found if isinstance(found, (list, tuple)) else ()


def _projection_keys(projection: Any) -> Any:
    if isinstance(projection, dict):
        return sorted(str(k) for k in projection)
    return placeholder(projection)


def query_shape(
    command: Mapping[str, Any],
    sequences: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """The normalised shape of a command document (see the module docstring).

    ``sequences`` are the OP_MSG document sequences by identifier (``updates``,
    ``deletes``); only those two are read. ``name``: the command's name as sent, when
    the caller parsed it (``Request.raw_name``).
    """
    if name is None:
        name = next(iter(command), "")
    target = command.get(name)
    if name == "getMore":
        target = command.get("collection")
    shape: dict[str, Any] = {
        "cmd": name,
        "db": command.get("$db"),
        "coll": target if isinstance(target, str) else None,
    }
    if name == "find":
        if "filter" in command:
            shape["filter"] = _filter(command["filter"])
        if "projection" in command:
            shape["projection"] = _projection_keys(command["projection"])
        if "sort" in command:
            shape["sort"] = _keep(command["sort"])
        if "hint" in command:
            shape["hint"] = _keep_name(command["hint"])
        if "limit" in command:
            shape["limit"] = True
        if "skip" in command:
            shape["skip"] = True
    elif name == "aggregate":
        shape["pipeline"] = _pipeline(command.get("pipeline", []))
        if "hint" in command:
            shape["hint"] = _keep_name(command["hint"])
    elif name == "update":
        shape["updates"] = _sorted_unique(
            {
                "q": _filter(s.get("q", {})),
                "u": _update_spec(s.get("u")),
                "multi": bool(s.get("multi", False)),
                "upsert": bool(s.get("upsert", False)),
            }
            for s in _statements(command, sequences, "updates") if isinstance(s, dict)
        )
    elif name == "delete":
        shape["deletes"] = _sorted_unique(
            {"q": _filter(s.get("q", {})), "limit": _keep(s.get("limit", 0))}
            for s in _statements(command, sequences, "deletes") if isinstance(s, dict)
        )
    elif name in ("findAndModify", "findandmodify"):
        shape["query"] = _filter(command.get("query", {}))
        if "sort" in command:
            shape["sort"] = _keep(command["sort"])
        if "update" in command:
            shape["update"] = _update_spec(command["update"])
        for flag in ("remove", "upsert", "new"):
            if command.get(flag):
                shape[flag] = True
    elif name == "count":
        if "query" in command:
            shape["query"] = _filter(command["query"])
        if "limit" in command:
            shape["limit"] = True
        if "skip" in command:
            shape["skip"] = True
    elif name == "distinct":
        shape["key"] = _keep_name(command.get("key"))
        if "query" in command:
            shape["query"] = _filter(command["query"])
    return shape


def shape_text(shape: Mapping[str, Any]) -> str:
    """Compact one-line JSON of a shape, for logs and the digest."""
    return _encode(shape)


def _hash_text(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def shape_hash(shape: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a shape (BLAKE2b-64 of its compact JSON).

    The JSON is canonical because :func:`query_shape` builds every mapping in a
    deterministic order (sorted where order does not matter, as written where it does),
    so the hash is stable across processes and versions of Python.
    """
    return _hash_text(shape_text(shape))


class Shape(NamedTuple):
    shape: dict[str, Any]
    text: str
    hash: str


# The Shape (with its text and hash) per distinct shape, keyed by the shape's marshal
# bytes: marshal (C, about a quarter of the JSON encoding plus hash) is injective, so a
# key always maps to an equal shape; format 2 has no back-references, so equal shapes
# give equal keys. A workload has few distinct shapes; the bound only stops a
# pathological one from growing the table without limit (it is then simply rebuilt).
# Callers share the cached Shape: they must not mutate its ``shape``.
_SHAPES: dict[bytes, Shape] = {}
_SHAPES_MAX = 4096
_MARSHAL_VERSION = 2


def describe(
    command: Mapping[str, Any],
    sequences: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Shape:
    """Shape, its text and its hash (text and hash computed once per distinct shape)."""
    shape = query_shape(command, sequences, name)
    try:
        key = marshal.dumps(shape, _MARSHAL_VERSION)
    except ValueError:  # a value marshal cannot write (kept as written by _keep)
        text = shape_text(shape)
        return Shape(shape, text, _hash_text(text))
    cached = _SHAPES.get(key)
    if cached is None:
        text = shape_text(shape)
        cached = Shape(shape, text, _hash_text(text))
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[key] = cached
    return cached
