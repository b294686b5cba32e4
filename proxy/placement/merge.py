"""Merging what several clusters answered to one fanned-out read, as one server would
have answered it (docs/placement.md, "Fan-out reads"). Pure functions, no I/O.

:func:`value_key` maps a decoded BSON value to a Python tuple whose ordering is
MongoDB's BSON comparison order (without a collation) and whose equality is BSON value
equality: MinKey < null/missing < numbers < strings < documents < arrays < BinData <
ObjectId < bool < datetime < Timestamp < regex < DBPointer < Code < CodeWScope < MaxKey.
Numbers of every type compare by value (``1 == 1.0 == Decimal128("1")``; NaN below
every other number); strings compare by code point (the UTF-8 byte order the server
uses); documents element by element (type, then field name, then value); BinData by
length, then subtype, then bytes.

:func:`sort_key` extracts a ``sort`` specification's key from a document as the server
does for the common cases: a missing field is null; an array (at the end of the path or
traversed by it) contributes its elements, and the smallest (ascending) or largest
(descending) decides; an empty array sorts before null. Approximated: a path through an
array whose elements are not documents counts those elements as null, and a numeric
path component indexes an array instead of also matching a field named by the digits.
"""

from __future__ import annotations

import datetime
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from functools import cmp_to_key
from typing import Any

from bson import DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.code import Code
from bson.datetime_ms import DatetimeMS

__all__ = [
    "Key", "SortSpec", "Unmergeable", "count_total", "merge_sorted", "ordering", "parse_sort",
    "per_cluster_limit", "pick", "sort_key", "union_values", "value_key",
]

Key = tuple[Any, ...]
SortSpec = tuple[tuple[str, int], ...]  # (dotted path, 1 or -1)

# Canonical type ranks (the server's canonicalizeBSONType); an empty array in a sort
# key ranks just below null.
_MIN_KEY, _EMPTY_ARRAY, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY = 0, 2, 5, 10, 15, 20, 25
_BINDATA, _OID, _BOOL, _DATE, _TIMESTAMP, _REGEX, _DBPOINTER = 30, 35, 40, 45, 47, 50, 55
_CODE, _CODE_W_SCOPE, _MAX_KEY = 60, 65, 127
_NULL_KEY: Key = (_NULL,)
_EMPTY_KEY: Key = (_EMPTY_ARRAY,)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MS = datetime.timedelta(milliseconds=1)
# The server's regex flags as letters, in its order.
_REGEX_FLAGS = ((re.IGNORECASE, "i"), (re.LOCALE, "l"), (re.MULTILINE, "m"),
                (re.DOTALL, "s"), (re.UNICODE, "u"), (re.VERBOSE, "x"))


class Unmergeable(ValueError):
    """A request whose results the proxy could not merge exactly: the reason why."""


def value_key(value: Any) -> Key:
    """The ordering and equality key of one decoded BSON value (see the module doc)."""
    if value is None:
        return _NULL_KEY
    kind = type(value)
    if kind is bool:
        return (_BOOL, value)
    if kind is int or kind is Int64:
        return (_NUMBER, 1, int(value))
    if kind is float:
        return (_NUMBER, 0) if math.isnan(value) else (_NUMBER, 1, value)
    if kind is str:
        return (_STRING, value)
    if isinstance(value, Mapping):
        return (_OBJECT, *_elements(value))
    if isinstance(value, DBRef):  # a document on the wire ($ref, $id, $db)
        return (_OBJECT, *_elements(value.as_doc()))
    if kind is list:
        return (_ARRAY, *(value_key(item) for item in value))
    return _other_key(value)


def _elements(document: Mapping[str, Any]) -> Iterator[Key]:
    for name, item in document.items():
        key = value_key(item)
        yield (key[0], name, key)


