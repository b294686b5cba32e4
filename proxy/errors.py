"""MongoDB-style error replies built by the proxy itself: the one error family
(:class:`ProxyError`; the codec's ``WireError`` is one too) and the one code table.

Codes and names are the server's own (src/mongo/base/error_codes.yml), so drivers apply
their usual retry rules: HostUnreachable and NetworkTimeout are retryable reads, and the
``RetryableWriteError`` label makes a driver retry a write that carried a txnNumber.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import bson

INTERNAL_ERROR = (1, "InternalError")
BAD_VALUE = (2, "BadValue")
FAILED_TO_PARSE = (9, "FailedToParse")
TYPE_MISMATCH = (14, "TypeMismatch")
HOST_UNREACHABLE = (6, "HostUnreachable")
AUTHENTICATION_FAILED = (18, "AuthenticationFailed")
UNAUTHORIZED = (13, "Unauthorized")
PROTOCOL_ERROR = (17, "ProtocolError")
INVALID_BSON = (22, "InvalidBSON")
COMMAND_NOT_FOUND = (59, "CommandNotFound")
NETWORK_TIMEOUT = (89, "NetworkTimeout")
SHUTDOWN_IN_PROGRESS = (91, "ShutdownInProgress")
UNSUPPORTED_OP_QUERY = (352, "UnsupportedOpQueryCommand")
FAILED_TO_SATISFY_READ_PREFERENCE = (133, "FailedToSatisfyReadPreference")
MAX_STALENESS_OUT_OF_RANGE = (215, "MaxStalenessOutOfRange")
INVALID_NAMESPACE = (73, "InvalidNamespace")
CURSOR_NOT_FOUND = (43, "CursorNotFound")
CURSOR_IN_USE = (143, "CursorInUse")
EXCEEDED_MEMORY_LIMIT = (146, "ExceededMemoryLimit")
# Replies meaning "this server is no longer (or not) the primary": SDAM marks it
# Unknown so the next request selects again instead of waiting for a heartbeat.
NOT_PRIMARY_CODES = frozenset({10107, 13435, 13436, 189, 91, 11600, 11602})

RETRYABLE_WRITE_ERROR = "RetryableWriteError"
TRANSIENT_TRANSACTION_ERROR = "TransientTransactionError"


class ProxyError(Exception):
    """An error the proxy answers itself, instead of a server reply."""

    def __init__(
        self, code: tuple[int, str], errmsg: str, labels: Iterable[str] = ()
    ) -> None:
        super().__init__(errmsg)
        self.code, self.code_name = code
        self.errmsg = errmsg
        self.labels = tuple(labels)

    def document(self) -> dict[str, Any]:
        return error_document(self.code, self.code_name, self.errmsg, self.labels)


def error_document(
    code: int, code_name: str, errmsg: str, labels: Iterable[str] = ()
) -> dict[str, Any]:
    doc: dict[str, Any] = {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}
    labels = list(labels)
    if labels:
        doc["errorLabels"] = labels
    return doc


def network_error_labels(command: Mapping[str, Any], retryable_writes: bool = False
                         ) -> list[str]:
    """Labels mongos adds when the exchange with a shard failed at the network level.

    A retryable write (txnNumber outside a transaction) is safe to retry only because
    the server deduplicates it by txnNumber: so the label is given only when the
    upstream does (``retryable_writes``: a replica set or mongos; never a standalone
    server nor FerretDB, where a retry could apply the write twice). A transaction
    statement makes the whole transaction retryable. Anything else gets no label: the
    write may or may not have been applied.
    """
    if "txnNumber" not in command:
        return []
    if command.get("autocommit") is False:
        return [TRANSIENT_TRANSACTION_ERROR]
    return [RETRYABLE_WRITE_ERROR] if retryable_writes else []


def encode(doc: Mapping[str, Any]) -> bytes:
    return bson.encode(doc)
