"""The advice document: the digest's shapes against the catalog's real indexes.

Derived when asked (``GET /advice``, ``mongoproxy advise``, ``mongoproxy top``), never
per operation: the request path pays only for the digest it already feeds. The
derivation of a shape is cached by its hash (a shape never changes); the comparison
with the indexes is redone on each request (a few µs per shape).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.advice.catalog import CatalogEntry, IndexCatalog, RunCommand
from proxy.advice.compare import IndexInfo, consolidate, redundant, serving_index
from proxy.advice.config import AdviceConfig
from proxy.advice.derive import Derivation, Need, derive, key_document
from proxy.advice.explain import Explainer
from proxy.advice.render import create_index_js, drop_index_js
from proxy.advice.window import Snapshots
from proxy.observe.digest import QueryDigest

__all__ = ["QUERY_COMMANDS", "Advisor"]

# Commands whose shapes can need an index.
QUERY_COMMANDS = frozenset({"find", "count", "distinct", "findAndModify", "findandmodify",
                            "update", "delete", "aggregate"})
_CACHE_MAX = 8192


@dataclass
class _Missing:
    namespace: str
    need: Need
    count: int = 0
    total_ms: float = 0.0
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _shape_of(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The digest row's shape as a document (a JSON text today; an object later)."""
    shape = row.get("shape")
    if isinstance(shape, str):
        try:
            shape = json.loads(shape)
        except ValueError:
            return None
    return shape if isinstance(shape, dict) else None


