"""The tenancy checks of writes: inserted documents, update and delete statements,
findAndModify (see ``proxy.tenancy.policy`` for the rules)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.tenancy.core import (
    _DELETE_STMT_KEYS,
    _UPDATE_OPS,
    _UPDATE_STMT_KEYS,
    CheckContext,
    PolicyCore,
    _Deny,
    _is_tenant_scalar,
)


class WriteChecks(PolicyCore):
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


