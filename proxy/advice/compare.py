"""Existing indexes against what the traffic needs (pure functions).

* An index **serves** a :class:`~proxy.advice.derive.Need` when it starts with the
  need's key up to equivalent orderings: the equality block in any order (and any
  direction), then the sort fields in order with their directions all as asked or
  all reversed (an index is read backwards as well as forwards), then the range
  fields in any order. ``{tenant_id: 1, status: 1, role: 1}`` serves a query on
  ``{tenant_id, status}``. Hidden and partial indexes do not count (the planner
  ignores the first; the second only serves queries that imply its filter, which a
  shape cannot prove).
* An index is **redundant** when its key is a prefix of another index's key (same
  directions, or all reversed): the longer one serves every query the shorter one
  does. Not redundant whatever their keys: ``_id_``, unique, TTL, partial and hidden
  indexes (they carry a constraint or a filter), and an index whose longer twin is
  sparse, partial or hidden.
* **Missing** indexes are consolidated: a need served by another missing index's key
  is counted under that index, so one ``createIndex`` answers several shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.advice.derive import Need

__all__ = ["IndexInfo", "consolidate", "redundant", "serves", "serving_index"]


@dataclass(frozen=True, slots=True)
class IndexInfo:
    """One entry of ``listIndexes``; ``key`` keeps non-numeric types (``"hashed"``,
    ``"text"``, ``"2dsphere"``) as written."""

    name: str
    key: tuple[tuple[str, Any], ...]
    unique: bool = False
    sparse: bool = False
    partial: bool = False
    hidden: bool = False
    ttl: bool = False

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> IndexInfo:
        key = doc.get("key")
        items = tuple((str(f), _direction(d)) for f, d in key.items()) if isinstance(
            key, Mapping) else ()
        return cls(
            name=str(doc.get("name", "")),
            key=items,
            unique=bool(doc.get("unique", False)),
            sparse=bool(doc.get("sparse", False)),
            partial="partialFilterExpression" in doc,
            hidden=bool(doc.get("hidden", False)),
            ttl="expireAfterSeconds" in doc,
        )

    def key_document(self) -> dict[str, Any]:
        return dict(self.key)


def _direction(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return 1 if value >= 0 else -1


def _ordered(key: Sequence[tuple[str, Any]]) -> bool:
    return all(isinstance(d, int) for _f, d in key)


def serves(index: Sequence[tuple[str, Any]], need: Need) -> bool:
    """Whether an index with this key serves the need (see the module docstring)."""
    fields = [f for f, _d in index]
    n_eq, n_sort = len(need.equality), len(need.sort)
    if len(fields) < n_eq + n_sort + len(need.range):
        return False
    if set(fields[:n_eq]) != set(need.equality):
        return False
    sort_part = index[n_eq:n_eq + n_sort]
    if [f for f, _d in sort_part] != [f for f, _d in need.sort] or not _ordered(sort_part):
        return False
    signs = {d * want for (_f, d), (_g, want) in zip(sort_part, need.sort, strict=True)}
    if len(signs) > 1:
        return False
    range_part = index[n_eq + n_sort:n_eq + n_sort + len(need.range)]
    return set(f for f, _d in range_part) == set(need.range) and _ordered(range_part)


def serving_index(indexes: Iterable[IndexInfo], need: Need) -> IndexInfo | None:
    """The first usable index that serves the need, or None."""
    for index in indexes:
        if not index.hidden and not index.partial and serves(index.key, need):
            return index
    return None


def _prefix(short: Sequence[tuple[str, Any]], long: Sequence[tuple[str, Any]]) -> bool:
    if not short or len(short) > len(long) or not _ordered(long[:len(short)]):
        return False
    head = long[:len(short)]
    if [f for f, _d in short] != [f for f, _d in head] or not _ordered(short):
        return False
    return len({a * b for (_f, a), (_g, b) in zip(short, head, strict=True)}) == 1


def redundant(indexes: Sequence[IndexInfo]) -> list[tuple[IndexInfo, IndexInfo]]:
    """(redundant index, the index that makes it so) pairs."""
    out: list[tuple[IndexInfo, IndexInfo]] = []
    for short in indexes:
        if (short.name == "_id_" or short.unique or short.ttl or short.partial
                or short.hidden):
            continue
        for long in indexes:
            if (long is short or long.sparse or long.partial or long.hidden
                    or len(long.key) < len(short.key)):
                continue
            # Two identical keys (possible with different options): report one of them.
            if long.key == short.key and (long.unique is short.unique) and long.name > short.name:
                continue
            if _prefix(short.key, long.key):
                out.append((short, long))
                break
    return out


def consolidate(needs: Iterable[Need]) -> dict[Need, Need]:
    """Each need mapped to the missing index that will serve it: the longest needs
    first become indexes; a need one of them serves joins it."""
    chosen: list[Need] = []
    out: dict[Need, Need] = {}
    for need in sorted(set(needs), key=lambda n: (-len(n.key), n.key)):
        for index in chosen:
            if serves(index.key, need):
                out[need] = index
                break
        else:
            chosen.append(need)
            out[need] = need
    return out
