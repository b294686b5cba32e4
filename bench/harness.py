"""`python -m bench run`: the multi-tenant workload against several targets, interleaved.

Targets
-------
``direct`` (FerretDB), ``tcp`` (HAProxy in TCP mode in front of the same FerretDB: the
floor cost of any extra hop), ``proxy`` (mongoproxy, default config) and ``proxy-cache``
(a second mongoproxy with a ``cache:`` section on a private redis-server, caching the
permission check, the task board and the dashboard).  Without ``--uri`` the harness
starts all of them on free loopback ports (bench/stack.py) and seeds the data set
(bench/seed.py) through ``direct``; with ``--uri NAME=URI`` (repeatable) it measures
already running targets against a database seeded beforehand with ``python -m bench
seed``.  A target that cannot be started is reported as unavailable, with the reason,
and never measured.

Method
------
* Rounds: ``--rounds`` rounds; in each, for each mode, every target runs one *phase*,
  the target order rotated by one each round, so drift (collections grow with the
  inserts; other load on the machine) hits every target alike.  ``--duration`` is the
  measured time per target and mode, split evenly over the rounds.
* A phase: the load generator's ``--workers`` processes (spawned once, kept for the
  run; asyncio + uvloop + pymongo's ``AsyncMongoClient``, one client per phase with
  ``directConnection=True``) start together at one instant, run ``--warmup`` seconds
  unmeasured, then ``--duration / --rounds`` seconds measured.  Operations are drawn
  from the weighted mix (bench/workload.py).  After each phase the documents it
  inserted are deleted (unmeasured), so every phase starts from the seeded data set:
  FerretDB's SQLite handler scans whole collections, and growing collections would
  make later phases slower than earlier ones.
* Closed loop (``--mode closed``): ``--concurrency`` clients in total, each sending its
  next operation when the previous one finished.
* Open loop (``--mode open``): ``--rate`` operations per second in total, at evenly
  spaced intended send times, whatever the target's speed.  At most ``--max-inflight``
  operations per worker are outstanding (a driver's pool is bounded too); an arrival
  that finds them all busy waits, and its latency is measured from its *intended* send
  time, so queueing is never hidden (no coordinated omission).  The service time (from
  the actual start) is reported beside it.
* What counts: operations *issued* (closed) or *intended* (open) inside the measured
  window.  After the window no new operation starts; those outstanding may finish
  within ``--drain`` seconds (their latency counts), the rest are cancelled and counted
  ``unfinished``.  issued = ok + errors + unfinished, per operation.  Throughput = ok /
  (last completion - window start), summed over the rounds.
* Latency: HdrHistogram per (mode, target, operation), µs, 1 µs .. 60 s, 3 significant
  figures, merged over workers and rounds: p50/p95/p99/p99.9/max.  Errors by code
  (server code, or the exception class for network errors).
* Load generator: each worker reports its CPU (getrusage) over the measured window; a
  worker above 0.9 cores, or an open-loop schedule that fell more than 50 ms behind,
  is flagged in ``warnings``: the generator, not the target, may be the limit.  The
  CPU of the processes the harness started (FerretDB, proxies, HAProxy, Redis) is
  recorded per phase from /proc.
* Cache: for targets with an admin endpoint, ``mongoproxy_cache_operations_total`` is
  read from ``/metrics`` at the start and end of each phase; hit ratio = hits / (hits +
  misses).
* Ratios (from the reported figures): proxy/direct and proxy/tcp throughput, p50 and
  p99; the cache's speed-up = proxy-cache throughput / proxy throughput and proxy p50
  / proxy-cache p50.

Outputs (``--out``, default bench/results, named ``--name``): ``NAME.json`` (machine,
versions, config, every phase, aggregated rows, ratios, warnings), ``NAME.md`` and
PNG charts (bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import multiprocessing
import os
import random
import secrets
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvloop
from hdrh.histogram import HdrHistogram
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import BulkWriteError, OperationFailure

from bench import report
from bench.core import (
    HIST_HIGHEST_US,
    HIST_LOWEST_US,
    HIST_SIGFIGS,
    machine_info,
    new_histogram,
    record_ns,
)
from bench.pool import _cpu_self, raise_nofile
from bench.seed import add_dataset_args, read_dataset, seed_database
from bench.spread import ROUND_PERCENTILES, with_spread
from bench.stack import (
    REPO_ROOT,
    Stack,
    find_haproxy,
    find_redis,
    process_cpu_seconds,
    start_stack,
    stop_processes,
)
from bench.workload import (
    CACHE_RULES,
    DEFAULT_WEIGHTS,
    OPERATIONS,
    Dataset,
    Filler,
    OpContext,
    UnexpectedResult,
    parse_weights,
)

TARGETS = ("direct", "tcp", "proxy", "proxy-cache")
MODES = ("closed", "open")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))

CPU_WARN_CORES = 0.9
LAG_WARN_MS = 50.0
PROGRESS_S = 0.5
CACHE_SECTION: dict[str, Any] = {
    "key_prefix": "mp:",
    "max_entry_bytes": 1_048_576,
    "rules": CACHE_RULES,
}

Doc = dict[str, Any]


def now_ns() -> int:
    return time.monotonic_ns()


def summarize(hist: HdrHistogram) -> dict[str, Any]:
    if hist.get_total_count() == 0:
        return {**{f"{k}_us": None for k, _ in PERCENTILES}, "max_us": None, "mean_us": None}
    out: dict[str, Any] = {
        f"{k}_us": int(hist.get_value_at_percentile(q)) for k, q in PERCENTILES
    }
    out["max_us"] = int(hist.get_max_value())
    out["mean_us"] = round(float(hist.get_mean_value()), 1)
    return out


def error_code(exc: BaseException) -> str:
    """A short, bounded name for an error: the server's code, else the class name."""
    if isinstance(exc, BulkWriteError):
        errs = exc.details.get("writeErrors") or []
        if errs:
            return f"code {errs[0].get('code')}"
    if isinstance(exc, OperationFailure) and exc.code is not None:
        return f"code {exc.code}"
    if isinstance(exc, UnexpectedResult):
        return "unexpected_result"
    return type(exc).__name__


