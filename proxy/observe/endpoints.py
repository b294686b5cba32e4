"""Admin HTTP handlers (for :class:`proxy.admin.http.AdminServer`): ``/metrics``,
``/digest``, ``POST /digest/reset`` and ``/readyz``.

Each factory returns a handler ``(query) -> (status, content type, body)``::

    routes.update(observe_routes(metrics, digest, readiness))
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.admin.http import BadQuery, Handler, json_response, query_limit
from proxy.observe.digest import ORDERS, QueryDigest
from proxy.observe.metrics import CONTENT_TYPE, Metrics

__all__ = [
    "MAX_DIGEST_LIMIT",
    "ReadinessFacts",
    "digest_handler",
    "digest_reset_handler",
    "has_usable_primary",
    "metrics_handler",
    "observe_routes",
    "readyz_handler",
]

MAX_DIGEST_LIMIT = 1000
Reply = tuple[int, str, bytes]


@dataclass(frozen=True, slots=True)
class ReadinessFacts:
    """What ``/readyz`` reports. Ready: a usable primary, a data path not proven broken
    (``data_path``: None when not checked), not shutting down, and, when
    ``redis_required``, Redis up. ``redis`` is None when no cache is configured, else a
    state word ("ok", "down", "connecting", ...)."""

    primary: bool
    redis: str | None = None
    redis_required: bool = False
    shutting_down: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    data_path: bool | None = None

    @property
    def ready(self) -> bool:
        if self.shutting_down or not self.primary or self.data_path is False:
            return False
        return not (self.redis_required and self.redis != "ok")


def metrics_handler(metrics: Metrics) -> Handler:
    def handle(_query: dict[str, list[str]]) -> Reply:
        return 200, CONTENT_TYPE, metrics.render()

    return handle


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def digest_handler(digest: QueryDigest, default_limit: int = 50) -> Handler:
    """``GET /digest?limit=N&order=total_time|count|avg_time|p95|max_time|errors|docs|bytes``
    (``&sketch=1``: each row with its latency sketch, for merging across workers)"""

    def handle(query: dict[str, list[str]]) -> Reply:
        order = _one(query, "order") or "total_time"
        try:
            limit = query_limit(query, default_limit, MAX_DIGEST_LIMIT)
        except BadQuery as exc:
            return json_response(400, {"error": str(exc)})
        if order not in ORDERS:
            return json_response(400, {"error": f"order must be one of {', '.join(ORDERS)}"})
        body = digest.summary()
        body["order"] = order
        body["top"] = digest.top(limit, order,
                                 sketches=_one(query, "sketch") == "1")
        return json_response(200, body)

    return handle


def digest_reset_handler(digest: QueryDigest) -> Handler:
    """``POST /digest/reset``: forget every row; the body says what was dropped."""

    def handle(_query: dict[str, list[str]]) -> Reply:
        return json_response(200, {"reset": True, "before": digest.reset()})

    return handle


Readiness = Callable[[], ReadinessFacts | Awaitable[ReadinessFacts]]


def readyz_handler(facts: Readiness) -> Handler:
    """200 when ready, else 503; the JSON body says why either way. ``facts`` may be
    async (the data-path probe awaits a round trip)."""

    def handle(_query: dict[str, list[str]]) -> Reply | Awaitable[Reply]:
        state = facts()
        if inspect.isawaitable(state):
            return _answer_later(state)
        return _answer(state)

    return handle


async def _answer_later(state: Awaitable[ReadinessFacts]) -> Reply:
    return _answer(await state)


def _answer(state: ReadinessFacts) -> Reply:
    body: dict[str, Any] = {
        "ready": state.ready,
        "primary": "yes" if state.primary else "no",
        "redis": state.redis,
        "shutting_down": state.shutting_down,
        **state.detail,
    }
    return json_response(200 if state.ready else 503, body)


def observe_routes(
    metrics: Metrics, digest: QueryDigest, readiness: Readiness
) -> dict[str, Handler]:
    return {
        "/metrics": metrics_handler(metrics),
        "/digest": digest_handler(digest),
        "/readyz": readyz_handler(readiness),
    }


def has_usable_primary(description: Any) -> bool:
    """A pymongo ``TopologyDescription`` has a writable member (primary, standalone,
    mongos) that is up."""
    return any(sd.is_writable for sd in description.known_servers)
