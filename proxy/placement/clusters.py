"""The clusters of ``placement.clusters`` at run time: each its own topology, pools and
:class:`~proxy.upstream.roundtrip.Roundtrip` (so its own routing classes, failover and
health), beside the home cluster the proxy always has. One cursor table serves them all:
a cursor entry names its cluster, so a getMore finds its way back."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from proxy.address import Address
from proxy.config import UpstreamConfig
from proxy.errors import HOST_UNREACHABLE, ProxyError
from proxy.placement.directory import HOME
from proxy.pool.auth import Credentials
from proxy.pool.pool import UpstreamPool
from proxy.pool.registry import Pools
from proxy.route.cursors import CursorTable
from proxy.route.readpref import read_preference
from proxy.route.topology import make_topology
from proxy.tls.client import UpstreamTLS
from proxy.upstream.roundtrip import Roundtrip

__all__ = ["Clusters"]

log = logging.getLogger("mongoproxy.placement")
_PRIMARY_PREFERRED = read_preference("primaryPreferred")


def cluster_roundtrip(name: str, config: UpstreamConfig, cursors: CursorTable) -> Roundtrip:
    """A cluster's own topology, pools and upstream path."""
    pools = Pools(config.pool, Credentials.from_uri(config.uri), UpstreamTLS(config))
    roundtrip = Roundtrip(make_topology(config), pools, cursors, config.socket_timeout_ms)
    roundtrip.cluster = name
    return roundtrip


class Clusters:
    """Every cluster's :class:`Roundtrip` by name; ``home`` is the upstream section's."""

    def __init__(self, home: Roundtrip, others: dict[str, UpstreamConfig]) -> None:
        self.home = home
        home.cluster = HOME
        self.by_name: dict[str, Roundtrip] = {HOME: home}
        for name, config in others.items():
            self.by_name[name] = cluster_roundtrip(name, config, home.cursors)

    def __iter__(self) -> Iterator[Roundtrip]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Roundtrip:
        roundtrip = self.by_name.get(name)
        if roundtrip is None:
            raise ProxyError(
                HOST_UNREACHABLE,
                f"tenant placement names cluster {name!r}, which is not configured "
                f"(placement.clusters: {', '.join(sorted(self.by_name))})")
        return roundtrip

    def others(self) -> list[Roundtrip]:
        return [r for name, r in self.by_name.items() if name != HOME]

    # -- wiring for the parts keyed by server address (outlier detection, probes) -----------

    def owner_of(self, address: Address) -> Roundtrip:
        for roundtrip in self.by_name.values():
            if roundtrip.pools.find(address) is not None:
                return roundtrip
        return self.home

    def pool_of(self, address: Address) -> UpstreamPool:
        return self.owner_of(address).pools.get(address)

    def eject(self, address: Address) -> None:
        self.owner_of(address).eject(address)

    def pools(self) -> list[UpstreamPool]:
        return [pool for roundtrip in self for pool in roundtrip.pools.all()]

    # -- life cycle of the clusters other than home (the proxy starts home itself) ----------

    async def start(self) -> None:
        for roundtrip in self.others():
            await roundtrip.topology.start()
            try:
                await roundtrip.topology.select(_PRIMARY_PREFERRED)
            except ProxyError as exc:
                log.warning("cluster %s not reachable at start: %s", roundtrip.cluster,
                            exc.errmsg)

    async def close(self) -> None:
        for roundtrip in self.others():
            await roundtrip.pools.close()
            await roundtrip.topology.close()
