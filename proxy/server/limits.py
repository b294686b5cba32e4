"""Limits on what clients may hold: connections, file descriptors, buffered bytes.

* :class:`ConnectionLimit` decides at accept whether one more client connection may be
  served: at most ``listen.max_connections``, and never so many that the process runs
  out of file descriptors (uvloop, like libuv, accepts and closes connections silently
  at EMFILE, so the proxy must stay below the limit rather than detect reaching it).
  Every refusal is logged, at most once a second with the count since the last line.
* :class:`MemoryBudget` bounds the bytes all client connections hold together: the
  messages being received (charged their declared length once the header is in) and
  replies a client has not read yet. A message that does not fit waits, its socket not
  read (the kernel pushes back on the client), until other messages are released;
  messages up to :data:`SMALL_MESSAGE` always fit, so that stalled large messages
  filling the budget never hold up ordinary traffic.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections import deque
from collections.abc import Callable

__all__ = ["ConnectionLimit", "MemoryBudget", "RateLimitedLog"]

log = logging.getLogger("mongoproxy.limits")

# Messages up to this size are never made to wait for the budget.
SMALL_MESSAGE = 64 * 1024

# File descriptors kept for everything but client connections: upstream pools,
# monitors, the admin server, Redis, log files.
_FD_RESERVE = 64


class RateLimitedLog:
    """A warning at most once per ``interval_s``, with how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last = -interval_s
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last such line)"
        self._log.warning(message, *args)
        self._last = now
        self._suppressed = 0


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (new) soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ConnectionLimit:
    """Whether a new client connection may be served (see the module docstring)."""

    def __init__(
        self, max_connections: int, upstream_fds: int, fd_limit: int | None = None
    ) -> None:
        fds = raise_fd_limit() if fd_limit is None else fd_limit
        by_fds = max(1, fds - upstream_fds - _FD_RESERVE)
        self.limit = min(max_connections, by_fds)
        self.by_fds = by_fds < max_connections
        if self.by_fds:
            log.warning(
                "listen.max_connections %d lowered to %d: the file descriptor limit is "
                "%d and the upstream pools may use %d (raise `ulimit -n`)",
                max_connections, self.limit, fds, upstream_fds)
        self.refused = 0
        self._log = RateLimitedLog(log)

    def admit(self, current: int, peer: object) -> bool:
        """False (and a log line) when ``current`` connections are already the limit."""
        if current < self.limit:
            return True
        self.refused += 1
        reason = ("the file descriptor limit" if self.by_fds
                  else "listen.max_connections")
        self._log.warning("refused client connection from %s: %d connections open, "
                          "the limit (%s)", peer, current, reason)
        return False


class MemoryBudget:
    """Bytes buffered for all clients, at most ``limit`` (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # Called (in order) when bytes are released: each retries its reservation.
        self._waiters: deque[Callable[[], bool]] = deque()

    def try_reserve(self, size: int) -> bool:
        # A small message always fits (at most max_connections x SMALL over the limit):
        # filling the budget with stalled large messages must not stop ordinary traffic.
        if self.used + size > self.limit and self.used > 0 and size > SMALL_MESSAGE:
            return False  # a message larger than the whole budget waits for an empty one
        self.used += size
        return True

    def wait(self, retry: Callable[[], bool]) -> None:
        """Call ``retry`` after releases until it returns True (it reserved)."""
        self._waiters.append(retry)

    def release(self, size: int) -> None:
        self.used -= size
        waiters = self._waiters
        while waiters and waiters[0]():
            waiters.popleft()

    def forget(self, retry: Callable[[], bool]) -> None:
        """A waiter whose connection went away."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(retry)
