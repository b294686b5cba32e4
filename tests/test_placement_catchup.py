"""The mover's catch-up of written ids (docs/placement.md, "Moving a tenant online"),
against two real FerretDB servers and a real Redis (the ``setup`` of
tests/test_placement_moves.py): a small set of ids is re-copied by point lookups and a
large one by ``$in``, with the same outcome; a catch-up bounded by a deadline stops
while writes keep refilling the dirty set, and loses none of them; a drain whose hold
cannot be met returns instead of spinning past it. And a proxy's agent closes even when
a cancellation of its refresh is lost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import bson
import pytest

from proxy.placement.agent import PlacementAgent
from proxy.placement.move_data import POINT_IDS, Cluster
from proxy.placement.move_phases import Limits, catch_up
from proxy.placement.move_store import MoveError
from proxy.placement.mover import Mover
from proxy.placement.shared import full_member, id_member
from tests.test_placement_moves import DB, Setup, setup

__all__ = ["setup"]  # the fixture, re-exported for pytest

ORDERS = f"{DB}.orders"


@pytest.fixture
def mover(setup: Setup) -> Iterator[Mover]:
    result = Mover(setup.config, "a", Limits(pop=50))
    yield result
    result.close()


def _member(value: Any) -> bytes:
    return id_member(ORDERS, bson.encode({"_id": value}))


def _clusters(mover: Mover) -> tuple[Cluster, Cluster]:
    return mover.cluster("home"), mover.cluster("eu")


@pytest.mark.parametrize("count", [3, POINT_IDS + 20], ids=["point", "in"])
def test_replace_by_ids_makes_the_target_equal_the_source(setup: Setup, mover: Mover,
                                                          count: int) -> None:
    """Both paths: changed ids are copied, ids deleted on the source are deleted on the
    target, ids of another tenant are never read from the source nor deleted on the
    target."""
    source, target = _clusters(mover)
    home, eu = setup.direct("home")[DB], setup.direct("eu")[DB]
    a_ids = [d["_id"] for d in home.orders.find({"tenant_id": "a"}, sort=[("_id", 1)])]
    b_id = home.orders.find_one({"tenant_id": "b"})["_id"]  # type: ignore[index]
    # the target: a stale copy of every "a" document, and b's document under its _id
    eu.orders.insert_many([{"_id": i, "tenant_id": "a", "n": -1} for i in a_ids])
    eu.orders.insert_one({"_id": b_id, "tenant_id": "b", "n": "target's own"})
    changed = a_ids[:count - 2]
    home.orders.update_many({"_id": {"$in": changed}}, {"$set": {"n": "new"}})
    gone = a_ids[count - 2]
    home.orders.delete_one({"_id": gone})
    ids = [*changed, gone, b_id]

    found = source.by_ids(ORDERS, ids)
    assert sorted(bson.encode({"_id": d["_id"]}) for d in found) == sorted(
        bson.encode({"_id": i}) for i in changed)
    target.replace(ORDERS, ids, found)

    on_target = {bson.encode({"_id": d["_id"]}): d for d in eu.orders.find()}
    for i in changed:
        assert on_target[bson.encode({"_id": i})]["n"] == "new"
    assert bson.encode({"_id": gone}) not in on_target
    assert on_target[bson.encode({"_id": b_id})]["n"] == "target's own"
    untouched = a_ids[count - 1:]
    assert all(on_target[bson.encode({"_id": i})]["n"] == -1 for i in untouched)


def test_a_late_catch_up_stops_and_puts_back_what_it_took(setup: Setup, mover: Mover) -> None:
    """The deadline is checked before each step: after the first step the rest stays in
    the dirty set, and a whole-collection re-sync that runs late is put back whole."""
    source, target = _clusters(mover)
    a_ids = [d["_id"] for d in setup.direct("home")[DB].orders.find({"tenant_id": "a"})]
    mover.store.redirty([_member(i) for i in a_ids[:120]])
    steps = iter([False, True])
    done = catch_up(source, target, mover.store, mover.limits, until_empty=True,
                    late=lambda: next(steps, True))
    assert done is False
    assert mover.store.dirty_count() == 120 - 50  # one step of 50 was handled

    mover.store.pop_dirty(1000)
    mover.store.redirty([full_member(ORDERS)])
    small = Limits(batch=10, pop=50)
    checks = iter([False, False, False, True])  # late inside the re-sync's batches
    assert catch_up(source, target, mover.store, small, until_empty=True,
                    late=lambda: next(checks, True)) is False
    assert mover.store.pop_dirty(10) == [full_member(ORDERS)]


def test_catch_up_keeps_up_with_writes_only_until_its_deadline(setup: Setup,
                                                               mover: Mover) -> None:
    """A writer refills the dirty set faster than the catch-up empties it (what a hold
    that expired lets through): bounded by a deadline, the catch-up returns, and every
    document is then either equal on both clusters or still in the set."""
    source, target = _clusters(mover)
    home = setup.direct("home")[DB].orders
    a_ids = [d["_id"] for d in home.find({"tenant_id": "a"}, sort=[("_id", 1)])]
    mover.store.redirty([_member(i) for i in a_ids])
    stop = threading.Event()
    rounds = [0]

    def write() -> None:
        while not stop.is_set():
            batch = a_ids[(rounds[0] * 5) % 175:][:5]
            home.update_many({"_id": {"$in": batch}}, {"$inc": {"n": 1000}})
            mover.store.redirty([_member(i) for i in batch])
            rounds[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 3
        done = catch_up(source, target, mover.store, Limits(pop=1), until_empty=True,
                        late=lambda: time.monotonic() >= deadline)
    finally:
        stop.set()
        writer.join()
    assert done is False and rounds[0] > 0
    left = set(mover.store.pop_dirty(100_000))
    on_source = {bson.encode({"_id": d["_id"]}): d for d in home.find({"tenant_id": "a"})}
    on_target = {bson.encode({"_id": d["_id"]}): d
                 for d in setup.direct("eu")[DB].orders.find({"tenant_id": "a"})}
    for key, doc in on_source.items():
        assert _member(bson.decode(key)["_id"]) in left or on_target.get(key) == doc, doc


def test_a_drain_that_cannot_finish_in_its_hold_returns(setup: Setup, mover: Mover) -> None:
    """The mover's drain (the final catch-up) gives the hold up instead of catching up
    past it: with the set refilled continuously it returns False once the hold is
    over, so the next attempt starts from a fresh catch-up."""
    source, target = _clusters(mover)
    stop = threading.Event()

    def refill() -> None:
        n = 0
        while not stop.is_set():
            mover.store.redirty([_member(f"r{n + k}") for k in range(5)])
            n += 5

    mover.store.redirty([_member(f"r-{n}") for n in range(100)])

    refiller = threading.Thread(target=refill)
    refiller.start()
    try:
        hold_until = mover.store.now_ms() + 2_000
        assert mover._drain(source, target, hold_until) is False
    finally:
        stop.set()
        refiller.join()
    assert mover.store.now_ms() >= hold_until - 10


async def test_an_agent_closes_when_a_cancellation_is_lost(setup: Setup) -> None:
    """A proxy's agent stops even if its refresh swallows the cancellation (as a cancel
    landing inside redis-py's clean-up can): close() returns, the loop is over."""
    agent = PlacementAgent(setup.config.placement, "i1")
    await agent.start()
    swallowed: list[bool] = []

    async def refresh_that_swallows() -> bool:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.append(True)
        return True

    agent.refresh = refresh_that_swallows  # type: ignore[method-assign]
    await asyncio.sleep(0.2)  # the loop is inside the refresh now
    await asyncio.wait_for(agent.close(), timeout=10)
    assert swallowed == [True]


def test_an_id_of_another_tenant_on_the_target_stops_the_move(setup: Setup) -> None:
    """A document of another tenant with one of the moving tenant's _ids on the target:
    the copy stops with an error naming it, before any switch (the tenant stays whole on
    its source); --abort then leaves the other tenant's document alone."""
    eu = setup.direct("eu")[DB].orders
    eu.insert_one({"_id": 5, "tenant_id": "b", "n": "b's own"})
    mover = Mover(setup.config, "a", Limits(batch=25))
    try:
        with pytest.raises(MoveError, match=r"_id 5 of another tenant"):
            mover.run("eu")
        assert mover.current_cluster() == "home"
        assert (mover.store.move() or {}).get("phase") == "copy"
        assert mover.abort() == 0
    finally:
        mover.close()
    assert eu.find_one({"_id": 5}) == {"_id": 5, "tenant_id": "b", "n": "b's own"}
    assert eu.count_documents({"tenant_id": "a"}) == 0
    assert len(setup.docs("home", "orders", "a")) == 180
