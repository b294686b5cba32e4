"""The only upstream path: select a server, check out a pooled connection, exchange one
message, decide what a failure means, and keep the cursor table that later requests
are routed by.

Requests from clients (:meth:`Roundtrip.exchange`) and the proxy's own commands (the
``killCursors`` of a departed client's cursors, :meth:`Roundtrip.release_cursors`) take
the same path, so a failure is handled the same way whoever caused it, in
:meth:`Roundtrip._server_failed`: a refused connect marks the server failed (SDAM would
mark it Unknown) and clears its pool at once; a dropped or timed-out exchange goes to
the outlier detector (``proxy.pool.outlier``), which does the same only once other
clients' failures or a health probe confirm it (one client's command can make a
server drop the connection it arrived on; that must not evict the server for everyone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import bson
from bson import Int64
from pymongo.read_preferences import _ServerMode

from proxy.address import Address
from proxy.commands import CURSOR_COMMANDS
from proxy.errors import (
    HOST_UNREACHABLE,
    NETWORK_TIMEOUT,
    NOT_PRIMARY_CODES,
    ProxyError,
)
from proxy.identity.handshake import UpstreamLimits
from proxy.pool.connection import UpstreamConnection, UpstreamProtocolError, next_request_id
from proxy.pool.outlier import OutlierDetector
from proxy.pool.pool import ConnectFailed, UpstreamPool
from proxy.pool.registry import Pools
from proxy.request import Request
from proxy.route.cursors import CursorTable
from proxy.route.readpref import read_preference
from proxy.route.router import Router
from proxy.route.rules import RouteDecision
from proxy.route.topology import Topology
from proxy.upstream.failover import Failover, SentFailed
from proxy.wire import decode_body, encode_op_msg, parse_op_msg, reply_cursor, reply_error_code

__all__ = ["Exchanged", "Roundtrip"]

log = logging.getLogger("mongoproxy.upstream")
_PRIMARY_PREFERRED = read_preference("primaryPreferred")


class Exchanged:
    """One upstream reply: where it came from and its raw bytes (never decoded here)."""

    __slots__ = ("address", "body", "conn", "error_code", "header")

    def __init__(self, address: Address | None, conn: UpstreamConnection | None,
                 header: bytes, body: bytes) -> None:
        self.address = address
        self.conn = conn  # None for a reply served from the cache
        self.header = header
        self.body = body
        self.error_code: int | None = None


class Roundtrip:
    """Select, check out, exchange, handle failures; track cursors and their owners."""

    def __init__(self, topology: Topology, pools: Pools, cursors: CursorTable,
                 socket_timeout_ms: int) -> None:
        self.topology = topology
        self.pools = pools
        self.cursors = cursors
        self.router = Router(topology, cursors)
        self.timeout_ms = socket_timeout_ms
        # Set by the wiring (proxy.server.guard); None: every failure marks the server.
        self.outliers: OutlierDetector | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Its name among placement's clusters ("home": the upstream section's).
        self.cluster = "home"

    # -- what other layers ask of the upstream --------------------------------------------

    def limits(self) -> UpstreamLimits:
        """The limits the upstream servers report (pymongo's view of the topology)."""
        return UpstreamLimits.from_description(self.topology.description())

    def role_of(self, address: Address) -> str:
        return self.topology.role_of(address)

    def retryable_writes(self) -> bool:
        """The upstream deduplicates writes by txnNumber (see Topology.retryable_writes)."""
        return self.topology.retryable_writes()

    # -- one client request -----------------------------------------------------------------

    async def exchange(self, request: Request, message: bytes, decision: RouteDecision,
                       timer: Any, client: int = 0) -> Exchanged:
        """Send ``message`` (the request as forwarded) to the server the decision points
        to and return its reply. Raises ProxyError for a failure the client is told of.
        ``client``: the client connection's id (outlier detection counts them).

        Always reads a reply: the moreToCome flag was cleared before forwarding, because
        a pooled connection must never be left with an unread reply.
        """
        address = (
            self.topology.select_now(decision.read_preference) if decision.pinned is None
            else None)
        if address is None:  # pinned, or nothing suitable now: wait for a server
            address = await self.router.server_for(request, decision)
        timer.mark("select")
        failover: Failover | None = None
        slots_for_cursor = decision.pinned == "cursor"
        while True:
            pool = self.pools.get(address)
            slots = None if slots_for_cursor else pool.ordinary_slots
            try:
                if slots is not None:
                    await _acquire(slots, pool)
                try:
                    conn, header, body = await self._on(pool, address, request.raw_name,
                                                        message, request.request_id, timer,
                                                        client)
                finally:
                    if slots is not None:
                        slots.release()
            except ProxyError as exc:
                if failover is None:
                    failover = Failover(self.topology, request, decision)
                address = await failover.after_error(exc, address)  # or raises exc
                continue
            done = Exchanged(address, conn, header, body)
            code = done.error_code = reply_error_code(body)
            if code in NOT_PRIMARY_CODES:
                # SDAM marks such a server Unknown: select again instead of waiting for
                # the next heartbeat; a retryable request goes to the new primary.
                self.topology.mark_failed(address)
                if failover is None:
                    failover = Failover(self.topology, request, decision)
                retry_on = await failover.after_not_primary()
                if retry_on is not None:
                    address = retry_on
                    continue
            return done

    async def _on(self, pool: UpstreamPool, address: Address, name: str, message: bytes,
                  request_id: int, timer: Any, client: int
                  ) -> tuple[UpstreamConnection, bytes, bytes]:
        try:
            conn = await pool.checkout()
        except ConnectFailed:
            # Between heartbeats, a refused connect is the first sign the server is down
            # (and no client's doing): marked at once.
            self._server_failed(address, pool, clear=True, client=None)
            raise
        timer.mark("checkout_wait")
        reusable = False
        try:
            header, body = await conn.exchange(message, request_id, self.timeout_ms / 1000)
            reusable = True
            if self.outliers is not None:
                self.outliers.success(address)
        except TimeoutError:
            self._server_failed(address, pool, clear=False, client=client)
            raise SentFailed(
                NETWORK_TIMEOUT,
                f"no reply from upstream {pool.label} to {name} within {self.timeout_ms} ms",
                timed_out=True,
            ) from None
        except (OSError, asyncio.IncompleteReadError, UpstreamProtocolError) as exc:
            # The server (or the path to it) failed: its other idle connections are
            # suspect too, as SDAM clears a pool on a network error (once confirmed).
            self._server_failed(address, pool, clear=True, client=client)
            raise SentFailed(
                HOST_UNREACHABLE,
                f"connection to upstream {pool.label} failed during {name}: {_describe(exc)}",
                timed_out=False,
            ) from None
        finally:
            pool.checkin(conn, reusable)
        timer.mark("upstream")
        return conn, header, body

    def _server_failed(self, address: Address, pool: UpstreamPool, *, clear: bool,
                       client: int | None) -> None:
        """A failure of ``address`` seen by an exchange on ``client``'s request (None: a
        failure no client can cause). With outlier detection, the server is marked
        failed and its pool cleared (:meth:`eject`) only once the detector confirms it;
        the failed connection itself is discarded either way."""
        outliers = self.outliers
        if outliers is not None and client is not None:
            outliers.failure(address, client)
            return
        self.topology.mark_failed(address)
        if clear:
            pool.clear()

    def eject(self, address: Address) -> None:
        """The outlier detector's verdict: ``address`` is down (as SDAM's Unknown)."""
        self.topology.mark_failed(address)
        self.pools.get(address).clear()

    # -- cursors ------------------------------------------------------------------------------

    def bookkeeping(self, request: Request, done: Exchanged, owner: int, tenant: Any
                    ) -> int | None:
        """Cursor state that later requests are routed by; returns the batch length."""
        name = request.name
        if name not in CURSOR_COMMANDS:
            if name == "killCursors":
                for killed in request.cursor_ids:
                    self.cursors.remove(killed)
            return None
        cursor_id, docs = reply_cursor(done.body)
        if name == "getMore":
            # Exhausted (id 0), or gone on the server (an error reply has no cursor).
            if cursor_id is None or cursor_id == 0:
                self.cursors.remove(request.cursor_ids[0])
        elif cursor_id and done.address is not None and done.conn is not None:
            self.cursors.add(cursor_id, done.address, request.namespace, owner, done.conn,
                             tenant, self.cluster)
        return docs

    def release_cursors(self, owner: int) -> None:
        """Kill, on their servers, the cursors a departed client connection left open."""
        for (server, namespace), ids in self.cursors.release_owner(owner).items():
            self.kill_cursors(server, namespace, ids)

    def kill_cursors(self, server: Address, namespace: str, ids: list[int]) -> None:
        """Kill cursors of this cluster's ``server`` in the background."""
        if ids:
            database, _, collection = namespace.partition(".")
            # Cursor ids are longs on the wire; a small id encoded as int32 is refused.
            command = {"killCursors": collection, "cursors": [Int64(i) for i in ids]}
            task = asyncio.create_task(self._kill_cursors(server, database, command))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _kill_cursors(self, server: Address, database: str,
                            command: dict[str, Any]) -> None:
        label = self.pools.get(server).label
        try:
            reply = await self.command(database, command, server=server)
        except ProxyError as exc:
            log.info("could not run killCursors on %s: %s", label, exc.errmsg)
            return
        if not reply.get("ok"):
            log.warning("killCursors on %s failed: %s", label, reply.get("errmsg"))

    # -- the proxy's own commands -------------------------------------------------------------

    async def command(self, database: str, command: dict[str, Any], *,
                      server: Address | None = None) -> dict[str, Any]:
        """One command of the proxy's own (killCursors of departed clients, the index
        catalog's listIndexes) through the same exchange and failure handling as a
        client's request, on ``server`` or the primary (else any member). Raises
        ProxyError."""
        done = await self.command_on(database, command, _PRIMARY_PREFERRED, server)
        return decode_body(parse_op_msg(done.header + done.body))

    async def command_on(self, database: str, command: dict[str, Any],
                         selector: _ServerMode, server: Address | None = None) -> Exchanged:
        """One command of the proxy's own on ``server``, else on the member ``selector``
        picks (fan-out reads, proxy.placement.fanout): the raw reply, with the server
        and the connection that answered (a cursor it opens lives as long as that
        connection). Raises ProxyError."""
        address = server or await self.topology.select(selector)
        request_id = next_request_id()
        message = encode_op_msg(request_id, 0, bson.encode({**command, "$db": database}))
        conn, header, body = await self._on(self.pools.get(address), address,
                                            next(iter(command)), message, request_id,
                                            _NO_TIMER, _PROXY_CLIENT)
        return Exchanged(address, conn, header, body)

    def runner(self, timeout_s: float) -> Callable[
            [str, dict[str, Any]], Awaitable[Mapping[str, Any]]]:
        """:meth:`command` bounded by ``timeout_s``, as a plain callable."""
        async def run(database: str, command: dict[str, Any]) -> Mapping[str, Any]:
            async with asyncio.timeout(timeout_s):
                return await self.command(database, command)
        return run


class _NoTimer:
    """The phase timer of the proxy's own commands: nothing is recorded."""

    __slots__ = ()

    def mark(self, phase: str) -> None:
        pass


_NO_TIMER = _NoTimer()
# The "client" of the proxy's own commands for outlier detection (client ids start at 1).
_PROXY_CLIENT = 0


async def _acquire(slots: asyncio.Semaphore, pool: UpstreamPool) -> None:
    """Take one of the pool's slots for cursor-opening requests, within the wait limit."""
    if not slots.locked():
        await slots.acquire()  # a free slot: taken at once, no timeout scope needed
        return
    timeout_ms = pool.config.wait_queue_timeout_ms
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            await slots.acquire()
    except TimeoutError:
        raise ProxyError(
            NETWORK_TIMEOUT,
            f"timed out after {timeout_ms} ms waiting for a connection to upstream "
            f"{pool.label} (pool max_size {pool.config.max_size}, all in use)",
        ) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
