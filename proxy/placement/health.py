"""The clusters' health and the directory for operators: ``/placement``, the
``clusters`` part of ``/readyz`` and the ``mongoproxy_placement_*`` metrics (each
with a ``cluster`` label)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import PlacementConfig
from proxy.placement.clusters import Clusters
from proxy.placement.directory import PlacementState
from proxy.placement.route import PlacementRouter

__all__ = ["PlacementMetrics", "cluster_health", "placement_report"]


def cluster_health(clusters: Clusters) -> dict[str, dict[str, Any]]:
    """Per cluster: a usable primary (a writable member that is up) and its members."""
    health: dict[str, dict[str, Any]] = {}
    for roundtrip in clusters:
        description = roundtrip.topology.description()
        health[roundtrip.cluster] = {
            "primary": any(sd.is_writable for sd in description.known_servers),
            "members": [f"{sd.address[0]}:{sd.address[1] or 27017}"
                        for sd in description.known_servers],
            "summary": roundtrip.topology.summary(),
        }
    return health


def directory_counts(config: PlacementConfig, state: PlacementState,
                     clusters: Iterable[str]) -> dict[str, int]:
    """Tenants the directory and the overrides name, per cluster."""
    counts = dict.fromkeys(clusters, 0)
    for cluster in {**config.tenants, **state.overrides}.values():
        counts[cluster] = counts.get(cluster, 0) + 1
    return counts


def placement_report(router: PlacementRouter, config: PlacementConfig,
                     state: PlacementState) -> dict[str, Any]:
    return {**router.describe(config, state), "health": cluster_health(router.clusters),
            "commands": dict(router.placed)}


class PlacementMetrics(Collector):
    def __init__(self, router: PlacementRouter, config: Callable[[], PlacementConfig],
                 state: Callable[[], PlacementState]) -> None:
        self.router = router
        self.config = config
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("mongoproxy_placement_cluster_up",
                               "1 when the cluster has a usable primary", labels=["cluster"])
        for name, facts in cluster_health(self.router.clusters).items():
            up.add_metric([name], 1.0 if facts["primary"] else 0.0)
        yield up
        commands = CounterMetricFamily(
            "mongoproxy_placement_commands", "Commands sent per cluster by tenant placement "
            "('*': fanned out or run on every cluster)", labels=["cluster"])
        for name, count in sorted(self.router.placed.items()):
            commands.add_metric([name], count)
        yield commands
        state = self.state()
        tenants = GaugeMetricFamily(
            "mongoproxy_placement_directory_tenants",
            "Tenants the directory and the move overrides place on each cluster",
            labels=["cluster"])
        for name, count in directory_counts(self.config(), state,
                                            self.router.clusters.by_name).items():
            tenants.add_metric([name], count)
        yield tenants
        yield GaugeMetricFamily("mongoproxy_placement_state_version",
                                "Version of the shared placement state last read",
                                value=state.version)
        yield GaugeMetricFamily("mongoproxy_placement_moves",
                                "Tenant moves in progress", value=len(state.moves))
