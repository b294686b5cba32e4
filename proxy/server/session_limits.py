"""One client connection's limits: message size, idle and login timeouts, slow readers.

* Before login (when users are configured) a message may be at most
  ``listen.max_preauth_message_bytes``, compressed or not: an unauthenticated client
  cannot make the proxy buffer, or inflate, a 48 MB message.
* Before login a connection may send ``listen.max_preauth_messages_per_s`` messages a
  second (a token bucket, bursts of as many): faster ones wait, their socket unread, so
  an unauthenticated flood (of refused compression bombs, say) costs the proxy no
  more than that rate per connection.
* A connection that sends nothing for ``listen.idle_timeout_ms`` is closed.
* With users configured, a connection that has sent anything but the handshake (driver
  monitors send only ``hello``, and are never asked to log in) must complete its login
  within ``listen.login_timeout_ms`` of that first message, or it is closed.
* A client whose unsent reply has waited ``listen.write_timeout_ms`` for it to read is
  dropped (the reply is not kept in memory for a client that never reads).
"""

from __future__ import annotations

import asyncio
import time

from proxy.config import ListenConfig
from proxy.identity.preauth import message_limit
from proxy.server.stream import IdleTimeoutError, StalledMessageError

__all__ = ["LoginTimeoutError", "SessionLimits"]

_clock = time.monotonic  # module-level, so that a unit test can drive them
_sleep = asyncio.sleep


class LoginTimeoutError(StalledMessageError):
    """The client did not complete its login in time: closed without a reply."""


class SessionLimits:
    __slots__ = (
        "_idle_s", "_login_binding", "_login_deadline", "_login_s", "_max", "_preauth_max",
        "_rate", "_tokens", "_tokens_at", "read_timeout_s", "users_configured",
        "write_timeout_s",
    )

    def __init__(self, listen: ListenConfig, users_configured: bool) -> None:
        self.users_configured = users_configured
        self.read_timeout_s = listen.read_timeout_ms / 1000
        self.write_timeout_s = listen.write_timeout_ms / 1000
        self._idle_s = listen.idle_timeout_ms / 1000 or None
        self._login_s = listen.login_timeout_ms / 1000
        self._login_deadline: float | None = None
        self._login_binding = False
        self._max = listen.max_message_size_bytes
        self._preauth_max = message_limit(self._max, listen.max_preauth_message_bytes,
                                          before_login=True)
        self._rate = float(listen.max_preauth_messages_per_s)
        self._tokens = self._rate
        self._tokens_at = _clock()

    @property
    def write_timeout_text(self) -> str:
        return f"a reply still unread after the write timeout of {self.write_timeout_s:g} s"

    def max_size(self, identity: object | None) -> int:
        """The largest message the connection may send now."""
        if identity is None and self.users_configured:
            return self._preauth_max
        return self._max

    def paced(self, identity: object | None) -> bool:
        """Whether messages are rate-limited now (users configured, not logged in)."""
        return identity is None and self.users_configured

    async def pace(self) -> None:
        """Wait as long as the pre-login message rate limit says (maybe not at all)."""
        now = _clock()
        tokens = min(self._rate, self._tokens + (now - self._tokens_at) * self._rate) - 1
        self._tokens, self._tokens_at = tokens, now
        if tokens < 0:
            await _sleep(-tokens / self._rate)

    def login_started(self) -> None:
        """A message that needs (or performs) a login: the login clock starts."""
        if self._login_deadline is None and self.users_configured:
            self._login_deadline = time.monotonic() + self._login_s

    def wait_s(self, identity: object | None) -> float | None:
        """How long to wait for the next message (None: no limit). Raises
        LoginTimeoutError once the login time is over."""
        self._login_binding = False
        deadline = self._login_deadline
        if identity is None and deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._login_error()
            if self._idle_s is None or remaining < self._idle_s:
                self._login_binding = True
                return remaining
        return self._idle_s

    def timed_out(self, identity: object | None, exc: IdleTimeoutError) -> Exception:
        """The error to close with when the wait from :meth:`wait_s` timed out."""
        if identity is None and self._login_binding:
            return self._login_error()
        return exc

    def _login_error(self) -> LoginTimeoutError:
        return LoginTimeoutError(
            f"not authenticated within the login timeout of {self._login_s:g} s", fatal=True)
