"""A replica-set primary change behind the proxy, played by mockupdb.

FerretDB has no replica sets, no elections and no retryable-write deduplication, so
two ``mockupdb`` servers play a two-member replica set ``rs`` here; the proxy discovers
it from its uri (pymongo's SDAM). Each member records what it receives, so a test can
tell where the proxy sent each attempt of a request. The primary answers
``NotWritablePrimary`` (or drops the connection) and from then on reports itself
secondary while the other member reports itself primary, as after an election.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson.binary import UUID_SUBTYPE, Binary
from bson.int64 import Int64
from mockupdb import MockupDB

from proxy.wire import HEADER_SIZE, decode_body, encode_op_msg, parse_op_msg
from tests.support import ProxyFactory, ProxyProcess

pytestmark = pytest.mark.timeout(120)

Doc = dict[str, Any]
_ids = itertools.count(90_000)


class Member:
    """One mockupdb replica-set member; ``fault`` says what it does to the next write or
    read: "not_primary" (reply NotWritablePrimary), "hangup" (close the connection);
    either way the election happens (the other member becomes primary)."""

    def __init__(self, name: str, rs: ReplicaSet) -> None:
        self.name = name
        self.rs = rs
        self.fault: str | None = None
        self.seen: list[Doc] = []
        self._lock = threading.Lock()
        self.server = MockupDB(auto_ismaster=False, request_timeout=5)
        self.server.autoresponds(self._handle)
        self.server.run()

    @property
    def address(self) -> str:
        return str(self.server.address_string)

    def _handle(self, request: Any) -> bool:
        name = str(request.command_name or "")
        if name.lower() in ("hello", "ismaster"):
            return bool(request.replies(self.rs.hello(self)))
        doc = dict(request.doc)
        with self._lock:
            self.seen.append(doc)
            fault, self.fault = self.fault, None
        if fault is not None:
            self.rs.elect(self.rs.other(self))
            if fault == "hangup":
                return bool(request.hangup())
            return bool(request.replies(ok=0, code=10107, codeName="NotWritablePrimary",
                                        errmsg="not primary"))
        if name == "insert":
            return bool(request.replies(n=len(doc.get("documents", []))))
        if name == "find":
            return bool(request.replies(cursor={
                "id": Int64(0), "firstBatch": [{"who": self.name}],
                "ns": f"{doc.get('$db')}.{doc.get('find')}"}))
        return bool(request.replies(ok=1))

    def received(self, name: str) -> list[Doc]:
        with self._lock:
            return [d for d in self.seen if name in d]


class ReplicaSet:
    def __init__(self) -> None:
        self.a = Member("A", self)
        self.b = Member("B", self)
        self.primary = self.a
        self.uri = f"mongodb://{self.a.address},{self.b.address}/?replicaSet=rs"

    def other(self, member: Member) -> Member:
        return self.b if member is self.a else self.a

    def elect(self, member: Member) -> None:
        self.primary = member

    def hello(self, member: Member) -> Doc:
        primary = member is self.primary
        return {
            "ok": 1, "helloOk": True, "isWritablePrimary": primary, "ismaster": primary,
            "secondary": not primary, "setName": "rs", "setVersion": 1,
            "hosts": [self.a.address, self.b.address], "me": member.address,
            "primary": self.primary.address, "minWireVersion": 0, "maxWireVersion": 21,
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000, "logicalSessionTimeoutMinutes": 30,
        }

    def stop(self) -> None:
        self.a.server.stop()
        self.b.server.stop()


@pytest.fixture
def rs() -> Iterator[ReplicaSet]:
    replica_set = ReplicaSet()
    yield replica_set
    replica_set.stop()


@pytest.fixture
def rs_proxy(rs: ReplicaSet, proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(rs.uri, {"upstream": {
        "heartbeat_ms": 500, "server_selection_timeout_ms": 10_000,
        "pool": {"connect_timeout_ms": 1000}}})


def command(proxy: ProxyProcess, doc: Doc) -> Doc:
    """One OP_MSG on a fresh socket (no driver: its own retries would hide the proxy's)."""
    rid = next(_ids)
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as sock:
        sock.sendall(encode_op_msg(rid, 0, bson.encode(doc)))
        header = _recv(sock, HEADER_SIZE)
        length = struct.unpack("<i", header[:4])[0]
        message = header + _recv(sock, length - HEADER_SIZE)
    return decode_body(parse_op_msg(message))


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def retryable_insert(_id: str) -> Doc:
    return {"insert": "c", "documents": [{"_id": _id}], "$db": "d",
            "lsid": {"id": Binary(uuid.uuid4().bytes, UUID_SUBTYPE)}, "txnNumber": Int64(1)}


def warm(rs: ReplicaSet, proxy: ProxyProcess) -> None:
    """The proxy has discovered A as primary (a find reaches it)."""
    assert command(proxy, {"find": "c", "$db": "d"})["ok"] == 1.0
    assert rs.a.received("find")


@pytest.mark.parametrize("fault", ["not_primary", "hangup"])
def test_retryable_write_goes_to_the_new_primary(
    rs: ReplicaSet, rs_proxy: ProxyProcess, fault: str
) -> None:
    warm(rs, rs_proxy)
    rs.a.fault = fault
    reply = command(rs_proxy, retryable_insert("x"))
    assert reply["ok"] == 1.0, reply
    first, = rs.a.received("insert")
    retried, = rs.b.received("insert")
    # The same statement: the new primary deduplicates it by (lsid, txnNumber).
    assert retried["lsid"] == first["lsid"] and retried["txnNumber"] == first["txnNumber"]


def test_write_without_txn_number_is_never_retried(
    rs: ReplicaSet, rs_proxy: ProxyProcess
) -> None:
    warm(rs, rs_proxy)
    rs.a.fault = "not_primary"
    reply = command(rs_proxy, {"insert": "c", "documents": [{"_id": 1}], "$db": "d"})
    assert reply["ok"] == 0.0 and reply["code"] == 10107, reply  # the driver's to handle
    assert len(rs.a.received("insert")) == 1
    assert not rs.b.received("insert")
    # The next write waits for the election's outcome and goes to the new primary.
    reply = command(rs_proxy, {"insert": "c", "documents": [{"_id": 2}], "$db": "d"})
    assert reply["ok"] == 1.0, reply
    assert len(rs.b.received("insert")) == 1


def test_write_without_txn_number_after_hangup_gets_no_label(
    rs: ReplicaSet, rs_proxy: ProxyProcess
) -> None:
    warm(rs, rs_proxy)
    rs.a.fault = "hangup"
    reply = command(rs_proxy, {"insert": "c", "documents": [{"_id": 1}], "$db": "d"})
    assert reply["ok"] == 0.0 and reply["code"] == 6, reply
    assert "RetryableWriteError" not in reply.get("errorLabels", []), reply
    assert not rs.b.received("insert")


def test_read_retried_once_on_a_fresh_server(rs: ReplicaSet, rs_proxy: ProxyProcess) -> None:
    warm(rs, rs_proxy)
    rs.a.fault = "hangup"
    reply = command(rs_proxy, {"find": "c", "$db": "d"})
    assert reply["ok"] == 1.0, reply
    assert reply["cursor"]["firstBatch"] == [{"who": "B"}]


def test_second_failure_carries_the_label_for_a_replica_set(
    rs: ReplicaSet, rs_proxy: ProxyProcess
) -> None:
    """A replica set deduplicates retryable writes: when the proxy's one retry fails too,
    the client gets RetryableWriteError and may retry itself."""
    warm(rs, rs_proxy)
    rs.a.fault = "hangup"
    rs.b.fault = "hangup"
    reply = command(rs_proxy, retryable_insert("y"))
    assert reply["ok"] == 0.0 and reply["code"] == 6, reply
    assert "RetryableWriteError" in reply.get("errorLabels", []), reply
    assert len(rs.a.received("insert")) == 1 and len(rs.b.received("insert")) == 1
