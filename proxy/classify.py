"""Command classification: what a decoded command is, as a pure function (no I/O).

``classify(command, context)`` reads the command document as the proxy decoded it (the
first key names the command, ``$db`` the database) and the client connection's context,
and returns a :class:`Classification` that routing rules match against
(``proxy.route.rules``) and the router uses to pin or place the command.

Definitions, precisely:

* ``command`` is the first key, with the server's legacy lowercase aliases mapped to
  the canonical name (``findandmodify`` -> ``findAndModify``, ``mapreduce`` ->
  ``mapReduce``, ``deleteIndexes`` -> ``dropIndexes``, ``ismaster`` -> ``isMaster``,
  ``buildinfo`` -> ``buildInfo``, ``dbstats`` -> ``dbStats``). Names are otherwise
  case-sensitive, as on the server (``Find`` is an unknown command).
* ``explain``: ``{explain: {find: ...}}`` is classified as the explained command with
  ``explain=True``; database, ``$readPreference`` and ``maxTimeMS`` still come from the
  outer document. An explained write counts as a write (it goes to the primary, as
  before), although the server does not apply it. An ``explain`` whose argument is not a
  non-empty document, or that explains an explain, is an unknown command named
  ``explain`` (neither read nor write: primary).
* ``is_write``: commands that modify data, users, roles or collection metadata (see
  ``WRITE_COMMANDS``), ``aggregate`` with ``$out`` or ``$merge`` anywhere in the pipeline
  (including sub-pipelines of ``$facet``, ``$lookup`` and ``$unionWith``), and
  ``mapReduce`` whose ``out`` is anything but ``{inline: 1}``.
* ``is_read`` (property): not a write, not a cursor continuation, and a known read
  command (``READ_COMMANDS``). Only reads may leave the primary; anything unknown stays
  on it.
* ``is_cursor_continuation``: ``getMore`` and ``killCursors`` (pinned to the cursor's
  server by the caller).
* ``in_transaction``: ``autocommit: false`` (a statement of a multi-statement transaction,
  pinned by the caller).
* ``is_admin``: handshake, authentication, session housekeeping and server
  administration commands (``ADMIN_COMMANDS``).
* ``stages``: the top-level stage names of an aggregate pipeline (``$group`` inside a
  ``$facet`` is not listed; ``$facet`` is).
* ``text_search``: ``$text`` in the query of ``find`` (``filter``), ``count``,
  ``distinct`` (``query``), or the first stage of an aggregate when it is a ``$match``
  (at its top level or inside top-level ``$and``/``$or``), or a ``$search`` /
  ``$searchMeta`` stage anywhere at the pipeline's top level.
* ``comment``: the command's ``comment`` when it is a string or a document (the
  explained command's, else the explain's); other BSON types are ignored (None).
* ``max_time_ms``: the command's own ``maxTimeMS`` when it is a non-negative integer
  (0 means "no limit" to the server), else None.
* ``collection``: for collection-level commands, the collection named by the command's
  value (``getMore``: its ``collection`` field); ``renameCollection`` and a single-
  namespace ``bulkWrite`` take database and collection from their namespace. None for
  database-level commands (``aggregate: 1``, ``listCollections``, ``dropDatabase``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.commands import (
    ADMIN_COMMANDS,
    ALIASES,
    COLLECTION_COMMANDS,
    CONTINUATIONS,
    READ_COMMANDS,
    WRITE_COMMANDS,
)

# Documents are tested with isinstance(x, dict), here and in the other per-request
# modules (tenancy, cache, route): bson decodes every document to a dict, and the
# Mapping ABC's isinstance costs ~0.3 µs per call, about a tenth of classify's time.

__all__ = [
    "ADMIN_COMMANDS",
    "COLLECTION_COMMANDS",
    "READ_COMMANDS",
    "WRITE_COMMANDS",
    "Classification",
    "ClientContext",
    "classify",
]

_ALIASES = ALIASES
_CONTINUATIONS = CONTINUATIONS
_WRITE_STAGES = ("$out", "$merge")
_SEARCH_STAGES = ("$search", "$searchMeta")
_QUERY_FIELD = {"find": "filter", "count": "query", "distinct": "query"}
_NO_STAGES: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ClientContext:
    """What the proxy knows about the client connection a command came from."""

    app_name: str | None = None  # client.application.name from the handshake
    user: str | None = None      # authenticated user, when known
    tenant: str | None = None    # tenant, when known


NO_CONTEXT = ClientContext()


@dataclass(frozen=True, slots=True)
class Classification:
    command: str
    database: str | None
    collection: str | None
    is_write: bool = False
    is_cursor_continuation: bool = False
    in_transaction: bool = False
    is_admin: bool = False
    explain: bool = False
    stages: frozenset[str] = _NO_STAGES
    text_search: bool = False
    comment: str | Mapping[str, Any] | None = None
    max_time_ms: int | None = None
    app_name: str | None = None
    user: str | None = None
    tenant: str | None = None

    @property
    def is_read(self) -> bool:
        """A known read command that writes nothing: may go where a read preference says."""
        return (
            not self.is_write
            and not self.is_cursor_continuation
            and self.command in READ_COMMANDS
        )


def classify(
    command: Mapping[str, Any],
    context: ClientContext = NO_CONTEXT,
    raw_name: str | None = None,
) -> Classification:
    """Classify a decoded command document (see the module docstring for definitions).

    ``raw_name``: the command's name as sent, when the caller has parsed it already
    (the request path passes ``Request.raw_name``: the document is not read again for
    it); None reads it from the document (tests, ad-hoc callers).
    """
    if raw_name is None:
        if not command:
            return Classification("", None, None, app_name=context.app_name,
                                  user=context.user, tenant=context.tenant)
        raw_name = next(iter(command))
    outer = command
    name = _ALIASES.get(raw_name, raw_name)
    explain = False
    database = _str_or_none(outer.get("$db"))
    if name == "explain":
        inner = command.get("explain")
        if isinstance(inner, dict) and inner:
            inner_raw = next(iter(inner))
            inner_name = _ALIASES.get(inner_raw, inner_raw)
            if inner_name != "explain":
                command, raw_name, name, explain = inner, inner_raw, inner_name, True

    value = command.get(raw_name)
    collection: str | None = None
    if name in COLLECTION_COMMANDS:
        collection = value if type(value) is str else None
    elif name == "getMore":
        collection = _str_or_none(command.get("collection"))
    elif name == "renameCollection" and type(value) is str:
        database, collection = _split_namespace(value, database)
    elif name == "bulkWrite":
        database, collection = _bulk_write_namespace(command, database)

    stages = _NO_STAGES
    text_search = False
    is_write = name in WRITE_COMMANDS
    if name == "aggregate":
        pipeline = command.get("pipeline")
        if isinstance(pipeline, list):
            stages = frozenset(_stage_name(s) for s in pipeline if isinstance(s, dict) and s)
            is_write = _pipeline_writes(pipeline)
            text_search = any(s in stages for s in _SEARCH_STAGES) or _first_match_text(pipeline)
    elif name == "mapReduce":
        is_write = not _inline_output(command.get("out"))
    elif name in _QUERY_FIELD:
        text_search = _has_text(command.get(_QUERY_FIELD[name]))

    comment = _comment(command.get("comment"))
    if comment is None and explain:
        comment = _comment(outer.get("comment"))
    # Positional (field order): ~0.5 us cheaper than keywords for a frozen dataclass.
    return Classification(
        name,                              # command
        database,
        collection,
        is_write,
        name in _CONTINUATIONS,            # is_cursor_continuation
        outer.get("autocommit") is False,  # in_transaction
        name in ADMIN_COMMANDS,            # is_admin
        explain,
        stages,
        text_search,
        comment,
        _max_time(outer.get("maxTimeMS")),  # max_time_ms
        context.app_name,
        context.user,
        context.tenant,
    )


def _str_or_none(value: Any) -> str | None:
    # Exactly str: bson's Code is a str subclass (and unhashable).
    return value if type(value) is str else None


def _max_time(value: Any) -> int | None:
    """A usable ``maxTimeMS``: a non-negative integer (or integral double)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value >= 0 else None


