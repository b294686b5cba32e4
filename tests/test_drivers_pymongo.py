"""pymongo (sync) through the proxy, compared with the same operations run directly.

Every test talks to the session FerretDB twice: through the proxy and on a direct
connection.  Writes go to separate databases (``<db_name>_p`` through the proxy,
``<db_name>_d`` directly) with fixed ``_id``s, so the two result sets can be compared
as they are, and the proxy's writes are then read back directly to prove they landed.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import bson
import pytest
from bson.binary import Binary
from pymongo import (
    ASCENDING,
    DeleteOne,
    InsertOne,
    MongoClient,
    ReadPreference,
    ReplaceOne,
    UpdateOne,
    WriteConcern,
)
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from tests.support import FerretDBProcess, ProxyProcess

Doc = dict[str, Any]
Client = MongoClient[Doc]

TIMEOUTS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 10_000,
    "connectTimeoutMS": 10_000,
    "socketTimeoutMS": 60_000,
}


class CommandRecorder(CommandListener):
    """Keeps every command a client sends (the command documents, as sent)."""

    def __init__(self) -> None:
        self.events: list[CommandStartedEvent] = []
        self.failures: list[CommandFailedEvent] = []

    def started(self, event: CommandStartedEvent) -> None:
        self.events.append(event)

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        self.failures.append(event)

    def commands(self, name: str) -> list[Doc]:
        return [dict(e.command) for e in self.events if e.command_name == name]

    def clear(self) -> None:
        self.events.clear()
        self.failures.clear()

    def failure_summary(self) -> list[str]:
        return [f"{e.command_name}: {e.failure}" for e in self.failures]


@pytest.fixture(scope="module")
def recorder() -> CommandRecorder:
    return CommandRecorder()


@pytest.fixture(scope="module")
def pclient(proxy: ProxyProcess, recorder: CommandRecorder) -> Iterator[Client]:
    """A client of the proxy (seen as a mongos: no directConnection)."""
    client: Client = MongoClient(proxy.uri, event_listeners=[recorder], **TIMEOUTS)
    yield client
    client.close()


@pytest.fixture(scope="module")
def dclient(ferretdb: FerretDBProcess) -> Iterator[Client]:
    """A direct client of the same FerretDB."""
    client: Client = MongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS)
    yield client
    client.close()


@pytest.fixture
def dbs(pclient: Client, dclient: Client, db_name: str) -> Iterator[tuple[Database[Doc], ...]]:
    """(through-proxy db, direct db, the proxy db seen directly)."""
    pname, dname = f"{db_name}_p", f"{db_name}_d"
    for name in (pname, dname):
        dclient.drop_database(name)
    yield pclient[pname], dclient[dname], dclient[pname]
    for name in (pname, dname):
        dclient.drop_database(name)


def both(
    dbs: tuple[Database[Doc], ...], fn: Callable[[Database[Doc]], Any]
) -> tuple[Any, Any]:
    """Run `fn` through the proxy and directly; return both results."""
    return fn(dbs[0]), fn(dbs[1])


def dump(coll: Collection[Doc]) -> list[Doc]:
    return list(coll.find({}, sort=[("_id", ASCENDING)]))


def proxy_log_tail(proxy: ProxyProcess, lines: int = 40) -> str:
    return "\n".join(proxy.log_text().splitlines()[-lines:])


# --------------------------------------------------------------------------- CRUD


def crud_sequence(db: Database[Doc]) -> list[Any]:
    c = db["people"]
    out: list[Any] = []
    r1 = c.insert_one({"_id": 1, "name": "ann", "age": 31, "tags": ["a", "b"]})
    out.append(("insert_one", r1.inserted_id, r1.acknowledged))
    r2 = c.insert_many(
        [{"_id": i, "name": f"p{i}", "age": 20 + i % 7, "grp": i % 3} for i in range(2, 30)]
    )
    out.append(("insert_many", r2.inserted_ids))
    out.append(("find_all", dump(c)))
    out.append(("find_filter", list(c.find({"age": {"$gte": 24}}, {"name": 1}).sort("_id", 1))))
    out.append(("find_one", c.find_one({"_id": 1})))
    out.append(("find_skip_limit", list(c.find().sort("_id", -1).skip(3).limit(5))))
    u1 = c.update_one({"_id": 1}, {"$set": {"age": 32}, "$push": {"tags": "c"}})
    out.append(("update_one", u1.matched_count, u1.modified_count, u1.upserted_id))
    u2 = c.update_many({"grp": 1}, {"$inc": {"age": 100}})
    out.append(("update_many", u2.matched_count, u2.modified_count))
    u3 = c.update_one({"_id": 999}, {"$set": {"name": "upserted"}}, upsert=True)
    out.append(("upsert", u3.matched_count, u3.modified_count, u3.upserted_id))
    r3 = c.replace_one({"_id": 2}, {"name": "replaced", "age": 1})
    out.append(("replace_one", r3.matched_count, r3.modified_count))
    d1 = c.delete_one({"_id": 3})
    out.append(("delete_one", d1.deleted_count))
    d2 = c.delete_many({"grp": 2})
    out.append(("delete_many", d2.deleted_count))
    d3 = c.delete_many({"nothing": "matches"})
    out.append(("delete_none", d3.deleted_count))
    out.append(("final", dump(c)))
    return out


def test_crud_matches_direct(dbs: tuple[Database[Doc], ...]) -> None:
    via_proxy, direct = both(dbs, crud_sequence)
    assert via_proxy == direct
    # Sanity: the sequence did something, and the proxy's writes are really stored.
    final = via_proxy[-1][1]
    assert any(d["_id"] == 999 for d in final)
    assert not any(d.get("grp") == 2 for d in final)
    assert dump(dbs[2]["people"]) == final


# ---------------------------------------------------------------------- bulk_write


def bulk_sequence(db: Database[Doc]) -> list[Any]:
    c = db["bulk"]
    out: list[Any] = []
    ops: list[Any] = [InsertOne({"_id": i, "v": i}) for i in range(50)]
    ops += [UpdateOne({"_id": i}, {"$set": {"v": -i}}) for i in range(0, 50, 5)]
    ops += [DeleteOne({"_id": i}) for i in range(1, 50, 7)]
    ops += [ReplaceOne({"_id": 2}, {"v": "r"}), UpdateOne({"_id": 500}, {"$set": {"v": 5}},
                                                           upsert=True)]
    res = c.bulk_write(ops)
    out.append(("ordered", res.bulk_api_result))
    # Unordered with a duplicate in the middle: the rest still applies.
    bad: list[Any] = [InsertOne({"_id": 1000}), InsertOne({"_id": 0}), InsertOne({"_id": 1001}),
                      DeleteOne({"_id": 4})]
    try:
        c.bulk_write(bad, ordered=False)
    except BulkWriteError as exc:
        details = dict(exc.details)
        for err in details.get("writeErrors", []):
            # The message names the namespace, which differs per side.
            err["errmsg"] = err["errmsg"].replace(db.name, "<db>")
            err.pop("op", None)
        out.append(("unordered_error", details))
    else:
        out.append(("unordered_error", None))
    out.append(("final", dump(c)))
    return out


def test_bulk_write_matches_direct(dbs: tuple[Database[Doc], ...]) -> None:
    via_proxy, direct = both(dbs, bulk_sequence)
    assert via_proxy == direct
    assert via_proxy[0][1]["nInserted"] == 50
    assert via_proxy[1][1] is not None, "the duplicate _id did not raise"
    assert via_proxy[1][1]["writeErrors"][0]["code"] == 11000
    assert dump(dbs[2]["bulk"]) == via_proxy[-1][1]


# -------------------------------------------------------------- cursors (getMore)


def test_10000_doc_cursor_batch_size_100(
    dbs: tuple[Database[Doc], ...], recorder: CommandRecorder
) -> None:
    pdb, _, pdb_direct = dbs
    n = 10_000
    res = pdb["big"].insert_many([{"_id": i, "pad": "x" * 20} for i in range(n)])
    assert len(res.inserted_ids) == n
    assert pdb_direct["big"].count_documents({}) == n

    recorder.clear()
    ids = [d["_id"] for d in pdb["big"].find({}, {"_id": 1}).sort("_id", 1).batch_size(100)]
    assert ids == list(range(n))
    get_mores = recorder.commands("getMore")
    assert len(get_mores) >= n // 100 - 1
    assert all(g["batchSize"] == 100 for g in get_mores)


# --------------------------------------------------------- reads: agg/count/distinct


def seed_sales(db: Database[Doc]) -> None:
    db["sales"].insert_many(
        [
            {"_id": i, "item": f"item{i % 5}", "qty": i % 11, "price": (i * 7) % 23,
             "region": ["n", "s", "e", "w"][i % 4]}
            for i in range(200)
        ]
    )


def test_aggregate_count_distinct_match_direct(dbs: tuple[Database[Doc], ...]) -> None:
    both(dbs, seed_sales)
    pipeline: list[Doc] = [
        {"$match": {"qty": {"$gte": 3}}},
        # (FerretDB 1.24 sums a constant {$sum: 1} to 0 next to a {$sum: "$field"}.)
        {"$group": {"_id": "$item", "total": {"$sum": "$qty"}}},
        {"$sort": {"total": -1, "_id": 1}},
    ]

    def reads(db: Database[Doc]) -> list[Any]:
        c = db["sales"]
        return [
            list(c.aggregate(pipeline)),
            list(c.aggregate(pipeline, batchSize=1)),  # getMore on an aggregate cursor
            c.count_documents({}),
            c.count_documents({"region": "n", "qty": {"$lt": 5}}),
            c.estimated_document_count(),
            sorted(c.distinct("item")),
            sorted(c.distinct("region", {"qty": 0})),
        ]

    via_proxy, direct = both(dbs, reads)
    assert via_proxy == direct
    totals: dict[str, int] = {}
    for i in range(200):
        if i % 11 >= 3:
            totals[f"item{i % 5}"] = totals.get(f"item{i % 5}", 0) + i % 11
    assert via_proxy[0] == [
        {"_id": k, "total": v} for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    assert via_proxy[0] == via_proxy[1]
    assert via_proxy[2] == 200
    assert via_proxy[5] == [f"item{i}" for i in range(5)]


def test_indexes_and_collection_names_match_direct(dbs: tuple[Database[Doc], ...]) -> None:
    def run(db: Database[Doc]) -> list[Any]:
        db["a"].insert_one({"_id": 1, "x": 1, "y": "a"})
        db["b"].insert_one({"_id": 1})
        db.create_collection("c")
        names = [
            db["a"].create_index([("x", ASCENDING)]),
            db["a"].create_index([("y", ASCENDING), ("x", -1)], name="y_x", unique=True),
        ]
        indexes = sorted(
            ({k: v for k, v in ix.items() if k != "ns"} for ix in db["a"].list_indexes()),
            key=lambda ix: str(ix["name"]),
        )
        info = db["a"].index_information()
        db["a"].drop_index("x_1")
        after_drop = sorted(ix["name"] for ix in db["a"].list_indexes())
        return [names, indexes, sorted(info), after_drop, sorted(db.list_collection_names())]

    via_proxy, direct = both(dbs, run)
    assert via_proxy == direct
    assert via_proxy[0] == ["x_1", "y_x"]
    assert via_proxy[3] == ["_id_", "y_x"]
    assert via_proxy[4] == ["a", "b", "c"]
    assert sorted(ix["name"] for ix in dbs[2]["a"].list_indexes()) == ["_id_", "y_x"]


def test_duplicate_key_error_equals_direct(
    pclient: Client, dclient: Client, db_name: str
) -> None:
    # Same namespace on both sides, so the messages must be identical.
    pcoll = pclient[db_name]["dup"]
    dcoll = dclient[db_name]["dup"]
    dcoll.insert_one({"_id": "k", "v": 1})

    with pytest.raises(DuplicateKeyError) as via_proxy:
        pcoll.insert_one({"_id": "k", "v": 2})
    with pytest.raises(DuplicateKeyError) as direct:
        dcoll.insert_one({"_id": "k", "v": 3})

    assert via_proxy.value.code == direct.value.code == 11000
    assert via_proxy.value.details is not None and direct.value.details is not None
    assert via_proxy.value.details["errmsg"] == direct.value.details["errmsg"]
    assert str(via_proxy.value) == str(direct.value)
    assert dcoll.find_one({"_id": "k"}) == {"_id": "k", "v": 1}

    # A unique secondary index violation via update, too (FerretDB reports this one as
    # an InternalError rather than 11000; whatever it says must reach the client as is).
    dcoll.create_index("u", unique=True)
    dcoll.insert_many([{"_id": 1, "u": 1}, {"_id": 2, "u": 2}])
    with pytest.raises(OperationFailure) as upd_proxy:
        pcoll.update_one({"_id": 2}, {"$set": {"u": 1}})
    with pytest.raises(OperationFailure) as upd_direct:
        dcoll.update_one({"_id": 2}, {"$set": {"u": 1}})
    assert upd_proxy.value.code == upd_direct.value.code
    assert upd_proxy.value.details == upd_direct.value.details
    pclient.drop_database(db_name)


# -------------------------------------------------------------------- big document


def test_document_near_16mb_round_trips(
    dbs: tuple[Database[Doc], ...], proxy: ProxyProcess
) -> None:
    pdb, _, pdb_direct = dbs
    payload = bytes(range(256)) * (15_900_000 // 256)
    doc: Doc = {"_id": "big", "blob": Binary(payload), "tail": "end"}
    assert 15_800_000 < len(bson.encode(doc)) < 16 * 1024 * 1024
    pdb["blobs"].insert_one(doc)
    back = pdb["blobs"].find_one({"_id": "big"})
    assert back is not None, proxy_log_tail(proxy)
    assert back["blob"] == payload
    assert back["tail"] == "end"
    stored = pdb_direct["blobs"].find_one({"_id": "big"})
    assert stored is not None and stored["blob"] == payload


# ------------------------------------------------------------ w=0 (moreToCome)


def test_unacknowledged_writes_land(
    dbs: tuple[Database[Doc], ...], recorder: CommandRecorder, proxy: ProxyProcess
) -> None:
    pdb, _, pdb_direct = dbs
    pdb["w0"].insert_one({"_id": -1})  # create the collection acknowledged
    recorder.clear()
    unacked = pdb["w0"].with_options(write_concern=WriteConcern(w=0))
    n = 300
    for i in range(n):
        res = unacked.insert_one({"_id": i, "v": i})
        assert res.acknowledged is False
    unacked.update_one({"_id": 0}, {"$set": {"v": "updated"}})
    unacked.delete_one({"_id": -1})

    # Acknowledged traffic right after must still get its own replies: an upstream that
    # answered a moreToCome message would desynchronise the pooled connection.
    for i in range(50):
        assert pdb["w0"].find_one({"_id": -2 - i}) is None
        assert pdb.command("ping")["ok"] == 1.0

    # Nor may they fail: a desynchronised upstream connection shows up as errors.
    failures = recorder.failure_summary()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pdb_direct["w0"].count_documents({}) == n and pdb_direct["w0"].find_one(
            {"_id": 0, "v": "updated"}
        ):
            break
        time.sleep(0.1)
    landed = pdb_direct["w0"].count_documents({})
    assert (landed, failures) == (n, []), proxy_log_tail(proxy)
    assert pdb_direct["w0"].find_one({"_id": 0}) == {"_id": 0, "v": "updated"}
    assert pdb_direct["w0"].find_one({"_id": -1}) is None
    # And the proxy still answers normally.
    assert pdb["w0"].count_documents({}) == n


# ------------------------------------------------------------------ compression


OP_MSG = 2013
OP_COMPRESSED = 2012
COMPRESSOR_IDS = {"snappy": 1, "zlib": 2, "zstd": 3}


def _compress(data: bytes, name: str) -> bytes:
    if name == "zlib":
        return zlib.compress(data)
    if name == "snappy":
        import snappy

        out: bytes = snappy.compress(data)
        return out
    from backports import zstd

    out = zstd.compress(data)
    return out


def _decompress(data: bytes, name: str) -> bytes:
    if name == "zlib":
        return zlib.decompress(data)
    if name == "snappy":
        import snappy

        out: bytes = snappy.uncompress(data)
        return out
    from backports import zstd

    out = zstd.decompress(data)
    return out


def _op_msg(request_id: int, doc: Doc) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def _recv(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    header = exactly(16)
    length, _, _, op_code = struct.unpack("<iiii", header)
    return op_code, exactly(length - 16)


def _op_msg_doc(body: bytes) -> Doc:
    assert body[4] == 0, "expected a kind-0 section"
    doc: Doc = bson.decode(body[5:])
    return doc


@pytest.mark.parametrize("compressor", ["zstd", "snappy", "zlib"])
def test_compression_round_trip(
    compressor: str, proxy: ProxyProcess, dclient: Client, db_name: str
) -> None:
    coll_name = f"comp_{compressor}"
    docs = [{"_id": i, "text": f"row {i} " + "lorem ipsum " * 40} for i in range(600)]
    dclient[db_name][coll_name].insert_many(docs)
    recorder = CommandRecorder()
    client: Client = MongoClient(
        proxy.uri, compressors=compressor, event_listeners=[recorder], **TIMEOUTS
    )
    try:
        hello = client.admin.command("hello")
        # The proxy repeats the negotiated compressor of this connection in hello.
        assert hello.get("compression") == [compressor]
        got = list(client[db_name][coll_name].find().sort("_id", 1).batch_size(200))
        assert got == docs
        assert len(recorder.commands("getMore")) >= 2
        client[db_name][coll_name].insert_one({"_id": "via", "c": compressor})
        assert dclient[db_name][coll_name].find_one({"_id": "via"}) == {
            "_id": "via", "c": compressor,
        }
    finally:
        client.close()

    # The same at the wire level: a compressed request gets a compressed reply.
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(_op_msg(1, {"hello": 1, "client": {"driver": {"name": "t",
                                 "version": "0"}}, "compression": [compressor],
                                 "$db": "admin"}))
        op, body = _recv(sock)
        assert op == OP_MSG
        assert _op_msg_doc(body).get("compression") == [compressor]

        inner = _op_msg(2, {"find": coll_name, "filter": {}, "sort": {"_id": 1},
                            "batchSize": 1000, "$db": db_name})
        payload = _compress(inner[16:], compressor)
        comp_body = struct.pack("<iiB", OP_MSG, len(inner) - 16, COMPRESSOR_IDS[compressor])
        comp_body += payload
        sock.sendall(struct.pack("<iiii", 16 + len(comp_body), 2, 0, OP_COMPRESSED) + comp_body)
        op, body = _recv(sock)
        assert op == OP_COMPRESSED, f"reply to a {compressor} request was not compressed"
        orig_op, size, comp_id = struct.unpack("<iiB", body[:9])
        assert orig_op == OP_MSG
        assert comp_id == COMPRESSOR_IDS[compressor]
        raw = _decompress(body[9:], compressor)
        assert len(raw) == size
        reply = _op_msg_doc(raw)
        assert reply["ok"] == 1.0
        batch = reply["cursor"]["firstBatch"]
        assert [d["_id"] for d in batch] == [*range(600), "via"][: len(batch)]
        assert len(batch) == 601
    dclient.drop_database(db_name)


# ------------------------------------------------------------ hello / handshake


def test_hello_presents_as_mongos(pclient: Client, dclient: Client) -> None:
    via_proxy = pclient.admin.command("hello")
    direct = dclient.admin.command("hello")
    assert via_proxy["msg"] == "isdbgrid"
    assert via_proxy["ok"] == 1.0
    assert via_proxy["maxWireVersion"] == direct["maxWireVersion"]
    assert via_proxy["minWireVersion"] == direct["minWireVersion"]
    assert via_proxy["maxBsonObjectSize"] == direct["maxBsonObjectSize"]
    assert via_proxy["maxMessageSizeBytes"] == direct["maxMessageSizeBytes"]
    assert via_proxy["maxWriteBatchSize"] == direct["maxWriteBatchSize"]
    assert isinstance(via_proxy["connectionId"], int)
    assert via_proxy.get("isWritablePrimary") is True
    assert "setName" not in via_proxy and "hosts" not in via_proxy
    legacy = pclient.admin.command("isMaster")
    assert legacy["msg"] == "isdbgrid" and legacy["ismaster"] is True
    # The driver took it for a mongos.
    assert pclient.topology_description.topology_type_name == "Sharded"


def test_sessions_and_retryable_writes(
    pclient: Client, dclient: Client, db_name: str, recorder: CommandRecorder
) -> None:
    coll = pclient[db_name]["sess"]
    assert pclient.options.retry_writes is True
    recorder.clear()
    with pclient.start_session() as s:
        coll.insert_one({"_id": 1, "v": "a"}, session=s)
        coll.insert_many([{"_id": 2}, {"_id": 3}], session=s)
        coll.update_one({"_id": 1}, {"$set": {"v": "b"}}, session=s)
        assert coll.find_one({"_id": 1}, session=s) == {"_id": 1, "v": "b"}
        assert list(coll.find({}, session=s).sort("_id", 1).batch_size(1)) == [
            {"_id": 1, "v": "b"}, {"_id": 2}, {"_id": 3},
        ]
        lsid = s.session_id
    inserts = recorder.commands("insert")
    assert len(inserts) == 2
    assert all(cmd["lsid"] == lsid for cmd in inserts)
    # Retryable writes (on by default against a mongos) carry a transaction number.
    txns = [cmd.get("txnNumber") for cmd in inserts + recorder.commands("update")]
    assert all(isinstance(t, int) for t in txns), txns
    assert len(set(txns)) == 3
    assert all(cmd["lsid"] == lsid for cmd in recorder.commands("getMore"))
    assert dclient[db_name]["sess"].count_documents({}) == 3
    pclient.drop_database(db_name)


def test_read_preference_secondary_preferred(
    pclient: Client, dclient: Client, db_name: str, recorder: CommandRecorder
) -> None:
    dclient[db_name]["rp"].insert_many([{"_id": i, "even": i % 2 == 0} for i in range(20)])
    coll = pclient[db_name]["rp"].with_options(
        read_preference=ReadPreference.SECONDARY_PREFERRED
    )
    recorder.clear()
    got = list(coll.find({"even": True}).sort("_id", 1))
    assert got == [{"_id": i, "even": True} for i in range(0, 20, 2)]
    assert coll.count_documents({"even": False}) == 10
    finds = recorder.commands("find")
    assert finds and finds[0]["$readPreference"] == {"mode": "secondaryPreferred"}
    pclient.drop_database(db_name)
