"""`python -m bench cache`: a hot cacheable find served from the result cache vs the same
find sent to FerretDB directly, in one run.

Method
------
* Stack (started here, in a temporary directory): FerretDB (SQLite handler), one
  ``redis-server`` (no persistence), and two proxies in front of that FerretDB: ``proxy``
  without a cache (for reference) and ``proxy-cache`` with ``cache.rules`` matching the
  benchmark collection (``timeout_ms`` as given, default 5 like the proxy's own; the
  bypasses during the measurement are counted, so a cache that gave up on Redis shows).
* Seed: ``--docs`` documents ``{_id: "k000000", status, n, pad}`` (string ids: FerretDB's
  SQLite handler only uses its ``_id`` index for strings/ObjectIds).
* Operations: ``by_id`` = ``find_one({_id})`` over ``--hot`` distinct hot ids (a
  permission lookup), ``list20`` = ``find({status}).sort(n).limit(20)`` over 5 statuses
  (a dashboard tile). Before measuring, every hot query runs once through each target
  (warm-up: fills the cache and the pools).
* Load: closed loop, ``c`` pymongo threads per cell, one ``MongoClient`` per target;
  rounds interleave the targets (ABBA) so machine noise hits all alike.
* Figures: throughput = ops / summed cell wall time; latency per op (µs) percentiles from
  HdrHistograms; the proxy's own ``/metrics`` give the cache hits and misses during the
  measurement (a hit ratio below 1 means some finds went to FerretDB).
* Saturation (``--saturation-clients``, default 64; 0 skips it): each target's
  throughput when it is kept busy, the ``by_id`` find from raw OP_MSG clients in
  ``--workers`` processes (the load workers of ``python -m bench pool``), so that
  neither the GIL nor pymongo's ~200 µs per call caps the load as it does the threads
  above. The goal asked for by the cache issue, ``proxy-cache`` throughput / ``direct``
  throughput >= 2, is judged here: the closed-loop cells at concurrency 1 measure one
  request at a time through the whole chain (a latency), not what a target can serve.
* Writer shares (``--write-shares``, default 5 % and 20 %; empty skips it): the same
  saturation with that share of the clients writing (``findAndModify $inc`` on their own
  documents of a second cached collection) and the readers checking read-your-writes
  themselves (``bench/cache_rw.py``): stale reads, errors, circuit openings and pending
  invalidations are counted and must be 0; the readers' throughput is compared with
  ``direct`` under the same mix (goal >= 2 as well).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench.cache_rw import (
    CHECK_SHARE,
    RW_COLLECTION,
    cache_counts,
    counts_delta,
    format_mixed,
    writer_shares,
)
from bench.core import _positive_int, machine_info, new_histogram, record_ns, write_json
from bench.pool import LoadSpec, PhaseResult, run_phase
from bench.stack import Stack, StackError, start_stack

TARGETS = ("direct", "proxy", "proxy-cache")
OPS = ("by_id", "list20")
STATUSES = ("open", "doing", "review", "done", "archived")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "cache.json"
COLLECTION = "hot"
GOAL = 2.0

Doc = dict[str, Any]


@dataclass(frozen=True)
class CacheBenchConfig:
    ops: int
    rounds: int
    concurrency: tuple[int, ...]
    docs: int
    hot: int
    timeout_ms: float
    json_path: Path
    saturation_clients: int = 64
    saturation_s: float = 8.0
    saturation_rounds: int = 2
    workers: int = 2
    write_shares: tuple[float, ...] = (0.05, 0.2)


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "cache",
        help="hot cacheable find: proxy with result cache vs FerretDB directly",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--ops", type=_positive_int, default=2000,
                   help="measured ops per (target, op, concurrency) (default: %(default)s)")
    p.add_argument("--rounds", type=_positive_int, default=4,
                   help="interleaved rounds (default: %(default)s)")
    p.add_argument("--concurrency", default="1,8",
                   help="comma-separated thread counts (default: %(default)s)")
    p.add_argument("--docs", type=_positive_int, default=300,
                   help="seeded documents (default: %(default)s)")
    p.add_argument("--hot", type=_positive_int, default=50,
                   help="distinct hot ids for by_id (default: %(default)s)")
    p.add_argument("--timeout-ms", type=float, default=5.0,
                   help="cache.timeout_ms of the cached proxy (default: %(default)s)")
    p.add_argument("--saturation-clients", type=int, default=64,
                   help="raw wire clients per target in the saturation phase, 0 to skip "
                   "it (default: %(default)s)")
    p.add_argument("--saturation-s", type=float, default=8.0,
                   help="measured seconds per target and saturation round "
                   "(default: %(default)s)")
    p.add_argument("--saturation-rounds", type=_positive_int, default=2,
                   help="saturation rounds (default: %(default)s)")
    p.add_argument("--workers", type=_positive_int, default=2,
                   help="load-generator processes of the saturation phase "
                   "(default: %(default)s)")
    p.add_argument("--write-shares", default="0.05,0.2",
                   help="comma-separated shares of writing clients for the writer-share "
                   "phase, empty to skip it (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="results file (default: bench/results/cache.json)")
    p.set_defaults(func=main)


# ---------------------------------------------------------------- stack


def start_cache_stack(timeout_ms: float) -> tuple[Stack, dict[str, str], str]:
    """FerretDB, Redis, a proxy without and a proxy with the cache (``timeout_ms``, a rule
    for the bench collection); the targets' URIs and the cached proxy's admin URL."""
    rule = {"match": {"collection": f"{COLLECTION}|{RW_COLLECTION}"}, "ttl_s": 3600}
    stack = start_stack(cache={"timeout_ms": timeout_ms, "rules": [rule]})
    if "proxy-cache" not in stack.targets:
        stack.stop()
        raise StackError(stack.unavailable.get("proxy-cache", "the cached proxy did not start"))
    uris = {"direct": stack.direct_uri, "proxy": stack.proxy_uri,
            "proxy-cache": stack.targets["proxy-cache"]}
    return stack, uris, stack.admin_urls["proxy-cache"]


# ---------------------------------------------------------------- load


OpFn = Callable[[int], None]


def _op(name: str, client: MongoClient[Doc], db: str, hot: int, rng: random.Random) -> OpFn:
    coll = client[db][COLLECTION]
    if name == "by_id":
        ids = [f"k{i:06d}" for i in range(hot)]

        def by_id(i: int) -> None:
            if coll.find_one({"_id": ids[(i * 7919 + rng_offset) % hot]}) is None:
                raise RuntimeError("by_id: not found")

        rng_offset = rng.randrange(hot)
        return by_id

    def list20(i: int) -> None:
        if len(list(coll.find({"status": STATUSES[i % len(STATUSES)]}).sort("n", 1)
                    .limit(20))) != 20:
            raise RuntimeError("list20: short result")

    return list20


def _cell(fns: list[OpFn], n_ops: int) -> tuple[float, list[int]]:
    """``n_ops`` over ``len(fns)`` threads: (wall seconds, latencies in ns)."""
    shares = [n_ops // len(fns) + (1 if t < n_ops % len(fns) else 0) for t in range(len(fns))]
    lat: list[list[int]] = [[] for _ in fns]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(fns) + 1)
    spans = [(0, 0)] * len(fns)

    def worker(t: int) -> None:
        clock, fn, out = time.perf_counter_ns, fns[t], lat[t]
        try:
            barrier.wait()
            start = clock()
            for i in range(shares[t]):
                t0 = clock()
                fn(i)
                out.append(clock() - t0)
            spans[t] = (start, clock())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(len(fns))]
    for th in threads:
        th.start()
    barrier.wait()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"bench cache: {errors[0]!r}") from errors[0]
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e9
    return wall, [x for per in lat for x in per]


@dataclass
class Row:
    target: str
    op: str
    concurrency: int
    ops: int
    ops_per_s: float
    p50_us: float
    p99_us: float
    ratio_vs_direct: float | None = None


def _warm_up(cfg: CacheBenchConfig, clients: dict[str, MongoClient[Doc]], db: str,
             admin_url: str) -> int:
    """Every hot query through every target (fills the pools and the cache), then
    through the cached proxy again until one whole pass was all hits: on a busy host a
    store can miss its budget and leave a hole. The number of cached passes (<= 20)."""
    rng = random.Random(1)
    n = max(cfg.hot, len(STATUSES)) * 2

    def one_pass(target: str) -> int:
        for op in OPS:
            fn = _op(op, clients[target], db, cfg.hot, rng)
            for i in range(n):
                fn(i)
        return n * len(OPS)

    for target in TARGETS:
        if target != "proxy-cache":
            one_pass(target)
    for passes in range(1, 21):
        before = cache_counts(admin_url)
        ran = one_pass("proxy-cache")
        deadline = time.monotonic() + 3  # an operation is counted just after its reply
        while True:
            now = counts_delta(before, cache_counts(admin_url))
            if now["hit"] + now["miss"] + now["bypass"] >= ran or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if now["hit"] == ran:
            return passes
    return passes


def _cache_log(stack: Stack) -> list[str]:
    """The cached proxy's ``result cache:`` log lines (the last 20)."""
    if stack.workdir is None:
        return []
    try:
        text = (Path(stack.workdir) / "proxy-cache.log").read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "result cache:" in line][-20:]


