"""Which reads that span tenants can be fanned out to every cluster, and what each
cluster is asked (docs/placement.md, "Fan-out reads"). Pure: no I/O.

:func:`plan` turns a client's command into a :class:`Plan` (the command every cluster
runs, and how their answers are merged) or raises :class:`Unmergeable` with the reason
the proxy could not give the one answer a single server would have given.
A malformed value the server would refuse (a negative limit) is a
:class:`~proxy.errors.ProxyError` with the server's code instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.errors import BAD_VALUE, TYPE_MISMATCH, ProxyError
from proxy.placement.merge import SortSpec, Unmergeable, parse_sort, per_cluster_limit

__all__ = ["DEFAULT_BATCH", "Plan", "plan"]

DEFAULT_BATCH = 101  # the server's first batch when the client names none

# Fields of the client's command no cluster is sent: its session (a merged cursor's
# getMores are the proxy's own), its cluster time (another cluster's clock), the proxy
# sets the read preference and $db itself.
_NOT_FORWARDED = frozenset({
    "lsid", "$clusterTime", "$db", "$readPreference", "txnNumber", "autocommit",
    "startTransaction", "apiVersion", "apiStrict", "apiDeprecationErrors",
})
_CURSOR_FLAGS = ("tailable", "awaitData", "noCursorTimeout")
_PREFIX_STAGES = frozenset({"$match", "$project", "$group"})

Kind = Literal["cursor", "count", "distinct", "pipeline_count"]


@dataclass(frozen=True, slots=True)
class Plan:
    """A fanned-out read: ``command`` goes to every cluster (without ``$db``); the
    proxy applies ``skip``/``limit`` after merging by ``sort`` (None: clusters one after
    the other). ``counter_field``/``counter_head``: a counting pipeline's output."""

    kind: Kind
    database: str
    collection: str
    command: dict[str, Any]
    sort: SortSpec | None = None
    skip: int = 0
    limit: int | None = None
    first_batch: int = DEFAULT_BATCH
    single_batch: bool = False
    counter_field: str = ""
    counter_head: tuple[tuple[str, Any], ...] = ()

    @property
    def namespace(self) -> str:
        return f"{self.database}.{self.collection}"


def plan(name: str, command: Mapping[str, Any], tenant_field: str) -> Plan:
    """The fan-out plan of ``command`` (canonical ``name``); see the module docstring."""
    if name not in _PLANNERS:
        raise Unmergeable(f"only find, count, distinct and read-only aggregate are fanned "
                          f"out across clusters, not {name}")
    if command.get("autocommit") is False:
        raise Unmergeable("a transaction stays on one cluster")
    collection = command.get(name)
    if type(collection) is not str:
        raise Unmergeable(f"{name} must name a collection")
    database = command.get("$db")
    forwarded = {key: value for key, value in command.items() if key not in _NOT_FORWARDED}
    concern = forwarded.get("readConcern")
    if isinstance(concern, Mapping):
        # afterClusterTime/atClusterTime are times of the client's cluster, not the others'.
        forwarded["readConcern"] = {k: v for k, v in concern.items() if k == "level"}
    return _PLANNERS[name](str(database or "test"), collection, forwarded, tenant_field)


# -- find, count, distinct ------------------------------------------------------------------

def _find(database: str, collection: str, command: dict[str, Any], tenant: str) -> Plan:
    for flag in _CURSOR_FLAGS:
        if command.get(flag):
            raise Unmergeable(f"{flag} cursors are not fanned out")
    sort = _sort(command)
    if sort and command.get("returnKey"):
        raise Unmergeable("returnKey drops the sort keys the merge needs")
    if sort:
        _check_projection(command.get("projection"), sort)
    skip = _non_negative(command.pop("skip", None), "find.skip") or 0
    limit = _non_negative(command.pop("limit", None), "find.limit") or None
    first = _non_negative(command.pop("batchSize", None), "find.batchSize")
    single = bool(command.pop("singleBatch", False))
    wanted = per_cluster_limit(skip, limit)
    if wanted is not None:
        command["limit"] = wanted
    return Plan("cursor", database, collection, command, sort, skip, limit,
                DEFAULT_BATCH if first is None else first, single)


