"""The upstream deployment as pymongo sees it, in one of two modes.

* Discovery: ``upstream.uri`` is an ordinary connection string; pymongo's own Server
  Discovery and Monitoring (an ``AsyncMongoClient`` used only for monitoring) keeps the
  ``TopologyDescription`` current.
* Declared roles: ``upstream.members`` names each server's role (for backends that do not
  report replica-set roles, such as FerretDB or a writer/reader endpoint pair); the proxy
  health-checks each member with ``hello`` and builds the same kind of
  ``TopologyDescription`` from what it sees.

Either way, selection is pymongo's ``TopologyDescription.apply_selector`` with pymongo
read-preference objects (tag sets, maxStalenessSeconds, the latency window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.settings import TopologySettings
from pymongo.errors import ConfigurationError
from pymongo.hello import Hello
from pymongo.monitoring import TopologyDescriptionChangedEvent, TopologyListener
from pymongo.read_preferences import MovingAverage, _ServerMode, make_read_preference
from pymongo.server_description import ServerDescription
from pymongo.server_type import SERVER_TYPE
from pymongo.topology_description import TOPOLOGY_TYPE, TopologyDescription

from proxy.address import Address
from proxy.errors import (
    FAILED_TO_SATISFY_READ_PREFERENCE,
    MAX_STALENESS_OUT_OF_RANGE,
    ProxyError,
)
from proxy.pool.connection import UpstreamConnection
from proxy.pool.pool import HANDSHAKE
from proxy.tls.client import UpstreamTLS

if TYPE_CHECKING:  # a type only: the configuration is above the layers it configures
    from proxy.config import MemberConfig, UpstreamConfig

log = logging.getLogger("mongoproxy.topology")

# Read preference objects whose cache key is remembered per description: the routing
# rules' (long-lived); one-off client $readPreference objects beyond this are not kept.
_MAX_SELECTOR_KEYS = 256
_DEDUPING_TOPOLOGIES = frozenset({
    TOPOLOGY_TYPE.ReplicaSetWithPrimary, TOPOLOGY_TYPE.ReplicaSetNoPrimary,
    TOPOLOGY_TYPE.Sharded, TOPOLOGY_TYPE.LoadBalanced,
})
# A woken declared-member check runs at most this often (pymongo's minimum, 0.5 s, is
# for a driver's many clients; one proxy can afford a quicker look).
MIN_CHECK_INTERVAL_S = 0.25
_ROLES = {
    SERVER_TYPE.RSPrimary: "primary",
    SERVER_TYPE.RSSecondary: "secondary",
    SERVER_TYPE.Mongos: "mongos",
    SERVER_TYPE.Standalone: "standalone",
    SERVER_TYPE.LoadBalancer: "loadbalancer",
}


class Topology(ABC):
    """The current view of the upstream servers, and server selection over it."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._changed = asyncio.Event()
        # Servers a request just failed on: avoided until a newer health check succeeds.
        self._failed: dict[Address, float] = {}
        # Selection is pure given the description, so its result is cached per read
        # preference until the description changes or a server fails.
        self._selection_cache: dict[tuple[Any, ...], list[ServerDescription]] = {}
        self._cached_for: TopologyDescription | None = None
        # Per description too: each member's role label (role_of runs per operation, and
        # server_descriptions() copies its dict), and the selection-cache key of each
        # read preference object seen (building it reprs the tag sets).
        self._roles: dict[Address, str] = {}
        self._selector_keys: dict[int, tuple[_ServerMode, tuple[Any, ...]]] = {}
        # Whether the upstream deduplicates retryable writes, as last known (kept while
        # every server is down: a restart does not change what the deployment is).
        self._retryable_writes = False

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def description(self) -> TopologyDescription: ...

    def role_of(self, address: Address) -> str:
        """The server's role as a short label: primary, secondary, mongos, standalone..."""
        self._current()
        return self._roles.get(address, "unknown")

    def _current(self) -> TopologyDescription:
        """The description, with the per-description caches reset when it changed."""
        description = self.description()
        if description is not self._cached_for:
            self._selection_cache.clear()
            self._selector_keys.clear()
            self._roles = {
                (host, port or 27017): _ROLES.get(sd.server_type, "unknown")
                for (host, port), sd in description.server_descriptions().items()
            }
            self._cached_for = description
        return description

    def summary(self) -> str:
        return _summary(self.description())

    def notify_changed(self) -> None:
        self._changed.set()

    def mark_failed(self, address: Address) -> None:
        """A network error on ``address``: stop selecting it until it is seen healthy."""
        self._failed[address] = time.monotonic()
        self._selection_cache.clear()

    @abstractmethod
    def request_check(self) -> None:
        """Requests are waiting for a server: check the servers soon (rate-limited by
        the monitors themselves, so every waiting request shares one check)."""

    def retryable_writes(self) -> bool:
        """The upstream deduplicates writes by txnNumber (a replica set or mongos with
        sessions): only then may a failed write be labelled RetryableWriteError or
        retried by the proxy. Never for a standalone server, nor FerretDB."""
        description = self._current()
        if description.known_servers:
            self._retryable_writes = self._dedupes_writes(description)
        return self._retryable_writes

    def _dedupes_writes(self, description: TopologyDescription) -> bool:
        return (
            description.topology_type in _DEDUPING_TOPOLOGIES
            and description.logical_session_timeout_minutes is not None
        )

    def _not_recently_failed(self, servers: list[ServerDescription]) -> list[ServerDescription]:
        if not self._failed:
            return servers
        return [
            sd for sd in servers
            if sd.address not in self._failed or sd.last_update_time > self._failed[sd.address]
        ]

    def candidates(self, selector: _ServerMode) -> list[ServerDescription]:
        """Servers suitable for ``selector`` now (pymongo's selection and latency window)."""
        description = self._current()
        known = self._selector_keys.get(id(selector))
        if known is not None and known[0] is selector:
            key = known[1]
        else:
            key = (selector.mode, repr(selector.tag_sets), selector.max_staleness)
            if len(self._selector_keys) < _MAX_SELECTOR_KEYS:
                # The selector is kept alive with its key, so its id cannot be reused.
                self._selector_keys[id(selector)] = (selector, key)
        servers = self._selection_cache.get(key)
        if servers is None:
            try:
                servers = description.apply_selector(
                    self._adapt(selector), custom_selector=self._not_recently_failed
                )
            except ConfigurationError as exc:  # e.g. maxStalenessSeconds below the minimum
                raise ProxyError(MAX_STALENESS_OUT_OF_RANGE, str(exc)) from None
            if description.topology_type == TOPOLOGY_TYPE.Single:
                # pymongo ignores every selector (custom ones too) for a Single topology:
                # without this, a server a request just failed to reach would be
                # selected again until pymongo's own monitor noticed.
                servers = self._not_recently_failed(servers)
            self._selection_cache[key] = servers
        return servers

    def _adapt(self, selector: _ServerMode) -> _ServerMode:
        return selector

    def select_now(self, selector: _ServerMode,
                   avoid: tuple[Address, float] | None = None) -> Address | None:
        """A server for ``selector`` if one is suitable now (no await: the common case).
        ``avoid``: (a server, a time.monotonic()): that server only once a check newer
        than the time has seen it (a request's own failure there, not yet a verdict for
        every request: see outlier detection)."""
        servers = self.candidates(selector)
        if avoid is not None:
            servers = _checked_since(servers, *avoid)
        if not servers:
            return None
        host, port = random.choice(servers).address
        return host, port or 27017

    async def select(self, selector: _ServerMode, deadline: float | None = None,
                     avoid: tuple[Address, float] | None = None) -> Address:
        """A server for ``selector``, waiting up to server_selection_timeout_ms (or until
        the ``deadline``, a time.monotonic()) for one; ``avoid`` as in select_now."""
        timeout_ms = self.config.server_selection_timeout_ms
        if deadline is None:
            deadline = time.monotonic() + timeout_ms / 1000
        while True:
            address = self.select_now(selector, avoid)
            if address is not None:
                return address
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyError(
                    FAILED_TO_SATISFY_READ_PREFERENCE,
                    f"no upstream server available for read preference "
                    f"{_describe(selector)} after {timeout_ms} ms; topology: "
                    f"{_summary(self.description())}{_errors(self.description())}",
                )
            self._changed.clear()
            self.request_check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))


