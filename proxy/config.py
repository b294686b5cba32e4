"""The proxy's configuration: one typed, validated object loaded from YAML.

Unknown keys are rejected everywhere, and every error names the offending key path
(``upstream.pool.max_size: Input should be greater than 0``) so an operator can fix the
file without reading code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pymongo.errors import InvalidURI
from pymongo.uri_parser import parse_uri

from proxy.advice.config import AdviceConfig
from proxy.cache.config import CacheConfig
from proxy.configbase import Strict as _Strict
from proxy.identity.config import AuthThrottleConfig
from proxy.observe.config import ObservabilityConfig
from proxy.pool.auth import Credentials
from proxy.pool.config import PoolConfig
from proxy.route.rules import RoutingConfig
from proxy.tenancy import TenancyConfig
from proxy.tls.client import check_uri_options, context_from_options
from proxy.tls.config import ListenTLSConfig, MemberTLSConfig
from proxy.wire import SUPPORTED_COMPRESSORS
from proxy.yamlload import load_yaml_file


class ConfigError(Exception):
    """The configuration file is unreadable or invalid; the message names the key path."""


__all__ = [
    "AdminConfig",
    "AuthThrottleConfig",
    "Config",
    "ConfigError",
    "ListenConfig",
    "MemberConfig",
    "PlacementConfig",
    "PoolConfig",
    "ShutdownConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]


class ListenConfig(_Strict):
    """Where applications connect, and what the proxy accepts from them."""

    # Address applications connect to (0.0.0.0 inside a container).
    host: str = "127.0.0.1"
    port: int = Field(default=27016, ge=0, le=65535)  # MongoDB wire protocol port
    # Offered to clients in the handshake, in this order of preference of ours; the
    # client's own order decides among those both sides support.
    compressors: tuple[Literal["zstd", "snappy", "zlib"], ...] = SUPPORTED_COMPRESSORS  # type: ignore[assignment]
    zlib_compression_level: int = Field(default=-1, ge=-1, le=9)  # -1: zlib's default
    # A larger message is answered 17 ProtocolError and its connection closed.
    max_message_size_bytes: int = Field(default=48_000_000, ge=1024, le=48_000_000)
    # Bounded time for anything the proxy waits on from a client: a message that has
    # started arriving must be complete within this time.
    read_timeout_ms: int = Field(default=60_000, gt=0)
    # Client connections served at once; more are closed at accept, with a log line
    # (this and the limits below: docs/security.md).
    max_connections: int = Field(default=10_000, gt=0)
    # A connection that sends nothing for this long is closed (0 = never).
    idle_timeout_ms: int = Field(default=600_000, ge=0)
    # With users configured: time from a connection's first non-handshake message to
    # a completed login (driver monitors only send hello and are not held to it).
    login_timeout_ms: int = Field(default=30_000, gt=0)
    # With users configured: the largest message (compressed or not) before login.
    max_preauth_message_bytes: int = Field(default=65_536, ge=1024, le=48_000_000)
    # With users configured: messages a connection may send per second before login
    # (bursts of as many); faster ones wait, their socket unread.
    max_preauth_messages_per_s: int = Field(default=20, gt=0)
    # A client that does not read its replies: dropped when a reply is still unsent
    # after this long.
    write_timeout_ms: int = Field(default=60_000, gt=0)
    # All client connections together: bytes of messages being received plus unsent
    # replies. A message that does not fit waits (its socket is not read) until it does.
    max_buffered_bytes: int = Field(default=512 * 1024 * 1024, ge=48_000_000)
    # TLS for applications (docs/production.md); absent: plaintext only.
    tls: ListenTLSConfig | None = None
    # Serving processes sharing the port (SO_REUSEPORT) under a supervisor; "auto" is
    # the number of CPUs this process may run on. 1: one process, no supervisor.
    workers: Annotated[int, Field(ge=1, le=256, strict=True)] | Literal["auto"] = 1

    def worker_count(self) -> int:
        """``workers`` with ``auto`` resolved."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers


class AdminConfig(_Strict):
    """The operator HTTP endpoints (/, /healthz, /readyz, /metrics, /digest, ...)."""

    # Keep it on a private interface: without a token the endpoints have no auth.
    host: str = "127.0.0.1"
    port: int = Field(default=9216, ge=0, le=65535)  # HTTP port of the admin endpoints
    # /readyz proves the data path with a ping to the primary on a pooled connection
    # (or recent client traffic), reused for this long, and failing past this timeout
    # (below Kubernetes' default probe timeout of 1 s).
    ready_probe_interval_ms: int = Field(default=1_000, ge=0)
    # a data-path proof that takes longer than this fails (/readyz answers 503)
    ready_probe_timeout_ms: int = Field(default=800, gt=0)
    # When set (16 characters at least), every request but /healthz and /readyz must
    # carry "Authorization: Bearer <token>", else 401 (docs/security.md).
    token: str | None = Field(default=None, min_length=16)


