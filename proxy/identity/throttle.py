"""Failed client logins: throttled per client address and per user name.

Each failed attempt is counted against the client's address and the user name it
tried (unknown names too, so that the count says nothing about which names exist).
Beyond ``free_failures`` the failure reply is delayed, ``base_delay_ms`` doubled per
further failure up to ``max_delay_ms``, which slows a brute force on one connection;
``lockout_failures`` failures lock the address, or the user name, out for
``lockout_ms``: a locked attempt fails without its proof being checked, whatever the
password (so many parallel connections gain nothing). A success clears the address's
and the user's counts. Failures older than ``window_ms`` are forgotten, and at most
``max_tracked`` keys are kept (the oldest dropped first), so memory stays bounded.

Note that a user lockout is also a way for anyone to lock a user out: set
``lockout_failures`` high (or ``lockout_ms`` to 0) where that matters more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import AUTHENTICATION_FAILED, error_document
from proxy.identity.config import AuthThrottleConfig
from proxy.identity.scram import FAILED, AuthenticatedUser, ClientAuthSession

__all__ = ["AuthThrottle", "authenticate"]

log = logging.getLogger("mongoproxy.auth")


class _Count:
    __slots__ = ("failures", "first", "locked_until")

    def __init__(self, now: float) -> None:
        self.failures = 0
        self.first = now
        self.locked_until = 0.0


class AuthThrottle:
    """Failure counts per ``("peer", host)`` and ``("user", name)`` key."""

    def __init__(
        self,
        config: AuthThrottleConfig,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._counts: OrderedDict[tuple[str, str], _Count] = OrderedDict()
        # Called with "failed" or "locked" per refused attempt (a metric).
        self._on_failure = on_failure

    def _get(self, key: tuple[str, str], now: float) -> _Count | None:
        count = self._counts.get(key)
        if count is not None and now - count.first > self.config.window_ms / 1000 \
                and now >= count.locked_until:
            del self._counts[key]
            return None
        return count

    def locked(self, peer: str, user: str | None) -> bool:
        now = self._clock()
        for key in _keys(peer, user):
            count = self._get(key, now)
            if count is not None and now < count.locked_until:
                return True
        return False

    def failed(self, peer: str, user: str | None) -> float:
        """Count a failure; the delay (seconds) before its reply."""
        now = self._clock()
        cfg = self.config
        worst = 0
        for key in _keys(peer, user):
            count = self._get(key, now)
            if count is None:
                count = self._counts[key] = _Count(now)
                while len(self._counts) > cfg.max_tracked:
                    self._counts.popitem(last=False)
            count.failures += 1
            if count.failures >= cfg.lockout_failures and cfg.lockout_ms:
                count.locked_until = now + cfg.lockout_ms / 1000
            worst = max(worst, count.failures)
        excess = worst - cfg.free_failures
        if excess <= 0:
            return 0.0
        delay_ms: int = min(cfg.base_delay_ms * 2 ** min(excess - 1, 30), cfg.max_delay_ms)
        return delay_ms / 1000

    def succeeded(self, peer: str, user: str) -> None:
        for key in _keys(peer, user):
            self._counts.pop(key, None)

    def count(self, kind: str) -> None:
        if self._on_failure is not None:
            self._on_failure(kind)


def _keys(peer: str, user: str | None) -> list[tuple[str, str]]:
    keys = [("peer", peer)]
    if user is not None:
        keys.append(("user", user))
    return keys


def peer_host(peer: object) -> str:
    """The address part of a peername (the port changes per connection)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


async def authenticate(
    session: ClientAuthSession, throttle: AuthThrottle, peer: object,
    command: Mapping[str, Any],
    name: str,
) -> tuple[dict[str, Any], AuthenticatedUser | None]:
    """``session.handle(command)`` with throttling, lockout and a log line per failure
    (with the client's address); ``name``: the command's name as parsed
    (``Request.raw_name``)."""
    host = peer_host(peer)
    pending = session.pending_user
    if name in ("saslStart", "saslContinue") and throttle.locked(host, pending):
        session.abandon()
        throttle.count("locked")
        log.warning("authentication from %s refused: locked out after repeated failures "
                    "(user %r)", peer, pending)
        return error_document(*AUTHENTICATION_FAILED, FAILED), None
    reply, user = session.handle(command, name)
    if user is not None:
        throttle.succeeded(host, user.username)
    elif reply.get("code") == AUTHENTICATION_FAILED[0]:
        who = session.failed_user
        delay = throttle.failed(host, who)
        throttle.count("failed")
        log.warning("authentication from %s failed: %s", peer, session.last_failure)
        if delay:
            await asyncio.sleep(delay)
    return reply, user
