"""``advice:`` section of the configuration (mounted as ``Config.advice``).

```yaml
advice:
  enabled: true          # GET /advice and the background index fetcher
  refresh_s: 300         # listIndexes/$indexStats again after this long
  poll_s: 10             # how often the fetcher looks for newly queried collections
  max_namespaces: 500    # collections whose indexes are kept
  command_timeout_ms: 5000
  window_step_s: 60      # /advice?window=S: counters copied this often...
  window_keep: 60        # ...this many copies kept (0: no windows)
  explain: false         # confirm collection scans with the server's explain...
  explain_interval_s: 60 # ...at most one explain this often...
  explain_min_ms: 100    # ...of a shape lacking an index at least this slow on average
```
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdviceConfig"]


class AdviceConfig(BaseModel):
    """Index advice from the query shapes the digest collects (docs/advice.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # GET /advice and the background index fetcher
    # listIndexes/$indexStats of a collection again after this long
    refresh_s: float = Field(default=300.0, ge=1.0, le=86_400.0)
    # how often the fetcher looks for newly queried collections
    poll_s: float = Field(default=10.0, ge=0.1, le=3_600.0)
    max_namespaces: int = Field(default=500, ge=1, le=100_000)  # collections whose indexes are kept
    # bound of one listIndexes, $indexStats or explain on the upstream
    command_timeout_ms: int = Field(default=5000, ge=100, le=600_000)
    # /advice?window=S: the digest's counters are copied this often...
    window_step_s: float = Field(default=60.0, ge=0.1, le=86_400.0)
    window_keep: int = Field(default=60, ge=0, le=10_000)  # ...and this many copies kept (0: none)
    explain: bool = False  # confirm collection scans with the server's explain (rate-limited)
    # at most one explain this often...
    explain_interval_s: float = Field(default=60.0, ge=0.1, le=86_400.0)
    # ...of a shape lacking an index whose mean time is at least this
    explain_min_ms: float = Field(default=100.0, ge=0.0)
