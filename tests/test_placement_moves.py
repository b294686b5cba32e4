"""Online tenant moves (docs/placement.md, "Moving a tenant online"): the mover
(``python -m proxy move-tenant``, a real subprocess, SIGKILLed at each step) against two
real FerretDB servers and a real Redis, while a stand-in instance writes: a real
:class:`PlacementAgent` asked exactly as the pipeline asks it, the writes sent through the
real :class:`Roundtrip` of the tenant's cluster. Afterwards the target holds exactly what
the writer had acknowledged, the source none of it, and the other tenant is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
import pytest
import yaml
from bson import ObjectId
from pymongo import MongoClient
from redis import Redis

from proxy.config import Config, load_config
from proxy.errors import ProxyError
from proxy.placement.agent import PlacementAgent
from proxy.placement.clusters import cluster_roundtrip
from proxy.placement.directory import cluster_of
from proxy.placement.mover import PAUSE_ENV, Mover
from proxy.placement.shared import Keys, parse_state
from proxy.request import request_from_command
from proxy.route.cursors import CursorTable
from proxy.upstream.roundtrip import Roundtrip
from tests.support import FerretDBFactory, FerretDBProcess, RedisFactory, RedisProcess

ROOT = Path(__file__).resolve().parent.parent
DB = "shop"
Doc = dict[str, Any]


@dataclass
class Setup:
    home: FerretDBProcess
    eu: FerretDBProcess
    redis: RedisProcess
    path: Path
    config: Config
    clients: dict[str, MongoClient[Doc]] = field(default_factory=dict)

    def direct(self, cluster: str) -> MongoClient[Doc]:
        if cluster not in self.clients:
            uri = self.home.uri if cluster == "home" else self.eu.uri
            self.clients[cluster] = MongoClient(uri)
        return self.clients[cluster]

    def docs(self, cluster: str, coll: str, tenant: str) -> dict[Any, Doc]:
        found = self.direct(cluster)[DB][coll].find({"tenant_id": tenant})
        return {_key(d["_id"]): d for d in found}

    def state(self) -> Any:
        client = Redis.from_url(self.redis.url)
        try:
            return parse_state(client.get(Keys(self.config.placement.key_prefix).state))
        finally:
            client.close()


def _key(value: Any) -> Any:
    return bson.encode({"_id": value})  # ints and strings of equal look stay apart


@pytest.fixture
def setup(ferretdb_factory: FerretDBFactory, redis_factory: RedisFactory,
          tmp_path: Path) -> Iterator[Setup]:
    home, eu, redis = ferretdb_factory(), ferretdb_factory(), redis_factory()
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "upstream": {"uri": home.uri},
        "tenancy": {"mode": "enforce", "field": "tenant_id"},
        "placement": {"clusters": {"eu": {"uri": eu.uri}}, "redis_url": redis.url,
                      "key_prefix": "mp:", "refresh_ms": 50, "lease_ms": 1000,
                      "hold_timeout_ms": 8000},
    }))
    result = Setup(home, eu, redis, path, load_config(path))
    _seed(result.direct("home"))
    yield result
    for client in result.clients.values():
        client.close()


def _seed(client: MongoClient[Doc]) -> None:
    db = client[DB]
    ids: list[Any] = [*range(60), *(f"s{i}" for i in range(60)), *(ObjectId() for _ in range(60))]
    db.orders.insert_many([{"_id": i, "tenant_id": "a", "n": n, "k": n % 7}
                           for n, i in enumerate(ids)])
    db.orders.insert_many([{"tenant_id": "b", "n": n} for n in range(50)])
    db.orders.create_index([("tenant_id", 1), ("k", 1)], name="tenant_k")
    db.items.insert_many([{"_id": 1000 + n, "tenant_id": "a", "x": "y" * n} for n in range(40)])
    db.tenants.insert_one({"_id": "a", "name": "Acme"})  # exempt: not moved


# -- the stand-in instance -------------------------------------------------------------


class Instance:
    """What a proxy's pipeline does for a write, with a real agent and real roundtrips."""

    def __init__(self, setup: Setup, name: str = "i1") -> None:
        placement = setup.config.placement
        self.agent = PlacementAgent(placement, name)
        cursors = CursorTable()
        self.roundtrips: dict[str, Roundtrip] = {
            "home": cluster_roundtrip("home", setup.config.upstream, cursors),
            "eu": cluster_roundtrip("eu", placement.clusters["eu"], cursors)}

    async def start(self) -> None:
        for roundtrip in self.roundtrips.values():
            await roundtrip.topology.start()
        await self.agent.start()

    async def close(self) -> None:
        await self.agent.close()
        for roundtrip in self.roundtrips.values():
            await roundtrip.pools.close()
            await roundtrip.topology.close()

    def cluster(self, tenant: str) -> str:
        return cluster_of(tenant, {}, (), self.agent.state.overrides)

    async def write(self, tenant: str, command: Doc) -> Doc:
        command = {**command, "$db": DB}
        request = request_from_command(command)
        ticket = None
        if self.agent.gated(tenant):
            ticket = await self.agent.before_write(
                tenant, request, command, (), self.roundtrips[self.cluster(tenant)])
        try:
            reply = await self.roundtrips[self.cluster(tenant)].command(DB, command)
        except BaseException:
            await self.agent.after_write(ticket, None)
            raise
        await self.agent.after_write(ticket, b"\0\0\0\0\0" + bson.encode(reply))
        assert reply.get("ok") and not reply.get("writeErrors"), reply
        return reply


