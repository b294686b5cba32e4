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

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.commands import SAFE_DATABASE_COMMANDS
from proxy.errors import UNAUTHORIZED
from proxy.tenancy.core import (
    _ALIASES,
    _ALLOWED,
    _CURSOR_COMMANDS,
    _EXEMPT,
    _NONE,
    _OPERATOR,
    _READS,
    _SCOPED,
    _SEQUENCE_OF,
    CheckContext,
    Verdict,
    _Deny,
)
from proxy.tenancy.stages import ReadChecks
from proxy.tenancy.writes import WriteChecks

__all__ = [
    "SAFE_DATABASE_COMMANDS",
    "UNAUTHORIZED",
    "CheckContext",
    "TenantPolicy",
    "Verdict",
]


class TenantPolicy(ReadChecks, WriteChecks):
    """The compiled policy; ``check`` is the single entry point (see module docstring)."""

    # --- entry point --------------------------------------------------------------

    def check(
        self,
        command: Mapping[str, Any],
        sequences: Mapping[str, Sequence[Mapping[str, Any]]],
        bound_tenant: str | None,
        is_superuser: bool,
        raw_name: str | None = None,
    ) -> Verdict:
        """The verdict on ``command``; ``raw_name``: its name as sent, when the caller
        parsed it (the request path passes ``Request.raw_name``)."""
        mode = self.mode
        if mode == "off":
            return _ALLOWED
        try:
            verdict = self._check(command, sequences, bound_tenant, is_superuser,
                                  inject=mode == "inject" and bound_tenant is not None
                                  and not is_superuser, raw_name=raw_name)
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
        raw_name: str | None,
    ) -> Verdict:
        if raw_name is None:  # not parsed by the caller (tests, ad-hoc callers)
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