class DiscoveryTopology(Topology):
    """pymongo's SDAM, through an AsyncMongoClient that only monitors."""

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        assert config.uri is not None
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            config.uri,
            event_listeners=[_ChangeListener(self)],
            serverSelectionTimeoutMS=config.server_selection_timeout_ms,
            localThresholdMS=config.local_threshold_ms,
            heartbeatFrequencyMS=config.heartbeat_ms,
            # A check of a stopped (SIGSTOPped) server gives up as a connect would.
            connectTimeoutMS=config.pool.connect_timeout_ms,
            connect=False,
            appname="mongoproxy-monitor",
        )

    async def start(self) -> None:
        await self.client.aconnect()

    async def close(self) -> None:
        await self.client.close()

    def description(self) -> TopologyDescription:
        return self.client.topology_description

    def request_check(self) -> None:
        # pymongo's monitors run a woken check at most every 0.5 s (its minimum
        # heartbeat interval), however many requests ask.
        topology = getattr(self.client, "_topology", None)
        wake = getattr(topology, "_request_check_all", None)
        if wake is not None:
            wake()


class _ChangeListener(TopologyListener):
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.loop = asyncio.get_running_loop()

    def opened(self, event: Any) -> None:
        pass

    def closed(self, event: Any) -> None:
        pass

    def description_changed(self, event: TopologyDescriptionChangedEvent) -> None:
        self.loop.call_soon_threadsafe(self.topology.notify_changed)


