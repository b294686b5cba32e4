"""Fan-out read latency: ``python -m bench placement-fanout``.

Two FerretDB processes as two clusters, each holding half of the tenants' documents;
the first also holds all of them in another collection. One query, a sorted and
limited find (``sort: {priority: -1, _id: 1}, limit: 50`` over one status), is timed
sequentially on five paths. Through the proxy (placement over the two clusters, tenancy
enforce, pymongo as a ``"*"`` user):

- ``proxy-fanout-2``: the find on the tenant-scoped collection, fanned out to both;
- ``proxy-single``: the same find on the collection holding everything (exempt from
  tenancy, so it goes to the first cluster only, as any read of one cluster does).

In process, without a client or the proxy's listener:

- ``fanout-2``: ``proxy.placement.fanout.FanOut.run`` over both clusters (each asked
  for 50, merged in order), the path a ``"*"`` user's cross-tenant read takes;
- ``fanout-1``: ``FanOut.run`` over the one cluster holding everything (the merge
  machinery's own cost, nothing to gain from a second server);
- ``single``: the same find on the one cluster holding everything, through the same
  upstream path (``Roundtrip.command_on`` and a decode of the reply).

FerretDB (SQLite) filters and sorts in its own process, so its time grows with the
documents a cluster holds: two clusters with half each work in parallel.

Rounds rotate the order of the paths; each round gives p50/p95 per path and the
ratios of each fanned-out path to its single-cluster twin; the figures are the medians
of the rounds with each ratio's lowest and highest round. Writes
bench/results/placement-fanout.json.
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
from proxy.identity.credentials import hash_password
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
# (fanned-out path, the single-cluster path it is compared with)
_PAIRS = (("proxy-fanout-2", "proxy-single"), ("fanout-2", "single"), ("fanout-1", "single"))
_PATHS = ("proxy-fanout-2", "proxy-single", "fanout-2", "fanout-1", "single")
_RATIOS = tuple(f"{a}/{b} {q}" for a, b in _PAIRS for q in ("p50", "p95"))
USER, PASSWORD = "ops", "bench-secret"
TENANT_EXEMPT = ("tenants", "system.*", "admin.*", "config.*", "local.*", "all")


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "placement-fanout", help="fan-out find latency over 2 clusters vs one cluster",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000,
                   help="documents in all (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default: %(default)s)")
    p.add_argument("--ops", type=int, default=30,
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


def proxy_extra(other_uri: str) -> dict[str, Any]:
    """The measured proxy: home is the first cluster, "b" the second (odd tenants)."""
    users = [{"username": USER, "password_sha256": hash_password(PASSWORD, iterations=4096),
              "tenant": "*"}]
    return {
        "tenancy": {"mode": "enforce", "field": "tenant", "users": users,
                    "exempt": list(TENANT_EXEMPT)},
        "placement": {"clusters": {"b": {"uri": other_uri}},
                      "tenants": {f"t{i}": "b" for i in range(1, 40, 2)}},
    }


def _proxy_ops(client: MongoClient[dict[str, Any]]) -> dict[str, Op]:
    def find(collection: str) -> Op:
        coll = client[DB][collection]

        async def op() -> list[Any]:  # a blocking driver call: the loop has nothing else
            return [d["_id"] for d in coll.find(QUERY["filter"], sort=list(
                QUERY["sort"].items()), limit=QUERY["limit"])]
        return op
    return {"proxy-fanout-2": find("docs"), "proxy-single": find("all")}


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
    client: MongoClient[dict[str, Any]] = MongoClient(
        stacks[0].proxy_uri, username=USER, password=PASSWORD,
        authMechanism="SCRAM-SHA-256")
    try:
        return await _measure(stacks, client, rounds, ops)
    finally:
        client.close()


async def _measure(stacks: list[Stack], client: MongoClient[dict[str, Any]], rounds: int,
                   ops: int) -> dict[str, Any]:
    roundtrips = []
    for index, stack in enumerate(stacks):
        roundtrip = cluster_roundtrip(f"c{index}", UpstreamConfig(uri=stack.direct_uri),
                                      CursorTable())
        await roundtrip.topology.start()
        roundtrips.append(roundtrip)
    fanout = FanOut(101, "tenant")
    try:
        paths = {**_proxy_ops(client), **_ops(fanout, roundtrips)}
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
            for a, b in _PAIRS:
                for q in ("p50_us", "p95_us"):
                    row[f"{a}/{b} {q[:3]}"] = row[a][q] / row[b][q]
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
    for path in _PATHS:
        out[path] = {q: statistics.median(r[path][q] for r in rows)
                     for q in ("p50_us", "p95_us")}
    for key in _RATIOS:
        values = [r[key] for r in rows]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    return out


def main(args: argparse.Namespace) -> int:
    other = start_stack()
    try:
        stacks = [start_stack(proxy_extra=proxy_extra(other.direct_uri)), other]
    except BaseException:
        other.stop()
        raise
    try:
        print(f"seeding {args.docs} documents ...", flush=True)
        seed(stacks, args.docs)
        result = asyncio.run(measure(stacks, args.rounds, args.ops))
    finally:
        for stack in stacks:
            stack.stop()
    figures = summary(result)
    for path in _PATHS:
        print(f"{path:14s} p50 {figures[path]['p50_us']:8.0f} µs   "
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
