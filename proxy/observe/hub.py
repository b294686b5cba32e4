"""One object for the request path: ``observer.finish(op)`` feeds the digest, the metrics
and the slow log."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, Any

from proxy.admin.http import Handler
from proxy.advice.catalog import INDEX_COMMANDS
from proxy.observe.config import ObservabilityConfig
from proxy.observe.digest import QueryDigest
from proxy.observe.endpoints import Readiness, digest_reset_handler, observe_routes
from proxy.observe.metrics import MemberState, Metrics
from proxy.observe.record import OperationRecord
from proxy.observe.slowlog import SlowLog

__all__ = ["Observer"]


class Observer:
    def __init__(
        self,
        config: ObservabilityConfig,
        *,
        pool_stats: Callable[[], Mapping[str, Mapping[str, int]]] | None = None,
        pool_max_size: int | None = None,
        topology: Callable[[], Mapping[str, MemberState]] | None = None,
        slow_log_stream: IO[str] | None = None,
        **metrics_options: Any,
    ) -> None:
        self.config = config
        self.digest = QueryDigest(config.digest_max_shapes, log_values=config.log_values)
        self.metrics = Metrics(config, pool_stats=pool_stats, pool_max_size=pool_max_size,
                               topology=topology, **metrics_options)
        self.slowlog = SlowLog(config, stream=slow_log_stream)
        # Told (database, collection) after an index change passed through the proxy.
        self.index_changed: Callable[[str | None, str | None], None] | None = None

    def finish(self, op: OperationRecord) -> None:
        """Account for one finished operation (ok, failed or rejected)."""
        self.digest.record(op)
        self.metrics.observe(op)
        self.slowlog.record(op)
        if op.command in INDEX_COMMANDS and op.error_code is None and self.index_changed:
            self.index_changed(op.database, op.collection)

    def routes(self, readiness: Readiness) -> dict[str, Handler]:
        """``/metrics``, ``/digest`` and ``/readyz`` for the admin server."""
        return observe_routes(self.metrics, self.digest, readiness)

    def post_routes(self) -> dict[str, Handler]:
        """``POST /digest/reset``."""
        return {"/digest/reset": digest_reset_handler(self.digest)}

    def close(self) -> None:
        self.slowlog.close()