# ---------------------------------------------------------------- worker side


@dataclass(frozen=True)
class PhaseSpec:
    run_id: str
    target: str
    uri: str
    database: str
    mode: str
    round: int
    worker: int
    workers: int
    clients: int  # closed loop: this worker's clients
    rate: float  # open loop: this worker's operations per second
    max_inflight: int
    start_ns: int
    warmup_s: float
    duration_s: float
    drain_s: float
    seed: int
    scale: float
    data_seed: int
    weights: tuple[tuple[str, float], ...]


@dataclass
class _OpStats:
    issued: int = 0
    ok: int = 0
    unfinished: int = 0

    def __post_init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.lat: list[int] = []
        self.svc: list[int] = []


class _Phase:
    """One worker's share of one phase (runs inside the worker process)."""

    def __init__(self, spec: PhaseSpec, conn: Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.measure_ns = spec.start_ns + int(spec.warmup_s * 1e9)
        self.end_ns = self.measure_ns + int(spec.duration_s * 1e9)
        self.stats = {name: _OpStats() for name, _ in spec.weights}
        self.names = [n for n, _ in spec.weights]
        self.weights = [w for _, w in spec.weights]
        self.done_total = 0
        self.errors_total = 0
        self.last_done_ns = 0
        self.max_lag_ns = 0
        self.cpu: dict[str, float] = {}

    async def op(self, ctx: OpContext, name: str, intended: int, started: int) -> None:
        measured = self.measure_ns <= intended < self.end_ns
        st = self.stats[name]
        if measured:
            st.issued += 1
        try:
            await OPERATIONS[name](ctx)
        except asyncio.CancelledError:
            if measured:
                st.unfinished += 1
            raise
        except Exception as e:
            self.errors_total += 1
            if measured:
                st.errors[error_code(e)] += 1
                self.last_done_ns = max(self.last_done_ns, now_ns())
            return
        done = now_ns()
        self.done_total += 1
        if measured:
            st.ok += 1
            st.lat.append(done - intended)
            st.svc.append(done - started)
            self.last_done_ns = max(self.last_done_ns, done)

    async def sleep_until(self, t_ns: int) -> None:
        # The event loop's timers may fire up to a millisecond early: never start early.
        while (delay := t_ns - now_ns()) > 0:
            await asyncio.sleep(delay / 1e9)

    async def closed_client(self, ctx: OpContext) -> None:
        await self.sleep_until(self.spec.start_ns)
        while True:
            t0 = now_ns()
            if t0 >= self.end_ns:
                return
            name = ctx.rng.choices(self.names, self.weights)[0]
            await self.op(ctx, name, t0, t0)

    async def open_scheduler(self, ctx: OpContext, tasks: set[asyncio.Task[None]]) -> None:
        spec = self.spec
        interval = 1e9 / spec.rate
        offset = interval * spec.worker / spec.workers  # workers interleave their arrivals
        sem = asyncio.Semaphore(spec.max_inflight)

        async def arrival(name: str, intended: int) -> None:
            async with sem:
                await self.op(ctx, name, intended, now_ns())

        k = 0
        while True:
            intended = spec.start_ns + int(offset + k * interval)
            k += 1
            if intended >= self.end_ns:
                return
            await self.sleep_until(intended)
            if intended >= self.measure_ns:
                self.max_lag_ns = max(self.max_lag_ns, now_ns() - intended)
            name = ctx.rng.choices(self.names, self.weights)[0]
            task = asyncio.create_task(arrival(name, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def progress(self) -> None:
        while True:
            self.conn.send(
                ("progress", self.spec.worker, self.done_total, self.errors_total, now_ns())
            )
            await asyncio.sleep(PROGRESS_S)

    async def cpu_marks(self) -> None:
        await self.sleep_until(self.measure_ns)
        self.cpu["start"] = _cpu_self()
        self.cpu["start_wall"] = time.perf_counter()

    async def run(self) -> Doc:
        spec = self.spec
        pool = spec.clients if spec.mode == "closed" else spec.max_inflight
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            spec.uri,
            directConnection=True,
            maxPoolSize=max(pool, 1),
            serverSelectionTimeoutMS=10_000,
            connectTimeoutMS=10_000,
            appname=f"mongoproxy-bench-{spec.target}",
        )
        tag = f"{spec.run_id}{spec.round}{spec.mode[0]}{spec.target}w{spec.worker}"
        seed = f"{spec.seed}-{spec.target}-{spec.mode}-{spec.round}-{spec.worker}"
        ctx = OpContext(
            db=client[spec.database],
            ds=Dataset(spec.scale, spec.data_seed),
            rng=random.Random(seed),
            tag=tag,
            filler=Filler(random.Random(seed)),
        )
        reporter = asyncio.create_task(self.progress())
        marker = asyncio.create_task(self.cpu_marks())
        try:
            await client.admin.command("ping")
            tasks: set[asyncio.Task[None]] = set()
            if spec.mode == "closed":
                tasks.update(
                    asyncio.create_task(self.closed_client(ctx)) for _ in range(spec.clients)
                )
                await self.sleep_until(self.end_ns)
            else:
                await self.open_scheduler(ctx, tasks)
            # Drain: what is outstanding may finish within drain_s, the rest is cancelled.
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=spec.drain_s)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending)
            await marker
            cpu_s = _cpu_self() - self.cpu["start"]
            cpu_wall = time.perf_counter() - self.cpu["start_wall"]
        finally:
            reporter.cancel()
            marker.cancel()
            await client.close()
        ops: dict[str, Doc] = {}
        for name, st in self.stats.items():
            lat, svc = new_histogram(), new_histogram()
            record_ns(lat, st.lat)
            record_ns(svc, st.svc)
            ops[name] = {
                "issued": st.issued,
                "ok": st.ok,
                "errors": dict(st.errors),
                "unfinished": st.unfinished,
                "lat": lat.encode(),
                "svc": svc.encode(),
            }
        return {
            "worker": spec.worker,
            "ops": ops,
            "last_done_ns": self.last_done_ns,
            "cpu_s": cpu_s,
            "cpu_wall_s": cpu_wall,
            "max_lag_ms": self.max_lag_ns / 1e6,
        }


