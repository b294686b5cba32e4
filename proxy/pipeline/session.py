"""What the pipeline knows about one client connection: a value, no socket."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from proxy.classify import NO_CONTEXT, ClientContext

if TYPE_CHECKING:
    from proxy.identity.scram import AuthenticatedUser, ClientAuthSession
    from proxy.pipeline.reply import Reply

__all__ = ["Session"]


class Session:
    """One client connection's identity, handshake facts and authentication state."""

    __slots__ = ("app_name", "auth", "compressors", "connected_at", "connection_id",
                 "context", "identity", "in_flight", "in_flight_since", "interrupted",
                 "login_requested", "peer")

    def __init__(self, connection_id: int, peer: object, auth: ClientAuthSession) -> None:
        self.connection_id = connection_id
        self.peer = peer
        self.auth = auth
        self.app_name: str | None = None
        self.context: ClientContext = NO_CONTEXT
        self.identity: AuthenticatedUser | None = None
        # The connection sent something that needs a login (users configured): the
        # server's login timeout runs from then (proxy.server.session_limits).
        self.login_requested = False
        self.compressors: list[str] = []
        # The reply owed to a request whose handling was cancelled (shutdown): the
        # session loop sends it before it stops.
        self.interrupted: Reply | None = None
        # For GET /connections (proxy.admin.connections): when the connection was
        # accepted, and the command in flight (its name) since when (perf_counter ns).
        self.connected_at = time.monotonic()
        self.in_flight: str | None = None
        self.in_flight_since = 0

    @property
    def tenant(self) -> str | None:
        return self.identity.tenant if self.identity is not None else None

    @property
    def user(self) -> str | None:
        return self.identity.username if self.identity is not None else None

    def set_context(self) -> None:
        self.context = ClientContext(app_name=self.app_name, user=self.user,
                                     tenant=self.tenant)
