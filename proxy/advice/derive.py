"""The ideal index of a query shape, by the equality-sort-range rule (pure functions).

A shape (see :mod:`proxy.observe.shape`) keeps every filter field with its operators
and the sort with its directions, never a value. From it:

* **Equality** fields (a value, ``$eq``, ``$all``; ``$in`` when there is no sort) come
  first, the tenant field before the others: every query of a multi-tenant
  collection names it, so a tenant-first index serves them all. The shape sorts filter
  fields by name, so the order among the other equality fields is alphabetical; any
  order of the equality block serves the query equally well.
* **Sort** fields follow, in sort order and direction (fields fixed by equality are
  dropped from the sort: they cannot change the order).
* **Range** fields (``$gt``/``$gte``/``$lt``/``$lte``, ``$exists: true``, ``$type``,
  ``$elemMatch``, a left-anchored case-sensitive regex; ``$in`` with a sort, where it
  acts as a range) come last; a field both sorted and ranged stays in the sort.
* An equality on ``_id`` is served by the ``_id`` index: it is unique.

Predicates no index bounds are *problems*, reported as such and left out of the key:
``$where`` and ``$expr`` (evaluated per document), an unanchored or case-insensitive
regex, ``$ne``/``$nin``/``$not``/``$exists: false`` (negations: a filter made only of
them scans everything), ``$size``/``$mod``/bit tests, ``$nor``, ``$text`` and geo
operators (they need text or geo indexes, which this advisor does not propose).
A top-level ``$or`` needs one index per branch (each merged with the other top-level
predicates); ``$and`` branches are flattened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Derivation", "IndexKey", "Need", "derive", "derive_filter", "key_document"]

IndexKey = tuple[tuple[str, int], ...]

_RANGE_OPS = frozenset({"$gt", "$gte", "$lt", "$lte", "$type", "$elemMatch"})
_EQ_OPS = frozenset({"$eq", "$all"})
_NEGATIONS = frozenset({"$ne", "$nin", "$not"})
_GEO = frozenset({"$geoWithin", "$geoIntersects", "$near", "$nearSphere", "$within"})
_IGNORED_TOP = frozenset({"$comment"})
# Ranks of a field's predicate kinds: the best one decides where the field goes.
_EQ, _IN, _RANGE, _NEG, _SCAN = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Need:
    """The ideal index of one query: equality fields, then sort, then range fields."""

    equality: tuple[str, ...]
    sort: IndexKey
    range: tuple[str, ...]
    # The whole key, computed once: consolidation compares keys many times.
    key: IndexKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", tuple((f, 1) for f in self.equality) + self.sort
                           + tuple((f, 1) for f in self.range))

    def reason(self) -> str:
        parts = []
        if self.equality:
            parts.append("equality on " + ", ".join(self.equality))
        if self.sort:
            parts.append("sort by " + ", ".join(
                f"{f} {'asc' if d > 0 else 'desc'}" for f, d in self.sort))
        if self.range:
            parts.append("range on " + ", ".join(self.range))
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Derivation:
    """What a shape needs: one :class:`Need` per query it runs (several for an ``$or`` or
    an update/delete batch), and the predicates no index serves."""

    needs: tuple[Need, ...]
    problems: tuple[str, ...]

    @property
    def status(self) -> str:
        """``index`` (something to index), ``unindexable`` or ``no-filter``."""
        if self.needs:
            return "index"
        return "unindexable" if self.problems else "no-filter"


def key_document(key: IndexKey) -> dict[str, int]:
    return dict(key)


def _kind(value: Any, problems: list[str], field: str) -> int:
    """The rank of one field's condition (a placeholder or an operator document)."""
    if not isinstance(value, dict):
        if value == "?regex":
            problems.append(f"unanchored or case-insensitive regex on {field}: no index bounds")
            return _SCAN
        return _RANGE if value == "?regex:prefix" else _EQ
    best = _SCAN
    for op, arg in value.items():
        if op in _EQ_OPS:
            kind = _EQ
        elif op == "$in":
            kind = _IN
        elif op in _RANGE_OPS:
            kind = _RANGE
        elif op == "$exists":
            kind = _RANGE if arg is not False and arg != 0 else _NEG
        elif op == "$regex":
            options = value.get("$options")
            if arg == "?regex:prefix" and not (isinstance(options, str) and
                                               ("i" in options or "m" in options)):
                kind = _RANGE
            else:
                problems.append(
                    f"unanchored or case-insensitive regex on {field}: no index bounds")
                kind = _SCAN
        elif op == "$options":
            continue
        elif op in _NEGATIONS:
            kind = _NEG
        elif op in _GEO:
            problems.append(f"{op} on {field} needs a geo index (not advised here)")
            kind = _SCAN
        else:  # $size, $mod, $bitsAll..., unknown operators
            problems.append(f"{op} on {field}: no index bounds")
            kind = _SCAN
        best = min(best, kind)
    return best


def _collect(filter_: Mapping[str, Any], kinds: dict[str, int], ors: list[list[Any]],
             problems: list[str]) -> None:
    for key, value in filter_.items():
        if key == "$and" and isinstance(value, list):
            for branch in value:
                if isinstance(branch, dict):
                    _collect(branch, kinds, ors, problems)
        elif key == "$or" and isinstance(value, list):
            ors.append([b for b in value if isinstance(b, dict)])
        elif key == "$where":
            problems.append("$where runs JavaScript on every document")
        elif key == "$expr":
            problems.append("$expr is evaluated on every document")
        elif key == "$text":
            problems.append("$text needs a text index (not advised here)")
        elif key == "$nor":
            problems.append("$nor is a negation: no index bounds")
        elif key in _IGNORED_TOP or key[:1] == "$":
            continue
        else:
            kind = _kind(value, problems, key)
            kinds[key] = min(kind, kinds.get(key, _SCAN))