class MemberConfig(_Strict):
    """A server whose role is declared rather than discovered."""

    host: str  # HOST:PORT
    role: Literal["primary", "secondary"]  # at most one primary
    tags: dict[str, str] = {}  # tag set matched by read preferences' tags
    # This member's TLS; absent: the tls* options of upstream.uri (none without a uri).
    tls: MemberTLSConfig | None = None

    @field_validator("host")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.host.rpartition(":")
        return host, int(port)


class UpstreamHealthConfig(_Strict):
    """Outlier detection: when a dropped upstream connection marks its server down."""

    # Consecutive failed exchanges (no success between) ...
    consecutive_failures: int = Field(default=5, gt=0)
    # ... from at least this many different client connections.
    distinct_clients: int = Field(default=3, gt=0)


class UpstreamConfig(_Strict):
    """The MongoDB deployment behind the proxy: give either ``uri`` or ``members``."""

    # Discovery: a standard connection string (standalone, replicaSet=..., or mongos list).
    uri: str | None = None
    # Declared roles: used instead of the uri's hosts when given.
    members: tuple[MemberConfig, ...] = ()
    pool: PoolConfig = PoolConfig()  # per upstream server
    # When a failed exchange marks its server down (docs/security.md).
    outlier: UpstreamHealthConfig = UpstreamHealthConfig()
    # A request waits this long for a suitable server (also when its server refused
    # the connect: it waits for that server's return or another; docs/failover.md),
    # then fails 133 FailedToSatisfyReadPreference.
    server_selection_timeout_ms: int = Field(default=10_000, gt=0)
    # Latency window among suitable servers, as in the drivers.
    local_threshold_ms: int = Field(default=15, ge=0)
    # Health-check interval (declared roles) / pymongo heartbeatFrequencyMS (discovery).
    heartbeat_ms: int = Field(default=1_000, ge=500)
    # Upper bound on one request/reply exchange with the upstream. Long reports should
    # carry their own maxTimeMS below this.
    socket_timeout_ms: int = Field(default=300_000, gt=0)

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            options = parse_uri(value)["options"]
        except (InvalidURI, ValueError, OSError) as exc:  # OSError: an unreadable tls file
            raise ValueError(f"not a valid MongoDB connection string: {exc}") from None
        # Options the proxy's own pools would ignore are refused, never silently dropped;
        # TLS files are loaded now, so a missing CA file fails here rather than at start.
        check_uri_options(options)
        context_from_options(options)
        # The proxy authenticates its own upstream connections as the uri's user.
        credentials = Credentials.from_uri(value)  # ValueError: unsupported mechanism...
        if (credentials is not None and credentials.mechanism == "MONGODB-X509"
                and not options.get("tlsCertificateKeyFile")):
            raise ValueError("authMechanism=MONGODB-X509 needs tls=true and "
                             "tlsCertificateKeyFile (the client certificate is the identity)")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> UpstreamConfig:
        if self.uri is None and not self.members:
            raise ValueError("give either uri (discovery) or members (declared roles)")
        if sum(m.role == "primary" for m in self.members) > 1:
            raise ValueError("members: at most one member may have role primary")
        if len({m.address for m in self.members}) != len(self.members):
            raise ValueError("members: the same host is listed twice")
        return self


HOME_CLUSTER = "home"  # the cluster ``upstream`` describes
_CLUSTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}\Z")


