"""One pool per upstream server, created when the server is first selected."""

from __future__ import annotations

from proxy.config import PoolConfig
from proxy.pool.pool import UpstreamPool

Address = tuple[str, int]


class Pools:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._pools: dict[Address, UpstreamPool] = {}

    def get(self, address: Address) -> UpstreamPool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = UpstreamPool(address, self.config)
        return pool

    def all(self) -> list[UpstreamPool]:
        return list(self._pools.values())

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