def _sort_key(sort: Any) -> IndexKey:
    if not isinstance(sort, dict):
        return ()
    out = []
    for name, direction in sort.items():
        if isinstance(direction, bool) or not isinstance(direction, (int, float)):
            break  # {$meta: "textScore"}: the rest of the order is not an index's
        out.append((str(name), 1 if direction >= 0 else -1))
    return tuple(out)


def _need(kinds: Mapping[str, int], sort: IndexKey, tenant_field: str | None) -> Need | None:
    if kinds.get("_id") == _EQ:
        return Need(("_id",), (), ())
    equality = sorted(f for f, k in kinds.items() if k == _EQ or (k == _IN and not sort))
    if tenant_field is not None and kinds.get(tenant_field, _SCAN) <= _RANGE:
        # Tenant first, whatever its operator: every query of the collection names it.
        equality = [tenant_field] + [f for f in equality if f != tenant_field]
    fixed = set(equality)
    ordered = tuple((f, d) for f, d in sort if f not in fixed)
    in_order = {f for f, _ in ordered}
    ranges = tuple(sorted(f for f, k in kinds.items()
                          if k in (_RANGE, _IN) and f not in fixed and f not in in_order))
    if not (equality or ordered or ranges):
        return None
    return Need(tuple(equality), ordered, ranges)


def derive_filter(filter_: Any, sort: Any = None, tenant_field: str | None = None
                  ) -> Derivation:
    """The derivation of one filter shape with an optional sort shape."""
    sort_key = _sort_key(sort)
    problems: list[str] = []
    needs = _branches(filter_ if isinstance(filter_, dict) else {}, {}, sort_key,
                      tenant_field, problems) or []
    return Derivation(tuple(dict.fromkeys(needs)), tuple(dict.fromkeys(problems)))


def _branches(filter_: Mapping[str, Any], outer: Mapping[str, int], sort: IndexKey,
              tenant_field: str | None, problems: list[str]) -> list[Need] | None:
    """Needs of a filter (one per ``$or`` branch); None when a branch cannot be indexed
    (an ``$or`` with an unindexable branch scans the collection whatever the others)."""
    kinds = dict(outer)
    ors: list[list[Any]] = []
    _collect(filter_, kinds, ors, problems)
    if ors:
        needs: list[Need] = []
        for branch in ors[0]:
            inner = _branches({**branch, **({"$or": ors[1]} if len(ors) > 1 else {})},
                              kinds, sort, tenant_field, problems)
            if inner is None:
                problems.append("an $or branch has no indexable predicate: "
                                "the whole $or scans the collection")
                return None
            needs.extend(inner)
        return needs
    need = _need(kinds, sort, tenant_field)
    if need is None:
        if kinds and all(k == _NEG for k in kinds.values()):
            problems.append("only negations ($ne/$nin/$not/$exists: false): "
                            "an index cannot narrow the scan")
        return None if problems or kinds else []
    return [need]


def _pipeline_query(pipeline: Any) -> tuple[dict[str, Any], Any] | None:
    """The leading ``$match`` stages (merged) and a ``$sort`` right after them."""
    if not isinstance(pipeline, list):
        return None
    matches: list[Any] = []
    sort = None
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            break
        name, arg = next(iter(stage.items()))
        if name == "$match" and isinstance(arg, dict) and sort is None:
            matches.append(arg)
        elif name == "$sort" and sort is None:
            sort = arg
        else:
            break
    if not matches and sort is None:
        return None
    filter_: dict[str, Any] = matches[0] if len(matches) == 1 else (
        {"$and": matches} if matches else {})
    return filter_, sort


def derive(shape: Mapping[str, Any], tenant_field: str | None = None) -> Derivation | None:
    """The derivation of a command's shape; None for commands that run no query
    (``insert``, ``getMore``, administrative commands)."""
    cmd = shape.get("cmd")
    queries: list[tuple[Any, Any]] = []
    if cmd == "find":
        queries.append((shape.get("filter", {}), shape.get("sort")))
    elif cmd in ("count", "distinct"):
        queries.append((shape.get("query", {}), None))
    elif cmd in ("findAndModify", "findandmodify"):
        queries.append((shape.get("query", {}), shape.get("sort")))
    elif cmd in ("update", "delete"):
        statements = shape.get("updates" if cmd == "update" else "deletes")
        if isinstance(statements, list):
            queries.extend((s.get("q", {}), None) for s in statements if isinstance(s, dict))
    elif cmd == "aggregate":
        found = _pipeline_query(shape.get("pipeline"))
        if found is None:
            return Derivation((), ())
        queries.append(found)
    else:
        return None
    needs: list[Need] = []
    problems: list[str] = []
    for filter_, sort in queries:
        one = derive_filter(filter_, sort, tenant_field)
        needs.extend(one.needs)
        problems.extend(one.problems)
    return Derivation(tuple(dict.fromkeys(needs)), tuple(dict.fromkeys(problems)))