def _count(database: str, collection: str, command: dict[str, Any], tenant: str) -> Plan:
    skip = _non_negative(command.pop("skip", None), "count.skip") or 0
    raw_limit = _integer(command.pop("limit", None), "count.limit")
    limit = abs(raw_limit) if raw_limit else None  # count: -n is n, 0 none
    wanted = per_cluster_limit(skip, limit)
    if wanted is not None:
        command["limit"] = wanted
    return Plan("count", database, collection, command, skip=skip, limit=limit)


def _distinct(database: str, collection: str, command: dict[str, Any], tenant: str
              ) -> Plan:
    _check_collation(command, "distinct values are compared")
    return Plan("distinct", database, collection, command)


def _sort(command: Mapping[str, Any]) -> SortSpec | None:
    raw = command.get("sort")
    if raw is None or raw == {}:
        return None
    sort = parse_sort(raw)
    _check_collation(command, "a sorted merge compares")
    return sort


def _check_collation(command: Mapping[str, Any], what: str) -> None:
    collation = command.get("collation")
    if isinstance(collation, Mapping) and collation.get("locale") not in (None, "simple"):
        raise Unmergeable(f"{what} by BSON order; the proxy cannot apply the collation "
                          f"{collation.get('locale')!r}")


def _check_projection(projection: Any, sort: SortSpec) -> None:
    """Refuse a projection that drops or changes a sort key: the proxy merges by the
    returned documents, the servers sorted the documents before projecting."""
    if not isinstance(projection, Mapping) or not projection:
        return
    literal = {key: value for key, value in projection.items() if _is_flag(value)}
    inclusion = any(value for key, value in literal.items() if key != "_id") or len(
        literal) < len(projection)
    for path, _ in sort:
        touching = [key for key in projection if _related(key, path)]
        for key in touching:
            if key not in literal:
                raise Unmergeable(f"the projection computes {key!r}, which changes the "
                                  f"sort key {path!r}")
        if inclusion:
            kept = any(literal[key] and (key == path or path.startswith(key + "."))
                       for key in touching)
            narrowed = any(key.startswith(path + ".") for key in touching)
            if path == "_id" or path.startswith("_id."):
                kept = kept or "_id" not in projection
            if not kept or narrowed:
                raise Unmergeable(f"the projection drops the sort key {path!r}")
        elif touching:
            raise Unmergeable(f"the projection excludes the sort key {path!r}")


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool | int | float)


def _related(key: str, path: str) -> bool:
    return key == path or path.startswith(key + ".") or key.startswith(path + ".")


# -- aggregate --------------------------------------------------------------------------------

def _aggregate(database: str, collection: str, command: dict[str, Any], tenant: str
               ) -> Plan:
    if command.get("explain"):
        raise Unmergeable("explain is not fanned out")
    pipeline = command.get("pipeline")
    if not isinstance(pipeline, list):
        raise ProxyError(TYPE_MISMATCH, "aggregate.pipeline must be an array")
    stages = [_stage(stage, index) for index, stage in enumerate(pipeline)]
    prefix = _prefix(stages, tenant)
    tail = stages[len(prefix):]
    cursor = command.get("cursor")
    first = _non_negative(cursor.get("batchSize") if isinstance(cursor, Mapping) else None,
                          "aggregate.cursor.batchSize")
    counting = bool(tail) and _is_counter(tail[-1][1], tail[-1][2])
    sort: SortSpec | None = None
    position = len(prefix)
    if not counting and tail and tail[0][1] == "$sort":
        sort = parse_sort(tail[0][2])
        _check_collation(command, "a sorted merge compares")
        position += 1
    skip, limit = _skip_limit(stages[position:len(stages) - counting])
    forwarded = [{operator: argument} for _, operator, argument in prefix]
    if sort is not None:
        forwarded.append({"$sort": tail[0][2]})
    wanted = per_cluster_limit(skip, limit)
    if wanted is not None:
        forwarded.append({"$limit": wanted})
    if counting:
        _, operator, spec = stages[-1]
        forwarded.append({operator: spec})
    command["pipeline"] = forwarded
    command["cursor"] = {}
    if counting:
        field, head = _counter_output(stages[-1][1], stages[-1][2])
        return Plan("pipeline_count", database, collection, command, skip=skip,
                    limit=limit, first_batch=DEFAULT_BATCH if first is None else first,
                    counter_field=field, counter_head=head)
    return Plan("cursor", database, collection, command, sort, skip, limit,
                DEFAULT_BATCH if first is None else first)


