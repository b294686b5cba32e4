"""The client authentication section's own configuration: the login throttle."""

from __future__ import annotations

from pydantic import Field

from proxy.configbase import Strict

__all__ = ["AuthThrottleConfig"]


class AuthThrottleConfig(Strict):
    """Failed logins, counted per client address and per user name."""

    # Failures tolerated before each further attempt is delayed.
    free_failures: int = Field(default=3, ge=0)
    # The delay of the failure reply after the first counted failure, doubled per
    # further failure.
    base_delay_ms: int = Field(default=100, ge=0)
    # The longest delay of a failure reply.
    max_delay_ms: int = Field(default=5_000, ge=0)
    # This many failures lock the address (or the user) out: attempts fail without
    # their proof being checked, even with the right password.
    lockout_failures: int = Field(default=20, gt=0)
    # How long a lockout lasts (0 = never lock out).
    lockout_ms: int = Field(default=300_000, ge=0)
    # Failures older than this are forgotten.
    window_ms: int = Field(default=600_000, gt=0)
    # Addresses and users tracked at once (oldest forgotten first).
    max_tracked: int = Field(default=100_000, gt=0)
