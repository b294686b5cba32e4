"""``observability:`` section of the configuration (mounted as ``Config.observability``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ObservabilityConfig"]


class ObservabilityConfig(BaseModel):
    """The slow-query log, the query digest and the Prometheus labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Operations at least this slow are written to the slow log; 0 logs every operation.
    slow_query_ms: float = Field(default=100, ge=0)
    # "-" for stdout, or a file path (rotated by size).
    slow_log: str = Field(default="-", min_length=1)
    # Rotation of a slow-log file: rotate at this size (0 = never), keep this many old files.
    slow_log_max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    slow_log_backups: int = Field(default=5, ge=0)  # rotated slow-log files kept
    # Fraction of faster operations logged as well (0.0 .. 1.0).
    sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Log raw command values (Extended JSON) in the slow log and the digest's example.
    # Off by default: query values are customer data.
    log_values: bool = False
    # Query shapes the digest keeps; the least used are evicted beyond this.
    digest_max_shapes: int = Field(default=1000, ge=1, le=1_000_000)
    # Tenants that may appear as a Prometheus label value; others are "_other".
    tenant_labels: tuple[str, ...] = ()
