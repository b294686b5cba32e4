"""The running proxy: wires the parts (upstream, pipeline, server, admin endpoint),
starts them, and shuts them down in order. No request logic lives here."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.admin.connections import connections_handler
from proxy.admin.http import AdminServer, json_response
from proxy.advice.advisor import Advisor
from proxy.advice.endpoint import advice_routes
from proxy.cache.layer import ResultCache
from proxy.cache.upstream import CachedUpstream
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.identity.scram import ClientAuthenticator
from proxy.observe.dataprobe import DataPathProbe
from proxy.observe.endpoints import ReadinessFacts, has_usable_primary
from proxy.observe.hub import Observer
from proxy.observe.metrics import topology_facts
from proxy.pipeline import Pipeline
from proxy.pipeline.placed import Placement
from proxy.placement.agent import PlacementAgent
from proxy.placement.clusters import Clusters
from proxy.placement.directory import EMPTY_STATE, PlacementState
from proxy.placement.fanout import FanOut
from proxy.placement.health import PlacementMetrics, cluster_health, placement_report
from proxy.pool.auth import Credentials
from proxy.pool.registry import Pools
from proxy.reload import ConfigReloader
from proxy.route.cursors import CursorTable
from proxy.route.readpref import PRIMARY, read_preference
from proxy.route.rulehits import RuleHits, rules_handler
from proxy.route.topology import make_topology
from proxy.server.guard import Guard
from proxy.server.session import ClientSession
from proxy.server.stream import ClientStream
from proxy.tenancy import TenantPolicy
from proxy.tls.client import UpstreamTLS
from proxy.tls.server import ServerTLS, TLSListener, TLSMetrics
from proxy.upstream.roundtrip import Roundtrip

if TYPE_CHECKING:
    from proxy.worker import WorkerSlot
    from proxy.worker_siblings import Siblings

log = logging.getLogger("mongoproxy")
PRIMARY_PREFERRED = read_preference("primaryPreferred")


class Proxy:
    def __init__(self, config: Config, worker: WorkerSlot | None = None) -> None:
        self.config = config
        self.worker = worker  # one of listen.workers processes (proxy/worker.py)
        self.topology = make_topology(config.upstream)
        self.pools = Pools(config.upstream.pool, Credentials.from_uri(config.upstream.uri),
                           UpstreamTLS(config.upstream))
        self.listen_tls = None if config.listen.tls is None else ServerTLS(config.listen.tls)
        self.cursors = CursorTable()
        self.roundtrip = Roundtrip(self.topology, self.pools, self.cursors,
                                   config.upstream.socket_timeout_ms)
        self.policy = TenantPolicy(config.tenancy)
        self.authenticator = ClientAuthenticator(config.tenancy.users)
        # Tenant placement: the other clusters, each with its own roundtrip.
        self.clusters = Clusters(self.roundtrip, config.placement.clusters)
        self.observer = Observer(
            config.observability,
            pool_stats=self._pool_stats,
            pool_max_size=config.upstream.pool.max_size,
            topology=self._topology_facts,
        )
        if worker is not None:
            self.observer.slowlog.tag_worker(worker.index)
        # The result cache's metrics go on the proxy's registry; Redis is optional at
        # runtime, so a cache whose Redis is down is created all the same.
        self.cache = (
            None if config.cache is None
            else ResultCache(config.cache, self.observer.metrics.registry)
        )
        # Connection limit, memory budget, login throttle, outlier detection.
        self.guard = Guard(config, self.observer.metrics.registry, self.clusters.pool_of,
                           self.clusters.eject)
        for roundtrip in self.clusters:
            roundtrip.outliers = self.guard.outliers
        self.pipeline = Pipeline(
            roundtrip=self.roundtrip,
            cached=None if self.cache is None else CachedUpstream(self.cache, self.roundtrip),
            policy=self.policy,
            authenticator=self.authenticator,
            throttle=self.guard.throttle,
            observer=self.observer,
        )
        self.placement: Placement | None = None
        if config.placement.enabled:
            # Online moves: the shared state in Redis (placement.redis_url).
            agent = (None if config.placement.redis_url is None else PlacementAgent(
                config.placement, f"{socket.gethostname()}:{os.getpid()}:"
                                  f"{secrets.token_hex(4)}"))
            self.placement = Placement(self.clusters, FanOut(
                config.placement.fanout_batch_size, config.tenancy.field,
                max_cursors=config.placement.fanout_max_cursors,
                idle_timeout_s=config.placement.fanout_idle_timeout_ms / 1000), agent)
            self.pipeline.placement = self.placement
            self.observer.metrics.registry.register(PlacementMetrics(
                self.placement.router, lambda: self.config.placement,
                lambda: self._placement_state()))
        RuleHits(lambda: self.config, self.observer.metrics.registry)
        self.data_probe = DataPathProbe(
            lambda: self.topology.select(PRIMARY),
            self.pools.get,
            self._primary_address,
            interval_s=config.admin.ready_probe_interval_ms / 1000,
            timeout_s=config.admin.ready_probe_timeout_ms / 1000,
        )
        self.advisor = Advisor(
            config.advice, self.observer.digest,
            self.roundtrip.runner(config.advice.command_timeout_ms / 1000),
            tenant_field=config.tenancy.field,
        )
        if config.advice.enabled:
            self.observer.index_changed = self.advisor.index_changed
        self.admin = AdminServer({
            "/healthz": self._healthz,
            **self.observer.routes(self._readiness),
            "/rules": rules_handler(lambda: self.config),
            "/connections": connections_handler(lambda: self.connections),
            **({"/placement": self._placement_handler} if self.placement is not None
               else {}),
            **(advice_routes(self.advisor) if config.advice.enabled else {}),
        }, self.observer.post_routes(),
            # A worker's admin server is its supervisor's private unix socket (the
            # supervisor's own port checks the token).
            token=None if worker is not None else config.admin.token)
        # A worker's cursors that clients continue in its siblings (and theirs here).
        self.siblings: Siblings | None = None
        if worker is not None:
            from proxy.worker_siblings import attach

            self.siblings = attach(self, worker)
            self.pipeline.siblings = self.siblings
        self.server: asyncio.Server | TLSListener | None = None
        self.connections: dict[ClientSession, asyncio.Task[None]] = {}
        self.shutting_down = False
        self._connection_ids = itertools.count(1)
        self._started = time.monotonic()

    async def start(self) -> None:
        listen = self.config.listen
        if self.worker is None:
            await self.admin.start(self.config.admin.host, self.config.admin.port)
        # Learn the upstream's limits before the first client handshake; an upstream that
        # is down now is not fatal (clients get errors until it is back).
        await self.topology.start()
        try:
            await self.topology.select(PRIMARY_PREFERRED)
        except ProxyError as exc:
            log.warning("upstream not reachable at start: %s", exc.errmsg)
        for sd in self.topology.description().known_servers:
            await self._fill_pool(sd.address)
        await self.clusters.start()
        if self.placement is not None and self.placement.agent is not None:
            await self.placement.agent.start()  # a Redis that is down: retried, logged
        if self.cache is not None:
            await self.cache.start()
        if self.config.advice.enabled:
            self.advisor.start()
        reuse_port = self.worker is not None  # the workers share the port
        if self.listen_tls is None:
            self.server = await asyncio.get_running_loop().create_server(
                lambda: ClientStream(self._accept, self.guard.budget), listen.host,
                listen.port, backlog=4096, reuse_port=reuse_port,
            )
        else:
            self.listen_tls.start_watching()  # certificate files reloaded when they change
            self.server = await TLSListener.start(
                lambda: ClientStream(self._accept, self.guard.budget), self.listen_tls,
                listen.host, listen.port, reuse_port=reuse_port)
            self.observer.metrics.registry.register(TLSMetrics(self.listen_tls, self.server))
        if self.worker is not None:  # its supervisor sees it once it listens
            await self.admin.start_unix(self.worker.admin_socket)
        log.info(
            "mongoproxy listening on %s:%d, upstream %s, admin %s",
            listen.host, self.port, self.topology.summary(), self.admin.address,
        )

    async def _fill_pool(self, address: tuple[str, int | None]) -> None:
        try:
            await self.pools.get((address[0], address[1] or 27017)).fill()
        except ProxyError as exc:
            log.warning("could not open min_size connections: %s", exc.errmsg)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _accept(self, stream: ClientStream) -> None:
        if not self.guard.admit(len(self.connections), stream.peer):
            stream.close()
            return
        conn = ClientSession(self, self.pipeline, stream, next(self._connection_ids))
        self.connections[conn] = asyncio.get_running_loop().create_task(self._serve(conn))
        self.observer.metrics.client_connected()

    async def _serve(self, conn: ClientSession) -> None:
        try:
            await conn.serve()
        finally:
            del self.connections[conn]
            self.observer.metrics.client_disconnected()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish within the drain time, close."""
        self.shutting_down = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + self.config.shutdown.drain_timeout_ms / 1000
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn, task in list(self.connections.items()):
            if conn.busy:
                task.cancel()  # the handler answers ShutdownInProgress
            else:
                conn.close()
        if self.connections:
            await asyncio.wait(list(self.connections.values()), timeout=1)
        await self.guard.close()
        await self.advisor.close()
        if self.listen_tls is not None:
            await self.listen_tls.close()
        await self.pools.close()
        if self.placement is not None and self.placement.fanout is not None:
            await self.placement.fanout.close()
        if self.placement is not None and self.placement.agent is not None:
            await self.placement.agent.close()
        await self.clusters.close()
        if self.cache is not None:
            await self.cache.close()
        await self.topology.close()
        await self.admin.close()
        self.observer.close()
        log.info("mongoproxy stopped")

    async def _readiness(self) -> ReadinessFacts:
        primary = has_usable_primary(self.topology.description())
        data_path = None
        detail: dict[str, Any] = {}
        if primary and not self.shutting_down:
            state = await self.data_probe.check()
            data_path = state.ok
            detail["data_path"] = state.describe(time.monotonic())
        if self.placement is not None:
            # Each cluster's health; the proxy stays ready while home has a primary
            # (a tenant whose cluster is down gets errors, the others are served).
            detail["clusters"] = {name: facts["primary"] for name, facts in
                                  cluster_health(self.clusters).items()}
            detail["placement_state_version"] = self._placement_state().version
        return ReadinessFacts(
            primary=primary,
            redis=None if self.cache is None else self.cache.state,
            shutting_down=self.shutting_down,
            data_path=data_path,
            detail=detail,
        )

    def _primary_address(self) -> tuple[str, int] | None:
        for sd in self.topology.description().known_servers:
            if sd.is_writable:
                return sd.address[0], sd.address[1] or 27017
        return None

    def _pool_stats(self) -> dict[str, dict[str, int]]:
        stats = {}
        for roundtrip in self.clusters:
            max_size = roundtrip.pools.config.max_size
            for pool in roundtrip.pools.all():
                stats[pool.label] = {"max_size": max_size, **pool.stats()}
        return stats

    def _topology_facts(self) -> dict[str, dict[str, Any]]:
        facts: dict[str, dict[str, Any]] = {}
        for roundtrip in self.clusters:
            facts.update(topology_facts(roundtrip.topology.description()))
        return facts

    def _placement_state(self) -> PlacementState:
        return EMPTY_STATE if self.placement is None else self.placement.state

    def _placement_handler(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        assert self.placement is not None
        return json_response(200, placement_report(
            self.placement.router, self.config.placement, self._placement_state()))

    def _healthz(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return json_response(200, {
            "status": "ok",
            "uptime_s": round(time.monotonic() - self._started, 3),
            "client_connections": len(self.connections),
            "shutting_down": self.shutting_down,
        })


async def serve(config: Config, path: Path | None = None,
                worker: WorkerSlot | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP (or an edit of the
    file at ``path``) reloads the routing rules."""
    proxy = Proxy(config, worker)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = None
    if path is not None:
        reloader = ConfigReloader(proxy, path, None if worker is None else worker.adapt)
        reloader.start()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    if proxy.listen_tls is not None:
        # SIGHUP also reloads the listener's certificate (after the config, if any).
        loop.add_signal_handler(signal.SIGHUP, _reload_all, reloader, proxy.listen_tls)
    await stop.wait()
    log.info("signal received: draining")
    if reloader is not None:
        await reloader.close()
    await proxy.shutdown()


def _reload_all(reloader: ConfigReloader | None, tls: ServerTLS) -> None:
    if reloader is not None:
        reloader.reload()
    tls.reload()


def run(config: Config, path: Path | None = None, worker: WorkerSlot | None = None) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(config, path, worker))
    else:
        uvloop.run(serve(config, path, worker))
