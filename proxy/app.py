"""The running proxy: owns the listener, the upstream pool and the admin endpoint,
and shuts them down in order."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time

from proxy.admin.http import AdminServer, json_response
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.identity.handshake import UpstreamLimits
from proxy.listener.connection import ClientConnection
from proxy.pool.pool import UpstreamPool

log = logging.getLogger("mongoproxy")


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        host = config.upstream.hosts()[0]
        self.pool = UpstreamPool(host, config.upstream.pool)
        self.admin = AdminServer({"/healthz": self._healthz})
        self.server: asyncio.Server | None = None
        self.connections: dict[ClientConnection, asyncio.Task[None]] = {}
        self.shutting_down = False
        self._connection_ids = itertools.count(1)
        self._limits: UpstreamLimits | None = None
        self._started = time.monotonic()

    def upstream_limits(self) -> UpstreamLimits:
        """The upstream's limits, from the newest handshake any pooled connection made."""
        if self._limits is None and self.pool.last_hello:
            self._limits = UpstreamLimits.from_hello(self.pool.last_hello)
        return self._limits or UpstreamLimits()

    async def start(self) -> None:
        listen = self.config.listen
        await self.admin.start(self.config.admin.host, self.config.admin.port)
        # Learn the upstream's limits before the first client handshake; an upstream that
        # is down now is not fatal (clients get errors until it is back).
        try:
            await self.pool.fill()
            if not self.pool.last_hello:
                conn = await self.pool.checkout()
                self.pool.checkin(conn, reusable=True)
        except ProxyError as exc:
            log.warning("upstream not reachable at start: %s", exc.errmsg)
        self.server = await asyncio.start_server(
            self._accept, listen.host, listen.port, backlog=4096
        )
        log.info(
            "mongoproxy listening on %s:%d, upstream %s, admin http://%s:%d",
            listen.host, self.port, self.pool.label, self.config.admin.host, self.admin.port,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ClientConnection(self, reader, writer, next(self._connection_ids))
        task = asyncio.current_task()
        assert task is not None
        self.connections[conn] = task
        try:
            await conn.serve()
        finally:
            del self.connections[conn]

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
                conn.writer.close()
        if self.connections:
            await asyncio.wait(list(self.connections.values()), timeout=1)
        await self.pool.close()
        await self.admin.close()
        log.info("mongoproxy stopped")

    def _healthz(self, _query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return json_response(200, {
            "status": "ok",
            "uptime_s": round(time.monotonic() - self._started, 3),
            "client_connections": len(self.connections),
            "shutting_down": self.shutting_down,
        })


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await proxy.shutdown()


def run(config: Config) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
