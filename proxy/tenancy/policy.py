"""Tenant isolation policy: a pure function of one decoded command (no I/O).

``TenantPolicy(config).check(command, sequences, bound_tenant, is_superuser)`` returns a
:class:`Verdict`. ``command`` is the decoded OP_MSG body (first key = command name,
``$db`` = database); ``sequences`` maps each kind-1 section identifier to its decoded
documents. Decode both with :func:`proxy.tenancy.decode_strict` (duplicate keys refused:
the server applies *every* occurrence of a duplicated key, a ``dict`` keeps only the last).

Namespaces (first match wins)
-----------------------------
* *operator-only*: collections of the ``admin``, ``config``, ``local`` databases and
  ``system.*`` collections: any collection-level command is allowed for the ``"*"``
  identity only.
* *exempt* (``exempt`` patterns): not tenant-scoped. Reads (``find``, ``count``,
  ``distinct``, ``aggregate``) are allowed to everyone (their pipelines still may not
  reach scoped collections unconfined); writes and operator commands are ``"*"`` only.
* *scoped* (``collections`` patterns): every command must be proven confined (below).
* otherwise *unscoped*: outside tenancy; allowed (aggregate sub-pipelines into scoped
  collections are still checked).

Database-level commands: the connection housekeeping in ``SAFE_DATABASE_COMMANDS``
(handshake, ``ping``, sessions, transactions, ``listCollections``, ``listDatabases``) is
allowed; any other (``dropDatabase``, ``aggregate: 1``, ``dbStats``, ...) is ``"*"`` only.

Confinement ("the filter requires ``field == T``")
--------------------------------------------------
* A filter proves ``T`` when it has, at its top level or inside a top-level ``$and``
  (recursively; every ``$and`` element must be a document), ``{field: T}``,
  ``{field: {$eq: T, ...}}`` or ``{field: {$in: [T]}}`` (exactly one element; every key
  of the operator document starts with ``$``). A condition on ``field.x`` proves nothing.
* ``T`` must be a scalar: ``str``, ``int`` (not ``bool``), ``ObjectId`` or ``UUID``
  (``null`` matches missing fields, arrays and documents match differently, regexes
  match many values). With a bound tenant it must be the bound (string) value.
* Anything else at the top level or in ``$and`` is ANDed with the equality, so it can
  only narrow: other fields, ``$or``, ``$nor``, ``$expr``, ``$text``, ``$jsonSchema``,
  ``$comment``, ``$alwaysTrue/False``, ``$sampleRate``. Any other top-level operator
  (``$where``, legacy ``$query``, unknown) is refused. ``$or``/``$nor`` contents are not
  inspected (ANDed: cannot widen).
* Every tenant value proven anywhere in one command must be the same value (two values
  ANDed would only narrow, but "one command = one tenant" is the rule); with a bound
  tenant each must equal it.
* ``collation`` other than ``{locale: "simple"}`` is refused: a case- or
  diacritic-insensitive collation makes ``{field: "acme"}`` match ``"ACME"``. Scoped
  collections must not have a non-simple *default* collation (the proxy cannot see it).
* Stored documents are assumed to carry a scalar tenant value (the write checks keep it
  so): ``{field: "a"}`` also matches a document whose field is ``["a", "b"]``.

Commands on scoped collections
------------------------------
* ``find`` (``filter``), ``count`` / ``distinct`` (``query``): filter proven.
* ``aggregate``: the first stage is a ``$match`` that proves ``T`` (``$geoNear``,
  ``$search`` etc. first are refused). Every stage must be known: cross-collection
  stages into scoped collections must be confined: ``$lookup`` in its ``pipeline`` form
  whose first stage is a proving ``$match`` (the ``localField/foreignField``-only form
  is refused: the input documents' field may have been rewritten by earlier stages),
  ``$unionWith`` likewise, ``$graphLookup`` by ``restrictSearchWithMatch``. ``$facet``
  sub-pipelines run on the confined input (their stages are still checked). ``$out``
  is refused (it replaces the whole target collection: every tenant's documents).
  ``$merge`` is allowed only into a scoped collection, with ``on`` naming the field,
  ``whenMatched`` one of ``replace|merge|keepExisting|fail`` and the stage right before
  it ``{$set|$addFields: {field: T}}`` (so every written document carries ``T`` and can
  only match documents of ``T``). Stages that read server state or other data
  (``$collStats``, ``$indexStats``, ``$currentOp``, ``$documents``, ``$changeStream``,
  ``$search``, ...) and unknown stages are refused.
* ``insert``: every document (body ``documents`` or the ``documents`` sequence) has
  ``field == T``.
* ``update``: every statement's ``q`` proven; ``u`` is either a replacement document
  carrying ``field == T``, or an operator document none of whose paths is ``field``,
  below it (``field.x``, ``field.$``) or above it, and whose ``$rename`` targets are not
  the field either; ``$setOnInsert: {field: T}`` is allowed (same tenant). Pipeline
  updates (array ``u``), unknown operators and unknown statement keys are refused.
  Upserts therefore create documents of ``T`` only (the equality from ``q`` or the
  replacement supplies it).
* ``delete``: every statement's ``q`` proven.
* ``findAndModify``: ``query`` proven; ``update`` as for ``update``; ``remove`` fine.
* ``explain``: the explained command, checked the same way.
* ``getMore`` / ``killCursors``: allowed here with ``needs_cursor_owner_check``: the
  caller must check the cursor belongs to this connection's tenant.
* anything else (``createIndexes``, ``listIndexes``, ``drop``, ``mapReduce``, ...):
  ``"*"`` only.

The ``"*"`` identity (``is_superuser``) bypasses every check (``superuser=True`` in the
verdict so the caller can audit it).

Modes
-----
* ``enforce``: a violation gives ``allowed=False`` and ``reason``.
* ``audit``: ``allowed=True``, ``violation`` = the reason (log and count it).
* ``inject`` with a bound tenant ``T``: unproven filters get ``{field: T}`` (added at the
  top level, or ``{$and: [{field: T}, <filter>]}`` when the filter already has the
  field), pipelines a leading ``$match``, scoped ``$lookup``/``$unionWith`` sub-pipelines
  a leading ``$match`` (a plain ``$lookup``/``$unionWith: "coll"`` gains a ``pipeline``),
  ``$graphLookup`` its ``restrictSearchWithMatch``, ``$merge`` a preceding
  ``{$set: {field: T}}``; inserted documents and replacements get the field. A value of
  another tenant anywhere, field-modifying updates and everything else refused in
  enforce mode are still refused. Without a bound tenant, inject behaves like enforce.
* ``off``: everything allowed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from proxy.commands import ALIASES, CONTINUATIONS, FILTERED_READS, SAFE_DATABASE_COMMANDS
from proxy.errors import UNAUTHORIZED
from proxy.tenancy.config import TenancyConfig

__all__ = [
    "SAFE_DATABASE_COMMANDS",
    "UNAUTHORIZED",
    "CheckContext",
    "TenantPolicy",
    "Verdict",
]


_CURSOR_COMMANDS = CONTINUATIONS
_ALIASES = ALIASES
_READS = FILTERED_READS
_OPERATOR_DBS = frozenset({"admin", "config", "local"})

# Top-level (or $and-level) operators that, ANDed with the tenant equality, only narrow.
_NARROWING_OPS = frozenset({
    "$or", "$nor", "$expr", "$text", "$comment", "$jsonSchema", "$alwaysTrue",
    "$alwaysFalse", "$sampleRate",
})
# Stages that neither read other collections nor write: they transform the input.
_PLAIN_STAGES = frozenset({
    "$match", "$project", "$addFields", "$set", "$unset", "$group", "$sort", "$limit",
    "$skip", "$unwind", "$count", "$sortByCount", "$bucket", "$bucketAuto",
    "$replaceRoot", "$replaceWith", "$sample", "$redact", "$setWindowFields",
    "$densify", "$fill",
})
_UPDATE_OPS = frozenset({
    "$set", "$unset", "$inc", "$mul", "$rename", "$setOnInsert", "$min", "$max",
    "$currentDate", "$addToSet", "$pop", "$pull", "$push", "$pullAll", "$bit",
})
_UPDATE_STMT_KEYS = frozenset({
    "q", "u", "c", "upsert", "multi", "arrayFilters", "hint", "collation", "sort",
})
_DELETE_STMT_KEYS = frozenset({"q", "limit", "hint", "collation"})
_MERGE_WHEN_MATCHED = frozenset({"replace", "merge", "keepExisting", "fail"})
_SEQUENCE_OF = {"insert": "documents", "update": "updates", "delete": "deletes"}

_NONE: Any = object()  # "no tenant value proven here"
_SAME: Any = object()  # a stage checker's "the stage is unchanged"

# Namespace kinds
_SCOPED, _EXEMPT, _UNSCOPED, _OPERATOR = 0, 1, 2, 3


# Not frozen: a frozen dataclass's __init__ costs a setattr call per field, about 1.5 µs
# here, once per request; nothing mutates a Verdict after it is made.
@dataclass(slots=True)
class Verdict:
    """The policy's answer for one command.

    ``allowed``: forward it (possibly ``rewritten``). ``reason``: why it was refused
    (``allowed=False``). ``violation``: audit mode: what would have been refused.
    ``tenant``: the one tenant value the command was proven (or injected) confined to.
    ``rewritten`` / ``rewritten_sequences``: inject mode: the command body / the kind-1
    sections (identifier -> documents) to send instead of the client's.
    ``needs_cursor_owner_check``: getMore/killCursors: the caller checks cursor ownership.
    ``superuser``: allowed because of the ``"*"`` identity (audit it).
    """

    allowed: bool
    reason: str | None = None
    namespace: str | None = None
    tenant: Any = None
    rewritten: dict[str, Any] | None = None
    rewritten_sequences: dict[str, list[dict[str, Any]]] | None = None
    violation: str | None = None
    needs_cursor_owner_check: bool = False
    superuser: bool = False


_ALLOWED = Verdict(True)


class _Deny(Exception):
    pass


class CheckContext:
    """State of one check: the command, its namespace and the tenant values seen."""

    __slots__ = (
        "body_changed",
        "bound",
        "command",
        "db",
        "explained",
        "inject",
        "name",
        "ns",
        "rewritten",
        "seq_changed",
        "sequences",
        "tenant",
    )

    def __init__(
        self,
        command: dict[str, Any],
        name: str,
        db: str,
        ns: str,
        sequences: Mapping[str, Sequence[Mapping[str, Any]]],
        bound: str | None,
        inject: bool,
    ) -> None:
        self.command = command
        self.name = name
        self.db = db
        self.ns = ns
        self.sequences = sequences
        self.bound = bound
        self.inject = inject
        self.tenant: Any = _NONE
        self.rewritten: dict[str, Any] | None = None
        self.body_changed = False
        self.seq_changed: dict[str, list[dict[str, Any]]] = {}
        self.explained = False

    @property
    def where_cmd(self) -> str:
        """``find on acme.tasks`` / ``explain of find on acme.tasks`` (for errmsgs)."""
        return f"{'explain of ' if self.explained else ''}{self.name} on {self.ns}"


def _q(value: Any) -> str:
    """A tenant value as errmsgs show it: strings in double quotes."""
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def _is_tenant_scalar(value: Any) -> bool:
    t = type(value)
    if t is str or t is ObjectId or t is uuid.UUID:
        return True
    return isinstance(value, int) and t is not bool


def _collation_ok(value: Any) -> bool:
    return isinstance(value, dict) and dict(value) == {"locale": "simple"}


class TenantPolicy:
    """The compiled policy; ``check`` is the single entry point (see module docstring)."""

    def __init__(self, config: TenancyConfig) -> None:
        self.config = config
        self.field = config.field
        self.mode = config.mode
        self._scoped = config.scoped_patterns()
        self._exempt = config.exempt_patterns()
        self._kinds: dict[tuple[str, str], int] = {}

    # --- namespaces ---------------------------------------------------------------

    def namespace_kind(self, db: str, coll: str) -> int:
        key = (db, coll)
        kind = self._kinds.get(key)
        if kind is None:
            if db in _OPERATOR_DBS or coll.startswith("system."):
                kind = _OPERATOR
            elif self._exempt(db, coll):
                kind = _EXEMPT
            elif self._scoped(db, coll):
                kind = _SCOPED
            else:
                kind = _UNSCOPED
            if len(self._kinds) > 65536:
                self._kinds.clear()
            self._kinds[key] = kind
        return kind

    def is_scoped(self, db: str, coll: str) -> bool:
        return self.namespace_kind(db, coll) == _SCOPED

    # --- entry point --------------------------------------------------------------

    def check(
        self,
        command: Mapping[str, Any],
        sequences: Mapping[str, Sequence[Mapping[str, Any]]],
        bound_tenant: str | None,
        is_superuser: bool,
    ) -> Verdict:
        mode = self.mode
        if mode == "off":
            return _ALLOWED
        try:
            verdict = self._check(command, sequences, bound_tenant, is_superuser,
                                  inject=mode == "inject" and bound_tenant is not None
                                  and not is_superuser)
        except _Deny as exc:
            ns = exc.args[1] if len(exc.args) > 1 else None
            if mode == "audit":
                return Verdict(True, None, ns, violation=exc.args[0])
            return Verdict(False, exc.args[0], ns)
        except (AttributeError, TypeError, ValueError, KeyError, RecursionError) as exc:
            # Anything malformed we did not anticipate: fail closed.
            reason = f"command cannot be parsed with certainty ({type(exc).__name__})"
            if mode == "audit":
                return Verdict(True, None, None, violation=reason)
            return Verdict(False, reason)
        return verdict

    def _check(
        self,
        command: Mapping[str, Any],
        sequences: Mapping[str, Sequence[Mapping[str, Any]]],
        bound: str | None,
        is_superuser: bool,
        inject: bool,
    ) -> Verdict:
        if not command:
            raise _Deny("empty command")
        raw_name = next(iter(command))
        name = _ALIASES.get(raw_name, raw_name)
        db = command.get("$db")
        if not isinstance(db, str) or not db:
            raise _Deny(f"{name}: no $db: the namespace cannot be determined")
        if name in _CURSOR_COMMANDS:
            return Verdict(True, None, db, needs_cursor_owner_check=True,
                           superuser=is_superuser)
        if is_superuser:
            return Verdict(True, None, db, superuser=True)
        outer: Mapping[str, Any] | None = None
        if name == "explain":
            inner = command.get("explain")
            if not isinstance(inner, dict) or not inner:
                raise _Deny(f"explain on {db}: the explained command is not a document")
            outer = command
            command = inner
            raw_name = next(iter(command))
            name = _ALIASES.get(raw_name, raw_name)
            if name == "explain" or name in _CURSOR_COMMANDS:
                raise _Deny(f"explain of {name} on {db} is not allowed")
        coll = command.get(raw_name)
        if not isinstance(coll, str):
            # database-level command
            if outer is None and name in SAFE_DATABASE_COMMANDS and not sequences:
                return Verdict(True, None, db)
            raise _Deny(
                f"{name} on database {db} is an operator command: "
                f"allowed for the '*' identity only", db)
        ns = f"{db}.{coll}"
        kind = self.namespace_kind(db, coll)
        if kind == _OPERATOR:
            raise _Deny(f"{name} on {ns}: operator-only namespace: "
                        f"allowed for the '*' identity only", ns)
        if kind != _SCOPED:
            if name not in _READS and (kind == _EXEMPT or name not in _CHECKERS):
                if kind == _EXEMPT:
                    raise _Deny(f"{name} on {ns}: exempt namespace: only reads are allowed "
                                f"except for the '*' identity", ns)
                return Verdict(True, None, ns)
            if name != "aggregate":
                return Verdict(True, None, ns)
        checker = _CHECKERS.get(name)
        if checker is None:
            raise _Deny(f"{name} on {ns} is an operator command on a tenant-scoped "
                        f"collection: allowed for the '*' identity only", ns)
        expected_seq = _SEQUENCE_OF.get(name)
        for ident in sequences:
            if ident != expected_seq:
                raise _Deny(f"{name} on {ns}: unexpected document sequence {ident!r}", ns)
        if outer is not None and sequences:
            raise _Deny(f"explain of {name} on {ns}: unexpected document sequences", ns)
        ctx = CheckContext(
            dict(command) if inject else command,  # type: ignore[arg-type]
            name, db, ns, sequences, bound, inject)
        if outer is not None:
            ctx.explained = True
        ctx_scoped = kind == _SCOPED
        try:
            checker(self, ctx, ctx_scoped)
        except _Deny as exc:
            raise _Deny(exc.args[0], ns) from None
        tenant = None if ctx.tenant is _NONE else ctx.tenant
        if ctx_scoped and tenant is None:
            raise _Deny(f"{self.field} equality required in {ctx.where_cmd}", ns)
        rewritten: dict[str, Any] | None = None
        if ctx.body_changed:
            rewritten = ctx.command
            if outer is not None:
                rewritten = {**outer, "explain": ctx.command}
        return Verdict(True, None, ns, tenant, rewritten, ctx.seq_changed or None)

    # --- tenant values ------------------------------------------------------------

    def _note(self, ctx: CheckContext, value: Any, where: str) -> None:
        field = self.field
        if ctx.bound is not None and value != ctx.bound:
            raise _Deny(f"{ctx.where_cmd}: {where} has {field} {_q(value)}, connection is "
                        f"bound to {_q(ctx.bound)}")
        if ctx.tenant is _NONE:
            ctx.tenant = value
        elif ctx.tenant != value:
            raise _Deny(f"{ctx.where_cmd}: {where} has {field} {_q(value)}, another part "
                        f"of the command has {_q(ctx.tenant)}: one command, one tenant")

    def _equality_value(self, cond: Any) -> Any:
        """The tenant value a condition on the field proves, or _NONE."""
        if isinstance(cond, dict):
            if not cond:
                return _NONE
            for key in cond:
                if not (isinstance(key, str) and key.startswith("$")):
                    return _NONE  # equality with an embedded document
            if "$eq" in cond:
                v = cond["$eq"]
                return v if _is_tenant_scalar(v) else _NONE
            values = cond.get("$in")
            if isinstance(values, list) and len(values) == 1 and _is_tenant_scalar(values[0]):
                return values[0]
            return _NONE
        return cond if _is_tenant_scalar(cond) else _NONE

    def _scan(self, ctx: CheckContext, flt: Mapping[str, Any], where: str,
              found: list[Any], depth: int) -> None:
        if depth > 100:
            raise _Deny(f"{ctx.where_cmd}: {where} is nested too deeply")
        field = self.field
        for key, cond in flt.items():
            if key == field:
                v = self._equality_value(cond)
                if v is not _NONE:
                    found.append(v)
            elif key[:1] == "$":
                if key == "$and":
                    if not isinstance(cond, list) or not cond:
                        raise _Deny(f"{ctx.where_cmd}: $and in {where} must be a "
                                    f"non-empty array")
                    for el in cond:
                        if not isinstance(el, dict):
                            raise _Deny(f"{ctx.where_cmd}: $and in {where} has a "
                                        f"non-document element")
                        self._scan(ctx, el, where, found, depth + 1)
                elif key not in _NARROWING_OPS:
                    raise _Deny(f"{ctx.where_cmd}: operator {key} is not allowed in {where}")

    def _filter(self, ctx: CheckContext, flt: Any, where: str) -> Any:
        """Check (enforce) or confine (inject) a filter; returns the filter to send."""
        if flt is None:
            flt = {}
        if not isinstance(flt, dict):
            raise _Deny(f"{ctx.where_cmd}: {where} is not a document")
        found: list[Any] = []
        self._scan(ctx, flt, where, found, 0)
        for v in found:
            self._note(ctx, v, where)
        if found:
            return flt
        if not ctx.inject:
            raise _Deny(f"{self.field} equality required in {where} of {ctx.where_cmd}")
        bound = ctx.bound
        self._note(ctx, bound, where)
        field = self.field
        if not flt:
            return {field: bound}
        if field in flt:
            return {"$and": [{field: bound}, flt]}
        return {field: bound, **flt}

    def _collation(self, ctx: CheckContext, holder: Mapping[str, Any], where: str) -> None:
        if "collation" in holder and not _collation_ok(holder["collation"]):
            raise _Deny(f"{ctx.where_cmd}: {where}collation other than "
                        f"{{locale: 'simple'}} can widen the {self.field} equality")

    def _set_body(self, ctx: CheckContext, key: str, value: Any, original: Any) -> None:
        if value is not original:
            ctx.command[key] = value
            ctx.body_changed = True

    # --- reads ----------------------------------------------------------------------

    def check_find(self, ctx: CheckContext, scoped: bool) -> None:
        self._collation(ctx, ctx.command, "")
        flt = ctx.command.get("filter")
        self._set_body(ctx, "filter", self._filter(ctx, flt, "filter"), flt)

    def check_count(self, ctx: CheckContext, scoped: bool) -> None:
        self._collation(ctx, ctx.command, "")
        q = ctx.command.get("query")
        self._set_body(ctx, "query", self._filter(ctx, q, "query"), q)

    check_distinct = check_count

    def check_aggregate(self, ctx: CheckContext, scoped: bool) -> None:
        cmd = ctx.command
        self._collation(ctx, cmd, "")
        pipeline = cmd.get("pipeline")
        if not isinstance(pipeline, list):
            raise _Deny(f"{ctx.where_cmd}: pipeline is not an array")
        new = self._pipeline(ctx, pipeline, "pipeline", confine=scoped, depth=0)
        self._set_body(ctx, "pipeline", new, pipeline)

    def _stage(self, stage: Any, where: str, i: int, ctx: CheckContext) -> tuple[str, Any]:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise _Deny(f"{ctx.where_cmd}: {where} stage {i}: a stage must be a document "
                        f"with exactly one field")
        ((name, spec),) = stage.items()
        return name, spec

    def _pipeline(self, ctx: CheckContext, pipeline: list[Any], where: str,
                  confine: bool, depth: int) -> list[Any]:
        """Check a pipeline; returns it, or a modified copy (inject)."""
        if depth > 20:
            raise _Deny(f"{ctx.where_cmd}: {where} is nested too deeply")
        out: list[Any] | None = None
        if confine:
            first_ok = False
            if pipeline:
                name, spec = self._stage(pipeline[0], where, 0, ctx)
                if name == "$match":
                    m = self._filter(ctx, spec, f"first $match of {where}")
                    first_ok = True
                    if m is not spec:
                        out = [{"$match": m}, *pipeline[1:]]
            if not first_ok:
                if not ctx.inject:
                    raise _Deny(f"{ctx.where_cmd}: {where} must start with a $match on "
                                f"{self.field} equality")
                self._note(ctx, ctx.bound, where)
                out = [{"$match": {self.field: ctx.bound}}, *pipeline]
        offset = 0 if out is None else len(out) - len(pipeline)
        for i, stage in enumerate(pipeline):
            name, spec = self._stage(stage, where, i, ctx)
            if name in _PLAIN_STAGES:
                continue
            label = f"{name} ({where} stage {i})"
            new_stage: Any = _SAME
            if name == "$lookup":
                new_stage = self._lookup(ctx, spec, label, depth)
            elif name == "$unionWith":
                new_stage = self._union_with(ctx, spec, label, depth)
            elif name == "$graphLookup":
                new_stage = self._graph_lookup(ctx, spec, label)
            elif name == "$facet":
                new_stage = self._facet(ctx, spec, label, depth)
            elif name == "$merge":
                if depth or i != len(pipeline) - 1:
                    raise _Deny(f"{ctx.where_cmd}: {label}: $merge must be the last stage "
                                f"of the outer pipeline")
                prev = pipeline[i - 1] if i else None
                if self._merge(ctx, spec, label, prev):
                    if out is None:
                        out = list(pipeline)
                    out.insert(i + offset, {"$set": {self.field: {"$literal": ctx.bound}}})
                    offset += 1
                continue
            elif name == "$out":
                raise _Deny(f"{ctx.where_cmd}: {label}: $out replaces the whole target "
                            f"collection and is not allowed")
            else:
                raise _Deny(f"{ctx.where_cmd}: stage {label} is not allowed on a "
                            f"tenant-scoped request")
            if new_stage is not _SAME:
                if out is None:
                    out = list(pipeline)
                out[i + offset] = new_stage
        return pipeline if out is None else out

    def _foreign_kind(self, ctx: CheckContext, coll: Any, label: str) -> int:
        if not isinstance(coll, str) or not coll:
            raise _Deny(f"{ctx.where_cmd}: {label}: the collection is not a name")
        kind = self.namespace_kind(ctx.db, coll)
        if kind == _OPERATOR:
            raise _Deny(f"{ctx.where_cmd}: {label}: {ctx.db}.{coll} is operator-only")
        return kind

    def _sub_pipeline(self, ctx: CheckContext, spec: Mapping[str, Any], key: str,
                      label: str, scoped: bool, depth: int) -> Mapping[str, Any]:
        sub = spec.get(key)
        if sub is None:
            if not scoped:
                return spec
            if not ctx.inject:
                raise _Deny(f"{ctx.where_cmd}: {label} reads a tenant-scoped collection: "
                            f"it needs a pipeline starting with a $match on "
                            f"{self.field} equality")
            self._note(ctx, ctx.bound, label)
            return {**spec, key: [{"$match": {self.field: ctx.bound}}]}
        if not isinstance(sub, list):
            raise _Deny(f"{ctx.where_cmd}: {label}: pipeline is not an array")
        new = self._pipeline(ctx, sub, f"pipeline of {label}", scoped, depth + 1)
        return spec if new is sub else {**spec, key: new}

    def _lookup(self, ctx: CheckContext, spec: Any, label: str, depth: int) -> Any:
        if not isinstance(spec, dict):
            raise _Deny(f"{ctx.where_cmd}: {label}: not a document")
        scoped = self._foreign_kind(ctx, spec.get("from"), label) == _SCOPED
        new = self._sub_pipeline(ctx, spec, "pipeline", label, scoped, depth)
        return {"$lookup": new} if new is not spec else _SAME

    def _union_with(self, ctx: CheckContext, spec: Any, label: str, depth: int) -> Any:
        if isinstance(spec, str):
            spec_doc: Mapping[str, Any] = {"coll": spec}
        elif isinstance(spec, dict):
            spec_doc = spec
        else:
            raise _Deny(f"{ctx.where_cmd}: {label}: not a document")
        scoped = self._foreign_kind(ctx, spec_doc.get("coll"), label) == _SCOPED
        new = self._sub_pipeline(ctx, spec_doc, "pipeline", label, scoped, depth)
        return {"$unionWith": new} if new is not spec_doc else _SAME

    def _graph_lookup(self, ctx: CheckContext, spec: Any, label: str) -> Any:
        if not isinstance(spec, dict):
            raise _Deny(f"{ctx.where_cmd}: {label}: not a document")
        if self._foreign_kind(ctx, spec.get("from"), label) != _SCOPED:
            return _SAME
        restrict = spec.get("restrictSearchWithMatch")
        new = self._filter(ctx, restrict, f"restrictSearchWithMatch of {label}")
        return _SAME if new is restrict else {
            "$graphLookup": {**spec, "restrictSearchWithMatch": new}}

    def _facet(self, ctx: CheckContext, spec: Any, label: str, depth: int) -> Any:
        if not isinstance(spec, dict) or not spec:
            raise _Deny(f"{ctx.where_cmd}: {label}: not a non-empty document")
        changed: dict[str, Any] = {}
        for key, sub in spec.items():
            if not isinstance(sub, list):
                raise _Deny(f"{ctx.where_cmd}: {label}: facet {key!r} is not an array")
            new = self._pipeline(ctx, sub, f"facet {key!r} of {label}", False, depth + 1)
            if new is not sub:
                changed[key] = new
        return {"$facet": {**spec, **changed}} if changed else _SAME

    def _merge(self, ctx: CheckContext, spec: Any, label: str, prev: Any) -> bool:
        """Check $merge; True when inject must add a ``$set`` of the field before it."""
        if isinstance(spec, str):
            spec = {"into": spec}
        if not isinstance(spec, dict):
            raise _Deny(f"{ctx.where_cmd}: {label}: not a document")
        into = spec.get("into")
        if isinstance(into, dict):
            if set(into) - {"db", "coll"} or into.get("db", ctx.db) != ctx.db:
                raise _Deny(f"{ctx.where_cmd}: {label}: only a collection of the same "
                            f"database may be the target")
            into = into.get("coll")
        kind = self._foreign_kind(ctx, into, label)
        if kind != _SCOPED:
            raise _Deny(f"{ctx.where_cmd}: {label}: the target must be a tenant-scoped "
                        f"collection")
        on = spec.get("on")
        on_fields = [on] if isinstance(on, str) else on
        if not isinstance(on_fields, list) or self.field not in on_fields:
            raise _Deny(f"{ctx.where_cmd}: {label}: 'on' must include {self.field}")
        wm = spec.get("whenMatched", "merge")
        if not isinstance(wm, str) or wm not in _MERGE_WHEN_MATCHED:
            raise _Deny(f"{ctx.where_cmd}: {label}: whenMatched must be one of "
                        f"{', '.join(sorted(_MERGE_WHEN_MATCHED))}")
        wnm = spec.get("whenNotMatched", "insert")
        if not isinstance(wnm, str) or wnm not in ("insert", "discard", "fail"):
            raise _Deny(f"{ctx.where_cmd}: {label}: whenNotMatched must be one of "
                        f"discard, fail, insert")
        if set(spec) - {"into", "on", "whenMatched", "whenNotMatched"}:
            raise _Deny(f"{ctx.where_cmd}: {label}: unexpected options "
                        f"{sorted(set(spec) - {'into', 'on', 'whenMatched', 'whenNotMatched'})}")
        value = self._set_stage_value(prev)
        if value is not _NONE:
            self._note(ctx, value, label)
            return False
        if ctx.inject:
            self._note(ctx, ctx.bound, label)
            return True
        raise _Deny(f"{ctx.where_cmd}: {label}: must be preceded by "
                    f"{{$set: {{{self.field}: <tenant>}}}}")

    def _set_stage_value(self, stage: Any) -> Any:
        if not isinstance(stage, dict) or len(stage) != 1:
            return _NONE
        ((name, spec),) = stage.items()
        if name not in ("$set", "$addFields") or not isinstance(spec, dict):
            return _NONE
        if self.field not in spec:
            return _NONE
        v = spec[self.field]
        if isinstance(v, dict) and len(v) == 1 and "$literal" in v:
            v = v["$literal"]
        elif isinstance(v, str) and v.startswith("$"):
            return _NONE  # a field path or variable, not a literal
        return v if _is_tenant_scalar(v) else _NONE

    # --- writes ---------------------------------------------------------------------

    def _documents(self, ctx: CheckContext, key: str
                   ) -> tuple[list[Any], bool]:
        """The statements of a write, from the body or its document sequence."""
        body = ctx.command.get(key)
        seq = ctx.sequences.get(key)
        if body is not None and seq is not None:
            raise _Deny(f"{ctx.where_cmd}: {key} given both in the body and as a "
                        f"document sequence")
        if seq is not None:
            return list(seq), True
        if not isinstance(body, list):
            raise _Deny(f"{ctx.where_cmd}: {key} is missing or not an array")
        return body, False

    def _store(self, ctx: CheckContext, key: str, docs: list[Any], from_seq: bool) -> None:
        if from_seq:
            ctx.seq_changed[key] = docs
        else:
            ctx.command[key] = docs
            ctx.body_changed = True

    def _carries_tenant(self, ctx: CheckContext, doc: Any, where: str) -> Any:
        """A document to store must carry the tenant; returns it, or a copy with it."""
        if not isinstance(doc, dict):
            raise _Deny(f"{ctx.where_cmd}: {where} is not a document")
        field = self.field
        if field in doc:
            v = doc[field]
            if not _is_tenant_scalar(v):
                raise _Deny(f"{ctx.where_cmd}: {where} has {field} {v!r}: not a single "
                            f"tenant value")
            self._note(ctx, v, where)
            return doc
        if not ctx.inject:
            raise _Deny(f"{ctx.where_cmd}: {where} has no {field}")
        self._note(ctx, ctx.bound, where)
        return {**doc, field: ctx.bound}

    def check_insert(self, ctx: CheckContext, scoped: bool) -> None:
        docs, from_seq = self._documents(ctx, "documents")
        if not docs:
            raise _Deny(f"{ctx.where_cmd}: no documents")
        changed = False
        out = []
        for i, doc in enumerate(docs):
            new = self._carries_tenant(ctx, doc, f"document {i}")
            changed |= new is not doc
            out.append(new)
        if changed:
            self._store(ctx, "documents", out, from_seq)

    def _update_doc(self, ctx: CheckContext, u: Any, where: str) -> Any:
        """Check an update/replacement; returns it or a copy with the field (inject)."""
        if isinstance(u, list):
            raise _Deny(f"{ctx.where_cmd}: {where} is a pipeline update: it cannot be "
                        f"proven to keep {self.field}")
        if not isinstance(u, dict):
            raise _Deny(f"{ctx.where_cmd}: {where}: the update is not a document")
        keys = list(u)
        dollar = [k.startswith("$") for k in keys]
        if not keys or not any(dollar):
            return self._carries_tenant(ctx, u, f"{where} (replacement)")
        if not all(dollar):
            raise _Deny(f"{ctx.where_cmd}: {where} mixes update operators and fields")
        field = self.field
        prefix = field + "."
        for op, paths in u.items():
            if op not in _UPDATE_OPS:
                raise _Deny(f"{ctx.where_cmd}: {where}: update operator {op} is not allowed")
            if not isinstance(paths, dict):
                raise _Deny(f"{ctx.where_cmd}: {where}: {op} is not a document")
            for path, value in paths.items():
                targets = [path]
                if op == "$rename":
                    if not isinstance(value, str):
                        raise _Deny(f"{ctx.where_cmd}: {where}: $rename target is not a "
                                    f"string")
                    targets.append(value)
                for p in targets:
                    if p == field or p.startswith(prefix) or field.startswith(p + "."):
                        if (op == "$setOnInsert" and p == field
                                and _is_tenant_scalar(value)):
                            self._note(ctx, value, f"{where} ($setOnInsert)")
                            continue
                        raise _Deny(f"{ctx.where_cmd}: {where} modifies {field} ({op})")
        return u

    def _check_statements(
        self,
        ctx: CheckContext,
        key: str,
        allowed_keys: frozenset[str],
        confine: Callable[[Mapping[str, Any], str], Mapping[str, Any]],
    ) -> None:
        """The statements of an update/delete: each a document of known fields with no
        widening collation; ``confine`` checks (or, in inject mode, rewrites) one."""
        stmts, from_seq = self._documents(ctx, key)
        if not stmts:
            raise _Deny(f"{ctx.where_cmd}: no {key[:-1]} statements")
        changed = False
        out = []
        for i, stmt in enumerate(stmts):
            where = f"statement {i}"
            if not isinstance(stmt, dict):
                raise _Deny(f"{ctx.where_cmd}: {where} is not a document")
            extra = [k for k in stmt if k not in allowed_keys]
            if extra:
                raise _Deny(f"{ctx.where_cmd}: {where}: unknown field {extra[0]!r}")
            self._collation(ctx, stmt, f"{where}: ")
            new = confine(stmt, where)
            changed = changed or new is not stmt
            out.append(new)
        if changed:
            self._store(ctx, key, out, from_seq)

    def check_update(self, ctx: CheckContext, scoped: bool) -> None:
        def confine(stmt: Mapping[str, Any], where: str) -> Mapping[str, Any]:
            q, u = stmt.get("q"), stmt.get("u")
            new_q = self._filter(ctx, q, f"q of {where}")
            new_u = self._update_doc(ctx, u, where)
            if new_q is not q or new_u is not u:
                return {**stmt, "q": new_q, "u": new_u}
            return stmt

        self._check_statements(ctx, "updates", _UPDATE_STMT_KEYS, confine)

    def check_delete(self, ctx: CheckContext, scoped: bool) -> None:
        def confine(stmt: Mapping[str, Any], where: str) -> Mapping[str, Any]:
            q = stmt.get("q")
            new_q = self._filter(ctx, q, f"q of {where}")
            return stmt if new_q is q else {**stmt, "q": new_q}

        self._check_statements(ctx, "deletes", _DELETE_STMT_KEYS, confine)

    def check_find_and_modify(self, ctx: CheckContext, scoped: bool) -> None:
        cmd = ctx.command
        self._collation(ctx, cmd, "")
        q = cmd.get("query")
        self._set_body(ctx, "query", self._filter(ctx, q, "query"), q)
        remove = cmd.get("remove", False)
        if "update" in cmd:
            if remove not in (False, 0):
                raise _Deny(f"{ctx.where_cmd}: both remove and update")
            u = cmd["update"]
            self._set_body(ctx, "update", self._update_doc(ctx, u, "update"), u)
        elif remove in (False, 0):
            raise _Deny(f"{ctx.where_cmd}: neither remove nor update")



_CHECKERS: dict[str, Any] = {
    "find": TenantPolicy.check_find,
    "count": TenantPolicy.check_count,
    "distinct": TenantPolicy.check_distinct,
    "aggregate": TenantPolicy.check_aggregate,
    "insert": TenantPolicy.check_insert,
    "update": TenantPolicy.check_update,
    "delete": TenantPolicy.check_delete,
    "findAndModify": TenantPolicy.check_find_and_modify,
}