class DeclaredTopology(Topology):
    """Roles from the config; liveness and round-trip times from the proxy's own checks."""

    SET_NAME = "mongoproxy-declared"

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self.members = {m.address: m for m in config.members}
        self._servers: dict[Any, ServerDescription] = {
            addr: ServerDescription(addr) for addr in self.members
        }
        self._rtt = {addr: MovingAverage() for addr in self.members}
        self._settings = TopologySettings(
            seeds=list(self.members),
            replica_set_name=self.SET_NAME,
            local_threshold_ms=config.local_threshold_ms,
            heartbeat_frequency=max(1, config.heartbeat_ms // 1000),
        )
        self._description = self._build()
        self._tasks: list[asyncio.Task[None]] = []
        self._tls = UpstreamTLS(config)
        # Set to run a member's next check now (requests are waiting for a server).
        self._wake = {addr: asyncio.Event() for addr in self.members}
        # Whether each member's own hello says it deduplicates retryable writes (the
        # synthetic description above always says replica set).
        self._dedupes: dict[Address, bool] = {}

    async def start(self) -> None:
        first_checks = [asyncio.Event() for _ in self.members]
        self._tasks = [
            asyncio.create_task(self._monitor(addr, done), name=f"monitor {addr}")
            for addr, done in zip(self.members, first_checks, strict=True)
        ]
        # Start serving once every member has been checked once (up or down).
        await asyncio.gather(*(e.wait() for e in first_checks))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def description(self) -> TopologyDescription:
        return self._description

    def request_check(self) -> None:
        for event in self._wake.values():
            event.set()

    def _dedupes_writes(self, description: TopologyDescription) -> bool:
        return bool(self._dedupes) and all(self._dedupes.values())

    def _adapt(self, selector: _ServerMode) -> _ServerMode:
        # Declared members report no lastWrite, so staleness cannot be estimated:
        # maxStalenessSeconds is not applied in this mode (documented).
        if selector.max_staleness == -1:
            return selector
        return make_read_preference(selector.mode, list(selector.tag_sets))

    def _build(self) -> TopologyDescription:
        has_primary = any(sd.server_type == SERVER_TYPE.RSPrimary for sd in self._servers.values())
        kind = (
            TOPOLOGY_TYPE.ReplicaSetWithPrimary if has_primary
            else TOPOLOGY_TYPE.ReplicaSetNoPrimary
        )
        return TopologyDescription(
            kind,
            dict(self._servers),
            self.SET_NAME,
            None,
            None,
            self._settings,
        )

    def _update(self, address: Address, description: ServerDescription) -> None:
        before = self._servers[address]
        self._servers[address] = description
        self._description = self._build()
        if before.server_type != description.server_type:
            log.warning(
                "member %s:%d is now %s", address[0], address[1], description.server_type_name
            )
        self.notify_changed()

    def _synthetic_hello(self, member: MemberConfig, reply: dict[str, Any]) -> dict[str, Any]:
        doc = {k: v for k, v in reply.items() if k.startswith(("max", "min", "logical"))}
        doc.update(
            ok=1.0,
            setName=self.SET_NAME,
            hosts=[f"{h}:{p}" for h, p in self.members],
            me=f"{member.address[0]}:{member.address[1]}",
            isWritablePrimary=member.role == "primary",
            secondary=member.role == "secondary",
            tags=dict(member.tags),
        )
        return doc

    async def _monitor(self, address: Address, first_check: asyncio.Event) -> None:
        member = self.members[address]
        timeout_s = self.config.pool.connect_timeout_ms / 1000
        wake = self._wake[address]
        conn: UpstreamConnection | None = None
        while True:
            try:
                try:
                    conn, reply, rtt = await self._check(address, conn, timeout_s)
                except (OSError, EOFError, asyncio.IncompleteReadError):
                    if conn is None:
                        raise
                    # The kept connection died (a restarted server): one fresh attempt
                    # before calling the member down, as pymongo's monitor does.
                    conn.close()
                    conn = None
                    conn, reply, rtt = await self._check(address, conn, timeout_s)
                self._rtt[address].add_sample(rtt)
                self._dedupes[address] = _dedupes(reply)
                self._update(address, ServerDescription(
                    address,
                    Hello(self._synthetic_hello(member, reply)),
                    self._rtt[address].get(),
                ))
            except asyncio.CancelledError:
                if conn is not None:
                    conn.close()
                raise
            except Exception as exc:  # any failure means "down" until the next check
                if conn is not None:
                    conn.close()
                    conn = None
                self._rtt[address].reset()
                self._update(address, ServerDescription(address, error=exc))
            first_check.set()
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.config.heartbeat_ms / 1000)
            if wake.is_set():  # woken by waiting requests: not more often than this
                await asyncio.sleep(MIN_CHECK_INTERVAL_S)

    async def _check(self, address: Address, conn: UpstreamConnection | None,
                     timeout_s: float) -> tuple[UpstreamConnection, dict[str, Any], float]:
        fresh = conn is None
        if conn is None:
            conn = await UpstreamConnection.open(
                address, timeout_s, HANDSHAKE, None, self._tls.context_for(address))
        start = time.monotonic()
        try:
            reply = await conn.command({"hello": 1, "$db": "admin"}, timeout_s)
        except BaseException:
            if fresh:  # the caller never saw it: not left open
                conn.close()
            raise
        return conn, reply, time.monotonic() - start


