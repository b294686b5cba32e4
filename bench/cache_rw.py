"""The writer-share phase of ``python -m bench cache``: saturation with writes in the mix,
and the bench checking read-your-writes itself.

Of ``clients`` raw OP_MSG clients (in ``workers`` processes, as in the saturation
phase), a ``share`` are *writers*: each owns one document of the ``rw`` collection and
``$inc``-s it with ``findAndModify`` in a closed loop, publishing every acknowledged
``n`` in an array shared by all worker processes. The rest are *readers*: a ``find`` by
``_id`` on the hot collection (the cache's hits), and with probability ``CHECK_SHARE``
a ``find`` of a random writer's document instead, whose ``n`` must be at least the value
published before the read was sent (else it is a stale read). Both collections are
cached by the proxy's rule, so every write invalidates (``rw``'s token) through the
cache's write path while the hot reads keep being hits. The figure compared across
targets is the readers' throughput.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import sys
import time
import urllib.request
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import uvloop
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from bench.pool import OP_TIMEOUT_S, WireClient, doc_id

if TYPE_CHECKING:
    from bench.cache import CacheBenchConfig

__all__ = ["CHECK_SHARE", "RW_COLLECTION", "MixedResult", "cache_counts", "counts_delta",
           "format_mixed", "run_mixed", "writer_shares"]

RW_COLLECTION = "rw"
CHECK_SHARE = 0.1
Doc = dict[str, Any]


@dataclass(frozen=True)
class _Spec:
    host: str
    port: int
    database: str
    hot_collection: str
    hot_docs: int
    tag: str  # the writers' document ids: f"{tag}-{index}"
    writers: tuple[int, ...]  # global writer indexes of this process
    readers: int
    n_writers: int
    seed: int
    warmup_s: float
    duration_s: float


@dataclass
class MixedResult:
    reads: int
    writes: int
    checked: int
    stale: int
    errors: int
    error_samples: list[str]
    duration_s: float

    @property
    def reads_per_s(self) -> float:
        return self.reads / self.duration_s

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.duration_s


def _entry(spec: _Spec, acked: Any, conn: Connection) -> None:
    try:
        result = uvloop.run(_worker(spec, acked, conn))
    except BaseException as exc:
        conn.send({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    conn.send({"kind": "result", **result})
    conn.close()


async def _worker(spec: _Spec, acked: Any, conn: Connection) -> dict[str, Any]:
    n_clients = len(spec.writers) + spec.readers
    clients = [await WireClient.open(spec.host, spec.port, "bench-cache-rw")
               for _ in range(n_clients)]
    conn.send({"kind": "ready"})
    start_ns: int = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    measure_ns = start_ns + int(spec.warmup_s * 1e9)
    end_ns = measure_ns + int(spec.duration_s * 1e9)
    counts = {"reads": 0, "writes": 0, "checked": 0, "stale": 0, "errors": 0}
    samples: list[str] = []

    def measured() -> bool:
        return measure_ns <= time.monotonic_ns() <= end_ns

    def error(what: str) -> None:
        counts["errors"] += 1
        if len(samples) < 5:
            samples.append(what)

    async def writer(client: WireClient, index: int) -> None:
        await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        cmd = {"findAndModify": RW_COLLECTION, "query": {"_id": f"{spec.tag}-{index}"},
               "update": {"$inc": {"n": 1}}, "new": True, "$db": spec.database}
        while time.monotonic_ns() < end_ns:
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    reply = await client.command(cmd)
                value = reply["value"]["n"]
            except Exception as exc:
                error(f"write: {type(exc).__name__}: {exc}")
                continue
            acked[index] = max(acked[index], int(value))
            counts["writes"] += measured()

    async def reader(client: WireClient, local: int) -> None:
        rng = random.Random(f"{spec.seed}-{spec.tag}-{local}-{spec.writers}")
        await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        while time.monotonic_ns() < end_ns:
            check = spec.n_writers and rng.random() < CHECK_SHARE
            if check:
                index = rng.randrange(spec.n_writers)
                floor = acked[index]  # published before this read is sent
                cmd: Doc = {"find": RW_COLLECTION, "filter": {"_id": f"{spec.tag}-{index}"},
                            "limit": 1, "singleBatch": True, "$db": spec.database}
            else:
                key = doc_id(rng.randrange(spec.hot_docs))
                cmd = {"find": spec.hot_collection, "filter": {"_id": key}, "limit": 1,
                       "singleBatch": True, "$db": spec.database}
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    reply = await client.command(cmd)
                batch = reply["cursor"]["firstBatch"]
                if len(batch) != 1:
                    raise ValueError(f"{cmd['filter']} returned {batch!r}")
            except Exception as exc:
                error(f"read: {type(exc).__name__}: {exc}")
                continue
            if check:
                counts["checked"] += 1
                if batch[0]["n"] < floor:
                    counts["stale"] += 1
                    if len(samples) < 5:
                        samples.append(f"stale: {cmd['filter']} read n={batch[0]['n']} "
                                       f"after n={floor} was acknowledged")
            counts["reads"] += measured()

    tasks = [writer(c, i) for c, i in zip(clients, spec.writers, strict=False)]
    tasks += [reader(c, k) for k, c in enumerate(clients[len(spec.writers):])]
    await asyncio.gather(*tasks)
    for c in clients:
        c.close()
    return {**counts, "error_samples": samples}


def _recv(pipe: Connection, proc: BaseProcess, timeout: float) -> dict[str, Any]:
    if not pipe.poll(timeout):
        raise RuntimeError(f"{proc.name}: no message within {timeout:.0f} s")
    msg: dict[str, Any] = pipe.recv()
    if msg.get("kind") == "failed":
        raise RuntimeError(f"{proc.name} failed: {msg.get('error')}")
    return msg


def run_mixed(
    uri: str, seed_uri: str, database: str, hot_collection: str, hot_docs: int, *,
    clients: int, share: float, workers: int, tag: str, warmup_s: float, duration_s: float,
) -> MixedResult:
    """One phase against ``uri``; ``seed_uri`` (FerretDB directly) creates the writers'
    documents first."""
    n_writers = max(1, round(clients * share))
    n_readers = max(1, clients - n_writers)
    seed: MongoClient[Doc]
    with MongoClient(seed_uri, directConnection=True, document_class=dict) as seed:
        seed[database][RW_COLLECTION].insert_many(
            [{"_id": f"{tag}-{i}", "n": 0} for i in range(n_writers)])
    host, port = parse_uri(uri)["nodelist"][0]
    ctx = multiprocessing.get_context("spawn")
    acked = ctx.Array("q", n_writers, lock=False)  # one writer per slot: no lock needed
    procs: list[BaseProcess] = []
    pipes: list[Connection] = []
    for w in range(workers):
        spec = _Spec(str(host), int(port), database, hot_collection, hot_docs, tag,
                     tuple(range(w, n_writers, workers)),
                     n_readers // workers + (w < n_readers % workers), n_writers, w,
                     warmup_s, duration_s)
        parent, child = ctx.Pipe()
        started = ctx.Process(target=_entry, args=(spec, acked, child), daemon=True,
                              name=f"bench-cache-rw-{w}")
        started.start()
        child.close()
        procs.append(started)
        pipes.append(parent)
    try:
        for pipe, worker in zip(pipes, procs, strict=True):
            _recv(pipe, worker, 120)
        start_ns = time.monotonic_ns() + 200_000_000
        for pipe in pipes:
            pipe.send(start_ns)
        results = [_recv(p, w, warmup_s + duration_s + OP_TIMEOUT_S + 60)
                   for p, w in zip(pipes, procs, strict=True)]
    finally:
        for worker in procs:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    return MixedResult(
        reads=sum(r["reads"] for r in results), writes=sum(r["writes"] for r in results),
        checked=sum(r["checked"] for r in results), stale=sum(r["stale"] for r in results),
        errors=sum(r["errors"] for r in results),
        error_samples=[s for r in results for s in r["error_samples"]][:5],
        duration_s=duration_s,
    )


def cache_counts(admin_url: str) -> dict[str, float]:
    """``hit``, ``miss``, ``bypass`` and ``bypass:<reason>`` operation counts, plus the
    breaker's ``circuit_opened`` and ``invalidations_pending``."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("mongoproxy_cache_operations_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = counts.get(result, 0.0) + float(value)
            if result == "bypass":
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                counts[f"bypass:{reason}"] = float(value)
        elif line.startswith('mongoproxy_redis_circuit_changes_total{state="open"}'):
            counts["circuit_opened"] = float(value)
        elif line.startswith('mongoproxy_cache_invalidations_total{result="pending"}'):
            counts["invalidations_pending"] = float(value)
    return counts


