"""The host's admin endpoint when ``listen.workers`` > 1: the supervisor asks every
worker's private endpoint (a unix socket) and answers for all of them.

**Why scrape and sum rather than prometheus-client's multiprocess mode.** The
per-operation families are plain lists on each worker's event loop, exported at scrape
time (:mod:`proxy.observe.families`): the hot path stays ~1 µs. Multiprocess mode would
put every update through an mmap'd file per process and metric (prometheus-client's
``ValueClass`` for multiprocess), give up those families, and need a cleanup of a dead
worker's files. Scraping costs only at scrape time, N small HTTP requests over unix
sockets, and every family, including the callback gauges (pools, members), keeps
working unchanged.

Aggregation: counters, histograms and most gauges are summed (client connections,
pool connections, ``pool_max_size``: the workers' shares add up to the configured
total). Gauges that describe a shared thing rather than a share of it are not:
``primary_available``, ``member_up``, ``config_last_reload_successful`` and the
``*_created``/``process_start_time_seconds`` timestamps take the minimum (up only if
every worker sees it up); ``member_rtt_seconds``, ``member_replication_lag_seconds``
and ``redis_circuit_open`` the maximum. A counter of a replaced worker starts again
from zero, so a sum can go down after a worker died: ``rate()`` treats that as a
counter reset, as it does for a restarted process.

``/digest`` merges the workers' JSON rows by ``shape_hash``: counts, times, documents
and bytes add up; the percentiles come from the workers' latency sketches merged
(``/digest?sketch=1``; :mod:`proxy.observe.sketch`, same relative error as one
worker's), ``min_ms``/``max_ms`` are the lowest/highest; the last example is the most
recent one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.admin.http import BadQuery, Handler, json_response, query_limit
from proxy.observe.digest import ORDERS
from proxy.observe.endpoints import MAX_DIGEST_LIMIT
from proxy.observe.metrics import CONTENT_TYPE
from proxy.observe.sketch import LatencySketch

__all__ = ["WorkerView", "endpoint_routes", "http_get", "merge_digests", "merge_metrics"]

SCRAPE_TIMEOUT_S = 5.0
Reply = tuple[int, str, bytes]

_MIN = frozenset({"mongoproxy_primary_available", "mongoproxy_member_up",
                  "mongoproxy_config_last_reload_successful", "process_start_time_seconds",
                  "process_max_fds"})
_MAX = frozenset({"mongoproxy_member_rtt_seconds", "mongoproxy_member_replication_lag_seconds",
                  "mongoproxy_redis_circuit_open"})


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A running worker, as the admin endpoint sees it."""

    index: int
    pid: int
    admin_socket: str


async def http_get(socket_path: str, target: str, timeout: float = SCRAPE_TIMEOUT_S,
                   method: str = "GET") -> tuple[int, bytes]:
    """GET (or ``method``) ``target`` from an :class:`~proxy.admin.http.AdminServer` on a
    unix socket: (status, body). It answers and closes, so the reply is read to EOF."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: worker\r\n"
                         f"Content-Length: 0\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"malformed reply from {socket_path}")
    return int(status_line[1]), body


def _combine(name: str) -> Callable[[float, float], float]:
    if name in _MIN or name.endswith("_created"):
        return min
    if name in _MAX:
        return max
    return lambda a, b: a + b


def merge_metrics(texts: Iterable[str], own: Iterable[Metric] = ()) -> bytes:
    """The sum (see the module's docstring) of Prometheus text expositions, plus ``own``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation,
                                               family.type, family.unit)
                values[family.name] = {}
            combine = _combine(family.name)
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = merged.get(key)
                merged[key] = sample.value if old is None else combine(old, sample.value)
    out: list[Metric] = list(own)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)

    class _Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return out

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


_SUMMED = ("count", "errors", "total_ms", "docs_returned", "reply_bytes", "cache_hits",
           "cache_misses", "cache_bypasses")
# Without sketches (a worker of an older version): the highest, an upper bound.
_HIGHEST = ("max_ms", "p50_ms", "p95_ms", "p99_ms")
_QUANTILES = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))


