"""Pinning: transactions stay on one server, cursors follow their owner, exhaust is refused.

FerretDB v1.24 has no transactions (and one FerretDB is one server), so for the routing
tests `mockupdb` servers stand in for the upstream: two of them present themselves as
mongos routers (``msg: "isdbgrid"``), the proxy is given both in its uri, its topology
is Sharded and every statement could go to either. Each mock records every command it
receives with the ``lsid`` / ``txnNumber`` it carried, so a test can tell which server
the proxy chose for each statement.

The exhaust tests use the real session FerretDB behind the session proxy: the proxy
clears ``exhaustAllowed`` before forwarding, so the upstream never streams replies into
a pooled connection and the client falls back to ordinary getMore round trips.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import bson
import pymongo.common
import pymongo.message
import pytest
from bson.int64 import Int64
from mockupdb import MockupDB
from pymongo import CursorType, MongoClient
from pymongo.errors import InvalidOperation

from tests.support import ProxyFactory, ProxyProcess

pytestmark = pytest.mark.timeout(120)

HEARTBEAT_MS = 500
# Wide enough that both mocks are always inside the latency window.
LOCAL_THRESHOLD_MS = 1000
TRANSACTIONS = 16
PLAIN_FINDS = 40
CURSOR_IDS = {"A": 12345, "B": 67890}

OP_MSG = 2013
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16


@dataclass(frozen=True)
class Seen:
    """One command a mock received."""

    name: str
    lsid: bytes | None
    txn_number: int | None
    autocommit: bool | None
    doc: dict[str, Any]
    flags: int  # OP_MSG flagBits as the router received them


def _session_id(doc: dict[str, Any]) -> bytes | None:
    lsid = doc.get("lsid")
    if not isinstance(lsid, dict):
        return None
    raw = lsid.get("id")
    if isinstance(raw, uuid.UUID):
        return raw.bytes
    if isinstance(raw, bytes):
        return bytes(raw)
    return None


class Mongos:
    """One mockupdb server playing a mongos router.

    ``find`` opens a cursor with this router's id (when ``open_cursors``) or answers
    an empty, closed cursor; ``getMore`` of its own cursor answers the last batch, of
    any other id CursorNotFound (43), as a real router would.
    """

    def __init__(self, name: str, open_cursors: bool = False) -> None:
        self.name = name
        self.cursor_id = CURSOR_IDS[name]
        self.open_cursors = open_cursors
        self.hellos = 0
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self.server = MockupDB(auto_ismaster=False, request_timeout=5)
        # One handler for everything, so nothing is ever left waiting in mockupdb's queue.
        self.server.autoresponds(self._handle)
        self.server.run()

    @property
    def address(self) -> str:
        return str(self.server.address_string)

    def hello(self) -> dict[str, Any]:
        return {
            "helloOk": True,
            "isWritablePrimary": True,
            "ismaster": True,
            "msg": "isdbgrid",
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
        }

    def _handle(self, request: Any) -> bool:
        name = str(request.command_name or "")
        doc = dict(request.doc)
        if name.lower() in ("hello", "ismaster"):
            with self._lock:
                self.hellos += 1
            return bool(request.replies(self.hello()))
        autocommit = doc.get("autocommit")
        txn = doc.get("txnNumber")
        with self._lock:
            self._seen.append(Seen(
                name,
                _session_id(doc),
                int(txn) if txn is not None else None,
                bool(autocommit) if autocommit is not None else None,
                doc,
                int(request.flags or 0),
            ))
        namespace = f"{doc.get('$db')}.{doc.get(name)}"
        if name == "insert":
            return bool(request.replies(n=len(doc.get("documents", []))))
        if name == "update":
            n = len(doc.get("updates", []))
            return bool(request.replies(n=n, nModified=n))
        if name == "find":
            if not self.open_cursors:
                return bool(request.replies(cursor={"id": Int64(0), "firstBatch": [],
                                                    "ns": namespace}))
            return bool(request.replies(cursor={
                "id": Int64(self.cursor_id),
                "firstBatch": [{"who": self.name, "i": 0}, {"who": self.name, "i": 1}],
                "ns": namespace,
            }))
        if name == "getMore":
            if int(doc["getMore"]) != self.cursor_id:
                return bool(request.replies(ok=0, code=43, codeName="CursorNotFound",
                                            errmsg=f"cursor id {doc['getMore']} not found"))
            ns = f"{doc.get('$db')}.{doc.get('collection')}"
            return bool(request.replies(cursor={
                "id": Int64(0),
                "nextBatch": [{"who": self.name, "i": 2}, {"who": self.name, "i": 3}],
                "ns": ns,
            }))
        if name == "killCursors":
            ids = [int(i) for i in doc.get("cursors", [])]
            mine = [Int64(i) for i in ids if i == self.cursor_id]
            others = [Int64(i) for i in ids if i != self.cursor_id]
            return bool(request.replies(cursorsKilled=mine, cursorsNotFound=others,
                                        cursorsAlive=[], cursorsUnknown=[]))
        # commitTransaction, abortTransaction, endSessions, ...
        return bool(request.replies(ok=1))

    def seen(self, name: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if name is None or s.name == name]

    def stop(self) -> None:
        self.server.stop()


class Routers:
    def __init__(self, open_cursors: bool) -> None:
        self.a = Mongos("A", open_cursors)
        self.b = Mongos("B", open_cursors)
        self.all = (self.a, self.b)
        self.uri = f"mongodb://{self.a.address},{self.b.address}/"

    def by_name(self, name: str) -> Mongos:
        return self.a if name == "A" else self.b

    def stop(self) -> None:
        for m in self.all:
            m.stop()


def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _start(routers: Routers, proxy_factory: ProxyFactory) -> ProxyProcess:
    proxy = proxy_factory(routers.uri, {"upstream": {
        "heartbeat_ms": HEARTBEAT_MS,
        "local_threshold_ms": LOCAL_THRESHOLD_MS,
        "server_selection_timeout_ms": 5000,
    }})
    # The proxy serves once one router is known; wait until its monitor has seen both
    # (a second heartbeat to each means the first one was processed).
    _eventually(lambda: all(m.hellos >= 2 for m in routers.all),
                "the proxy's monitor has checked both routers")
    return proxy


def _client(proxy: ProxyProcess) -> MongoClient[dict[str, Any]]:
    # No driver retries: each operation is exactly one request to the proxy.
    return MongoClient(proxy.uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=10_000,
                       retryWrites=False, retryReads=False)


@pytest.fixture
def txn_routers() -> Iterator[Routers]:
    routers = Routers(open_cursors=False)
    try:
        yield routers
    finally:
        routers.stop()


@pytest.fixture
def cursor_routers() -> Iterator[Routers]:
    routers = Routers(open_cursors=True)
    try:
        yield routers
    finally:
        routers.stop()


def _statements_by_transaction(routers: Routers) -> dict[tuple[bytes, int], set[str]]:
    """(lsid, txnNumber) -> the routers that received any statement of it."""
    where: dict[tuple[bytes, int], set[str]] = {}
    for m in routers.all:
        for s in m.seen():
            if s.autocommit is False and s.lsid is not None and s.txn_number is not None:
                where.setdefault((s.lsid, s.txn_number), set()).add(m.name)
    return where


def _transaction_statements(m: Mongos, key: tuple[bytes, int]) -> list[str]:
    return [s.name for s in m.seen() if (s.lsid, s.txn_number) == key
            and s.autocommit is False]


# --- 1. transactions ------------------------------------------------------------------


def test_transaction_statements_pin_to_one_router(
    txn_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(txn_routers, proxy_factory)
    client = _client(proxy)
    try:
        coll = client.db.c
        for t in range(TRANSACTIONS):
            with client.start_session() as s, s.start_transaction():
                coll.insert_one({"_id": f"{t}-0"}, session=s)
                coll.find_one({"_id": f"{t}-0"}, session=s)
                coll.update_one({"_id": f"{t}-0"}, {"$set": {"x": 1}}, session=s)
                coll.insert_one({"_id": f"{t}-1"}, session=s)
                coll.find_one({"_id": f"{t}-1"}, session=s)
                coll.update_one({"_id": f"{t}-1"}, {"$set": {"x": 2}}, session=s)
        # Without pinning, these spread over both routers.
        for _ in range(PLAIN_FINDS):
            coll.find_one({})
    finally:
        client.close()

    where = _statements_by_transaction(txn_routers)
    assert len(where) == TRANSACTIONS, where
    split = {key: names for key, names in where.items() if len(names) != 1}
    assert split == {}, f"transactions whose statements went to more than one router: {split}"
    for key, names in where.items():
        owner = txn_routers.by_name(next(iter(names)))
        statements = _transaction_statements(owner, key)
        assert statements == ["insert", "find", "update", "insert", "find", "update",
                              "commitTransaction"], (owner.name, statements)
        first = next(s for s in owner.seen() if (s.lsid, s.txn_number) == key)
        assert first.doc.get("startTransaction") is True
    # Both routers took transactions (each starts on a random router: 2**-15 to miss).
    owners = [next(iter(names)) for names in where.values()]
    assert set(owners) == {"A", "B"}, owners

    plain = {m.name: sum(1 for s in m.seen("find") if s.autocommit is None)
             for m in txn_routers.all}
    assert sum(plain.values()) == PLAIN_FINDS
    assert plain["A"] > 0 and plain["B"] > 0, plain


def test_aborted_transaction_abort_reaches_the_same_router(
    txn_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(txn_routers, proxy_factory)
    client = _client(proxy)
    try:
        coll = client.db.c
        for t in range(8):
            with client.start_session() as s:
                s.start_transaction()
                coll.insert_one({"_id": t}, session=s)
                coll.find_one({"_id": t}, session=s)
                coll.update_one({"_id": t}, {"$set": {"x": 1}}, session=s)
                s.abort_transaction()
    finally:
        client.close()

    where = _statements_by_transaction(txn_routers)
    assert len(where) == 8, where
    for key, names in where.items():
        assert len(names) == 1, f"{key}: statements on {names}"
        owner = txn_routers.by_name(next(iter(names)))
        assert _transaction_statements(owner, key) == [
            "insert", "find", "update", "abortTransaction"
        ]
    assert not any(m.seen("commitTransaction") for m in txn_routers.all)


def test_commit_sent_again_reaches_the_same_router(
    txn_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    """Calling commit_transaction again after it succeeded re-sends commitTransaction
    with the same lsid/txnNumber; the session is still pinned to its mongos (the
    transactions spec unpins only on the next transaction, a non-transaction operation,
    abort, or a TransientTransactionError / UnknownTransactionCommitResult), so the
    proxy, acting as that mongos, must send it to the router that ran the transaction."""
    proxy = _start(txn_routers, proxy_factory)
    client = _client(proxy)
    try:
        for t in range(10):
            with client.start_session() as s:
                s.start_transaction()
                client.db.c.insert_one({"_id": t}, session=s)
                s.commit_transaction()
                s.commit_transaction()
    finally:
        client.close()

    where = _statements_by_transaction(txn_routers)
    assert len(where) == 10, where
    split = {key: {m.name: _transaction_statements(m, key) for m in txn_routers.all}
             for key, names in where.items() if len(names) != 1}
    assert split == {}, f"the repeated commitTransaction went to another router: {split}"


# --- 2. cursors -----------------------------------------------------------------------


def _getmores_by_router(routers: Routers) -> dict[str, list[int]]:
    return {m.name: [int(s.doc["getMore"]) for s in m.seen("getMore")] for m in routers.all}


def test_getmore_follows_its_cursor(
    cursor_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(cursor_routers, proxy_factory)
    client = _client(proxy)
    try:
        for _ in range(20):
            docs = list(client.db.c.find({}).batch_size(2))
            # The whole cursor came from the router that opened it.
            assert len(docs) == 4, docs
            assert len({d["who"] for d in docs}) == 1, docs
    finally:
        client.close()

    finds = {m.name: len(m.seen("find")) for m in cursor_routers.all}
    assert finds["A"] > 0 and finds["B"] > 0, finds  # 2**-19 to miss either
    getmores = _getmores_by_router(cursor_routers)
    assert getmores["A"] == [CURSOR_IDS["A"]] * finds["A"], getmores
    assert getmores["B"] == [CURSOR_IDS["B"]] * finds["B"], getmores


def test_kill_cursors_reaches_the_owner(
    cursor_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(cursor_routers, proxy_factory)
    client = _client(proxy)
    try:
        for _ in range(12):
            cursor = client.db.c.find({}).batch_size(2)
            first = next(cursor)
            cursor.close()  # still open on the router: the driver sends killCursors
            owner = cursor_routers.by_name(first["who"])
            other = cursor_routers.b if owner is cursor_routers.a else cursor_routers.a
            assert owner.seen("killCursors"), f"killCursors never reached {owner.name}"
            killed = [int(i) for s in owner.seen("killCursors") for i in s.doc["cursors"]]
            assert killed[-1] == owner.cursor_id
            assert all(int(i) != owner.cursor_id
                       for s in other.seen("killCursors") for i in s.doc["cursors"])
    finally:
        client.close()
    assert all(m.seen("killCursors") for m in cursor_routers.all)
    assert not any(m.seen("getMore") for m in cursor_routers.all)


def test_cursor_of_a_departed_client_is_killed_on_its_owner(
    cursor_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    """A client that disconnects with a cursor open: the proxy kills it on its router."""
    proxy = _start(cursor_routers, proxy_factory)
    owners: list[str] = []
    for _ in range(8):
        with _RawClient(proxy) as raw:
            reply = raw.command({"find": "c", "batchSize": 2, "$db": "db"})
            assert reply.doc["cursor"]["id"] != 0, reply.doc
            owners.append(reply.doc["cursor"]["firstBatch"][0]["who"])
        owner = cursor_routers.by_name(owners[-1])
        expected = owners.count(owner.name)

        def killed_on_owner(o: Mongos = owner, n: int = expected) -> bool:
            return len(o.seen("killCursors")) == n

        _eventually(killed_on_owner,
                    f"the proxy killed the departed client's cursor on {owner.name}")
    for m in cursor_routers.all:
        killed = [int(i) for s in m.seen("killCursors") for i in s.doc["cursors"]]
        assert killed == [m.cursor_id] * owners.count(m.name), (m.name, killed, owners)


# --- 3. exhaust cursors against FerretDB ---------------------------------------------


@dataclass(frozen=True)
class Reply:
    request_id: int
    response_to: int
    flags: int
    doc: dict[str, Any]


class _RawClient:
    """OP_MSG over a plain socket, so the flag bits of each reply can be inspected."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
        self._next_id = 1

    def __enter__(self) -> _RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, command: dict[str, Any], flags: int = 0) -> int:
        request_id = self._next_id
        self._next_id += 1
        body = struct.pack("<I", flags) + b"\x00" + bson.encode(command)
        header = struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG)
        self.sock.sendall(header + body)
        return request_id

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            data += chunk
        return data

    def read(self) -> Reply:
        length, request_id, response_to, op_code = struct.unpack(
            "<iiii", self._read_exactly(16)
        )
        assert op_code == OP_MSG, op_code
        body = self._read_exactly(length - 16)
        (flags,) = struct.unpack_from("<I", body)
        assert body[4] == 0, "first section is not a body section"
        doc_len = struct.unpack_from("<i", body, 5)[0]
        doc = bson.decode(body[5:5 + doc_len])
        return Reply(request_id, response_to, flags, doc)

    def command(self, command: dict[str, Any], flags: int = 0) -> Reply:
        request_id = self.send(command, flags)
        reply = self.read()
        assert reply.response_to == request_id, (reply, request_id)
        return reply

    def nothing_more_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1)  # data, or b"" if the proxy closed the connection
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)
        return False