class PlacementConfig(_Strict):
    """Which cluster holds each tenant; empty: every tenant is on home (the upstream
    section's cluster)."""

    # Other clusters by name, each described like upstream (uri or members, pool, ...).
    clusters: dict[str, UpstreamConfig] = {}
    # The directory: a tenant (its value as a string) -> a cluster name (or "home").
    tenants: dict[str, str] = {}
    # Tenants the directory does not list: by rendezvous hash over these cluster names;
    # empty: they stay home.
    hash: tuple[str, ...] = ()
    # Online moves (mongoproxy move-tenant): the Redis all instances share for the
    # directory overrides and the moves' state; absent: no moves, the file only.
    redis_url: str | None = None
    key_prefix: str = Field(default="mongoproxy:placement:", min_length=1)  # Redis keys
    # Each instance re-reads the shared state this often ...
    refresh_ms: int = Field(default=100, ge=10, le=10_000)
    # ... and, with redis_url set, refuses writes (retryable) once its last successful
    # read is older than this: a move cannot switch a tenant under an instance that
    # cannot hear of it. Moves wait this long for every instance to see a new phase.
    lease_ms: int = Field(default=2_000, ge=100, le=60_000)
    # A write of a tenant whose move is in its final catch-up waits at most this long
    # for the switch, then fails with a retryable error.
    hold_timeout_ms: int = Field(default=10_000, gt=0)
    # Fan-out reads (docs/placement.md): documents a merged cursor buffers per cluster.
    fanout_batch_size: int = Field(default=101, gt=0, le=100_000)
    # Merged cursors open at once (per process); a fan-out beyond is refused (146).
    fanout_max_cursors: int = Field(default=1_000, gt=0, le=1_000_000)
    # A merged cursor unused this long is killed, as a server times out a cursor.
    fanout_idle_timeout_ms: int = Field(default=600_000, gt=0)

    @field_validator("clusters")
    @classmethod
    def _cluster_names(cls, value: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in value:
            if name == HOME_CLUSTER:
                raise ValueError(f"{name!r} is the upstream section's cluster; "
                                 "give the others other names")
            if not _CLUSTER_NAME.match(name):
                raise ValueError(f"cluster name {name!r}: letters, digits, '_' and '-', "
                                 "starting with a letter")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _known_clusters(self) -> PlacementConfig:
        known = {HOME_CLUSTER, *self.clusters}
        for tenant, cluster in self.tenants.items():
            if cluster not in known:
                raise ValueError(f"tenants.{tenant}: unknown cluster {cluster!r} "
                                 f"(known: {', '.join(sorted(known))})")
        for cluster in self.hash:
            if cluster not in known:
                raise ValueError(f"hash: unknown cluster {cluster!r} "
                                 f"(known: {', '.join(sorted(known))})")
        if len(set(self.hash)) != len(self.hash):
            raise ValueError("hash: a cluster is listed twice")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.clusters or self.tenants or self.hash or self.redis_url)

    def cluster_names(self) -> tuple[str, ...]:
        return (HOME_CLUSTER, *self.clusters)

    def restart_part(self) -> dict[str, Any]:
        """What a reload cannot change (the directory, ``tenants`` and ``hash``, is live)."""
        return self.model_dump(exclude={"tenants", "hash"})


class ShutdownConfig(_Strict):
    """Graceful stop on SIGTERM/SIGINT."""

    # How long SIGTERM/SIGINT waits for in-flight requests before closing everything.
    drain_timeout_ms: int = Field(default=10_000, ge=0)


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    auth_throttle: AuthThrottleConfig = AuthThrottleConfig()
    upstream: UpstreamConfig
    shutdown: ShutdownConfig = ShutdownConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    routing: RoutingConfig = RoutingConfig()
    tenancy: TenancyConfig = TenancyConfig()
    advice: AdviceConfig = AdviceConfig()  # index advice (GET /advice, mongoproxy advise)
    # The Redis result cache; absent: no cache.
    cache: CacheConfig | None = None
    # Tenants on other clusters than upstream, and online moves (docs/placement.md).
    placement: PlacementConfig = PlacementConfig()

    @model_validator(mode="after")
    def _placement_needs_tenancy(self) -> Config:
        if self.placement.enabled and self.tenancy.mode not in ("enforce", "inject"):
            raise ValueError(
                f"placement needs tenancy.mode enforce or inject (it is "
                f"{self.tenancy.mode!r}): a command is routed by the one tenant the "
                "policy proves it confined to, which modes off and audit do not prove")
        return self

    @model_validator(mode="after")
    def _workers_fit(self) -> Config:
        workers = self.listen.worker_count()
        if workers > 1:
            # Every worker binds the same port; port 0 would give each its own.
            if self.listen.port == 0:
                raise ValueError("listen.port: 0 cannot be shared by listen.workers > 1")
            if self.upstream.pool.max_size < workers:
                raise ValueError(
                    f"upstream.pool.max_size ({self.upstream.pool.max_size}) is divided "
                    f"among listen.workers ({workers}): it must be at least that many"
                )
        return self


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"{path}: {err['msg']}")
    return "; ".join(lines)


def parse_config(data: Any) -> Config:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level): the configuration must be a mapping of keys")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML configuration file (a key given twice is an error)."""
    try:
        data = load_yaml_file(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