def _merge_row(into: dict[str, Any], row: dict[str, Any]) -> None:
    for key in _SUMMED:
        into[key] = into.get(key, 0) + row.get(key, 0)
    for key in _HIGHEST:
        into[key] = max(into.get(key, 0.0), row.get(key, 0.0))
    if "min_ms" in row:
        into["min_ms"] = min(into.get("min_ms", row["min_ms"]), row["min_ms"])
    mine, theirs = into.get("sketch"), row.get("sketch")
    if isinstance(mine, LatencySketch) and isinstance(theirs, dict):
        mine.merge(LatencySketch.from_state(theirs))
    else:
        into.pop("sketch", None)
    into["first_seen"] = min(into["first_seen"], row["first_seen"])
    if row["last_seen"] > into["last_seen"]:
        into["last_seen"] = row["last_seen"]
        into["last_example"] = row.get("last_example")


def merge_digests(documents: Sequence[dict[str, Any]], limit: int,
                  order: str) -> dict[str, Any]:
    """One ``/digest`` document from the workers' (each their top rows by ``order``)."""
    rows: dict[str, dict[str, Any]] = {}
    for document in documents:
        for row in document.get("top", []):
            mine = rows.get(row["shape_hash"])
            if mine is None:
                mine = rows[row["shape_hash"]] = dict(row)
                if isinstance(row.get("sketch"), dict):
                    mine["sketch"] = LatencySketch.from_state(row["sketch"])
            else:
                _merge_row(mine, row)
    for row in rows.values():
        sketch = row.pop("sketch", None)
        if isinstance(sketch, LatencySketch):  # exact to the sketch's accuracy
            for key, q in _QUANTILES:
                row[key] = round(sketch.quantile(q), 3)
        count = row["count"]
        row["total_ms"] = round(row["total_ms"], 3)
        row["avg_ms"] = round(row["total_ms"] / count, 3) if count else 0.0
        lookups = row["cache_hits"] + row["cache_misses"]
        row["cache_hit_ratio"] = round(row["cache_hits"] / lookups, 4) if lookups else None
    field = ORDERS[order]
    top = sorted(rows.values(), key=lambda d: (-d[field], -d["count"], d["shape_hash"]))
    return {
        # Rows beyond each worker's top MAX_DIGEST_LIMIT are not seen: a lower bound then.
        "shapes": max([len(rows), *(int(d.get("shapes", 0)) for d in documents)]),
        "max_shapes": max((int(d.get("max_shapes", 0)) for d in documents), default=0),
        "evicted": sum(int(d.get("evicted", 0)) for d in documents),
        "operations": sum(int(d.get("operations", 0)) for d in documents),
        "since": min((float(d["since"]) for d in documents if "since" in d), default=None),
        "workers": len(documents),
        "order": order,
        "top": top[:limit],
    }