@dataclass
class Writer:
    """Writes of tenant ``a`` (inserts, updates by _id and by filter, deletes, upserts)
    and of tenant ``b``; ``model`` is what was acknowledged."""

    instance: Instance
    model: dict[Any, Doc]
    errors: list[str] = field(default_factory=list)
    b_errors: list[str] = field(default_factory=list)
    count: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            try:
                await self._one(i)
                self.count += 1
            except ProxyError as exc:  # not sent: the model is unchanged
                self.errors.append(exc.errmsg)
            try:
                await self.instance.write("b", {"insert": "orders", "documents": [
                    {"_id": f"b{i}", "tenant_id": "b"}]})
            except ProxyError as exc:
                self.b_errors.append(exc.errmsg)
            await asyncio.sleep(0.002)

    async def _one(self, i: int) -> None:
        write = self.instance.write
        existing = list(self.model)
        op = i % 5
        if op == 0 or not existing:
            doc = {"_id": f"w{i}", "tenant_id": "a", "n": i, "k": i % 7}
            await write("a", {"insert": "orders", "documents": [doc]})
            self.model[_key(doc["_id"])] = doc
        elif op == 1:
            key = existing[(i * 7919) % len(existing)]
            target = self.model[key]
            await write("a", {"update": "orders", "updates": [
                {"q": {"_id": target["_id"]}, "u": {"$set": {"n": -i}}}]})
            target["n"] = -i
        elif op == 2:  # by a filter that is not an _id: the agent finds the ids
            await write("a", {"update": "orders", "updates": [
                {"q": {"tenant_id": "a", "k": i % 7}, "u": {"$inc": {"n": 1}}, "multi": True}]})
            for doc in self.model.values():
                if doc.get("k") == i % 7:
                    doc["n"] += 1
        elif op == 3:
            key = existing[(i * 104729) % len(existing)]
            await write("a", {"delete": "orders", "deletes": [
                {"q": {"_id": self.model[key]["_id"]}, "limit": 1}]})
            del self.model[key]
        else:  # an upsert whose _id the server makes: only the reply names it
            reply = await write("a", {"update": "orders", "updates": [
                {"q": {"tenant_id": "a", "u": i}, "u": {"$set": {"n": i}}, "upsert": True}]})
            new_id = reply["upserted"][0]["_id"]
            self.model[_key(new_id)] = {"_id": new_id, "tenant_id": "a", "u": i, "n": i}


def _model(setup: Setup) -> dict[Any, Doc]:
    return setup.docs("home", "orders", "a")


@contextlib.asynccontextmanager
async def writing(setup: Setup) -> AsyncIterator[Writer]:
    instance = Instance(setup)
    await instance.start()
    writer = Writer(instance, _model(setup))
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        await asyncio.sleep(0.2)
        yield writer
    finally:
        stop.set()
        await task
        await instance.close()