EXHAUST_DOCS = 500


@pytest.fixture
def filled(proxy: ProxyProcess, db_name: str) -> Iterator[str]:
    client: MongoClient[dict[str, Any]] = MongoClient(proxy.uri)
    try:
        client.drop_database(db_name)
        client[db_name].c.insert_many([{"_id": i, "pad": "x" * 100}
                                       for i in range(EXHAUST_DOCS)])
        yield db_name
        client.drop_database(db_name)
    finally:
        client.close()


def test_exhaust_cursor_falls_back_to_getmore(
    proxy: ProxyProcess, filled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(proxy.uri, socketTimeoutMS=10_000)
    try:
        wire = client.admin.command("hello")["maxWireVersion"]
        coll = client[filled].c
        if wire < pymongo.common.MONGOS_EXHAUST_WIRE_VERSION:
            # The proxy presents itself as mongos with the upstream's wire version
            # (FerretDB v1.24: 21, MongoDB 7.0), and pymongo refuses exhaust cursors on
            # a mongos older than 7.1 before sending anything. That gate is the
            # driver's, so lift it to exercise the proxy's own exhaust handling.
            with pytest.raises(InvalidOperation, match=r"7\.1"):
                list(coll.find(cursor_type=CursorType.EXHAUST).batch_size(10))
            monkeypatch.setattr(pymongo.message, "MONGOS_EXHAUST_WIRE_VERSION", 0)
        docs = list(coll.find(cursor_type=CursorType.EXHAUST).batch_size(10).sort("_id", 1))
        assert [d["_id"] for d in docs] == list(range(EXHAUST_DOCS))
        # The connection the exhaust cursor used is healthy and in sync afterwards.
        assert coll.count_documents({}) == EXHAUST_DOCS
        assert client.admin.command("ping")["ok"] == 1
    finally:
        client.close()


def test_exhaust_allowed_getmore_gets_exactly_one_reply(
    proxy: ProxyProcess, filled: str
) -> None:
    with _RawClient(proxy) as raw:
        first = raw.command({"find": "c", "batchSize": 10, "sort": {"_id": 1}, "$db": filled})
        assert first.doc.get("ok") == 1, first.doc
        cursor_id = first.doc["cursor"]["id"]
        assert cursor_id != 0
        assert [d["_id"] for d in first.doc["cursor"]["firstBatch"]] == list(range(10))

        more = raw.command(
            {"getMore": Int64(cursor_id), "collection": "c", "batchSize": 10, "$db": filled},
            flags=FLAG_EXHAUST_ALLOWED,
        )
        assert more.doc.get("ok") == 1, more.doc
        assert not more.flags & FLAG_MORE_TO_COME, f"flagBits {more.flags:#x}"
        assert [d["_id"] for d in more.doc["cursor"]["nextBatch"]] == list(range(10, 20))
        assert more.doc["cursor"]["id"] == cursor_id
        # Exactly one reply: nothing else is streamed after it.
        assert raw.nothing_more_within(1.0), "a second reply followed the exhaust getMore"

        # The connection is still in step: the next request gets its own reply.
        again = raw.command(
            {"getMore": Int64(cursor_id), "collection": "c", "batchSize": 10, "$db": filled},
            flags=FLAG_EXHAUST_ALLOWED,
        )
        assert not again.flags & FLAG_MORE_TO_COME
        assert [d["_id"] for d in again.doc["cursor"]["nextBatch"]] == list(range(20, 30))
        killed = raw.command({"killCursors": "c", "cursors": [Int64(cursor_id)],
                              "$db": filled})
        assert killed.doc.get("ok") == 1, killed.doc


def test_upstream_never_sees_exhaust_allowed(
    cursor_routers: Routers, proxy_factory: ProxyFactory
) -> None:
    """FerretDB v1.24 ignores exhaustAllowed, so the tests above would pass even if the
    proxy forwarded it; the routers here record the flag bits they receive."""
    proxy = _start(cursor_routers, proxy_factory)
    with _RawClient(proxy) as raw:
        first = raw.command({"find": "c", "batchSize": 2, "$db": "db"})
        cursor_id = first.doc["cursor"]["id"]
        more = raw.command(
            {"getMore": Int64(cursor_id), "collection": "c", "batchSize": 2, "$db": "db"},
            flags=FLAG_EXHAUST_ALLOWED,
        )
        assert more.doc.get("ok") == 1, more.doc
        assert not more.flags & FLAG_MORE_TO_COME, f"flagBits {more.flags:#x}"
        assert raw.nothing_more_within(0.5)
    getmores = [s for m in cursor_routers.all for s in m.seen("getMore")]
    assert len(getmores) == 1, getmores
    assert getmores[0].flags & FLAG_EXHAUST_ALLOWED == 0, f"flagBits {getmores[0].flags:#x}"
