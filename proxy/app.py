"""The running proxy: owns the listener, the upstream pool and the admin endpoint,
and shuts them down in order."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from pathlib import Path
from typing import Any

from bson import Int64

from proxy.admin.connections import connections_handler
from proxy.admin.http import AdminServer, json_response
from proxy.advice.advisor import Advisor
from proxy.advice.endpoint import advice_routes
from proxy.advice.upstream import pooled_runner
from proxy.cache.layer import ResultCache
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.identity.handshake import UpstreamLimits
from proxy.identity.scram import ClientAuthenticator
from proxy.listener.connection import ClientConnection
from proxy.listener.stream import ClientStream
from proxy.observe.dataprobe import DataPathProbe
from proxy.observe.endpoints import ReadinessFacts, has_usable_primary
from proxy.observe.hub import Observer
from proxy.observe.metrics import topology_facts
from proxy.observe.rulehits import RuleHits, rules_handler
from proxy.pool.auth import Credentials
from proxy.pool.registry import Pools
from proxy.reload import ConfigReloader
from proxy.route.cursors import CursorTable
from proxy.route.readpref import PRIMARY, read_preference
from proxy.route.router import Router
from proxy.route.topology import make_topology
from proxy.tenancy import TenantPolicy
from proxy.tls.client import UpstreamTLS
from proxy.tls.server import ServerTLS, TLSListener, TLSMetrics

log = logging.getLogger("mongoproxy")
PRIMARY_PREFERRED = read_preference("primaryPreferred")


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.topology = make_topology(config.upstream)
        self.pools = Pools(config.upstream.pool, Credentials.from_uri(config.upstream.uri),
                           UpstreamTLS(config.upstream))
        self.listen_tls = None if config.listen.tls is None else ServerTLS(config.listen.tls)
        self.cursors = CursorTable()
        self.router = Router(self.topology, self.cursors)
        self.policy = TenantPolicy(config.tenancy)
        self.authenticator = ClientAuthenticator(config.tenancy.users)
        self._background: set[asyncio.Task[None]] = set()
        self.observer = Observer(
            config.observability,
            pool_stats=lambda: {p.label: p.stats() for p in self.pools.all()},
            pool_max_size=config.upstream.pool.max_size,
            topology=lambda: topology_facts(self.topology.description()),
        )
        # The result cache's metrics go on the proxy's registry; Redis is optional at
        # runtime, so a cache whose Redis is down is created all the same.
        self.cache = (
            None if config.cache is None
            else ResultCache(config.cache, self.observer.metrics.registry)
        )
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
            pooled_runner(self.topology, self.pools, config.advice.command_timeout_ms / 1000),
            tenant_field=config.tenancy.field,
        )
        if config.advice.enabled:
            self.observer.index_changed = self.advisor.index_changed
        self.admin = AdminServer({
            "/healthz": self._healthz,
            **self.observer.routes(self._readiness),
            "/rules": rules_handler(lambda: self.config),
            "/connections": connections_handler(lambda: self.connections),
            **(advice_routes(self.advisor) if config.advice.enabled else {}),
        }, self.observer.post_routes())
        self.server: asyncio.Server | TLSListener | None = None
        self.connections: dict[ClientConnection, asyncio.Task[None]] = {}
        self.shutting_down = False
        self._connection_ids = itertools.count(1)
        self._started = time.monotonic()

    def upstream_limits(self) -> UpstreamLimits:
        """The limits the upstream servers report (pymongo's view of the topology)."""
        return UpstreamLimits.from_description(self.topology.description())

    def release_cursors(self, owner: int) -> None:
        """Kill, on their servers, the cursors a departed client connection left open."""
        for (server, namespace), ids in self.cursors.release_owner(owner).items():
            database, _, collection = namespace.partition(".")
            # Cursor ids are longs on the wire; a small id encoded as int32 is refused.
            command = {"killCursors": collection, "cursors": [Int64(i) for i in ids],
                       "$db": database}
            task = asyncio.create_task(self._run_on(server, command))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run_on(self, server: tuple[str, int], command: dict[str, Any]) -> None:
        pool = self.pools.get(server)
        try:
            conn = await pool.checkout()
        except ProxyError as exc:
            log.info("could not run %s on %s: %s", next(iter(command)), pool.label, exc.errmsg)
            return
        ok = False
        try:
            reply = await conn.command(command, self.config.upstream.socket_timeout_ms / 1000)
            ok = True
            if not reply.get("ok"):
                log.warning("%s on %s failed: %s", next(iter(command)), pool.label,
                            reply.get("errmsg"))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.info("could not run %s on %s: %r", next(iter(command)), pool.label, exc)
        finally:
            pool.checkin(conn, ok)

    async def start(self) -> None:
        listen = self.config.listen
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
        if self.cache is not None:
            await self.cache.start()
        if self.config.advice.enabled:
            self.advisor.start()
        if self.listen_tls is None:
            self.server = await asyncio.get_running_loop().create_server(
                lambda: ClientStream(self._accept), listen.host, listen.port, backlog=4096
            )
        else:
            self.listen_tls.start_watching()  # certificate files reloaded when they change
            self.server = await TLSListener.start(
                lambda: ClientStream(self._accept), self.listen_tls, listen.host, listen.port)
            self.observer.metrics.registry.register(TLSMetrics(self.listen_tls, self.server))
        log.info(
            "mongoproxy listening on %s:%d, upstream %s, admin http://%s:%d",
            listen.host, self.port, self.topology.summary(), self.config.admin.host,
            self.admin.port,
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
        conn = ClientConnection(self, stream, next(self._connection_ids))
        self.connections[conn] = asyncio.get_running_loop().create_task(self._serve(conn))
        self.observer.metrics.client_connected()

    async def _serve(self, conn: ClientConnection) -> None:
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
        await self.advisor.close()
        if self.listen_tls is not None:
            await self.listen_tls.close()
        await self.pools.close()
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

    def _healthz(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return json_response(200, {
            "status": "ok",
            "uptime_s": round(time.monotonic() - self._started, 3),
            "client_connections": len(self.connections),
            "shutting_down": self.shutting_down,
        })


async def serve(config: Config, path: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP (or an edit of the
    file at ``path``) reloads the routing rules."""
    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = None
    if path is not None:
        reloader = ConfigReloader(proxy, path)
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


def run(config: Config, path: Path | None = None) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(config, path))
    else:
        uvloop.run(serve(config, path))