async def move(setup: Setup, *args: str, pause: str | None = None) -> tuple[int, str]:
    """Run ``python -m proxy move-tenant``; with ``pause``, SIGKILL it once it has paused
    after that step (returns -9)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if pause is not None:
        env[PAUSE_ENV] = pause
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "move-tenant", "--config", str(setup.path), *args,
        "--batch", "25", "--settle-ms", "100", "--hold-ms", "3000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    async for raw in proc.stdout:
        line = raw.decode()
        lines.append(line)
        if pause is not None and f"paused after {pause}" in line:
            proc.send_signal(signal.SIGKILL)
            break
    code = await proc.wait()
    return code, "".join(lines)


def _assert_moved(setup: Setup, writer: Writer | None, before_items: dict[Any, Doc]) -> None:
    state = setup.state()
    assert state.overrides == {"a": "eu"} and state.moves == {}
    if writer is not None:
        assert setup.docs("eu", "orders", "a") == writer.model
        assert writer.b_errors == []
    assert setup.docs("eu", "items", "a") == before_items
    assert setup.docs("home", "orders", "a") == {} and setup.docs("home", "items", "a") == {}
    assert setup.direct("home")[DB].orders.count_documents({"tenant_id": "b"}) >= 50
    assert setup.direct("eu")[DB].orders.count_documents({"tenant_id": "b"}) == 0
    assert setup.direct("eu")[DB].tenants.count_documents({}) == 0  # exempt
    names = {ix["name"] for ix in setup.direct("eu")[DB].orders.list_indexes()}
    assert "tenant_k" in names


# -- tests -----------------------------------------------------------------------------------


def test_move_without_traffic(setup: Setup) -> None:
    """Copy, verify, switch and cleanup of a tenant with mixed _id types; the other
    tenant and the exempt collection stay; a leftover on the target is removed."""
    orders, items = _model(setup), setup.docs("home", "items", "a")
    # A leftover of the tenant on the target (not its data: it lives home) goes.
    setup.direct("eu")[DB].orders.insert_one({"_id": "stale", "tenant_id": "a"})
    mover = Mover(setup.config, "a")
    try:
        assert mover.run("eu") == 0
    finally:
        mover.close()
    assert setup.docs("eu", "orders", "a") == orders
    _assert_moved(setup, None, items)


async def test_move_under_writes(setup: Setup) -> None:
    items = setup.docs("home", "items", "a")
    async with writing(setup) as writer:
        code, out = await move(setup, "a", "--to", "eu")
        assert code == 0, out
        await asyncio.sleep(0.3)  # writes after the switch go to eu
    assert writer.count > 50
    _assert_moved(setup, writer, items)


STEPS = ["tracking", "copy-batch", "copy", "catch-up", "hold", "drained", "switch", "verify"]


@pytest.mark.parametrize("step", STEPS)
async def test_sigkill_at_each_step_then_resume(setup: Setup, step: str) -> None:
    """A crash at any step leaves one cluster serving and nothing lost; running the
    command again finishes the move."""
    items = setup.docs("home", "items", "a")
    async with writing(setup) as writer:
        code, out = await move(setup, "a", "--to", "eu", pause=step)
        assert code == -signal.SIGKILL, out
        await asyncio.sleep(0.5)  # writes go on meanwhile (a hold expires after 3 s)
        serving = writer.instance.cluster("a")
        assert serving == ("eu" if step in ("switch", "verify") else "home")
        code, out = await move(setup, "a", "--to", "eu")
        assert code == 0, out
        await asyncio.sleep(0.3)
    _assert_moved(setup, writer, items)


async def test_abort_during_copy_and_during_hold(setup: Setup) -> None:
    """--abort: the tenant stays home, the target's copy is gone, held writes go home."""
    async with writing(setup) as writer:
        code, out = await move(setup, "a", "--to", "eu", pause="copy-batch")
        assert code == -signal.SIGKILL
        code, out = await move(setup, "a", "--status")
        assert code == 0 and "phase=copy" in out and "to=eu" in out, out
        code, out = await move(setup, "a", "--abort")
        assert code == 0 and "aborted" in out, out
        assert setup.docs("eu", "orders", "a") == {}
        code, out = await move(setup, "a", "--to", "eu", pause="hold")
        assert code == -signal.SIGKILL
        before = writer.count
        await asyncio.sleep(0.3)
        assert writer.count <= before + 1  # held
        code, out = await move(setup, "a", "--abort")
        assert code == 0, out
        await asyncio.sleep(0.5)
        assert writer.count > before + 1  # released to home
    state = setup.state()
    assert state.moves == {} and state.overrides == {}
    assert setup.docs("home", "orders", "a") == writer.model
    assert setup.docs("eu", "orders", "a") == {} and setup.docs("eu", "items", "a") == {}
    assert writer.errors == []


async def test_abort_after_switch_is_refused(setup: Setup) -> None:
    code, out = await move(setup, "a", "--to", "eu", pause="switch")
    assert code == -signal.SIGKILL
    code, out = await move(setup, "a", "--abort")
    assert code == 2 and "move the tenant back with --to home" in out, out
    assert setup.state().overrides == {"a": "eu"}