def counts_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = {"hit", "miss", "bypass", "circuit_opened", "invalidations_pending"}
    keys.update(k for k in after if k.startswith("bypass:"))
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(keys)}


MIXED_TARGETS = ("direct", "proxy-cache")


def writer_shares(cfg: CacheBenchConfig, uris: dict[str, str], admin_url: str, db: str,
                  hot_collection: str) -> dict[str, Any]:
    """Per writer share: readers' and writers' throughput of ``direct`` and
    ``proxy-cache`` (rounds alternate the order), stale reads found by the readers, and
    what the cached proxy's breaker did meanwhile."""
    out: dict[str, Any] = {}
    for share in cfg.write_shares:
        before = cache_counts(admin_url)
        phases: dict[str, list[MixedResult]] = {t: [] for t in MIXED_TARGETS}
        for rnd in range(cfg.saturation_rounds):
            for target in MIXED_TARGETS if rnd % 2 == 0 else MIXED_TARGETS[::-1]:
                print(f"bench cache: writer share {share:.0%} round {rnd + 1}/"
                      f"{cfg.saturation_rounds} {target}", file=sys.stderr, flush=True)
                phases[target].append(run_mixed(
                    uris[target], uris["direct"], db, hot_collection, cfg.hot,
                    clients=cfg.saturation_clients, share=share, workers=cfg.workers,
                    tag=f"s{share}-r{rnd}-{target}", warmup_s=1.0,
                    duration_s=cfg.saturation_s))
        counts = counts_delta(before, cache_counts(admin_url))
        rows: dict[str, dict[str, Any]] = {t: {
            "reads_per_s": sum(p.reads for p in ps) / sum(p.duration_s for p in ps),
            "writes_per_s": sum(p.writes for p in ps) / sum(p.duration_s for p in ps),
            "per_round_reads_per_s": [p.reads_per_s for p in ps],
            "checked_reads": sum(p.checked for p in ps),
            "stale_reads": sum(p.stale for p in ps),
            "errors": sum(p.errors for p in ps),
            "error_samples": [s for p in ps for s in p.error_samples][:5],
        } for t, ps in phases.items()}
        ratio = rows["proxy-cache"]["reads_per_s"] / rows["direct"]["reads_per_s"]
        out[f"{share:g}"] = {"share": share, "results": rows, "ratio": ratio,
                             "cache": counts}
    return out


def format_mixed(mixed: dict[str, Any]) -> str:
    lines = [f"{'share':>5} {'target':<12} {'reads/s':>9} {'per round':>18} {'writes/s':>8} "
             f"{'checked':>7} {'stale':>5} {'errors':>6}"]
    for entry in mixed.values():
        for target, r in entry["results"].items():
            rounds = "/".join(f"{x:.0f}" for x in r["per_round_reads_per_s"])
            lines.append(f"{entry['share']:>5.0%} {target:<12} {r['reads_per_s']:>9.1f} "
                         f"{rounds:>18} {r['writes_per_s']:>8.1f} {r['checked_reads']:>7} "
                         f"{r['stale_reads']:>5} {r['errors']:>6}")
        c = entry["cache"]
        lines.append(f"      proxy-cache / direct reads: {entry['ratio']:.2f}x; cache: "
                     f"{c['hit']:.0f} hits, {c['miss']:.0f} misses, {c['bypass']:.0f} "
                     f"bypasses, {c['circuit_opened']:.0f} circuit openings, "
                     f"{c['invalidations_pending']:.0f} pending invalidations")
    return "\n".join(lines)