Stage = tuple[int, str, Any]  # (position, operator, its argument)


def _stage(stage: Any, index: int) -> Stage:
    if not isinstance(stage, Mapping) or len(stage) != 1:
        raise ProxyError(BAD_VALUE, f"aggregate.pipeline[{index}]: a stage must be a "
                                    f"document with exactly one field")
    operator, argument = next(iter(stage.items()))
    return index, operator, argument


def _prefix(stages: list[Stage], tenant: str) -> list[Stage]:
    """The leading $match/$project/$group-by-tenant stages; a $group by anything else
    would merge groups that several clusters each computed a part of."""
    intact = True  # the tenant field still holds the tenant (no stage replaced it)
    prefix: list[Stage] = []
    for index, operator, argument in stages:
        if operator not in _PREFIX_STAGES:
            break
        if operator == "$group":
            if _is_counter(operator, argument) and index == len(stages) - 1:
                break
            if not (intact and _groups_by(argument, tenant)):
                raise Unmergeable(f"stage {index} ($group) does not group by the tenant "
                                  f"field {tenant!r}, so its groups span clusters")
            intact = False
        elif operator == "$project":
            intact = intact and _keeps(argument, tenant)
        prefix.append((index, operator, argument))
    return prefix


def _groups_by(group: Any, tenant: str) -> bool:
    if not isinstance(group, Mapping):
        return False
    key = group.get("_id")
    reference = "$" + tenant
    if isinstance(key, Mapping):
        return any(value == reference for value in key.values())
    return bool(key == reference)


def _keeps(projection: Any, tenant: str) -> bool:
    """The projection leaves the tenant field as it was."""
    if not isinstance(projection, Mapping):
        return False
    touching = [key for key in projection if _related(key, tenant)]
    if any(not _is_flag(projection[key]) for key in touching):
        return False
    if any(key.startswith(tenant + ".") for key in touching):
        return False
    inclusion = any(_is_flag(v) and v for k, v in projection.items() if k != "_id") or any(
        not _is_flag(v) for v in projection.values())
    if inclusion:
        return any(projection[key] for key in touching)
    return not touching


def _is_counter(operator: str, argument: Any) -> bool:
    """``$count`` or pymongo's countDocuments ``$group: {_id: <constant>, n: {$sum: 1}}``."""
    if operator == "$count":
        return isinstance(argument, str)
    if operator != "$group" or not isinstance(argument, Mapping) or len(argument) != 2:
        return False
    key = argument.get("_id", "$")
    if isinstance(key, Mapping | list) or (isinstance(key, str) and key.startswith("$")):
        return False
    return any(name != "_id" and value == {"$sum": 1} for name, value in argument.items())


def _counter_output(operator: str, argument: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    if operator == "$count":
        return str(argument), ()
    field = next(name for name in argument if name != "_id")
    return field, (("_id", argument["_id"]),)


def _skip_limit(stages: list[Stage]) -> tuple[int, int | None]:
    """Trailing $skip/$limit stages folded into one skip then one limit."""
    skip, limit = 0, None
    for index, operator, argument in stages:
        if operator == "$skip":
            value = _non_negative(argument, f"aggregate.pipeline[{index}].$skip") or 0
            skip += value
            limit = None if limit is None else max(0, limit - value)
        elif operator == "$limit":
            value = _non_negative(argument, f"aggregate.pipeline[{index}].$limit") or 0
            limit = value if limit is None else min(limit, value)
        else:
            raise Unmergeable(f"stage {index} ({operator}) is not fanned out: only "
                              f"$match, $project and $group by the tenant field, then "
                              f"$sort, $skip, $limit or $count")
    return skip, limit


# -- values ----------------------------------------------------------------------------------

def _integer(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProxyError(TYPE_MISMATCH, f"{field} must be an integer")
    return int(value)


def _non_negative(value: Any, field: str) -> int | None:
    number = _integer(value, field)
    if number is not None and number < 0:
        raise ProxyError(BAD_VALUE, f"{field} must be non-negative, not {number}")
    return number


_PLANNERS = {"find": _find, "count": _count, "distinct": _distinct, "aggregate": _aggregate}
