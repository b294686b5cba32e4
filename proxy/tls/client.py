"""TLS from the proxy to its upstream servers, as pymongo would do it.

The context comes from pymongo's own option handling (``client_options._parse_ssl_options``,
the function ``MongoClient`` calls, with ``is_sync=False``: a standard-library context,
which asyncio needs): ``tls``/``ssl``, ``tlsCAFile``, ``tlsCertificateKeyFile`` (+
``Password``), ``tlsCRLFile``, ``tlsAllowInvalidHostnames``, ``tlsAllowInvalidCertificates``
and ``tlsInsecure`` mean exactly what they mean to pymongo's monitor, which builds its
own context from the same options. A ``mongodb+srv://`` uri implies ``tls=true``, as in
pymongo.

The proxy's own pools do not use every connection-string option; the ones they would
silently ignore are refused by :func:`check_uri_options` (so by ``check-config``), naming
the config key to use instead.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pymongo.client_options import _parse_ssl_options
from pymongo.common import _CaseInsensitiveDictionary
from pymongo.errors import ConfigurationError
from pymongo.uri_parser import parse_uri
from redis.asyncio.connection import SSLConnection

from proxy.tls.server import check_readable

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

__all__ = ["UpstreamTLS", "check_uri_options", "context_from_options", "redis_ssl_context"]

Address = tuple[str, int]

# Options both the pools and the monitor honour (lower case, as pymongo normalises).
IMPLEMENTED_OPTIONS = frozenset({
    "tls", "ssl", "tlscafile", "tlscertificatekeyfile", "tlscertificatekeyfilepassword",
    "tlscrlfile", "tlsallowinvalidhostnames", "tlsallowinvalidcertificates", "tlsinsecure",
    # Implied by tlsInsecure, and moot: the asyncio (standard library) context pymongo
    # builds for the monitor does no OCSP either.
    "tlsdisableocspendpointcheck",
    "authsource", "authmechanism",
    "replicaset", "directconnection", "srvservicename", "srvmaxhosts",
})
# Options with a key of the proxy's own config instead.
_USE_INSTEAD = {
    "maxpoolsize": "upstream.pool.max_size",
    "minpoolsize": "upstream.pool.min_size",
    "maxidletimems": "upstream.pool.max_idle_ms",
    "waitqueuetimeoutms": "upstream.pool.wait_queue_timeout_ms",
    "connecttimeoutms": "upstream.pool.connect_timeout_ms",
    "sockettimeoutms": "upstream.socket_timeout_ms",
    "serverselectiontimeoutms": "upstream.server_selection_timeout_ms",
    "localthresholdms": "upstream.local_threshold_ms",
    "heartbeatfrequencyms": "upstream.heartbeat_ms",
}
# Per-operation settings: each application's own connection string carries them.
_CLIENT_SIDE = frozenset({
    "readpreference", "readpreferencetags", "maxstalenessseconds", "w", "journal",
    "wtimeoutms", "readconcernlevel", "retrywrites", "retryreads", "timeoutms",
    "uuidrepresentation", "tz_aware",
})


def check_uri_options(options: Mapping[str, Any]) -> None:
    """ValueError for a connection-string option the proxy would accept and then ignore."""
    refused = []
    for name in options:
        key = name.lower()
        if key in IMPLEMENTED_OPTIONS:
            continue
        if key in _USE_INSTEAD:
            refused.append(f"{name} (set {_USE_INSTEAD[key]} instead)")
        elif key in _CLIENT_SIDE:
            refused.append(f"{name} (a per-operation setting: put it in the applications' "
                           "connection strings)")
        else:
            refused.append(f"{name} (not implemented by the proxy's upstream connections)")
    if refused:
        raise ValueError("unsupported connection-string options: " + "; ".join(refused))


def context_from_options(options: Mapping[str, Any]) -> ssl.SSLContext | None:
    """pymongo's TLS context for these uri options; None when they do not enable TLS.

    Raises ValueError saying what does not load (a missing file, a key that does not
    match its certificate, a wrong key password).
    """
    try:
        check_readable(*(options.get(name) for name in options
                         if name.lower() in ("tlscafile", "tlscertificatekeyfile", "tlscrlfile")))
        context, _ = _parse_ssl_options(_CaseInsensitiveDictionary(dict(options)), False)
    except ConfigurationError as exc:
        raise ValueError(f"TLS options: {exc}") from None
    except OSError as exc:
        name = getattr(exc, "filename", None)
        what = f"cannot read {name}: {exc.strerror}" if name else str(exc)
        raise ValueError(f"TLS options: {what}") from None
    if context is None:
        return None
    if not isinstance(context, ssl.SSLContext):  # pragma: no cover - is_sync=False
        raise ValueError("TLS options: pymongo built a non-standard SSL context")
    return context


def redis_ssl_context(url_params: Mapping[str, Any]) -> ssl.SSLContext:
    """The context redis-py builds for a ``rediss://`` url's ``ssl_*`` query options
    (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ...), taken
    from redis-py itself (an SSLConnection is only constructed, never connected), so the
    cache's raw lookup lane verifies exactly as its redis-py client does."""
    options = {k: v for k, v in url_params.items() if k.startswith("ssl_")}
    return SSLConnection(**options).ssl_context.get()


class UpstreamTLS:
    """The TLS context for each upstream server (None: plain TCP).

    Discovered servers (and declared members without a ``tls`` block) use the context of
    ``upstream.uri``'s options; a declared member with a ``tls`` block, its own.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self.default: ssl.SSLContext | None = None
        if config.uri is not None:
            self.default = context_from_options(parse_uri(config.uri)["options"])
        self._members: dict[Address, ssl.SSLContext | None] = {
            member.address: context_from_options(member.tls.uri_options())
            for member in config.members if member.tls is not None
        }

    def context_for(self, address: Address) -> ssl.SSLContext | None:
        return self._members.get(address, self.default)
