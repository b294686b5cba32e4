"""The cache key of a read: a hash of a canonical form of everything that changes its
result. Pure (no I/O).

**Kept** (they change the result): the namespace, the command name, every argument of
the command that is not in :data:`ENVELOPE` (filter, projection, sort, skip, limit,
batchSize, singleBatch, collation, hint, min/max, let, pipeline, key, query, ...,
and ``readConcern``), the read preference the routing decision selects with (a
secondary may lag: its results never answer a primary read), and the tenant the
connection is bound to and the tenant the policy admitted the command for
(``tenants``). Unknown
arguments are kept: an option the proxy does not know can only cost hits, never mix
results.

**Dropped** (:data:`ENVELOPE`): what identifies the session, the transport or the
deadline, not the result: ``$db`` (it is in the namespace), ``lsid``, ``$clusterTime``,
``txnNumber``, ``$readPreference`` (replaced by the decision's), ``writeConcern``,
``comment``, ``maxTimeMS``, ``apiVersion``/``apiStrict``/``apiDeprecationErrors``,
``allowDiskUse``, ``$client``...

**Order**: the command's arguments are sorted by name (drivers order the envelope
differently); a filter's top-level clauses are sorted too (a conjunction: their order
changes neither the result nor, on MongoDB, the plan). Everything else keeps its order:
sort keys, projections, pipelines and embedded documents compare field by field
(``{a: {x: 1, y: 2}}`` does not match ``{a: {y: 2, x: 1}}``).

The canonical form is BSON (typed: ``1`` and ``1.0`` are different keys, never the same
key for different filters), hashed with BLAKE2b-128.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import bson

__all__ = ["ENVELOPE", "canonical", "entry_digest"]

ENVELOPE = frozenset({
    "$db", "lsid", "$clusterTime", "txnNumber", "autocommit", "startTransaction",
    "$readPreference", "readPreference", "writeConcern", "comment", "maxTimeMS",
    "apiVersion", "apiStrict", "apiDeprecationErrors", "allowDiskUse", "$client",
    "$audit", "$traceCtx", "mayBypassWriteBlocking", "noCursorTimeout",
    "$configServerState", "$gleStats", "$queryOptions",
})

# Where each command keeps its query (top-level clauses sorted).
_QUERY_FIELDS = ("filter", "query")


def canonical(
    command: Mapping[str, Any],
    read_preference: Mapping[str, Any] | None,
    tenants: tuple[Any, ...],
    name: str | None = None,
) -> dict[str, Any]:
    """The canonical document hashed into the key (exposed for tests and debugging).
    ``name``: the command's name as sent, when the caller parsed it (``Request.raw_name``)."""
    if name is None:
        name = next(iter(command))
    out: dict[str, Any] = {
        "ns": f"{command.get('$db')}.{command[name]}",
        "cmd": name,
        "tenants": [None if t is None else str(t) for t in tenants],
        "rp": dict(read_preference) if read_preference is not None else None,
    }
    args = {k: v for k, v in command.items() if k != name and k not in ENVELOPE}
    for field in _QUERY_FIELDS:
        query = args.get(field)
        if isinstance(query, dict):
            args[field] = {k: query[k] for k in sorted(query)}
    out["args"] = {k: args[k] for k in sorted(args)}
    return out


def entry_digest(
    command: Mapping[str, Any],
    read_preference: Mapping[str, Any] | None,
    tenants: tuple[Any, ...],
    name: str | None = None,
) -> str:
    """32 hex digits identifying the result of ``command`` (see the module docstring)."""
    raw = bson.encode(canonical(command, read_preference, tenants, name))
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