async def test_verify_detects_a_tampered_target(setup: Setup) -> None:
    code, out = await move(setup, "a", "--to", "eu", pause="switch")
    assert code == -signal.SIGKILL
    one = next(iter(setup.docs("eu", "items", "a").values()))
    setup.direct("eu")[DB].items.update_one({"_id": one["_id"]}, {"$set": {"x": "tampered"}})
    code, out = await move(setup, "a", "--to", "eu")
    assert code == 1 and "VERIFY FAILED" in out and f"{DB}.items" in out, out
    assert setup.state().moves["a"]["phase"] == "verify-failed"
    assert len(setup.docs("home", "items", "a")) == 40  # the source copy is kept
    setup.direct("eu")[DB].items.replace_one({"_id": one["_id"]}, one)
    code, out = await move(setup, "a", "--to", "eu")
    assert code == 0, out
    assert setup.docs("home", "items", "a") == {}


async def test_lease_refuses_writes_without_the_state(setup: Setup) -> None:
    """An instance that cannot read the state refuses writes (retryable, not sent)."""
    setup.redis.stop()
    instance = Instance(setup)
    await instance.start()
    try:
        assert instance.agent.gated("b")
        command = {"insert": "orders", "documents": [{"tenant_id": "b"}], "$db": DB,
                   "txnNumber": 1, "lsid": {"id": bson.Binary(b"0" * 16, 4)}}
        with pytest.raises(ProxyError) as caught:
            await instance.agent.before_write("b", request_from_command(command), command,
                                              (), instance.roundtrips["home"])
        assert caught.value.code == 189 and "lease_ms" in caught.value.errmsg
        assert caught.value.labels == ("RetryableWriteError",)
        setup.redis.start()
        for _ in range(100):
            if not instance.agent.gated("b"):
                break
            await asyncio.sleep(0.05)
        assert not instance.agent.gated("b")
    finally:
        await instance.close()


def test_check_config_shows_overrides_and_moves(setup: Setup) -> None:
    import subprocess

    mover = Mover(setup.config, "a")
    try:
        assert mover.run("eu") == 0
    finally:
        mover.close()
    Mover(setup.config, "b").store.set_move({"phase": "copy", "from": "home", "to": "eu"})
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(setup.path)],
                         capture_output=True, text=True, env={**os.environ,
                                                              "PYTHONPATH": str(ROOT)},
                         check=True).stdout
    assert "override: tenant a -> eu" in out
    assert "move in progress: tenant b home -> eu, phase copy" in out


async def test_transaction_statements_stay_in_flight_until_the_commit(setup: Setup) -> None:
    """A transaction's statement is applied at the commit: its in-flight entry stays
    until commitTransaction passes (which is never held, nor are the transaction's
    further statements), so the mover's drain waits for it. (FerretDB has no
    transactions: the agent is driven directly; Redis is real.)"""
    instance = Instance(setup)
    await instance.start()
    keys = Keys(setup.config.placement.key_prefix)
    client = Redis.from_url(setup.redis.url)
    try:
        Mover(setup.config, "a").store.set_move({"phase": "copy", "from": "home", "to": "eu"})
        await instance.agent.refresh()
        lsid = {"id": bson.Binary(b"1" * 16, 4)}
        statement = {"update": "orders", "updates": [{"q": {"_id": 7}, "u": {"$set": {"n": 1}}}],
                     "$db": DB, "lsid": lsid, "txnNumber": 3, "autocommit": False,
                     "startTransaction": True}
        ticket = await instance.agent.before_write(
            "a", request_from_command(statement), statement, (), instance.roundtrips["home"])
        await instance.agent.after_write(ticket, None)
        assert client.hlen(keys.inflight("a")) == 1  # still in flight: not committed
        Mover(setup.config, "a").store.set_move({"phase": "hold", "hold_until_ms": 2**50})
        await instance.agent.refresh()
        second = {**statement, "updates": [{"q": {"_id": 8}, "u": {"$set": {"n": 1}}}]}
        del second["startTransaction"]
        ticket = await asyncio.wait_for(instance.agent.before_write(
            "a", request_from_command(second), second, (), instance.roundtrips["home"]), 5)
        assert ticket is not None  # its transaction is in flight already: not held
        await instance.agent.after_write(ticket, None)
        assert client.hlen(keys.inflight("a")) == 2
        commit = {"commitTransaction": 1, "$db": "admin", "lsid": lsid, "txnNumber": 3,
                  "autocommit": False}
        ticket = await asyncio.wait_for(instance.agent.before_write(
            "a", request_from_command(commit), commit, (), instance.roundtrips["home"]), 5)
        assert ticket is not None  # not held
        await instance.agent.after_write(ticket, None)
        assert client.hlen(keys.inflight("a")) == 0
        member = f"{DB}.orders".encode() + b"\0" + bson.encode({"_id": 7}).hex().encode()
        assert client.sismember(keys.dirty("a"), member)
    finally:
        client.close()
        await instance.close()