def _other_key(value: Any) -> Key:
    if isinstance(value, ObjectId):
        return (_OID, value.binary)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:  # bson decodes to naive UTC
            value = value.replace(tzinfo=datetime.UTC)
        return (_DATE, (value - _EPOCH) // _ONE_MS)
    if isinstance(value, DatetimeMS):
        return (_DATE, int(value))
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return (_NUMBER, 0) if number.is_nan() else (_NUMBER, 1, number)
    if isinstance(value, Decimal):
        return (_NUMBER, 0) if value.is_nan() else (_NUMBER, 1, value)
    if isinstance(value, Binary):
        return (_BINDATA, len(value), value.subtype, bytes(value))
    if isinstance(value, bytes):  # subtype 0 decodes to bytes
        return (_BINDATA, len(value), 0, value)
    if isinstance(value, uuid.UUID):  # subtype 4, when decoded with a UUID representation
        return (_BINDATA, 16, 4, value.bytes)
    if isinstance(value, Timestamp):
        return (_TIMESTAMP, value.time, value.inc)
    if isinstance(value, Regex):
        flags = "".join(letter for bit, letter in _REGEX_FLAGS if value.flags & bit)
        return (_REGEX, value.pattern, flags)
    if isinstance(value, Code):
        if value.scope is None:
            return (_CODE, str(value))
        return (_CODE_W_SCOPE, str(value), value_key(dict(value.scope)))
    if isinstance(value, MinKey):
        return (_MIN_KEY,)
    if isinstance(value, MaxKey):
        return (_MAX_KEY,)
    if isinstance(value, int | float):  # other numeric subclasses
        return value_key(float(value) if isinstance(value, float) else int(value))
    raise TypeError(f"no BSON order for a value of type {type(value).__name__}")


# -- sort specifications and keys -------------------------------------------------------------

def parse_sort(sort: Any) -> SortSpec:
    """A ``sort`` document as (path, direction) pairs; Unmergeable for what the proxy
    cannot reproduce ($meta sorts, $natural order)."""
    if not isinstance(sort, Mapping):
        raise Unmergeable("sort must be a document")
    spec: list[tuple[str, int]] = []
    for path, direction in sort.items():
        if path == "$natural":
            raise Unmergeable("a $natural sort has no meaning across clusters")
        if isinstance(direction, Mapping):
            raise Unmergeable(f"sort by {path!r}: a $meta sort cannot be merged")
        if isinstance(direction, bool) or direction not in (1, -1):
            raise Unmergeable(f"sort by {path!r}: direction must be 1 or -1")
        spec.append((path, int(direction)))
    return tuple(spec)


_EMPTY = object()  # an empty array at the end of a sort path


def _candidates(value: Any, parts: Sequence[str], out: list[Any]) -> None:
    for index, part in enumerate(parts):
        if isinstance(value, Mapping):
            if part not in value:
                out.append(None)
                return
            value = value[part]
        elif isinstance(value, list):
            if part.isdigit() and int(part) < len(value):
                value = value[int(part)]
                continue
            rest = parts[index:]
            for item in value:
                if isinstance(item, Mapping):
                    _candidates(item, rest, out)
                else:
                    out.append(None)
            if not value:
                out.append(None)
            return
        else:
            out.append(None)
            return
    if isinstance(value, list):
        if value:
            out.extend(value)
        else:
            out.append(_EMPTY)
    else:
        out.append(value)


def _field_key(document: Mapping[str, Any], path: str, direction: int) -> Key:
    found: list[Any] = []
    _candidates(document, path.split("."), found)
    keys = [_EMPTY_KEY if item is _EMPTY else value_key(item) for item in found]
    if len(keys) == 1:
        return keys[0]
    return min(keys) if direction > 0 else max(keys)


def sort_key(document: Mapping[str, Any], spec: SortSpec) -> tuple[Key, ...]:
    """The key ``document`` sorts by under ``spec`` (compare with :func:`pick`)."""
    return tuple(_field_key(document, path, direction) for path, direction in spec)


def _less(a: tuple[Key, ...], b: tuple[Key, ...], spec: SortSpec) -> bool:
    for (_, direction), left, right in zip(spec, a, b, strict=True):
        if left != right:
            return (left < right) if direction > 0 else (left > right)
    return False


def ordering(spec: SortSpec) -> Callable[[Mapping[str, Any]], Any]:
    """A ``key=`` for :func:`sorted` ordering documents as the server sorts by ``spec``."""
    def compare(a: tuple[Key, ...], b: tuple[Key, ...]) -> int:
        return -1 if _less(a, b, spec) else int(_less(b, a, spec))
    by_key = cmp_to_key(compare)
    return lambda document: by_key(sort_key(document, spec))


def pick(heads: Sequence[tuple[Key, ...] | None], spec: SortSpec) -> int:
    """The index of the stream whose head comes first (None: that stream is exhausted;
    ties go to the lowest index, so the merge is stable). -1 when all are exhausted."""
    best, best_head = -1, None
    for index, head in enumerate(heads):
        if head is not None and (best_head is None or _less(head, best_head, spec)):
            best, best_head = index, head
    return best


def merge_sorted(streams: Sequence[Iterable[Mapping[str, Any]]], spec: SortSpec
                 ) -> Iterator[Mapping[str, Any]]:
    """K-way merge of streams each already sorted by ``spec``."""
    iterators = [iter(stream) for stream in streams]
    docs: list[Mapping[str, Any] | None] = [next(it, None) for it in iterators]
    heads = [None if doc is None else sort_key(doc, spec) for doc in docs]
    while True:
        index = pick(heads, spec)
        if index < 0:
            return
        yield docs[index]  # type: ignore[misc]
        doc = docs[index] = next(iterators[index], None)
        heads[index] = None if doc is None else sort_key(doc, spec)


# -- counts and distinct values ---------------------------------------------------------------

def per_cluster_limit(skip: int, limit: int | None) -> int | None:
    """What each cluster is asked for: skip + limit documents (skip 0), since any of
    them may hold the first ones; None: no limit."""
    return None if limit is None else skip + limit


def count_total(counts: Iterable[int], skip: int, limit: int | None) -> int:
    """The count the one server would have given: the sum, then skip and limit."""
    total = max(0, sum(counts) - skip)
    return total if limit is None else min(total, limit)


def union_values(lists: Iterable[Iterable[Any]]) -> list[Any]:
    """Distinct values of several clusters: one of each BSON-equal value (the first
    seen), in BSON order."""
    seen: dict[Key, Any] = {}
    for values in lists:
        for value in values:
            seen.setdefault(value_key(value), value)
    return [seen[key] for key in sorted(seen)]
