"""The proxy's own answer to hello / isMaster: it presents itself as a router (mongos).

Drivers that see ``msg: "isdbgrid"`` send ``$readPreference`` with every read, use
sessions and retryable writes, and never try to discover replica-set members behind it,
which is exactly what a proxy in front of a deployment needs. Pure functions only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.topology_description import TopologyDescription

from proxy.wire import negotiate


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """The limits the upstream reported in its own hello; relayed to clients unchanged."""

    min_wire_version: int = 0
    max_wire_version: int = 21
    max_bson_object_size: int = 16 * 1024 * 1024
    max_message_size_bytes: int = 48_000_000
    max_write_batch_size: int = 100_000
    logical_session_timeout_minutes: int | None = 30

    @classmethod
    def from_description(cls, description: TopologyDescription) -> UpstreamLimits:
        return _limits_from_description(description)


def _limits_from_description(description: TopologyDescription) -> UpstreamLimits:
    """Limits of the primary (else any known server); defaults while none is known."""
    known = description.known_servers
    if not known:
        return UpstreamLimits()
    primaries = [sd for sd in known if sd.is_writable]
    sd = (primaries or known)[0]
    timeout = description.logical_session_timeout_minutes
    return UpstreamLimits(
        min_wire_version=sd.min_wire_version,
        max_wire_version=sd.max_wire_version,
        max_bson_object_size=sd.max_bson_size,
        max_message_size_bytes=sd.max_message_size,
        max_write_batch_size=sd.max_write_batch_size,
        logical_session_timeout_minutes=None if timeout is None else int(timeout),
    )


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client said about itself in its handshake."""

    app_name: str | None
    compressors: list[str]


def read_client_hello(command: Mapping[str, Any], enabled: Sequence[str]) -> ClientHello:
    """Parse the handshake's ``client`` metadata and negotiate compression."""
    client = command.get("client")
    app_name = None
    if isinstance(client, Mapping):
        application = client.get("application")
        if isinstance(application, Mapping) and isinstance(application.get("name"), str):
            app_name = application["name"]
    offer = command.get("compression")
    compressors = negotiate(offer, enabled) if isinstance(offer, list) else []
    return ClientHello(app_name=app_name, compressors=compressors)


def hello_reply(
    command_name: str,
    limits: UpstreamLimits,
    connection_id: int,
    compressors: Sequence[str],
    now: datetime.datetime,
) -> dict[str, Any]:
    """The reply document to hello / isMaster, as a mongos would send it."""
    reply: dict[str, Any] = {}
    if command_name == "hello":
        reply["isWritablePrimary"] = True
    else:
        reply["ismaster"] = True
    reply.update(
        {
            "msg": "isdbgrid",
            "maxBsonObjectSize": limits.max_bson_object_size,
            "maxMessageSizeBytes": limits.max_message_size_bytes,
            "maxWriteBatchSize": limits.max_write_batch_size,
            "localTime": now,
            "connectionId": connection_id,
            "minWireVersion": limits.min_wire_version,
            "maxWireVersion": limits.max_wire_version,
            "readOnly": False,
        }
    )
    if limits.logical_session_timeout_minutes is not None:
        reply["logicalSessionTimeoutMinutes"] = limits.logical_session_timeout_minutes
    if compressors:
        reply["compression"] = list(compressors)
    reply["helloOk"] = True
    reply["ok"] = 1.0
    return reply