def _comment(value: Any) -> str | Mapping[str, Any] | None:
    return value if isinstance(value, str | dict) else None


def _stage_name(stage: Mapping[str, Any]) -> str:
    return str(next(iter(stage)))


def _split_namespace(namespace: str, default_db: str | None) -> tuple[str | None, str | None]:
    db, dot, coll = namespace.partition(".")
    if not dot or not db or not coll:
        return default_db, None
    return db, coll


def _bulk_write_namespace(
    command: Mapping[str, Any], default_db: str | None
) -> tuple[str | None, str | None]:
    """The namespace of a bulkWrite that touches exactly one collection."""
    ns_info = command.get("nsInfo")
    if not isinstance(ns_info, list):
        return default_db, None
    namespaces = {_str_or_none(e.get("ns")) for e in ns_info if isinstance(e, dict)}
    if len(namespaces) != 1:
        return default_db, None
    (namespace,) = namespaces
    return _split_namespace(namespace, default_db) if namespace is not None else (
        default_db, None)


def _pipeline_writes(pipeline: list[Any]) -> bool:
    """``$out``/``$merge`` in the pipeline or any sub-pipeline ($facet, $lookup, $unionWith)."""
    for stage in pipeline:
        if not isinstance(stage, dict):
            continue
        for key, spec in stage.items():
            if key in _WRITE_STAGES:
                return True
            if key == "$facet" and isinstance(spec, dict):
                if any(isinstance(p, list) and _pipeline_writes(p) for p in spec.values()):
                    return True
            elif key in ("$lookup", "$unionWith") and isinstance(spec, dict):
                sub = spec.get("pipeline")
                if isinstance(sub, list) and _pipeline_writes(sub):
                    return True
    return False


def _first_match_text(pipeline: list[Any]) -> bool:
    if not pipeline or not isinstance(pipeline[0], dict):
        return False
    return _has_text(pipeline[0].get("$match"))


def _has_text(query: Any) -> bool:
    if not isinstance(query, dict):
        return False
    if "$text" in query:
        return True
    for op in ("$and", "$or"):
        clauses = query.get(op)
        if isinstance(clauses, list) and any(_has_text(c) for c in clauses):
            return True
    return False


def _inline_output(out: Any) -> bool:
    """``out: {inline: 1}``: results returned to the client, nothing written."""
    if not isinstance(out, dict) or "inline" not in out:
        return False
    flag = out["inline"]
    return isinstance(flag, int | float) and bool(flag)
