"""Fan-out read latency: ``python -m bench placement-fanout``.

Two FerretDB processes as two clusters, each holding half of the tenants' documents;
the first also holds all of them in another collection. One query, a sorted and
limited find (``sort: {priority: -1, _id: 1}, limit: 50`` over one status), is timed
sequentially, in process, on two paths:

- ``fanout-2``: ``proxy.placement.fanout.FanOut.run`` over both clusters (each asked
  for 50, merged in order), the path a ``"*"`` user's cross-tenant read takes;
- ``fanout-1``: ``FanOut.run`` over the one cluster holding everything (the merge
  machinery's own cost, nothing to gain from a second server);
- ``single``: the same find on the one cluster holding everything, through the same
  upstream path (``Roundtrip.command_on`` and a decode of the reply).

FerretDB (SQLite) filters and sorts in its own process, so its time grows with the
documents a cluster holds: two clusters with half each work in parallel.

Rounds rotate the order of the paths; each round gives p50/p95 per path and
their ratio; the figures are the ratios over all rounds with each round's lowest and
highest. Client-side costs (a driver, the proxy's listener) are not in either path.
Writes bench/results/placement-fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bson
from pymongo import MongoClient

from bench.stack import Stack, start_stack
from proxy.config import UpstreamConfig
from proxy.placement.clusters import cluster_roundtrip
from proxy.placement.fanout import FanOut
from proxy.route.cursors import CursorTable
from proxy.route.readpref import PRIMARY
from proxy.route.rules import RouteDecision
from proxy.upstream.roundtrip import Roundtrip
from proxy.wire import parse_op_msg

DEFAULT_JSON = Path(__file__).parent / "results" / "placement-fanout.json"
DB = "bench_fanout"
DECISION = RouteDecision("default", None, None, PRIMARY)
QUERY: dict[str, Any] = {"filter": {"status": "open"}, "sort": {"priority": -1, "_id": 1},
                         "limit": 50}
Op = Callable[[], Awaitable[list[Any]]]
_FANNED = ("fanout-2", "fanout-1")
_RATIOS = tuple(f"{path}/single {q}" for path in _FANNED for q in ("p50", "p95"))


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "placement-fanout", help="fan-out find latency over 2 clusters vs one cluster",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000,
                   help="documents in all (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default: %(default)s)")
    p.add_argument("--ops", type=int, default=40,
                   help="finds per path per round (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default: %(default)s)")
    p.set_defaults(func=main)


def seed(stacks: list[Stack], docs: int) -> None:
    clients: list[MongoClient[dict[str, Any]]] = [MongoClient(s.direct_uri) for s in stacks]
    try:
        for client in clients:
            client.drop_database(DB)
        batch: list[list[dict[str, Any]]] = [[], []]
        for i in range(docs):
            tenant = i % 40
            batch[tenant % 2].append({
                "tenant": f"t{tenant}", "status": ("open", "done", "blocked")[i % 3],
                "priority": (i * 7919) % 1000, "title": f"task {i}", "n": i})
        for client, part in zip(clients, batch, strict=True):
            client[DB]["docs"].insert_many(part)  # gives each its _id
        clients[0][DB]["all"].insert_many([dict(d) for part in batch for d in part])
    finally:
        for client in clients:
            client.close()


def _ops(fanout: FanOut, roundtrips: list[Roundtrip]) -> dict[str, Op]:
    async def fanned() -> list[Any]:
        reply = await fanout.run("find", {"find": "docs", **QUERY, "$db": DB}, roundtrips,
                                 DECISION, 1)
        return [d["_id"] for d in reply["cursor"]["firstBatch"]]

    async def fanned_one() -> list[Any]:
        reply = await fanout.run("find", {"find": "all", **QUERY, "$db": DB},
                                 roundtrips[:1], DECISION, 1)
        return [d["_id"] for d in reply["cursor"]["firstBatch"]]

    async def single() -> list[Any]:
        done = await roundtrips[0].command_on(DB, {"find": "all", **QUERY}, PRIMARY)
        reply = bson.decode(parse_op_msg(done.header + done.body).body)
        return [d["_id"] for d in reply["cursor"]["firstBatch"]]

    return {"fanout-2": fanned, "fanout-1": fanned_one, "single": single}


async def _timed(op: Op, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


async def measure(stacks: list[Stack], rounds: int, ops: int) -> dict[str, Any]:
    roundtrips = []
    for index, stack in enumerate(stacks):
        roundtrip = cluster_roundtrip(f"c{index}", UpstreamConfig(uri=stack.direct_uri),
                                      CursorTable())
        await roundtrip.topology.start()
        roundtrips.append(roundtrip)
    fanout = FanOut(101, "tenant")
    try:
        paths = _ops(fanout, roundtrips)
        same = [await op() for op in paths.values()]
        if any(ids != same[0] for ids in same):
            raise SystemExit("bench placement-fanout: the fan-out and the single cluster "
                             "disagree; nothing to measure")
        for op in paths.values():  # warm-up: connections, FerretDB's caches
            await _timed(op, max(10, ops // 10))
        per_round: list[dict[str, Any]] = []
        for rnd in range(rounds):
            names = list(paths)
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            samples = {name: await _timed(paths[name], ops) for name in order}
            row: dict[str, Any] = {"round": rnd}
            for name, values in samples.items():
                row[name] = {"p50_us": _pct(values, 50), "p95_us": _pct(values, 95)}
            for path in _FANNED:
                for q in ("p50_us", "p95_us"):
                    row[f"{path}/single {q[:3]}"] = row[path][q] / row["single"][q]
            per_round.append(row)
    finally:
        await fanout.close()
        for roundtrip in roundtrips:
            await roundtrip.pools.close()
            await roundtrip.topology.close()
    return {"rounds": per_round}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rounds"]
    out: dict[str, Any] = {}
    for path in (*_FANNED, "single"):
        out[path] = {q: statistics.median(r[path][q] for r in rows)
                     for q in ("p50_us", "p95_us")}
    for key in _RATIOS:
        values = [r[key] for r in rows]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    return out


def main(args: argparse.Namespace) -> int:
    stacks = [start_stack(), start_stack()]
    try:
        print(f"seeding {args.docs} documents ...", flush=True)
        seed(stacks, args.docs)
        result = asyncio.run(measure(stacks, args.rounds, args.ops))
    finally:
        for stack in stacks:
            stack.stop()
    figures = summary(result)
    for path in (*_FANNED, "single"):
        print(f"{path:9s} p50 {figures[path]['p50_us']:8.0f} µs   "
              f"p95 {figures[path]['p95_us']:8.0f} µs  (median of rounds)")
    for key in _RATIOS:
        r = figures[key]
        print(f"{key}: {r['median']:.2f} "
              f"(rounds {r['min']:.2f}-{r['max']:.2f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "python": sys.version.split()[0], "machine": platform.machine(),
        "docs": args.docs, "ops_per_round": args.ops, "query": repr(QUERY),
        "summary": figures, **result}, indent=2) + "\n")
    return 0
