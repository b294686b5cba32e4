"""The tenancy policy's shared parts: the verdict, the state of one check, namespace
kinds, and the proof of a tenant equality in a filter (``proxy.tenancy.policy`` has
the rules; ``stages`` and ``writes`` the checks of pipelines and of writes)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from proxy.commands import ALIASES, CONTINUATIONS, FILTERED_READS
from proxy.tenancy.config import TenancyConfig

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



class PolicyCore:
    """The compiled namespaces and the filter proofs every check builds on."""

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

