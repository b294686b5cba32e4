"""What a failed exchange may do next (proxy/upstream/failover.py) and which labels a
network failure carries (proxy/errors.py), as pure functions: the integration tests
are tests/test_failover.py (FerretDB) and tests/test_failover_election.py (mockupdb)."""

from __future__ import annotations

import uuid
from typing import Any

import bson
import pytest
from bson.binary import Binary
from bson.int64 import Int64

from proxy.errors import network_error_labels
from proxy.request import Request, request_from_op_msg
from proxy.route.readpref import PRIMARY
from proxy.route.rules import RouteDecision
from proxy.upstream.failover import NO_RETRY, RETRY_READ, RETRY_WRITE, retry_kind
from proxy.wire import encode_op_msg, parse_op_msg

SESSION = {"id": Binary(uuid.uuid4().bytes, 4)}
PLAIN = RouteDecision("default", None, None, PRIMARY)


def parse(doc: dict[str, Any], flags: int = 0) -> Request:
    message = encode_op_msg(7, 0, bson.encode(doc), flags=flags)
    return request_from_op_msg(message, parse_op_msg(message), None)


def kind(doc: dict[str, Any], retryable_writes: bool = True,
         decision: RouteDecision = PLAIN, flags: int = 0) -> int:
    return retry_kind(parse({**doc, "$db": "d"}, flags), decision, retryable_writes)


@pytest.mark.parametrize("doc", [
    {"find": "c"}, {"count": "c"}, {"distinct": "c", "key": "a"},
    {"aggregate": "c", "pipeline": [{"$match": {}}], "cursor": {}},
    {"listCollections": 1}, {"listIndexes": "c"}, {"listDatabases": 1},
])
def test_reads_are_retried_once(doc: dict[str, Any]) -> None:
    assert kind(doc) == RETRY_READ
    assert kind(doc, retryable_writes=False) == RETRY_READ


def test_aggregate_with_output_stage_is_a_write() -> None:
    for stage in ({"$out": "o"}, {"$merge": {"into": "o"}}):
        assert kind({"aggregate": "c", "pipeline": [stage], "cursor": {}}) == NO_RETRY


def test_retryable_write_only_where_deduplicated() -> None:
    write = {"insert": "c", "documents": [{}], "lsid": SESSION, "txnNumber": Int64(3)}
    assert kind(write, retryable_writes=True) == RETRY_WRITE
    assert kind(write, retryable_writes=False) == NO_RETRY  # a standalone, FerretDB
    assert kind({"insert": "c", "documents": [{}]}) == NO_RETRY  # no txnNumber: never


def test_never_in_a_transaction_nor_pinned_nor_unacknowledged() -> None:
    in_txn = {"find": "c", "lsid": SESSION, "txnNumber": Int64(1), "autocommit": False}
    assert kind(in_txn) == NO_RETRY
    for pinned in ("cursor", "transaction"):
        decision = RouteDecision("default", None, None, PRIMARY, pinned=pinned)
        assert kind({"find": "c"}, decision=decision) == NO_RETRY
    assert kind({"getMore": Int64(5), "collection": "c"}) == NO_RETRY
    assert kind({"insert": "c", "documents": [{}], "lsid": SESSION, "txnNumber": Int64(1)},
                flags=1 << 1) == NO_RETRY  # moreToCome


def test_labels_follow_the_upstream() -> None:
    write = {"insert": "c", "lsid": SESSION, "txnNumber": Int64(1)}
    assert network_error_labels(write, retryable_writes=True) == ["RetryableWriteError"]
    assert network_error_labels(write, retryable_writes=False) == []
    assert network_error_labels({"insert": "c"}, retryable_writes=True) == []
    in_txn = {**write, "autocommit": False}
    for retryable in (True, False):
        assert network_error_labels(in_txn, retryable) == ["TransientTransactionError"]