def _worker_main(conn: Connection) -> None:
    """Worker process: run the phases the parent sends until it sends None."""
    while True:
        spec = conn.recv()
        if spec is None:
            break
        try:
            result = uvloop.run(_Phase(spec, conn).run())
        except BaseException as e:
            conn.send(("failed", spec.worker, f"{type(e).__name__}: {e}"))
            raise
        conn.send(("result", spec.worker, result))
    conn.close()


# ---------------------------------------------------------------- parent side


@dataclass(frozen=True)
class RunConfig:
    targets: tuple[str, ...]
    modes: tuple[str, ...]
    duration_s: float
    rounds: int
    warmup_s: float
    drain_s: float
    concurrency: int
    rate: float
    max_inflight: int
    workers: int
    weights: dict[str, float]
    seed: int
    scale: float
    data_seed: int
    database: str
    tenancy: str
    pool_max_size: int | None
    uris: dict[str, str]
    admin_urls: dict[str, str]
    out: Path
    name: str
    quiet: bool


class Workers:
    """The load generator's processes, kept for the whole run."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), name=f"bench-load-{i}")
            proc.daemon = True
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    def close(self) -> None:
        for p in self.pipes:
            with contextlib.suppress(OSError):
                p.send(None)
        stop_processes(self.procs, self.pipes)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def scrape_cache(admin_url: str | None) -> dict[str, float] | None:
    """``mongoproxy_cache_operations_total`` summed by ``result`` (None: no endpoint)."""
    if admin_url is None:
        return None
    try:
        with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "mongoproxy_cache_operations":
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                key = s.labels.get("result", "?")
                out[key] = out.get(key, 0.0) + s.value
    return out


class Progress:
    """A live line per phase on stderr (rewritten in place on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0
        self.prev: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, label: str, start_ns: int, measure_ns: int, done: int, errors: int,
               final: bool = False) -> None:  # fmt: skip
        if self.quiet:
            return
        t = time.monotonic()
        if self.prev is not None and t - self.prev[0] >= 0.9:
            self.rate = (done - self.prev[1]) / (t - self.prev[0])
            self.prev = (t, done)
        elif self.prev is None:
            self.prev = (t, done)
        if not final and not self.tty and t - self.last_print < 5.0:
            return
        self.last_print = t
        now = now_ns()
        stage = "warm-up" if now < measure_ns else "measure"
        line = (
            f"{label}  {stage} {max(0, now - start_ns) / 1e9:5.1f}s  ops {done:>7}  "
            f"rate {self.rate:7.1f}/s  errors {errors}"
        )
        if self.tty:
            print(f"\r{line:<100}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def reset(self) -> None:
        self.prev = None
        self.rate = 0.0
        self.last_print = time.monotonic()


def run_phase(
    cfg: RunConfig,
    workers: Workers,
    run_id: str,
    target: str,
    uri: str,
    mode: str,
    round_no: int,
    phase_s: float,
    pids: dict[str, int],
    admin_url: str | None,
    progress: Progress,
) -> Doc:
    n = len(workers.pipes)
    clients = _split(cfg.concurrency, n)
    start_ns = now_ns() + 300_000_000
    measure_ns = start_ns + int(cfg.warmup_s * 1e9)
    for i, pipe in enumerate(workers.pipes):
        pipe.send(
            PhaseSpec(
                run_id=run_id,
                target=target,
                uri=uri,
                database=cfg.database,
                mode=mode,
                round=round_no,
                worker=i,
                workers=n,
                clients=clients[i],
                rate=cfg.rate / n,
                max_inflight=cfg.max_inflight,
                start_ns=start_ns,
                warmup_s=cfg.warmup_s,
                duration_s=phase_s,
                drain_s=cfg.drain_s,
                seed=cfg.seed,
                scale=cfg.scale,
                data_seed=cfg.data_seed,
                weights=tuple(cfg.weights.items()),
            )
        )
    label = f"[{target:<11} {mode:<6} round {round_no + 1}/{cfg.rounds}]"
    progress.reset()
    done = [0] * n
    errs = [0] * n
    results: dict[int, Doc] = {}
    cpu0: dict[str, float | None] | None = None
    cache0: dict[str, float] | None = None
    deadline = measure_ns + int((phase_s + cfg.drain_s + 120) * 1e9)
    while len(results) < n:
        if cpu0 is None and now_ns() >= measure_ns:
            cpu0 = {k: process_cpu_seconds(v) for k, v in pids.items()}
            cache0 = scrape_cache(admin_url)
        if now_ns() > deadline:
            raise RuntimeError(f"{label}: workers did not report in time")
        for i, pipe in enumerate(workers.pipes):
            while pipe.poll():
                try:
                    msg = pipe.recv()
                except EOFError:
                    raise RuntimeError(
                        f"load worker {i} exited ({workers.procs[i].exitcode})"
                    ) from None
                if msg[0] == "progress":
                    done[i], errs[i] = msg[2], msg[3]
                elif msg[0] == "result":
                    results[i] = msg[2]
                else:
                    raise RuntimeError(f"load worker {i} failed in {label}: {msg[2]}")
        progress.update(label, start_ns, measure_ns, sum(done), sum(errs))
        time.sleep(0.05)
    cpu1 = {k: process_cpu_seconds(v) for k, v in pids.items()}
    cache1 = scrape_cache(admin_url)
    end_wall_ns = now_ns()

    ops: dict[str, Doc] = {}
    for name in cfg.weights:
        lat, svc = new_histogram(), new_histogram()
        errors: Counter[str] = Counter()
        issued = ok = unfinished = 0
        for r in results.values():
            o = r["ops"][name]
            lat.add(HdrHistogram.decode(o["lat"]))
            svc.add(HdrHistogram.decode(o["svc"]))
            errors.update(o["errors"])
            issued += o["issued"]
            ok += o["ok"]
            unfinished += o["unfinished"]
        ops[name] = {
            "issued": issued,
            "ok": ok,
            "errors": dict(errors),
            "unfinished": unfinished,
            "lat": lat,
            "svc": svc,
        }
    end_ns = measure_ns + int(phase_s * 1e9)
    last_done = max([end_ns, *(int(r["last_done_ns"]) for r in results.values())])
    wall_s = (last_done - measure_ns) / 1e9
    ok_total = sum(o["ok"] for o in ops.values())
    err_total = sum(sum(o["errors"].values()) for o in ops.values())
    server_cpu: dict[str, float | None] = {}
    for k in pids:
        a = (cpu0 or {}).get(k)
        b = cpu1.get(k)
        server_cpu[k] = None if a is None or b is None else round(b - a, 3)
    cache = None
    if cache0 is not None and cache1 is not None:
        cache = {k: cache1.get(k, 0.0) - cache0.get(k, 0.0) for k in set(cache0) | set(cache1)}
    progress.update(label, start_ns, measure_ns, sum(done), sum(errs), final=True)
    workers_out = [
        {
            "worker": r["worker"],
            "cpu_s": round(r["cpu_s"], 3),
            "cores": round(r["cpu_s"] / r["cpu_wall_s"], 3) if r["cpu_wall_s"] > 0 else 0.0,
            "max_lag_ms": round(r["max_lag_ms"], 3),
        }
        for r in sorted(results.values(), key=lambda r: int(r["worker"]))
    ]
    return {
        "target": target,
        "mode": mode,
        "round": round_no,
        "duration_s": phase_s,
        "wall_s": wall_s,
        "stack_wall_s": (end_wall_ns - measure_ns) / 1e9,
        "ok": ok_total,
        "errors": err_total,
        "ops_per_s": ok_total / wall_s if wall_s > 0 else 0.0,
        "workers": workers_out,
        "server_cpu_s": server_cpu,
        "cache": cache,
        "ops": ops,  # histograms inside: stripped before writing JSON
    }


def aggregate(cfg: RunConfig, phases: list[Doc], targets: list[str]) -> list[Doc]:
    """Rows per (mode, target, op) plus an ``op: "all"`` row per (mode, target)."""
    rows: list[Doc] = []
    for mode in cfg.modes:
        for target in targets:
            mine = [p for p in phases if p["mode"] == mode and p["target"] == target]
            if not mine:
                continue
            wall = sum(p["wall_s"] for p in mine)
            all_lat, all_svc = new_histogram(), new_histogram()
            tot: Counter[str] = Counter()
            all_errors: Counter[str] = Counter()
            op_rows: list[Doc] = []
            for name in cfg.weights:
                lat, svc = new_histogram(), new_histogram()
                errors: Counter[str] = Counter()
                issued = ok = unfinished = 0
                for p in mine:
                    o = p["ops"][name]
                    lat.add(o["lat"])
                    svc.add(o["svc"])
                    errors.update(o["errors"])
                    issued += o["issued"]
                    ok += o["ok"]
                    unfinished += o["unfinished"]
                all_lat.add(lat)
                all_svc.add(svc)
                all_errors.update(errors)
                tot.update({"issued": issued, "ok": ok, "unfinished": unfinished})
                op_rows.append(
                    _row(mode, target, name, issued, ok, errors, unfinished, wall, lat, svc)
                )
            hits = misses = 0.0
            have_cache = False
            for p in mine:
                if p["cache"]:
                    have_cache = True
                    hits += p["cache"].get("hit", 0.0)
                    misses += p["cache"].get("miss", 0.0)
            all_row = _row(
                mode, target, "all", tot["issued"], tot["ok"], all_errors, tot["unfinished"],
                wall, all_lat, all_svc,
            )  # fmt: skip
            all_row["cache_hits"] = int(hits) if have_cache else None
            all_row["cache_misses"] = int(misses) if have_cache else None
            all_row["cache_hit_ratio"] = (
                hits / (hits + misses) if have_cache and hits + misses > 0 else None
            )
            all_row["loadgen_cores_max"] = max(w["cores"] for p in mine for w in p["workers"])
            rows.append(all_row)
            rows.extend(op_rows)
    return rows


def _row(mode: str, target: str, op: str, issued: int, ok: int, errors: Counter[str],
         unfinished: int, wall: float, lat: HdrHistogram, svc: HdrHistogram) -> Doc:  # fmt: skip
    return {
        "mode": mode,
        "target": target,
        "op": op,
        "issued": issued,
        "ok": ok,
        "errors": sum(errors.values()),
        "errors_by_code": dict(sorted(errors.items())),
        "unfinished": unfinished,
        "wall_s": round(wall, 4),
        "ops_per_s": ok / wall if wall > 0 else 0.0,
        **summarize(lat),
        "service": summarize(svc),
    }


RATIO_PAIRS = (("proxy", "direct"), ("proxy", "tcp"), ("tcp", "direct"), ("proxy-cache", "proxy"),
               ("proxy-cache", "direct"))  # fmt: skip


def ratios(rows: list[Doc]) -> list[Doc]:
    """Throughput, p50 and p99 ratios of target pairs, per mode and operation.

    ``throughput`` = a ops/s / b ops/s; ``p50``/``p99`` = a latency / b latency (above 1:
    a is slower); for proxy-cache vs proxy the speed-up is 1 / p50 ratio.
    """
    by_key = {(r["mode"], r["target"], r["op"]): r for r in rows}
    out: list[Doc] = []
    for (mode, target, op), r in by_key.items():
        for a, b in RATIO_PAIRS:
            if target != a or (mode, b, op) not in by_key:
                continue
            o = by_key[(mode, b, op)]

            def div(x: float | None, y: float | None) -> float | None:
                return None if x is None or y is None or y == 0 else x / y

            out.append(
                {
                    "mode": mode,
                    "op": op,
                    "a": a,
                    "b": b,
                    "throughput": div(r["ops_per_s"], o["ops_per_s"]),
                    "p50": div(r["p50_us"], o["p50_us"]),
                    "p99": div(r["p99_us"], o["p99_us"]),
                }
            )
    return out


def round_ratios(phases: list[Doc]) -> list[Doc]:
    """Throughput ratio of each target pair within each round (same mode): the spread
    over the rounds shows how much of a ratio is noise."""
    by_key = {(p["mode"], p["round"], p["target"]): p for p in phases}
    out: list[Doc] = []
    modes = list(dict.fromkeys(p["mode"] for p in phases))
    rounds = sorted({p["round"] for p in phases})
    for mode in modes:
        for a, b in RATIO_PAIRS:
            values = []
            for rnd in rounds:
                pa, pb = by_key.get((mode, rnd, a)), by_key.get((mode, rnd, b))
                if pa is None or pb is None or pb["ops_per_s"] == 0:
                    continue
                values.append(pa["ops_per_s"] / pb["ops_per_s"])
            if values:
                out.append({"mode": mode, "a": a, "b": b, "throughput_per_round": values})
    return out


def _versions(stack: Stack | None) -> Doc:
    def cmd(args: list[str]) -> str | None:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return None
        if proc.returncode != 0:
            return None
        return (proc.stdout or proc.stderr).strip().splitlines()[0]

    out: Doc = {}
    for pkg in ("mongoproxy", "pymongo", "hdrhistogram", "matplotlib", "uvloop"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    if stack is not None and stack.started:
        haproxy = find_haproxy()
        redis = find_redis()
        out["haproxy"] = cmd([haproxy, "-v"]) if haproxy else None
        out["redis"] = cmd([redis, "--version"]) if redis else None
    return out


def _strip(phase: Doc) -> Doc:
    """A phase for the JSON: per-op counts and percentiles instead of histograms, and
    the percentiles of all its operations (the report's per-round spread)."""
    ops = {}
    merged = new_histogram()
    for name, o in phase["ops"].items():
        merged.add(o["lat"])
        ops[name] = {
            **{k: o[k] for k in ("issued", "ok", "errors", "unfinished")},
            **{k: v for k, v in summarize(o["lat"]).items() if k in ROUND_PERCENTILES},
        }
    latency = {k: v for k, v in summarize(merged).items() if k in ROUND_PERCENTILES}
    return {**phase, "ops": ops, "latency": latency}


def run(cfg: RunConfig, stack: Stack | None) -> Doc:
    machine = machine_info()
    uris = dict(cfg.uris) if stack is None else dict(stack.targets)
    admin_urls = dict(cfg.admin_urls) if stack is None else dict(stack.admin_urls)
    unavailable = {} if stack is None else dict(stack.unavailable)
    for t in cfg.targets:
        if t not in uris and t not in unavailable:
            unavailable[t] = "not started and no --uri given"
    targets = [t for t in cfg.targets if t in uris]
    if not targets:
        raise SystemExit(f"bench run: no target available: {unavailable}")

    # Seeding, and the clean-up between phases, go straight to the database when we can
    # (an enforcing proxy refuses an unscoped delete).
    first = stack.direct_uri if stack is not None else uris.get("direct", uris[targets[0]])
    server: Doc = {}
    client: MongoClient[Doc] = MongoClient(
        first, directConnection=True, appname="mongoproxy-bench-run"
    )
    db = client[cfg.database]
    try:
        if stack is not None:
            _log(f"bench run: seeding scale {cfg.scale} through direct ({cfg.database})")
            seeded: Doc | None = seed_database(db, Dataset(cfg.scale, cfg.data_seed), log=False)
            ds = Dataset(cfg.scale, cfg.data_seed)
        else:
            seeded = None
            ds = read_dataset(db)
        info = client.admin.command("buildInfo")
        server = {k: info.get(k) for k in ("version", "ferretdbVersion") if k in info}
    except BaseException:
        client.close()
        raise
    cfg = RunConfig(**{**cfg.__dict__, "scale": ds.scale, "data_seed": ds.seed})

    pids = stack.pids if stack is not None else {}
    run_id = secrets.token_hex(3)
    phase_s = cfg.duration_s / cfg.rounds
    phases: list[Doc] = []
    workers = Workers(cfg.workers)
    progress = Progress(cfg.quiet)
    t0 = time.perf_counter()
    try:
        for rnd in range(cfg.rounds):
            k = rnd % len(targets)
            order = targets[k:] + targets[:k]
            for mode in cfg.modes:
                for target in order:
                    phases.append(
                        run_phase(cfg, workers, run_id, target, uris[target], mode, rnd,
                                  phase_s, pids, admin_urls.get(target), progress)
                    )  # fmt: skip
                    phases[-1]["cleanup"] = remove_inserted(db)
    finally:
        workers.close()
        client.close()
    total_s = time.perf_counter() - t0
    rows = aggregate(cfg, phases, targets)
    stripped = [_strip(p) for p in phases]

    warnings: list[str] = []
    for mode in cfg.modes:
        for target in targets:
            mine = [p for p in phases if p["mode"] == mode and p["target"] == target]
            cores = max(w["cores"] for p in mine for w in p["workers"])
            if cores > CPU_WARN_CORES:
                warnings.append(
                    f"{target} {mode}: a load worker used {cores:.0%} of a core: the load "
                    "generator may be the limit (use more --workers)"
                )
            lag = max(w["max_lag_ms"] for p in mine for w in p["workers"])
            if mode == "open" and lag > LAG_WARN_MS:
                warnings.append(
                    f"{target} open: the arrival schedule fell up to {lag:.0f} ms behind (the "
                    "machine's cores were busy); latency still counts from the intended time"
                )
    for t, why in unavailable.items():
        warnings.append(f"target {t} unavailable: {why}")
    if machine.get("loadavg_at_start") and machine["loadavg_at_start"][0] > 1.0:
        warnings.append(
            f"load average {machine['loadavg_at_start'][0]:.2f} at start: the machine is shared"
        )

    return {
        "benchmark": "run",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "command": "python -m bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "versions": {**_versions(stack), "server": server},
        "config": {
            "targets": list(cfg.targets),
            "measured_targets": targets,
            "modes": list(cfg.modes),
            "duration_s_per_target_and_mode": cfg.duration_s,
            "rounds": cfg.rounds,
            "phase_s": phase_s,
            "warmup_s": cfg.warmup_s,
            "drain_s": cfg.drain_s,
            "concurrency": cfg.concurrency,
            "rate": cfg.rate,
            "max_inflight_per_worker": cfg.max_inflight,
            "workers": cfg.workers,
            "weights": cfg.weights,
            "seed": cfg.seed,
            "dataset": {"scale": cfg.scale, "seed": cfg.data_seed, "counts": ds.totals()},
            "database": cfg.database,
            "tenancy": cfg.tenancy,
            "pool_max_size": cfg.pool_max_size,
            "stack": "started by bench" if stack is not None else "external",
            "uris": uris,
            "cache_section": CACHE_SECTION if "proxy-cache" in cfg.targets else None,
            "order": "per round and mode, every target once, order rotated by one per round",
            "histogram": {"unit": "us", "lowest": HIST_LOWEST_US, "highest": HIST_HIGHEST_US,
                          "significant_figures": HIST_SIGFIGS},
        },
        "seeded": seeded,
        "unavailable": unavailable,
        "total_s": total_s,
        "phases": stripped,
        "results": rows,
        "ratios": with_spread(ratios(rows), stripped),
        "round_ratios": round_ratios(phases),
        "warnings": warnings,
    }


def remove_inserted(db: Any) -> dict[str, int]:
    """Delete what the workload inserted (ids ``<tenant>-ts-...``, ``<tenant>-n-...``), so
    every phase starts from the seeded data set: FerretDB's SQLite handler scans whole
    collections, and letting them grow would make later phases slower than earlier ones."""
    out: dict[str, int] = {}
    for coll, kind in (("timesheets", "ts"), ("notifications", "n")):
        res = db[coll].delete_many({"_id": {"$regex": f"^t[0-9]+-{kind}-"}})
        out[coll] = int(res.deleted_count)
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- command line


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}: {text}")
        return values

    return parse


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text}")
    return name, value


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value

    return parse


