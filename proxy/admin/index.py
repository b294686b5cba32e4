"""``GET /``: the admin endpoints this proxy serves, with a line on each.

Built from the live route tables, so an endpoint another module registers is listed
too (with an empty description until it is added to :data:`DESCRIPTIONS`). The full
reference is docs/admin-api.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.admin.http import Handler, Reply, json_response

__all__ = ["DESCRIPTIONS", "index_handler"]

DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("GET", "/"): "this list",
    ("GET", "/healthz"): "the process is up: uptime, client connections, shutting_down",
    ("GET", "/readyz"): "200 when the proxy can serve: a primary, a proven data path "
                        "(a round trip on a pooled connection), not shutting down; else 503",
    ("GET", "/metrics"): "Prometheus metrics (text exposition format)",
    ("GET", "/digest"): "query digest: statistics per query shape; "
                        "?limit=N&order=total_time|count|avg_time|p95|max_time|errors|docs|bytes",
    ("POST", "/digest/reset"): "forget every digest row (statistics start over)",
    ("GET", "/rules"): "routing and cache rules with their hit counters",
    ("GET", "/connections"): "client connections: app, user, tenant, peer, age, in-flight "
                             "command and its duration; ?limit=N&active=1",
    ("GET", "/placement"): "tenant placement: clusters and their health, the directory, "
                           "overrides, moves in progress, commands per cluster",
    ("GET", "/advice"): "index advice from the digest's shapes: missing, redundant and "
                        "unused indexes; ?limit=N&window=S",
}


def index_handler(
    routes: Mapping[str, Handler], post_routes: Mapping[str, Handler]
) -> Handler:
    def handle(_query: dict[str, list[str]]) -> Reply:
        endpoints = [
            {"method": method, "path": path,
             "description": DESCRIPTIONS.get((method, path), "")}
            for method, table in (("GET", routes), ("POST", post_routes))
            for path in sorted(table)
        ]
        return json_response(200, {"endpoints": endpoints, "docs": "docs/admin-api.md"})

    return handle