def run(cfg: CacheBenchConfig, stack: Stack, uris: dict[str, str],
        admin_url: str) -> dict[str, Any]:
    machine = machine_info()
    db = f"bench_cache_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"
    top = max(cfg.concurrency)
    clients: dict[str, MongoClient[Doc]] = {
        t: MongoClient(u, directConnection=True, maxPoolSize=top,
                       serverSelectionTimeoutMS=10_000, appname="bench-cache")
        for t, u in uris.items()
    }
    try:
        seed = clients["direct"][db][COLLECTION]
        seed.insert_many([{"_id": f"k{i:06d}", "status": STATUSES[i % len(STATUSES)], "n": i,
                           "pad": "x" * 64} for i in range(cfg.docs)])
        seed.create_index("status")
        warmup_passes = _warm_up(cfg, clients, db, admin_url)
        counts_before = cache_counts(admin_url)
        per_round = [cfg.ops // cfg.rounds + (1 if r < cfg.ops % cfg.rounds else 0)
                     for r in range(cfg.rounds)]
        walls: dict[tuple[str, str, int], float] = {}
        hists: dict[tuple[str, str, int], Any] = {}
        for r, n in enumerate(per_round):
            for c in cfg.concurrency:
                for op in OPS:
                    order = TARGETS if r % 2 == 0 else tuple(reversed(TARGETS))
                    for target in order:
                        fns = [_op(op, clients[target], db, cfg.hot, random.Random(r * 100 + t))
                               for t in range(c)]
                        wall, lat = _cell(fns, n)
                        key = (target, op, c)
                        walls[key] = walls.get(key, 0.0) + wall
                        record_ns(hists.setdefault(key, new_histogram()), lat)
        counts_after = cache_counts(admin_url)
        saturation = (_saturation(cfg, stack, uris, admin_url, db)
                      if cfg.saturation_clients else None)
        mixed = writer_shares(cfg, uris, admin_url, db, COLLECTION) if cfg.write_shares else None
        cache_log = _cache_log(stack)
        clients["direct"].drop_database(db)
    finally:
        for client in clients.values():
            client.close()
    rows: list[Row] = []
    for (target, op, c), wall in walls.items():
        hist = hists[(target, op, c)]
        rows.append(Row(target, op, c, cfg.ops, cfg.ops / wall,
                        float(hist.get_value_at_percentile(50)),
                        float(hist.get_value_at_percentile(99))))
    direct = {(r.op, r.concurrency): r.ops_per_s for r in rows if r.target == "direct"}
    for row in rows:
        row.ratio_vs_direct = row.ops_per_s / direct[(row.op, row.concurrency)]
    hits = counts_after.get("hit", 0) - counts_before.get("hit", 0)
    lookups = hits + counts_after.get("miss", 0) - counts_before.get("miss", 0)
    bypasses = counts_after.get("bypass", 0) - counts_before.get("bypass", 0)
    cached = [r for r in rows if r.target == "proxy-cache"]
    return {
        "config": {**asdict(cfg), "json_path": str(cfg.json_path),
                   "concurrency": list(cfg.concurrency)},
        "machine": machine,
        "results": [asdict(r) for r in rows],
        "warmup_cached_passes": warmup_passes,
        "cache_during_measurement": {"hits": hits, "lookups": lookups, "bypasses": bypasses,
                                     "hit_ratio": hits / lookups if lookups else None,
                                     "counts": counts_delta(counts_before, counts_after)},
        "closed_loop": {"min_ratio": min((r.ratio_vs_direct or 0) for r in cached)},
        "saturation": saturation,
        "writer_shares": mixed,
        # the cached proxy's cache log lines (circuit changes, pending invalidations)
        "cache_log": cache_log,
        "goal": {"ratio": GOAL, "basis": "saturation throughput, proxy-cache / direct",
                 "measured": None if saturation is None else saturation["ratio"],
                 "met": None if saturation is None else saturation["ratio"] >= GOAL},
    }


