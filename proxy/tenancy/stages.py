"""The tenancy checks of reads: filters of find/count/distinct and aggregation
pipelines, stage by stage (see ``proxy.tenancy.policy`` for the rules)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.tenancy.core import (
    _MERGE_WHEN_MATCHED,
    _NONE,
    _OPERATOR,
    _PLAIN_STAGES,
    _SAME,
    _SCOPED,
    CheckContext,
    PolicyCore,
    _Deny,
    _is_tenant_scalar,
)


class ReadChecks(PolicyCore):
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

