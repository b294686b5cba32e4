"""What the pipeline hands back for one request: :class:`Reply`, a value.

``parts`` are the bytes to write to the client (empty: no reply, for moreToCome); the
other fields are the operation's outcome, for the operation record written once the
reply is out (:meth:`proxy.pipeline.handle.Pipeline.finish`). Every refusal and error
is a :class:`~proxy.errors.ProxyError` turned into a reply here, in one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import bson

from proxy.errors import ProxyError, error_document, network_error_labels
from proxy.pool.connection import next_request_id
from proxy.wire import REPLY_FLAG_QUERY_FAILURE, encode_op_msg, encode_op_reply

if TYPE_CHECKING:
    from proxy.address import Address
    from proxy.cache.layer import Access
    from proxy.observe.record import Timer
    from proxy.request import Request
    from proxy.route.rules import RouteDecision

__all__ = ["NO_PARTS", "Reply", "error_message", "message_for", "query_failure"]

NO_PARTS: tuple[bytes, ...] = ()


class Reply:
    """The bytes to send for one request and what the operation record says of it."""

    __slots__ = ("access", "address", "body", "cluster", "collection", "command", "db",
                 "decision", "docs", "error_code", "name", "parts", "reply_bytes",
                 "request_sequences", "tenant", "timer")

    def __init__(self, parts: tuple[bytes, ...], timer: Timer | None = None,
                 name: str = "", command: Mapping[str, Any] | None = None,
                 request: Request | None = None) -> None:
        self.parts = parts
        self.timer = timer  # None: not an operation (handshake, wire error): not recorded
        self.name = name
        self.command = command
        self.request_sequences: Any = () if request is None else request.sequences
        self.db = None if request is None else request.db
        self.collection = None if request is None else request.collection
        self.address: Address | None = None
        self.error_code: int | None = None
        self.docs: int | None = None
        self.reply_bytes = 0
        self.decision: RouteDecision | None = None
        self.tenant: Any = None
        self.access: Access | None = None
        self.body: bytes | None = None  # the upstream reply's body (placement's writes)
        self.cluster: str | None = None  # tenant placement's cluster


def message_for(response_to: int, document: Mapping[str, Any]) -> bytes:
    """An OP_MSG reply carrying ``document``."""
    return encode_op_msg(next_request_id(), response_to, bson.encode(document))


def error_message(response_to: int, error: ProxyError,
                  command: Mapping[str, Any] | None = None,
                  retryable_writes: bool = False) -> bytes:
    """The one way an error becomes a reply; a failed exchange of a retryable write (when
    the upstream deduplicates them) or of a transaction statement carries the label
    drivers retry by."""
    labels = list(error.labels)
    if command is not None:
        labels += network_error_labels(command, retryable_writes)
    return message_for(response_to, error_document(error.code, error.code_name,
                                                   error.errmsg, labels))


def query_failure(response_to: int, error: ProxyError) -> bytes:
    """An OP_REPLY with QueryFailure, for a legacy OP_QUERY."""
    document = error.document()
    legacy = {"$err": document["errmsg"], **document}
    return encode_op_reply(next_request_id(), response_to, [bson.encode(legacy)],
                           flags=REPLY_FLAG_QUERY_FAILURE)
