"""Many client connections at once through one proxy: mixed reads and writes all succeed.

The clients spread over a few collections: FerretDB (SQLite) scans a collection for any
filter other than ``_id``, so one big collection would make the test slow rather than
concurrent.  The mixed test reads its cursors in one batch; the second test holds
hundreds of multi-batch cursors open at once, which FerretDB pays for with one of its 100
per-database SQLite connections each: the proxy must keep part of each pool for the
getMores that release them, or every pooled connection ends up waiting inside FerretDB.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection

from tests.support import FerretDBProcess, ProxyFactory

Doc = dict[str, Any]

CLIENTS = 500
INSERTS_PER_CLIENT = 4
COLLECTIONS = 25


def healthz(admin_url: str) -> Doc:
    with urllib.request.urlopen(f"{admin_url}/healthz", timeout=5) as resp:
        doc: Doc = json.loads(resp.read())
        return doc


async def test_500_concurrent_clients_mixed_reads_and_writes(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri)
    setup: MongoClient[Doc] = MongoClient(ferretdb.uri, directConnection=True)
    with setup as direct:
        direct.drop_database(db_name)
        for j in range(COLLECTIONS):
            direct[db_name][f"conc{j}"].insert_many(
                [{"_id": f"seed-{i}", "c": -1, "v": i} for i in range(2)]
            )

    clients: list[AsyncMongoClient[Doc]] = [
        AsyncMongoClient(
            proxy.uri,
            maxPoolSize=1,
            serverSelectionTimeoutMS=30_000,
            connectTimeoutMS=30_000,
            socketTimeoutMS=60_000,
            heartbeatFrequencyMS=60_000,
            appname=f"conc-{i}",
        )
        for i in range(CLIENTS)
    ]
    errors: list[str] = []
    done_ops = 0

    async def connect(i: int) -> None:
        try:
            assert (await clients[i].admin.command("ping"))["ok"] == 1.0
        except Exception as exc:
            errors.append(f"client {i} connect: {exc!r}")

    async def work(i: int, start: asyncio.Event) -> None:
        nonlocal done_ops
        coll = clients[i][db_name][f"conc{i % COLLECTIONS}"]
        await start.wait()
        try:
            for k in range(INSERTS_PER_CLIENT):
                _id = f"{i:04d}-{k}"
                res = await coll.insert_one({"_id": _id, "c": i, "k": k})
                assert res.inserted_id == _id
                assert await coll.find_one({"_id": _id}) == {"_id": _id, "c": i, "k": k}
                done_ops += 2
            mine = await coll.find({"c": i}).sort("k", 1).to_list()
            assert [d["k"] for d in mine] == list(range(INSERTS_PER_CLIENT)), mine
            seed = await coll.find_one({"_id": f"seed-{i % 2}"})
            assert seed is not None and seed["v"] == i % 2
            n = await coll.count_documents({"c": i})
            assert n == INSERTS_PER_CLIENT
            done_ops += 3
        except Exception as exc:
            errors.append(f"client {i}: {exc!r}")

    started = time.monotonic()
    try:
        await asyncio.gather(*(connect(i) for i in range(CLIENTS)))
        assert errors == [], errors[:10]
        # Every client holds its connection(s) open now.
        assert healthz(proxy.admin_url)["client_connections"] >= CLIENTS

        start = asyncio.Event()
        tasks = [asyncio.create_task(work(i, start)) for i in range(CLIENTS)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    elapsed = time.monotonic() - started

    log_tail = "\n".join(proxy.log_text().splitlines()[-30:])
    assert errors == [], f"{len(errors)} clients failed, e.g. {errors[:5]}\n{log_tail}"
    assert done_ops == CLIENTS * (2 * INSERTS_PER_CLIENT + 3)
    check: MongoClient[Doc] = MongoClient(ferretdb.uri, directConnection=True)
    with check as direct:
        colls: list[Collection[Doc]] = [direct[db_name][f"conc{j}"] for j in range(COLLECTIONS)]
        inserted = sum(c.count_documents({"c": {"$gte": 0}}) for c in colls)
        assert inserted == CLIENTS * INSERTS_PER_CLIENT
        assert sum(c.count_documents({}) for c in colls) == inserted + 2 * COLLECTIONS
        for i in range(0, CLIENTS, 37):  # spot checks of single clients' documents
            found = colls[i % COLLECTIONS].find({"c": i}, sort=[("k", 1)]).to_list()
            assert [d["_id"] for d in found] == [
                f"{i:04d}-{k}" for k in range(INSERTS_PER_CLIENT)
            ]
        direct.drop_database(db_name)
    assert elapsed < 60, f"took {elapsed:.1f}s"


async def test_500_clients_with_open_multi_batch_cursors(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, {"upstream": {"pool": {"max_size": 100}}})
    with MongoClient(ferretdb.uri, directConnection=True) as direct:
        direct.drop_database(db_name)
        direct[db_name]["c"].insert_many([{"_id": f"k{i:02d}", "v": i} for i in range(20)])

    async def read_all() -> list[Doc]:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            proxy.uri, maxPoolSize=1, serverSelectionTimeoutMS=30_000,
            socketTimeoutMS=60_000, heartbeatFrequencyMS=60_000,
        )
        try:
            return [d async for d in client[db_name]["c"].find({}).sort("_id").batch_size(2)]
        finally:
            await client.close()

    results = await asyncio.wait_for(
        asyncio.gather(*(read_all() for _ in range(CLIENTS)), return_exceptions=True),
        timeout=120,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], f"{len(errors)} clients failed, e.g. {errors[:3]}"
    expected = [{"_id": f"k{i:02d}", "v": i} for i in range(20)]
    assert all(r == expected for r in results)