class Advisor:
    def __init__(self, config: AdviceConfig, digest: QueryDigest, run_command: RunCommand,
                 tenant_field: str | None = "tenant_id") -> None:
        self.config = config
        self.digest = digest
        self.tenant_field = tenant_field
        self.explainer = (
            Explainer(run_command, config.explain_interval_s, config.explain_min_ms)
            if config.explain else None)
        self.catalog = IndexCatalog(
            run_command, refresh_s=config.refresh_s, poll_s=config.poll_s,
            max_namespaces=config.max_namespaces, source=self._poll,
            after=None if self.explainer is None else self._explain)
        self._derived: dict[str, Derivation | None] = {}
        # Consolidation per set of unserved needs: the same from one request to the next
        # while the traffic's shapes and the indexes stay the same.
        self._consolidated: dict[frozenset[Need], dict[Need, Need]] = {}
        self._served: dict[str, tuple[CatalogEntry, dict[Need, IndexInfo | None]]] = {}
        self.snapshots = Snapshots(config.window_step_s, config.window_keep)

    def start(self) -> None:
        self.catalog.start()

    async def close(self) -> None:
        await self.catalog.close()

    def index_changed(self, database: str | None, collection: str | None) -> None:
        self.catalog.invalidate(database, collection)

    def _poll(self) -> list[str]:
        """Called by the catalog's task every ``poll_s``: a window snapshot when due,
        and the namespaces to fetch indexes for."""
        rows = list(self.digest.rows.items())
        self.snapshots.maybe_take(time.time(), ((k, r.count, r.total_ms) for k, r in rows))
        return list(self.namespaces())

    async def _explain(self) -> None:
        """After each poll: one explain of the slowest shape lacking an index, when due."""
        now = time.time()
        if self.explainer is None or not self.explainer.due(now):
            return
        candidates = [{**s, "shape_doc": _shape_of(s)}
                      for s in self.report(limit=0)["shapes"] if s["status"] == "missing"]
        candidates.sort(key=lambda s: -s["total_ms"])
        await self.explainer.explain_one(candidates, now)

    def namespaces(self) -> Iterable[str]:
        """The namespaces the digest has queries for (polled by the catalog)."""
        for row in list(self.digest.rows.values()):
            if row.command in QUERY_COMMANDS and row.database and row.collection:
                yield f"{row.database}.{row.collection}"

    def _derive(self, key: str, row: Mapping[str, Any]) -> Derivation | None:
        """The derivation of a digest row's shape, parsed and derived once per hash."""
        if key in self._derived:
            return self._derived[key]
        if len(self._derived) >= _CACHE_MAX:
            self._derived.clear()
        shape = _shape_of(row)
        found = self._derived[key] = None if shape is None else derive(shape,
                                                                        self.tenant_field)
        return found

    def _serving(self, namespace: str, entry: CatalogEntry, indexes: tuple[IndexInfo, ...],
                 need: Need) -> IndexInfo | None:
        """serving_index, remembered per namespace until its catalog entry is replaced."""
        known = self._served.get(namespace)
        if known is None or known[0] is not entry:
            known = self._served[namespace] = (entry, {})
        answers = known[1]
        if need not in answers:
            answers[need] = serving_index(indexes, need)
        return answers[need]

    def report(self, limit: int = 50, window_s: float | None = None) -> dict[str, Any]:
        """The ``/advice`` document (see docs/advice.md for its fields): time at stake
        since the digest started, or within the last ``window_s`` seconds."""
        now = time.time()
        rows = self.digest.top(len(self.digest), "total_time")
        since: float = self.digest.started
        base: dict[str, tuple[int, float]] | None = None
        if window_s is not None:
            found = self.snapshots.baseline(now, window_s)
            if found is not None:
                since, base = max(since, found[0]), found[1]
        shapes: list[dict[str, Any]] = []
        missing: dict[tuple[str, Need], _Missing] = {}
        unserved: dict[str, list[tuple[Need, dict[str, Any]]]] = {}
        unindexable: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in rows:
            namespace = row.get("namespace")
            if not isinstance(namespace, str) or "." not in namespace:
                continue
            derivation = self._derive(str(row["shape_hash"]), row)
            if derivation is None:
                continue
            count, total_ms = row["count"], row["total_ms"]
            if base is not None:
                count, total_ms = Snapshots.delta(count, total_ms, base.get(row["shape_hash"]))
                if count == 0:
                    continue
            seen.add(namespace)
            entry = self.catalog.get(namespace)
            about = {
                "shape_hash": row["shape_hash"], "namespace": namespace,
                "command": row.get("command"), "shape": row.get("shape"),
                "count": count, "total_ms": round(total_ms, 3),
                "avg_ms": round(total_ms / count, 3) if count else 0.0,
            }
            if self.explainer is not None and row["shape_hash"] in self.explainer.results:
                about["explain"] = self.explainer.results[row["shape_hash"]]
            status, extra = self._judge(derivation, entry, about, unserved)
            shapes.append({**about, "status": status, **extra})
            if status == "unindexable":
                unindexable.append({**about, "problems": list(derivation.problems)})
        self.catalog.want(seen)
        for namespace, pairs in unserved.items():
            target = self._consolidate(frozenset(n for n, _about in pairs))
            for need, about in pairs:
                chosen = target[need]
                item = missing.setdefault((namespace, chosen), _Missing(namespace, chosen))
                if about["shape_hash"] not in item.shapes:
                    item.shapes[about["shape_hash"]] = about
                    item.count += about["count"]
                    item.total_ms += about["total_ms"]
        ranked = sorted(missing.values(), key=lambda m: (-m.total_ms, -m.count, m.need.key))
        return {
            "generated_at": now,
            "since": since,
            "window_s": None if window_s is None else round(now - since, 3),
            "tenant_field": self.tenant_field,
            "missing": [_missing_document(m) for m in ranked[:max(0, limit)]],
            "unindexable": unindexable[:max(0, limit)],
            **self._index_findings(sorted(seen)),
            "shapes": shapes,
        }

    def _consolidate(self, needs: frozenset[Need]) -> dict[Need, Need]:
        found = self._consolidated.get(needs)
        if found is None:
            if len(self._consolidated) >= _CACHE_MAX // 16:
                self._consolidated.clear()
            found = self._consolidated[needs] = consolidate(needs)
        return found

    def _judge(self, derivation: Derivation, entry: CatalogEntry | None,
               about: dict[str, Any], unserved: dict[str, list[tuple[Need, dict[str, Any]]]]
               ) -> tuple[str, dict[str, Any]]:
        extra: dict[str, Any] = {}
        if derivation.problems:
            extra["problems"] = list(derivation.problems)
        if derivation.status != "index":
            return derivation.status, extra
        extra["ideal"] = [key_document(n.key) for n in derivation.needs]
        if entry is None or entry.indexes is None:
            extra["why"] = "indexes not fetched yet" if entry is None else entry.error
            return "unknown", extra
        used, lacking = [], []
        for need in derivation.needs:
            index = self._serving(about["namespace"], entry, entry.indexes, need)
            if index is None:
                lacking.append(need)
            else:
                used.append(index.name)
        extra["served_by"] = list(dict.fromkeys(used))
        for need in lacking:
            unserved.setdefault(about["namespace"], []).append((need, about))
        return ("missing" if lacking else "served"), extra

    def _index_findings(self, namespaces: list[str]) -> dict[str, Any]:
        redundant_out: list[dict[str, Any]] = []
        unused: list[dict[str, Any]] = []
        usage_unknown: list[dict[str, Any]] = []
        catalog: dict[str, Any] = {}
        for namespace in namespaces:
            entry = self.catalog.get(namespace)
            if entry is None:
                catalog[namespace] = {"state": "pending"}
                continue
            if entry.indexes is None:
                catalog[namespace] = {"state": "error", "error": entry.error,
                                      "fetched_at": entry.fetched_at}
                continue
            catalog[namespace] = {
                "state": "ok" if entry.exists else "no such collection",
                "fetched_at": entry.fetched_at,
                "indexes": [{"name": i.name, "key": i.key_document()} for i in entry.indexes],
                "usage": "unknown" if entry.usage is None else "known",
            }
            for short, long in redundant(entry.indexes):
                redundant_out.append({
                    "namespace": namespace, "index": short.name,
                    "key": short.key_document(), "covered_by": long.name,
                    "covered_by_key": long.key_document(),
                    "reason": f"its key is a prefix of {long.name}'s: "
                              f"{long.name} serves every query it serves",
                    "js": drop_index_js(namespace, short.name),
                })
            if entry.usage is None:
                if entry.exists:
                    usage_unknown.append({"namespace": namespace, "unused": "unknown",
                                          "why": entry.usage_error})
                continue
            for index in entry.indexes:
                if (index.name != "_id_" and not index.unique
                        and entry.usage.get(index.name, 0) == 0 and index.name in entry.usage):
                    since = (entry.usage_since or {}).get(index.name)
                    unused.append({"namespace": namespace, "index": index.name,
                                   "key": index.key_document(), "ops": 0,
                                   "since": None if since is None else str(since)})
        return {"redundant": redundant_out, "unused": unused,
                "usage_unknown": usage_unknown, "catalog": catalog}


def _missing_document(item: _Missing) -> dict[str, Any]:
    shapes = sorted(item.shapes.values(), key=lambda s: -s["total_ms"])
    return {
        "namespace": item.namespace,
        "key": key_document(item.need.key),
        "reason": item.need.reason(),
        "count": item.count,
        "total_ms": round(item.total_ms, 3),
        "shapes": [{k: s[k] for k in ("shape_hash", "command", "shape", "count",
                                      "total_ms", "avg_ms", "explain") if k in s}
                   for s in shapes],
        "js": create_index_js(item.namespace, item.need.key),
    }