def _saturation(cfg: CacheBenchConfig, stack: Stack, uris: dict[str, str],
                admin_url: str, db: str) -> dict[str, Any]:
    """Each target's throughput at saturation: ``saturation_clients`` raw OP_MSG clients
    (``find`` by ``_id`` over the hot ids, one request at a time each) in ``workers``
    processes, so neither the GIL nor pymongo caps the load; targets alternate per
    round. The proxies' and FerretDB's CPU come from /proc."""
    pids = stack.pids
    load = LoadSpec(workers=cfg.workers, collection=COLLECTION, docs=cfg.hot,
                    insert_share=0.0, seed=1, warmup_s=1.0, duration_s=cfg.saturation_s,
                    open_batch=200, sample_interval_s=cfg.saturation_s)
    phases: dict[str, list[PhaseResult]] = {t: [] for t in TARGETS}
    before = cache_counts(admin_url)
    for rnd in range(cfg.saturation_rounds):
        for target in TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS)):
            print(f"bench cache: saturation round {rnd + 1}/{cfg.saturation_rounds} "
                  f"{target}", file=sys.stderr, flush=True)
            watched = {"ferretdb": pids["ferretdb"]}
            if target in pids:
                watched["proxy"] = pids[target]
            phases[target].append(run_phase(load, target, rnd, uris[target],
                                             cfg.saturation_clients, db, watched, None, 0))
    after = cache_counts(admin_url)
    rows: dict[str, dict[str, Any]] = {}
    for target, mine in phases.items():
        errors = sum(p.errors for p in mine)
        if errors:
            raise RuntimeError(f"bench cache: {errors} errors at saturation on {target}: "
                               f"{mine[0].error_samples or mine[-1].error_samples}")
        hist = mine[0].hist
        for p in mine[1:]:
            hist.add(p.hist)
        rows[target] = {
            "ops_per_s": sum(p.ops for p in mine) / sum(p.duration_s for p in mine),
            "p50_us": int(hist.get_value_at_percentile(50)),
            "p99_us": int(hist.get_value_at_percentile(99)),
            "proxy_cores": _mean([p.proxy_cpu_cores for p in mine]),
            "ferretdb_cores": _mean([p.ferretdb_cpu_cores for p in mine]),
            "loadgen_cores": _mean([sum(p.worker_cpu_cores) for p in mine]),
            "per_round_ops_per_s": [p.ops_per_s for p in mine],
        }
    direct = rows["direct"]["ops_per_s"]
    for row in rows.values():
        row["ratio_vs_direct"] = row["ops_per_s"] / direct
    return {
        "clients": cfg.saturation_clients, "workers": cfg.workers,
        "seconds_per_round": cfg.saturation_s, "rounds": cfg.saturation_rounds,
        "results": rows, "ratio": rows["proxy-cache"]["ratio_vs_direct"],
        "cache": counts_delta(before, after),
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def format_table(rows: list[Row]) -> str:
    lines = [f"{'target':<12} {'op':<7} {'conc':>4} {'ops/s':>9} {'p50 µs':>8} {'p99 µs':>8} "
             f"{'x direct':>8}"]
    for r in sorted(rows, key=lambda r: (r.op, r.concurrency, TARGETS.index(r.target))):
        lines.append(f"{r.target:<12} {r.op:<7} {r.concurrency:>4} {r.ops_per_s:>9.1f} "
                     f"{r.p50_us:>8.0f} {r.p99_us:>8.0f} {r.ratio_vs_direct or 0:>8.2f}")
    return "\n".join(lines)


def format_saturation(saturation: dict[str, Any]) -> str:
    def cores(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [f"{'target':<12} {'ops/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'x direct':>8} "
             f"{'proxy':>6} {'ferretdb':>8} {'lg':>5}"]
    for target in TARGETS:
        r = saturation["results"][target]
        lines.append(f"{target:<12} {r['ops_per_s']:>9.1f} {r['p50_us']:>8d} {r['p99_us']:>8d} "
                     f"{r['ratio_vs_direct']:>8.2f} {cores(r['proxy_cores']):>6} "
                     f"{cores(r['ferretdb_cores']):>8} {cores(r['loadgen_cores']):>5}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        concurrency = tuple(dict.fromkeys(int(x) for x in args.concurrency.split(",") if x))
    except ValueError:
        raise SystemExit(f"bench cache: bad --concurrency {args.concurrency!r}") from None
    if not concurrency or min(concurrency) < 1:
        raise SystemExit("bench cache: concurrency levels must be >= 1")
    if args.saturation_clients < 0 or args.saturation_s <= 0:
        raise SystemExit("bench cache: --saturation-clients >= 0 and --saturation-s > 0")
    try:
        shares = tuple(float(x) for x in args.write_shares.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"bench cache: bad --write-shares {args.write_shares!r}") from None
    if any(not 0 < x < 1 for x in shares):
        raise SystemExit("bench cache: write shares must be between 0 and 1")
    cfg = CacheBenchConfig(args.ops, args.rounds, concurrency, args.docs,
                           min(args.hot, args.docs), args.timeout_ms, args.json,
                           args.saturation_clients, args.saturation_s,
                           args.saturation_rounds, args.workers, shares)
    t0 = time.perf_counter()
    print("bench cache: starting FerretDB + Redis + two proxies", file=sys.stderr, flush=True)
    stack, uris, admin_url = start_cache_stack(cfg.timeout_ms)
    with stack:
        data = run(cfg, stack, uris, admin_url)
    data["total_wall_s"] = time.perf_counter() - t0
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    write_json(cfg.json_path, data)
    print(format_table([Row(**r) for r in data["results"]]))
    cache = data["cache_during_measurement"]
    goal = data["goal"]
    print(f"\ncache during measurement: {cache['hits']:.0f} hits of {cache['lookups']:.0f} "
          f"lookups, {cache['bypasses']:.0f} bypasses")
    saturation = data["saturation"]
    if saturation is not None:
        print(f"\nsaturation: {saturation['clients']} raw clients in {saturation['workers']} "
              f"processes, by_id, {saturation['rounds']} x {saturation['seconds_per_round']:g} s"
              " per target")
        print(format_saturation(saturation))
        counts = saturation["cache"]
        print(f"cache at saturation: {counts['hit']:.0f} hits, {counts['miss']:.0f} misses, "
              f"{counts['bypass']:.0f} bypasses, {counts['circuit_opened']:.0f} circuit "
              f"openings ({counts})")
        print(f"goal proxy-cache >= {GOAL}x direct at saturation: "
              f"{'met' if goal['met'] else 'NOT met'} ({goal['measured']:.2f}x)")
    for line in data["cache_log"]:
        print(f"proxy-cache log: {line}")
    mixed = data["writer_shares"]
    if mixed is not None:
        print(f"\nwriter shares: {cfg.saturation_clients} raw clients, readers: by_id on "
              f"the hot collection + {CHECK_SHARE:.0%} read-your-writes checks")
        print(format_mixed(mixed))
        stale = {share: sum(r["stale_reads"] for r in e["results"].values())
                 for share, e in mixed.items()}
        if any(stale.values()):
            print(f"CONSISTENCY PROBLEM: stale reads {stale}")
            return 1
    print(f"results: {cfg.json_path}")
    return 0
