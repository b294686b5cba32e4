"""``GET /connections``: the client connections, like ProxySQL's processlist or
``db.currentOp()``.

One row per client connection: id, peer, appName, authenticated user and tenant, age,
and the command in flight (its *name* only: no values, no shape) with how long it has
been running. Bounded: at most ``limit`` rows (default 100, at most
:data:`MAX_CONNECTIONS_LIMIT`), the longest-running commands first, then the oldest
idle connections; ``total`` and ``in_flight`` count them all.

:func:`view_of` is the one place that reads a connection object's fields, so the
listener can change shape without this endpoint changing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.admin.http import BadQuery, Handler, Reply, json_response, query_limit

__all__ = ["MAX_CONNECTIONS_LIMIT", "ConnectionView", "connections_handler", "view_of"]

DEFAULT_CONNECTIONS_LIMIT = 100
MAX_CONNECTIONS_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """What /connections shows of one client connection."""

    connection_id: int
    peer: str | None
    app_name: str | None
    user: str | None
    tenant: str | None
    connected_at: float  # time.monotonic()
    command: str | None  # the command in flight, by name
    command_since_ns: int  # time.perf_counter_ns() when it started arriving


def _peer(peer: Any) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return None if peer is None else str(peer)


def view_of(conn: Any) -> ConnectionView:
    """The fields of a client connection: the session loop's object keeps them on its
    ``.session`` (``busy`` stays on the outer object). ``connected_at``, ``in_flight``
    (the command's name) and ``in_flight_since`` (perf_counter ns) are set by the
    request path."""
    state = conn.session
    identity = state.identity
    command = state.in_flight if conn.busy else None
    return ConnectionView(
        connection_id=state.connection_id,
        peer=_peer(state.peer),
        app_name=state.app_name,
        user=None if identity is None else identity.username,
        tenant=None if identity is None else identity.tenant,
        connected_at=state.connected_at,
        command=command,
        command_since_ns=state.in_flight_since if command is not None else 0,
    )


def _row(view: ConnectionView, now: float, now_ns: int) -> dict[str, Any]:
    running = None
    if view.command is not None:
        running = round(max(0, now_ns - view.command_since_ns) / 1e6, 3)
    return {
        "id": view.connection_id,
        "peer": view.peer,
        "app_name": view.app_name,
        "user": view.user,
        "tenant": view.tenant,
        "age_s": round(max(0.0, now - view.connected_at), 3),
        "command": view.command,
        "running_ms": running,
    }


def connections_handler(
    connections: Callable[[], Iterable[Any]],
    view: Callable[[Any], ConnectionView] = view_of,
) -> Handler:
    """``GET /connections?limit=N&active=1`` (``active``: only those with a command in
    flight)."""

    def handle(query: dict[str, list[str]]) -> Reply:
        try:
            limit = query_limit(query, DEFAULT_CONNECTIONS_LIMIT, MAX_CONNECTIONS_LIMIT)
        except BadQuery as exc:
            return json_response(400, {"error": str(exc)})
        active_only = query.get("active", ["0"])[-1] in ("1", "true", "yes")
        views = [view(c) for c in list(connections())]
        busy = [v for v in views if v.command is not None]
        chosen = busy if active_only else views
        # Longest-running first (smallest start), then the oldest idle connections.
        chosen.sort(key=lambda v: (v.command is None, v.command_since_ns, v.connected_at,
                                   v.connection_id))
        now, now_ns = time.monotonic(), time.perf_counter_ns()
        return json_response(200, {
            "total": len(views),
            "in_flight": len(busy),
            "limit": limit,
            "connections": [_row(v, now, now_ns) for v in chosen[:limit]],
        })

    return handle