def _weights(text: str) -> dict[str, float]:
    try:
        return parse_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="the multi-tenant workload: direct vs tcp vs proxy vs proxy-cache, interleaved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", type=_csv(TARGETS), default=TARGETS,
                   help="comma-separated, from direct,tcp,proxy,proxy-cache (default: all)")
    p.add_argument("--uri", type=_name_value, action="append", default=[], metavar="NAME=URI",
                   help="measure a running target (repeatable; the database must be seeded); "
                   "without --uri a private stack is started and seeded")
    p.add_argument("--admin", type=_name_value, action="append", default=[], metavar="NAME=URL",
                   help="admin endpoint of a --uri proxy target (for the cache hit ratio)")
    p.add_argument("--mode", type=_csv(MODES), default=("closed",),
                   help="closed, open or closed,open (default: closed)")
    p.add_argument("--duration", type=_positive(float), default=15.0,
                   help="measured seconds per target and mode, split over the rounds "
                   "(default: %(default)s)")
    p.add_argument("--rounds", type=_positive(int), default=3, help="default: %(default)s")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unmeasured seconds at the start of each phase (default: %(default)s)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="seconds outstanding operations may take after a phase's window "
                   "(default: %(default)s)")
    p.add_argument("--concurrency", type=_positive(int), default=16,
                   help="closed loop: clients in total (default: %(default)s)")
    p.add_argument("--rate", type=_positive(float), default=40.0,
                   help="open loop: operations per second in total (default: %(default)s)")
    p.add_argument("--max-inflight", type=_positive(int), default=32,
                   help="open loop: outstanding operations per worker at most "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=_positive(int), default=2,
                   help="load generator processes (default: %(default)s)")
    p.add_argument("--weights", type=_weights, default=dict(DEFAULT_WEIGHTS),
                   help="name=weight,... replacing default weights (0 drops an operation); "
                   "default: " + ",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items()))
    p.add_argument("--op-seed", type=int, default=1, dest="op_seed",
                   help="random seed of the operation mix (default: 1)")
    p.add_argument("--pool-max-size", type=_positive(int), default=None, metavar="N",
                   help="upstream.pool.max_size of the started proxies (default: the "
                   "proxy's default, 100)")
    p.add_argument("--tenancy", choices=("off", "enforce"), default="off",
                   help="started proxies enforce tenant_id on every collection but tenants")
    add_dataset_args(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default: bench/results)")
    p.add_argument("--name", default="run", help="output file stem (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=main)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> RunConfig:
    uris = dict(args.uri)
    targets = tuple(args.targets)
    if uris:
        if args.targets == TARGETS:
            targets = tuple(uris)  # --uri names the targets
        missing = [t for t in targets if t not in uris]
        if missing:
            raise SystemExit(f"bench run: --targets {','.join(missing)} have no --uri")
    return RunConfig(
        targets=targets,
        modes=tuple(args.mode),
        duration_s=args.duration,
        rounds=args.rounds,
        warmup_s=max(0.0, args.warmup),
        drain_s=max(0.0, args.drain),
        concurrency=args.concurrency,
        rate=args.rate,
        max_inflight=args.max_inflight,
        workers=args.workers,
        weights=args.weights,
        seed=args.op_seed,
        scale=args.scale,
        data_seed=args.seed,
        database=args.db,
        tenancy=args.tenancy,
        pool_max_size=args.pool_max_size,
        uris=uris,
        admin_urls=dict(args.admin),
        out=args.out,
        name=args.name,
        quiet=args.quiet,
    )


TENANCY_SECTION: Doc = {"mode": "enforce", "collections": ["*"], "exempt": ["tenants"]}


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    stack: Stack | None = None
    if not cfg.uris:
        raise_nofile()  # the children (HAProxy, the proxies) inherit it
        _log(f"bench run: starting FerretDB + {', '.join(t for t in cfg.targets if t != 'direct')}")
        extra = {"tenancy": TENANCY_SECTION} if cfg.tenancy == "enforce" else None
        stack = start_stack(
            pool_max_size=cfg.pool_max_size,
            tcp="tcp" in cfg.targets,
            cache=CACHE_SECTION if "proxy-cache" in cfg.targets else None,
            proxy_extra=extra,
        )
    try:
        data = run(cfg, stack)
    finally:
        if stack is not None:
            stack.stop()
    paths = report.write_run_outputs(data, cfg.out, cfg.name)
    print(report.run_markdown(data))
    for w in data["warnings"]:
        print(f"WARNING: {w}")
    print("results: " + ", ".join(str(p) for p in paths))
    return 0

