"""The upstream connection pool's settings (``upstream.pool``)."""

from __future__ import annotations

from pydantic import Field

from proxy.configbase import Strict

__all__ = ["PoolConfig"]


class PoolConfig(Strict):
    max_size: int = Field(default=100, gt=0)
    min_size: int = Field(default=0, ge=0)
    connect_timeout_ms: int = Field(default=5_000, gt=0)
    wait_queue_timeout_ms: int = Field(default=10_000, gt=0)
    # Idle connections are closed after this long unused (0 = never, the drivers'
    # maxIdleTimeMS default); never one that owns open cursors, never below min_size.
    max_idle_ms: int = Field(default=0, ge=0)
