"""One pool per upstream server, created when the server is first selected."""

from __future__ import annotations

from proxy.address import Address
from proxy.pool.auth import Credentials
from proxy.pool.config import PoolConfig
from proxy.pool.pool import UpstreamPool
from proxy.tls.client import UpstreamTLS


class Pools:
    def __init__(
        self, config: PoolConfig, credentials: Credentials | None = None,
        tls: UpstreamTLS | None = None,
    ) -> None:
        """``credentials``: ``Credentials.from_uri(upstream.uri)``, used for every server;
        ``tls``: each server's TLS context."""
        self.config = config
        self.credentials = credentials
        self.tls = tls
        self._pools: dict[Address, UpstreamPool] = {}

    def get(self, address: Address) -> UpstreamPool:
        pool = self._pools.get(address)
        if pool is None:
            context = None if self.tls is None else self.tls.context_for(address)
            pool = self._pools[address] = UpstreamPool(
                address, self.config, self.credentials, context)
        return pool

    def find(self, address: Address) -> UpstreamPool | None:
        """The pool of ``address`` if this registry has one (no pool is created)."""
        return self._pools.get(address)

    def stats(self) -> dict[str, dict[str, int]]:
        """``UpstreamPool.stats()`` per server, keyed by its ``host:port`` label."""
        return {pool.label: pool.stats() for pool in self._pools.values()}

    def all(self) -> list[UpstreamPool]:
        return list(self._pools.values())

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