async def test_held_write_waits_then_fails_retryably(setup: Setup) -> None:
    """A write of a held tenant waits for the switch at most hold_timeout_ms, then
    fails retryably without being sent; an expired hold lets writes through (tracked)."""
    placement = setup.config.placement.model_copy(update={"hold_timeout_ms": 300})
    agent = PlacementAgent(placement, "i2")
    await agent.start()
    store = Mover(setup.config, "a").store
    roundtrip = cluster_roundtrip("home", setup.config.upstream, CursorTable())  # _ids known
    try:
        until = store.now_ms() + 60_000
        store.set_move({"phase": "hold", "from": "home", "to": "eu", "hold_until_ms": until})
        await agent.refresh()
        command = {"insert": "orders", "documents": [{"_id": "h1", "tenant_id": "a"}],
                   "$db": DB}
        request = request_from_command(command)
        with pytest.raises(ProxyError) as caught:
            await agent.before_write("a", request, command, (), roundtrip)
        assert caught.value.code == 189 and "being moved" in caught.value.errmsg
        store.set_move({"hold_until_ms": store.now_ms()})  # a dead mover's hold runs out
        await agent.refresh()
        ticket = await agent.before_write("a", request, command, (), roundtrip)
        assert ticket is not None
        await agent.after_write(ticket, None)
        assert store.inflight() == {} and store.dirty_count() == 1
    finally:
        store.close()
        await agent.close()


def test_in_flight_entries_of_a_gone_instance_are_resynced(setup: Setup) -> None:
    """The drain waits only for live instances: the entry of an instance whose heartbeat
    expired is put back into the dirty set (its write may or may not have been applied)."""
    store = Mover(setup.config, "a").store
    keys = Keys(setup.config.placement.key_prefix)
    try:
        store.client.set(keys.live("alive"), b"1", px=60_000)
        store.client.hset(keys.inflight("a"), mapping={"alive:1": b"m1", "gone:7": b"m2\nm3"})
        assert store.settle_inflight() == 1
        assert set(store.inflight()) == {"alive:1"}
        assert sorted(store.pop_dirty(10)) == [b"m2", b"m3"]
        store.client.delete(keys.live("alive"))
        assert store.settle_inflight() == 0 and store.inflight() == {}
    finally:
        store.close()


def test_a_tenant_is_deleted_in_batches(setup: Setup) -> None:
    """Cleanup and abort delete a tenant's documents a batch at a time (by _id range,
    or $in for a batch spanning types) when one delete of all is refused (FerretDB 1.24
    fails one of ~100,000: "too many SQL variables"); here the one delete is made to
    fail."""
    from pymongo.collection import Collection
    from pymongo.errors import OperationFailure

    from proxy.placement.move_data import Cluster, connect

    cluster = Cluster("home", connect(setup.config.upstream), setup.config.tenancy, "a")
    real_delete_many = Collection.delete_many

    def refuse_the_whole_tenant(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if "_id" not in query:
            raise OperationFailure("too many SQL variables", code=1)
        return real_delete_many(self, query, *args, **kwargs)

    # another tenant's documents inside the ranges of "a"'s batches: never deleted
    setup.direct("home")[DB].orders.insert_many([
        {"_id": 10.5, "tenant_id": "b"}, {"_id": "s1x", "tenant_id": "b"}])
    Collection.delete_many = refuse_the_whole_tenant  # type: ignore[method-assign]
    try:
        assert cluster.delete_tenant(f"{DB}.orders", batch=7) == 180
        assert cluster.delete_tenant(f"{DB}.items", batch=7) == 40
        assert cluster.delete_tenant(f"{DB}.items", batch=7) == 0
    finally:
        Collection.delete_many = real_delete_many  # type: ignore[method-assign]
        cluster.close()
    assert setup.docs("home", "orders", "a") == {}
    assert len(setup.docs("home", "orders", "b")) == 52  # another tenant: untouched
