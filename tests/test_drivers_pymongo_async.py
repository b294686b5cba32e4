"""pymongo's AsyncMongoClient through the proxy, compared with a direct connection.

Writes go to ``<db_name>_p`` through the proxy and ``<db_name>_d`` directly, with fixed
``_id``s; results are compared as they are and the proxy's writes are read back directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pymongo import ASCENDING, AsyncMongoClient, DeleteOne, InsertOne, ReplaceOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from tests.support import FerretDBProcess, ProxyProcess

Doc = dict[str, Any]
Client = AsyncMongoClient[Doc]
Db = AsyncDatabase[Doc]

TIMEOUTS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 10_000,
    "connectTimeoutMS": 10_000,
    "socketTimeoutMS": 60_000,
}


class CommandRecorder(CommandListener):
    """Keeps every command a client sends, and every failed one."""

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


class Sides:
    """The proxy client and the direct client, with this test's databases."""

    def __init__(self, pclient: Client, dclient: Client, db_name: str) -> None:
        self.pclient = pclient
        self.dclient = dclient
        self.pname = f"{db_name}_p"
        self.dname = f"{db_name}_d"

    @property
    def pdb(self) -> Db:
        """The proxy's database, through the proxy."""
        return self.pclient[self.pname]

    @property
    def ddb(self) -> Db:
        """The direct side's database."""
        return self.dclient[self.dname]

    @property
    def pdb_direct(self) -> Db:
        """The proxy's database, read directly."""
        return self.dclient[self.pname]

    async def both(self, fn: Callable[[Db], Awaitable[Any]]) -> tuple[Any, Any]:
        return await fn(self.pdb), await fn(self.ddb)


@pytest.fixture
def recorder() -> CommandRecorder:
    return CommandRecorder()


@pytest.fixture
async def sides(
    proxy: ProxyProcess, ferretdb: FerretDBProcess, db_name: str, recorder: CommandRecorder
) -> AsyncIterator[Sides]:
    pclient: Client = AsyncMongoClient(proxy.uri, event_listeners=[recorder], **TIMEOUTS)
    dclient: Client = AsyncMongoClient(ferretdb.uri, directConnection=True, **TIMEOUTS)
    s = Sides(pclient, dclient, db_name)
    for name in (s.pname, s.dname):
        await dclient.drop_database(name)
    try:
        yield s
    finally:
        for name in (s.pname, s.dname):
            await dclient.drop_database(name)
        await pclient.close()
        await dclient.close()


async def dump(coll: AsyncCollection[Doc]) -> list[Doc]:
    return await coll.find({}, sort=[("_id", ASCENDING)]).to_list()


async def test_crud_matches_direct(sides: Sides, recorder: CommandRecorder) -> None:
    async def run(db: Db) -> list[Any]:
        c = db["people"]
        out: list[Any] = []
        r1 = await c.insert_one({"_id": 1, "name": "ann", "age": 31})
        out.append(("insert_one", r1.inserted_id))
        r2 = await c.insert_many(
            [{"_id": i, "name": f"p{i}", "age": 20 + i % 7, "grp": i % 3} for i in range(2, 40)]
        )
        out.append(("insert_many", r2.inserted_ids))
        out.append(("find", await c.find({"age": {"$gt": 22}}).sort("_id", -1).to_list()))
        out.append(("find_one", await c.find_one({"_id": 5}, {"name": 1})))
        u1 = await c.update_one({"_id": 1}, {"$set": {"age": 32}})
        out.append(("update_one", u1.matched_count, u1.modified_count))
        u2 = await c.update_many({"grp": 1}, {"$inc": {"age": 100}})
        out.append(("update_many", u2.matched_count, u2.modified_count))
        u3 = await c.update_one({"_id": 777}, {"$set": {"x": 1}}, upsert=True)
        out.append(("upsert", u3.upserted_id))
        r3 = await c.replace_one({"_id": 2}, {"name": "replaced"})
        out.append(("replace_one", r3.matched_count, r3.modified_count))
        out.append(("delete_one", (await c.delete_one({"_id": 3})).deleted_count))
        out.append(("delete_many", (await c.delete_many({"grp": 2})).deleted_count))
        out.append(("final", await dump(c)))
        return out

    via_proxy, direct = await sides.both(run)
    assert via_proxy == direct
    assert via_proxy[-1][1] == await dump(sides.pdb_direct["people"])
    assert any(d["_id"] == 777 for d in via_proxy[-1][1])
    assert recorder.failures == []


