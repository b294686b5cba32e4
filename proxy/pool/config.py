"""The upstream connection pool's settings (``upstream.pool``)."""

from __future__ import annotations

from pydantic import Field

from proxy.configbase import Strict

__all__ = ["PoolConfig"]


class PoolConfig(Strict):
    # Upstream connections per server at most, shared by all clients (a tenth of them,
    # at least one, is kept for getMore/killCursors).
    max_size: int = Field(default=100, gt=0)
    min_size: int = Field(default=0, ge=0)  # connections opened at start
    # Connect + hello handshake + authentication of a new upstream connection.
    connect_timeout_ms: int = Field(default=5_000, gt=0)
    # A request waits this long for a free pooled connection, then fails 89 NetworkTimeout.
    wait_queue_timeout_ms: int = Field(default=10_000, gt=0)
    # Idle connections are closed after this long unused (0 = never, the drivers'
    # maxIdleTimeMS default); never one that owns open cursors, never below min_size.
    max_idle_ms: int = Field(default=0, ge=0)
