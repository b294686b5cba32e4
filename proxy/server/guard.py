"""The proxy's defences against hostile or careless clients, in one object.

``Proxy`` owns one :class:`Guard`: the connection limit checked at accept, the memory
budget every client stream charges, the login throttle, and the outlier detector that
decides when a failed upstream exchange marks its server down (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from pymongo.uri_parser import parse_uri

from proxy.address import Address
from proxy.config import Config
from proxy.identity.throttle import AuthThrottle
from proxy.pool.outlier import OutlierDetector, ping_probe
from proxy.pool.pool import UpstreamPool
from proxy.server.limits import ConnectionLimit, MemoryBudget

__all__ = ["Guard"]


def upstream_fds(config: Config) -> int:
    """File descriptors the proxy holds besides counted client connections: pools and
    monitors per server, and TLS clients still in their handshake (not yet counted)."""
    upstream = config.upstream
    servers = len(upstream.members)
    if not servers and upstream.uri is not None:
        servers = len(parse_uri(upstream.uri)["nodelist"])
    tls = config.listen.tls
    handshakes = 0 if tls is None else tls.max_pending_handshakes
    return max(1, servers) * (upstream.pool.max_size + 2) + handshakes


class Guard:
    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        pool_of: Callable[[Address], UpstreamPool],
        eject: Callable[[Address], None],
    ) -> None:
        listen = config.listen
        self.budget = MemoryBudget(listen.max_buffered_bytes)
        self.connections = ConnectionLimit(listen.max_connections, upstream_fds(config))
        self.refused = Counter("mongoproxy_client_connections_refused",
                               "Client connections closed at accept (over the limit)",
                               registry=registry)
        self.auth_failures = Counter("mongoproxy_auth_failures",
                                     "Failed client logins (failed: wrong credentials; "
                                     "locked: refused while locked out)", ["result"],
                                     registry=registry)
        buffered = Gauge("mongoproxy_client_buffered_bytes",
                         "Bytes held for clients: messages being received and unread "
                         "replies (limit: listen.max_buffered_bytes)", registry=registry)
        buffered.set_function(lambda: self.budget.used)
        for result in ("failed", "locked"):
            self.auth_failures.labels(result)
        self.throttle = AuthThrottle(config.auth_throttle, on_failure=self._auth_failed)
        self.ejections = Counter("mongoproxy_upstream_ejections",
                                 "Upstream servers marked down after a failed exchange "
                                 "was confirmed (outlier detection)", registry=registry)
        self._pool_of = pool_of
        self._eject_server = eject
        outlier = config.upstream.outlier
        self.outliers = OutlierDetector(
            self._eject, self._probe,
            consecutive=outlier.consecutive_failures,
            distinct_clients=outlier.distinct_clients,
        )

    def admit(self, current: int, peer: object) -> bool:
        """Whether one more client connection may be served (False: close it)."""
        if self.connections.admit(current, peer):
            return True
        self.refused.inc()
        return False

    def _auth_failed(self, result: str) -> None:
        self.auth_failures.labels(result).inc()

    def _eject(self, server: object) -> None:
        address: Address = server  # type: ignore[assignment]
        self.ejections.inc()
        self._eject_server(address)  # marked failed, its pool cleared

    async def _probe(self, server: object) -> bool:
        address: Address = server  # type: ignore[assignment]
        return await ping_probe(self._pool_of(address))

    async def close(self) -> None:
        await self.outliers.close()