class _Endpoints:
    def __init__(self, workers: Callable[[], list[WorkerView]], expected: int,
                 facts: Callable[[], dict[str, Any]],
                 own_metrics: Callable[[], list[Metric]]) -> None:
        self.workers = workers
        self.expected = expected
        self.facts = facts
        self.own_metrics = own_metrics

    async def _ask(self, target: str,
                   method: str = "GET") -> list[tuple[WorkerView, int | None, bytes]]:
        """Every running worker's answer to ``target`` (status None: it did not answer)."""
        views = self.workers()
        answers = await asyncio.gather(
            *(http_get(v.admin_socket, target, method=method) for v in views),
            return_exceptions=True)
        out: list[tuple[WorkerView, int | None, bytes]] = []
        for view, answer in zip(views, answers, strict=True):
            if isinstance(answer, BaseException):
                out.append((view, None, repr(answer).encode()))
            else:
                out.append((view, answer[0], answer[1]))
        return out

    async def metrics(self, _query: dict[str, list[str]]) -> Reply:
        answers = await self._ask("/metrics")
        texts = [body.decode() for _v, status, body in answers if status == 200]
        scraped = Metric("mongoproxy_workers_scraped",
                         "Workers whose metrics are in this scrape's sums", "gauge")
        scraped.add_sample("mongoproxy_workers_scraped", {}, float(len(texts)))
        return 200, CONTENT_TYPE, merge_metrics(texts, [*self.own_metrics(), scraped])

    async def digest(self, query: dict[str, list[str]]) -> Reply:
        order = (query.get("order") or ["total_time"])[-1]
        try:
            limit = query_limit(query, 50, MAX_DIGEST_LIMIT)
        except BadQuery as exc:
            return json_response(400, {"error": str(exc)})
        if order not in ORDERS:
            return json_response(400, {"error": f"order must be one of {', '.join(ORDERS)}"})
        answers = await self._ask(f"/digest?limit={MAX_DIGEST_LIMIT}&order={order}&sketch=1")
        documents = [json.loads(body) for _v, status, body in answers if status == 200]
        merged = merge_digests(documents, limit, order)
        return json_response(200, merged)

    async def _documents(self, target: str,
                         method: str = "GET") -> list[tuple[WorkerView, dict[str, Any]]]:
        return [(view, json.loads(body)) for view, status, body
                in await self._ask(target, method) if status == 200]

    async def rules(self, _query: dict[str, list[str]]) -> Reply:
        """The rules (the first worker's) with every worker's hits added up."""
        documents = [doc for _v, doc in await self._documents("/rules")]
        if not documents:
            return json_response(503, {"error": "no worker answered"})
        merged = documents[0]
        for document in documents[1:]:
            for kind, rows in document.items():
                mine = {row["rule"]: row for row in merged.get(kind, [])}
                for row in rows:
                    if row["rule"] in mine:
                        mine[row["rule"]]["hits"] += row["hits"]
        return json_response(200, merged)

    async def connections(self, query: dict[str, list[str]]) -> Reply:
        """Every worker's connections (each row with its ``worker``), busy ones first."""
        documents = await self._documents(f"/connections?{urlencode(query, doseq=True)}")
        if not documents:
            return json_response(503, {"error": "no worker answered"})
        rows = [{"worker": view.index, **row} for view, doc in documents
                for row in doc["connections"]]
        rows.sort(key=lambda row: row.get("command") is None)  # stable: each worker's order
        limit = int(documents[0][1]["limit"])
        return json_response(200, {
            "total": sum(int(doc["total"]) for _v, doc in documents),
            "in_flight": sum(int(doc["in_flight"]) for _v, doc in documents),
            "limit": limit, "workers": len(documents), "connections": rows[:limit],
        })

    async def placement(self, _query: dict[str, list[str]]) -> Reply:
        """Tenant placement as the first worker sees it, commands summed over workers,
        and each worker's shared-state version (they converge within refresh_ms)."""
        documents = await self._documents("/placement")
        if not documents:
            return json_response(404, {"error": "placement is not configured, or no "
                                                "worker answered"})
        merged = documents[0][1]
        commands: dict[str, int] = {}
        for _view, document in documents:
            for cluster, count in document.get("commands", {}).items():
                commands[cluster] = commands.get(cluster, 0) + int(count)
        merged["commands"] = commands
        merged["workers"] = [{"worker": view.index, "state_version": doc.get("state_version")}
                             for view, doc in documents]
        return json_response(200, merged)

    async def digest_reset(self, _query: dict[str, list[str]]) -> Reply:
        """``POST /digest/reset`` on every worker; ``before`` is their summaries' sum."""
        befores = [doc["before"] for _v, doc in await self._documents("/digest/reset", "POST")]
        before = {key: sum(int(b.get(key, 0)) for b in befores)
                  for key in ("shapes", "evicted", "operations")}
        return json_response(200, {"reset": True, "workers": len(befores), "before": before})

    async def readyz(self, _query: dict[str, list[str]]) -> Reply:
        answers = await self._ask("/readyz")
        facts = self.facts()
        workers = []
        for view, status, body in answers:
            try:
                detail = json.loads(body) if status is not None else {"error": body.decode()}
            except ValueError:
                detail = {}
            workers.append({"worker": view.index, "pid": view.pid,
                            "ready": status == 200, **detail})
        ready = (not facts.get("shutting_down") and len(answers) == self.expected
                 and all(w["ready"] for w in workers))
        return json_response(200 if ready else 503,
                             {"ready": ready, **facts, "workers": workers})

    async def healthz(self, _query: dict[str, list[str]]) -> Reply:
        return json_response(200, {"status": "ok", **self.facts()})


def endpoint_routes(
    workers: Callable[[], list[WorkerView]], expected: int,
    facts: Callable[[], dict[str, Any]], own_metrics: Callable[[], list[Metric]],
) -> tuple[dict[str, Handler], dict[str, Handler]]:
    """GET and POST routes: ``/healthz`` (live while the supervisor is), ``/readyz``
    (every worker ready), ``/metrics`` (summed), ``/digest`` (merged), ``/rules`` (hits
    summed), ``/connections`` (all workers'), ``/placement`` (commands summed);
    ``POST /digest/reset`` (every worker)."""
    endpoints = _Endpoints(workers, expected, facts, own_metrics)
    return ({"/healthz": endpoints.healthz, "/readyz": endpoints.readyz,
             "/metrics": endpoints.metrics, "/digest": endpoints.digest,
             "/rules": endpoints.rules, "/connections": endpoints.connections,
             "/placement": endpoints.placement},
            {"/digest/reset": endpoints.digest_reset})
