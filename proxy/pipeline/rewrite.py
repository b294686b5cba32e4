"""What the proxy changes in a command before forwarding it: pure functions.

Tenancy's inject mode may add the tenant to the body and document sequences; a routing
class may cap or inject ``maxTimeMS`` and must say ``$readPreference`` when it sends a
read to a non-primary member. The message is re-encoded only when something changed;
otherwise only the flags the upstream must not see are cleared.
"""

from __future__ import annotations

from typing import Any

import bson

from proxy.request import STRIPPED_FLAGS, Request
from proxy.route.readpref import PRIMARY
from proxy.route.rules import RouteDecision
from proxy.tenancy.gate import Admission
from proxy.wire import DocumentSequence, encode_op_msg, with_flags

__all__ = ["forwarded_message", "with_injected", "with_route"]


def with_injected(
    request: Request, admission: Admission
) -> tuple[dict[str, Any], tuple[DocumentSequence, ...]]:
    """Inject mode: the command body and document sequences with the tenant added."""
    replaced = admission.sequences or {}
    sequences = tuple(
        DocumentSequence(seq.identifier,
                         b"".join(bson.encode(d) for d in replaced[seq.identifier]))
        if seq.identifier in replaced else seq
        for seq in request.sequences
    )
    command = admission.command if admission.command is not None else request.command
    return command, sequences


def with_route(command: dict[str, Any], decision: RouteDecision) -> dict[str, Any] | None:
    """The command as the route needs it forwarded, or None when it needs no change.

    A class may cap or inject ``maxTimeMS``; and when it sends a read to a non-primary
    member, the ``$readPreference`` must say so, or a replica-set secondary refuses the
    read (NotPrimaryNoSecondaryOk).
    """
    max_time = decision.max_time_ms
    wanted: dict[str, Any] | None = None
    if decision.pinned is None and decision.read_preference.mode != PRIMARY.mode:
        wanted = decision.read_preference.document
        if command.get("$readPreference") == wanted:
            wanted = None
    if max_time is None and wanted is None:
        return None
    changed = dict(command)
    if max_time is not None:
        changed["maxTimeMS"] = max_time
    if wanted is not None:
        changed["$readPreference"] = wanted
    return changed


def forwarded_message(
    request: Request,
    command: dict[str, Any],
    sequences: tuple[DocumentSequence, ...],
    changed: bool,
) -> bytes:
    """The message to send upstream: re-encoded when the command or its sequences
    changed, else the client's bytes with only the stripped flags cleared."""
    if changed:
        return encode_op_msg(request.request_id, request.msg.response_to,
                             bson.encode(command), sequences, request.forward_flags)
    if request.flags & STRIPPED_FLAGS:
        return with_flags(request.message, request.forward_flags)
    return request.message