def _dedupes(hello: dict[str, Any]) -> bool:
    """A server that deduplicates retryable writes: a replica-set member or mongos
    with sessions (a standalone server and FerretDB do not)."""
    member = "setName" in hello or hello.get("msg") == "isdbgrid"
    return member and hello.get("logicalSessionTimeoutMinutes") is not None


def make_topology(config: UpstreamConfig) -> Topology:
    if config.members:
        return DeclaredTopology(config)
    return DiscoveryTopology(config)


def _checked_since(servers: list[ServerDescription], address: Address, since: float
                   ) -> list[ServerDescription]:
    return [sd for sd in servers
            if (sd.address[0], sd.address[1] or 27017) != address
            or sd.last_update_time > since]


def _describe(selector: _ServerMode) -> str:
    parts = [f"mode: {selector.mongos_mode}"]
    if selector.tag_sets not in (None, [{}]):
        parts.append(f"tags: {selector.tag_sets}")
    if selector.max_staleness != -1:
        parts.append(f"maxStalenessSeconds: {selector.max_staleness}")
    return "{" + ", ".join(parts) + "}"


def _errors(description: TopologyDescription) -> str:
    """Why the unreachable servers are (a TLS or authentication failure, a refusal)."""
    errors = [
        f"{sd.address[0]}:{sd.address[1]}: {sd.error}"
        for sd in description.server_descriptions().values() if sd.error is not None
    ]
    return "; last errors: " + "; ".join(errors) if errors else ""


def _summary(description: TopologyDescription) -> str:
    servers = ", ".join(
        f"{sd.address[0]}:{sd.address[1]} {sd.server_type_name}"
        for sd in description.server_descriptions().values()
    )
    return f"{description.topology_type_name} [{servers}]"
