"""The failover scenario's load: pymongo writer threads whose every outcome is counted,
and the check, over a direct connection, that no acknowledged write was lost and none
applied twice. Shared by ``python -m bench failover`` and tests/test_failover.py.

Each worker cycles through three operations: ``update_one({$inc: {n: 1}}, upsert)`` of
a counter of its own, ``insert_one`` of a unique ``_id``, and ``find_one`` of its last
counter. Every increment has its own counter document: its ``n`` must be 1 when the
increment was acknowledged (absent: lost), 0 or 1 when it failed, never 2 or more
(applied twice). One shared counter cannot tell: FerretDB's ``$inc`` is not atomic
against a concurrent update of the same document, and a timed-out update still running
on the server can overwrite the next one. Every acknowledged ``_id`` must be there; a
duplicate-key error on a fresh ``_id`` means an earlier attempt of that very insert was
applied.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

Doc = dict[str, Any]

# What an application would configure (the scenario).
CLIENT_OPTIONS: Doc = {
    "retryWrites": True,
    "retryReads": True,
    "serverSelectionTimeoutMS": 3000,
    "connectTimeoutMS": 3000,
    "socketTimeoutMS": 20_000,
}


@dataclass
class WorkerStats:
    acked_incs: list[str] = field(default_factory=list)
    failed_incs: list[str] = field(default_factory=list)
    acked_ids: list[str] = field(default_factory=list)
    duplicate_keys: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    # time.monotonic() when each successful operation started
    ok_starts: list[float] = field(default_factory=list)


def _kind(exc: PyMongoError) -> str:
    if isinstance(exc, OperationFailure):
        return f"{type(exc).__name__} {exc.code}"
    return type(exc).__name__


class Load:
    """``workers`` threads, each with its own client, until :meth:`stop`."""

    def __init__(self, uri: str, db: str, tag: str, workers: int = 8,
                 **client_options: Any) -> None:
        self.uri = uri
        self.db = db
        self.tag = tag
        self.stats = [WorkerStats() for _ in range(workers)]
        self._options = {**CLIENT_OPTIONS, **client_options}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(workers)]


    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """Stop and join; returns the indexes of workers still running (hung)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [i for i, t in enumerate(self._threads) if t.is_alive()]

    def _run(self, index: int) -> None:
        stats = self.stats[index]
        with MongoClient(self.uri, **self._options) as client:
            counters = client[self.db]["counters"]
            docs = client[self.db]["docs"]
            counter = {"_id": ""}
            k = 0
            while not self._stop.is_set():
                k += 1
                step = k % 3
                start = time.monotonic()
                try:
                    if step == 0:
                        counter = {"_id": f"{self.tag}-c{index}-{k}"}
                        counters.update_one(counter, {"$inc": {"n": 1}}, upsert=True)
                        stats.acked_incs.append(counter["_id"])
                    elif step == 1:
                        _id = f"{self.tag}-w{index}-{k}"
                        docs.insert_one({"_id": _id})
                        stats.acked_ids.append(_id)
                    else:
                        counters.find_one(counter)
                    stats.ok_starts.append(start)
                except PyMongoError as exc:
                    if step == 0:
                        stats.failed_incs.append(counter["_id"])
                    if isinstance(exc, DuplicateKeyError):
                        stats.duplicate_keys += 1
                    stats.errors[_kind(exc)] += 1
                    time.sleep(0.02)  # as an application would, not a busy loop
                stats.slowest_s = max(stats.slowest_s, time.monotonic() - start)

    # -- outcomes ---------------------------------------------------------------------

    def ok_count(self) -> int:
        return sum(len(s.ok_starts) for s in self.stats)

    def every_worker_succeeded_since(self, since: float) -> bool:
        return all(s.ok_starts and s.ok_starts[-1] > since for s in self.stats)

    def recovery_s(self, since: float) -> float | None:
        """From ``since`` until every worker had an operation started after it succeed."""
        firsts = []
        for s in self.stats:
            first = next((t for t in s.ok_starts if t > since), None)
            if first is None:
                return None
            firsts.append(first)
        return max(firsts) - since

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for s in self.stats:
            total.update(s.errors)
        return total

    def verify(self, direct: MongoClient[Doc]) -> dict[str, int]:
        """Lost and doubled writes, read back over ``direct`` (a connection to the
        server itself, not the proxy)."""
        return verify(direct[self.db], self.stats)

    def summary(self, direct: MongoClient[Doc], since: float) -> Doc:
        errors = self.errors()
        recovery = self.recovery_s(since)
        return {
            "ok": self.ok_count(),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            **self.verify(direct),
            "slowest_s": round(max(s.slowest_s for s in self.stats), 3),
            "recovery_s": None if recovery is None else round(recovery, 3),
        }


def verify(db: Any, stats: list[WorkerStats]) -> dict[str, int]:
    """Acknowledged writes missing from ``db`` (a database over a direct connection)
    and writes applied twice (see the module docstring)."""
    lost_incs = lost_ids = doubled = 0
    for s in stats:
        counts = _counts(db["counters"], s.acked_incs + s.failed_incs)
        lost_incs += sum(1 for _id in s.acked_incs if counts.get(_id, 0) < 1)
        doubled += sum(1 for n in counts.values() if n > 1)
        found = _counts(db["docs"], s.acked_ids)
        lost_ids += sum(1 for _id in s.acked_ids if _id not in found)
        doubled += s.duplicate_keys
    return {"lost": lost_incs + lost_ids, "lost_incs": lost_incs, "lost_ids": lost_ids,
            "doubled": doubled}


def _counts(collection: Any, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for start in range(0, len(ids), 1000):
        for doc in collection.find({"_id": {"$in": ids[start:start + 1000]}}):
            counts[doc["_id"]] = int(doc.get("n", 0))
    return counts


def wait_until(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def scenario(uri: str, db: str, tag: str, direct: MongoClient[Doc], fault: Any,
             recover: Any, *, workers: int = 8, warm_s: float = 1.0,
             down_s: float = 2.0, settle_s: float = 1.0) -> Doc:
    """Load on ``uri``; after ``warm_s`` call ``fault()`` (kill or stop the server), after
    ``down_s`` more ``recover()`` (restart or continue it); run until every worker has
    succeeded again, then ``settle_s`` more. Returns :meth:`Load.summary` and ``hung``
    (workers that did not stop within a minute)."""
    load = Load(uri, db, tag, workers).start()
    recovered_at = time.monotonic()
    try:
        wait_until(lambda: load.ok_count() >= workers * 3, 30)
        time.sleep(warm_s)
        fault()
        time.sleep(down_s)
        recover()
        recovered_at = time.monotonic()
        wait_until(lambda: load.every_worker_succeeded_since(recovered_at), 30)
        time.sleep(settle_s)
    finally:
        hung = load.stop()
    return {**load.summary(direct, recovered_at), "hung": len(hung)}