async def test_bulk_write_matches_direct(sides: Sides) -> None:
    async def run(db: Db) -> list[Any]:
        c = db["bulk"]
        ops: list[Any] = [InsertOne({"_id": i, "v": i}) for i in range(40)]
        ops += [UpdateOne({"_id": i}, {"$set": {"v": -i}}) for i in range(0, 40, 4)]
        ops += [DeleteOne({"_id": i}) for i in range(1, 40, 6)]
        ops += [ReplaceOne({"_id": 2}, {"v": "r"})]
        res = await c.bulk_write(ops)
        try:
            await c.bulk_write([InsertOne({"_id": 100}), InsertOne({"_id": 0}),
                                InsertOne({"_id": 101})], ordered=False)
        except BulkWriteError as exc:
            errors = [(e["index"], e["code"]) for e in exc.details["writeErrors"]]
            n_inserted = exc.details["nInserted"]
        else:
            errors, n_inserted = [], -1
        return [res.bulk_api_result, errors, n_inserted, await dump(c)]

    via_proxy, direct = await sides.both(run)
    assert via_proxy == direct
    assert via_proxy[0]["nInserted"] == 40
    assert via_proxy[1] == [(1, 11000)]
    assert via_proxy[2] == 2
    assert via_proxy[3] == await dump(sides.pdb_direct["bulk"])


async def test_10000_doc_cursor_batch_size_100(sides: Sides, recorder: CommandRecorder) -> None:
    n = 10_000
    res = await sides.pdb["big"].insert_many([{"_id": i, "pad": "y" * 20} for i in range(n)])
    assert len(res.inserted_ids) == n
    assert await sides.pdb_direct["big"].count_documents({}) == n

    recorder.events.clear()
    ids: list[int] = []
    async for doc in sides.pdb["big"].find({}, {"_id": 1}).sort("_id", 1).batch_size(100):
        ids.append(doc["_id"])
    assert ids == list(range(n))
    get_mores = recorder.commands("getMore")
    assert len(get_mores) >= n // 100 - 1
    assert all(g["batchSize"] == 100 for g in get_mores)
    assert recorder.failures == []


async def test_aggregate_count_distinct_match_direct(sides: Sides) -> None:
    async def seed(db: Db) -> None:
        await db["sales"].insert_many(
            [{"_id": i, "item": f"item{i % 6}", "qty": i % 9, "region": "nsew"[i % 4]}
             for i in range(150)]
        )

    await sides.both(seed)
    pipeline: list[Doc] = [
        {"$match": {"qty": {"$gte": 2}}},
        {"$group": {"_id": "$item", "total": {"$sum": "$qty"}}},
        {"$sort": {"total": -1, "_id": 1}},
    ]

    async def reads(db: Db) -> list[Any]:
        c = db["sales"]
        return [
            await (await c.aggregate(pipeline)).to_list(),
            await (await c.aggregate(pipeline, batchSize=2)).to_list(),
            await c.count_documents({}),
            await c.count_documents({"region": "e"}),
            sorted(await c.distinct("item")),
            sorted(await c.distinct("qty", {"region": "n"})),
        ]

    via_proxy, direct = await sides.both(reads)
    assert via_proxy == direct
    totals: dict[str, int] = {}
    for i in range(150):
        if i % 9 >= 2:
            totals[f"item{i % 6}"] = totals.get(f"item{i % 6}", 0) + i % 9
    expected = [
        {"_id": k, "total": v} for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    assert via_proxy[0] == expected
    assert via_proxy[1] == expected
    assert via_proxy[2] == 150
    assert via_proxy[4] == [f"item{i}" for i in range(6)]


async def test_indexes_match_direct(sides: Sides) -> None:
    async def run(db: Db) -> list[Any]:
        await db["a"].insert_one({"_id": 1, "x": 1})
        await db["b"].insert_one({"_id": 1})
        name = await db["a"].create_index([("x", ASCENDING)], unique=True)
        indexes = [
            {k: v for k, v in ix.items() if k != "ns"}
            for ix in await (await db["a"].list_indexes()).to_list()
        ]
        indexes.sort(key=lambda ix: str(ix["name"]))
        return [name, indexes, sorted(await db.list_collection_names())]

    via_proxy, direct = await sides.both(run)
    assert via_proxy == direct
    assert via_proxy[0] == "x_1"
    assert [ix["name"] for ix in via_proxy[1]] == ["_id_", "x_1"]
    assert via_proxy[2] == ["a", "b"]


async def test_duplicate_key_error_equals_direct(sides: Sides) -> None:
    # Same namespace on both sides, so the messages must be identical.
    pcoll = sides.pdb["dup"]
    dcoll = sides.pdb_direct["dup"]
    await dcoll.insert_one({"_id": 7})
    with pytest.raises(DuplicateKeyError) as via_proxy:
        await pcoll.insert_one({"_id": 7})
    with pytest.raises(DuplicateKeyError) as direct:
        await dcoll.insert_one({"_id": 7})
    assert via_proxy.value.code == direct.value.code == 11000
    assert via_proxy.value.details == direct.value.details
    assert str(via_proxy.value) == str(direct.value)
