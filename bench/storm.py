"""`python -m bench storm`: N client connections opened at once, each running a few operations.

For each target (default: the proxy alone), ``--connections`` raw client connections are
opened all at the same instant, spread over ``--workers`` load processes (each opens its
share concurrently, no batching: a storm, as when every application instance restarts
together).  Each connection does what a driver does first, TCP connect + ``hello``
(timed together: the *connect time*), then ``--ops`` operations one after another: the
session lookup of a user, ``find({_id}).limit(1)`` on the seeded ``users`` (a string
``_id`` alone: the only filter FerretDB's SQLite handler pushes down to SQLite).
Connections stay open until every one has finished, then close together.  A request
that waits longer than the proxy's ``wait_queue_timeout_ms`` (10 s by default) for a
pooled connection is answered 89 NetworkTimeout: counted under ``code 89``.

Reported per target: connections asked for and opened, connect-time and operation
percentiles (HdrHistogram, µs), errors by kind, and, for the process behind the target
(the proxy; HAProxy for ``tcp``; FerretDB for ``direct``): RSS before, at its peak during
the storm (sampled every 50 ms), with every connection open, and after they closed; the
most upstream connections it held to FerretDB at once (from /proc), and at rest.

**Verdict.** The storm passes when at most ``--max-error-rate`` of the connections fail
(default 0: none); the report says PASSED or FAILED first, with the errors by code, and
the command exits 1 on a failure (after writing its JSON and Markdown). Each connection's
operations queue for the pool's connections: when the backend serves fewer than about
``connections x ops / wait_queue_timeout_ms`` operations a second, the last ones are
answered 89 (a slower machine, or a busier one, fails a storm a faster one passes).

Without ``--uri`` a private stack is started and seeded (bench/stack.py, bench/seed.py).
RLIMIT_NOFILE is raised to the hard limit first (the proxy and the workers inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvloop
from hdrh.histogram import HdrHistogram
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from bench import report
from bench.core import machine_info, new_histogram, record_ns, write_json
from bench.harness import CACHE_SECTION
from bench.pool import (
    OP_TIMEOUT_S,
    ErrorTally,
    WireClient,
    _cpu_self,
    _open_many,
    hist_summary,
    raise_nofile,
    rss_kb,
    upstream_connections,
)
from bench.seed import add_dataset_args, read_dataset, seed_database
from bench.stack import Stack, process_cpu_seconds, start_stack, stop_processes
from bench.workload import Dataset, tenant_id, user_id

TARGETS = ("direct", "tcp", "proxy", "proxy-cache")
# The process whose memory and upstream connections a target's storm is about.
PROCESS_OF = {"proxy": "proxy", "proxy-cache": "proxy-cache", "tcp": "haproxy",
              "direct": "ferretdb"}  # fmt: skip
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "storm.json"
SAMPLE_S = 0.05

Doc = dict[str, Any]


@dataclass(frozen=True)
class StormSpec:
    worker: int
    target: str
    host: str
    port: int
    connections: int
    ops: int
    database: str
    scale: float
    data_seed: int
    seed: int


def _worker_main(spec: StormSpec, conn: Connection) -> None:
    try:
        result = uvloop.run(_storm(spec, conn))
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("closed", result))
    conn.close()


async def _storm(spec: StormSpec, conn: Connection) -> Doc:
    loop = asyncio.get_running_loop()
    ds = Dataset(spec.scale, spec.data_seed)
    rng = random.Random(f"{spec.seed}-storm-{spec.target}-{spec.worker}")
    conn.send(("up",))
    start_ns: int = await loop.run_in_executor(None, conn.recv)
    await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
    cpu0, t0 = _cpu_self(), time.perf_counter()
    n = spec.connections
    app = f"mongoproxy-bench-storm-{spec.target}"
    clients, connect_ns, errors, open_wall = await _open_many(spec.host, spec.port, n, n, app)
    open_cpu = _cpu_self() - cpu0
    op_ns: list[int] = []

    async def work(c: WireClient) -> None:
        for _ in range(spec.ops):
            i = rng.choices(range(ds.tenants), ds.tenant_weights)[0]
            t = tenant_id(i)
            uid = user_id(t, rng.randrange(ds.counts["users"][i]))
            cmd = {"find": "users", "filter": {"_id": uid}, "limit": 1, "singleBatch": True,
                   "$db": spec.database}  # fmt: skip
            t1 = time.perf_counter_ns()
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    reply = await c.command(cmd)
                batch = reply.get("cursor", {}).get("firstBatch", [])
                if reply.get("ok") != 1 or len(batch) != 1:
                    _tally(errors, f"code {reply.get('code')}", f"find {uid!r}: {reply}")
                    return
            except Exception as e:
                errors.add(e)
                return  # this connection is in an unknown state: stop using it
            op_ns.append(time.perf_counter_ns() - t1)

    await asyncio.gather(*(work(c) for c in clients))
    storm_wall = time.perf_counter() - t0
    cpu = _cpu_self() - cpu0
    connect, ops = new_histogram(), new_histogram()
    record_ns(connect, connect_ns)
    record_ns(ops, op_ns)
    conn.send(("ready", len(clients)))
    await loop.run_in_executor(None, conn.recv)  # every worker is done: close together
    for c in clients:
        c.close()
    await asyncio.sleep(0.2)
    return {
        "worker": spec.worker,
        "opened": len(clients),
        "open_wall_s": open_wall,
        "storm_wall_s": storm_wall,
        "cpu_s": cpu,
        "open_cpu_s": open_cpu,
        "errors": errors.count,
        "errors_by_kind": errors.by_kind,
        "error_samples": errors.samples,
        "connect": connect.encode(),
        "ops": ops.encode(),
    }


def _tally(errors: ErrorTally, kind: str, sample: str) -> None:
    errors.count += 1
    errors.by_kind[kind] = errors.by_kind.get(kind, 0) + 1
    if len(errors.samples) < 5:
        errors.samples.append(sample[:300])


def _recv(pipe: Connection, proc: BaseProcess, timeout: float) -> tuple[Any, ...]:
    if not pipe.poll(timeout):
        raise RuntimeError(f"{proc.name}: no message within {timeout:.0f} s")
    try:
        msg: tuple[Any, ...] = pipe.recv()
    except EOFError:
        raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}") from None
    if msg[0] == "failed":
        raise RuntimeError(f"{proc.name} failed: {msg[1]}")
    return msg


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def storm_target(args: argparse.Namespace, target: str, uri: str, ds: Dataset,
                 pids: dict[str, int], upstream_port: int | None) -> Doc:  # fmt: skip
    pid = pids.get(PROCESS_OF[target])
    host, port = parse_uri(uri)["nodelist"][0]
    ctx = multiprocessing.get_context("spawn")
    shares = [s for s in _split(args.connections, args.workers) if s > 0]
    procs: list[BaseProcess] = []
    pipes: list[Connection] = []
    for i, share in enumerate(shares):
        spec = StormSpec(i, target, str(host), int(port), share, args.ops, args.db, ds.scale,
                         ds.seed, args.op_seed)  # fmt: skip
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(spec, child), name=f"bench-storm-{i}")
        proc.daemon = True
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)

    def upstream() -> int | None:
        if pid is None or upstream_port is None:
            return None
        return upstream_connections(pid, upstream_port)

    try:
        for p, w in zip(pipes, procs, strict=True):
            _recv(p, w, 60)
        rss_before, up_rest = rss_kb(pid), upstream()
        cpu_before = {k: process_cpu_seconds(v) for k, v in pids.items()}
        start_ns = time.monotonic_ns() + 200_000_000
        for p in pipes:
            p.send(start_ns)
        peak = rss_before or 0
        up_max = up_rest or 0
        ready: dict[int, int] = {}
        deadline = time.monotonic() + 600
        while len(ready) < len(pipes):
            if time.monotonic() > deadline:
                raise RuntimeError("storm: workers did not finish in 600 s")
            peak = max(peak, rss_kb(pid) or 0)
            up_max = max(up_max, upstream() or 0)
            for i, (p, w) in enumerate(zip(pipes, procs, strict=True)):
                if i not in ready and p.poll():
                    ready[i] = int(_recv(p, w, 1)[1])
            if not args.quiet:
                print(f"\r[storm {target}] connections done {len(ready)}/{len(pipes)} workers, "
                      f"RSS {(rss_kb(pid) or 0) / 1024:.0f} MB", end="", file=sys.stderr,
                      flush=True)  # fmt: skip
            time.sleep(SAMPLE_S)
        rss_open = rss_kb(pid)
        cpu_after = {k: process_cpu_seconds(v) for k, v in pids.items()}
        busy_s = (time.monotonic_ns() - start_ns) / 1e9
        peak = max(peak, rss_open or 0)
        for p in pipes:
            p.send(None)
        results = [_recv(p, w, 120)[1] for p, w in zip(pipes, procs, strict=True)]
        time.sleep(1.0)
        rss_after = rss_kb(pid)
        if not args.quiet:
            print(file=sys.stderr)
    finally:
        stop_processes(procs, pipes)

    connect, ops = new_histogram(), new_histogram()
    errors = ErrorTally()
    for r in results:
        connect.add(HdrHistogram.decode(r["connect"]))
        ops.add(HdrHistogram.decode(r["ops"]))
        errors.merge(ErrorTally(int(r["errors"]), dict(r["errors_by_kind"]), r["error_samples"]))
    opened = sum(int(r["opened"]) for r in results)
    return {
        "target": target,
        "process": PROCESS_OF.get(target) if pid is not None else None,
        "connections": args.connections,
        "opened": opened,
        "ops_per_connection": args.ops,
        "connect": {**hist_summary(connect), "p90_us": _pct(connect, 90)},
        "ops": {**hist_summary(ops), "p90_us": _pct(ops, 90)},
        "errors": errors.count,
        "errors_by_kind": errors.by_kind,
        "error_samples": errors.samples,
        "open_wall_s": max(float(r["open_wall_s"]) for r in results),
        "storm_wall_s": max(float(r["storm_wall_s"]) for r in results),
        "worker_cores": [
            round(float(r["cpu_s"]) / float(r["storm_wall_s"]), 3) if r["storm_wall_s"] else 0.0
            for r in results
        ],
        "worker_cores_while_opening": [
            round(float(r["open_cpu_s"]) / float(r["open_wall_s"]), 3) if r["open_wall_s"] else 0.0
            for r in results
        ],
        # CPU of the started processes from the storm's start until every connection
        # had finished its operations (cores).
        "stack_cores": {k: _cores(cpu_before.get(k), cpu_after.get(k), busy_s) for k in pids},
        "rss_mb_before": _mb(rss_before),
        "rss_mb_peak": _mb(peak) if pid is not None else None,
        "rss_mb_all_open": _mb(rss_open),
        "rss_mb_after": _mb(rss_after),
        "upstream_at_rest": up_rest,
        "upstream_max": up_max if upstream_port is not None and pid is not None else None,
    }


def _cores(a: float | None, b: float | None, wall: float) -> float | None:
    return None if a is None or b is None or wall <= 0 else round((b - a) / wall, 3)


def _pct(hist: Any, q: float) -> int | None:
    return int(hist.get_value_at_percentile(q)) if hist.get_total_count() else None


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "storm",
        help="N connections opened at once, each running a few operations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connections", type=int, default=10_000,
                   help="connections per target, opened at once (default: %(default)s)")
    p.add_argument("--ops", type=int, default=3,
                   help="operations per connection (default: %(default)s)")
    p.add_argument("--targets", default="proxy",
                   help="comma-separated, from direct,tcp,proxy,proxy-cache (default: proxy)")
    p.add_argument("--uri", action="append", default=[], metavar="NAME=URI",
                   help="a running target (repeatable; its database seeded beforehand)")
    p.add_argument("--workers", type=int, default=2, help="load processes (default: 2)")
    p.add_argument("--pool-max-size", type=int, default=None, metavar="N",
                   help="upstream.pool.max_size of the started proxies (default: the "
                   "proxy's default, 100)")
    p.add_argument("--op-seed", type=int, default=1, dest="op_seed")
    add_dataset_args(p)
    p.add_argument("--max-error-rate", type=float, default=0.0, metavar="FRACTION",
                   help="fail (exit 1) when more than this fraction of a target's "
                   "connections fail (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="default: bench/results/storm.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=main)  # fmt: skip


def main(args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if (bad or args.connections < 1 or args.ops < 0 or args.workers < 1
            or not 0 <= args.max_error_rate <= 1):
        raise SystemExit(f"bench storm: bad arguments (targets {bad})")
    uris: dict[str, str] = {}
    for item in args.uri:
        name, _, value = item.partition("=")
        uris[name] = value
    nofile = raise_nofile()
    machine = machine_info()
    stack: Stack | None = None
    if not uris:
        stack = start_stack(
            pool_max_size=args.pool_max_size,
            tcp="tcp" in targets,
            cache=CACHE_SECTION if "proxy-cache" in targets else None,
        )
        uris = dict(stack.targets)
    results: list[Doc] = []
    warnings: list[str] = []
    try:
        first = stack.direct_uri if stack is not None else uris[targets[0]]
        client: MongoClient[Doc] = MongoClient(first, directConnection=True)
        with client:
            if stack is not None:
                ds = Dataset(args.scale, args.seed)
                seed_database(client[args.db], ds, log=False)
            else:
                ds = read_dataset(client[args.db])
        fdb_port = int(parse_uri(stack.direct_uri)["nodelist"][0][1]) if stack else None
        for target in targets:
            if target not in uris:
                why = stack.unavailable.get(target, "no URI") if stack else "no --uri"
                warnings.append(f"target {target} unavailable: {why}")
                continue
            pids = stack.pids if stack is not None else {}
            up_port = fdb_port if target != "direct" else None
            print(f"bench storm: {args.connections} connections to {target}", file=sys.stderr)
            r = storm_target(args, target, uris[target], ds, pids, up_port)
            results.append(r)
            if r["errors"]:
                warnings.append(f"{target}: {r['errors']} errors ({r['errors_by_kind']})")
            if max(r["worker_cores"]) > 0.9:
                warnings.append(f"{target}: a storm worker used > 0.9 cores: load generator bound")
    finally:
        if stack is not None:
            stack.stop()
    verdict = report.storm_verdict(results, args.max_error_rate)
    data = {
        "benchmark": "storm",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "command": "python -m bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
        "machine": machine,
        "config": {
            "connections": args.connections,
            "ops_per_connection": args.ops,
            "workers": args.workers,
            "pool_max_size": args.pool_max_size,
            "targets": targets,
            "nofile": list(nofile),
            "dataset": {"scale": ds.scale, "seed": ds.seed},
            "operation": "find users {_id} limit 1 (raw OP_MSG)",
            "stack": "started by bench" if stack is not None else "external",
        },
        "results": results,
        "verdict": verdict,
        "warnings": warnings,
    }
    write_json(args.json, data)
    md = args.json.with_suffix(".md")
    md.write_text(report.storm_markdown(data) + "\n")
    print(report.storm_markdown(data))
    print(f"results: {args.json}, {md}")
    if not verdict["passed"]:
        print(f"bench storm: {report.storm_verdict_text(data)}", file=sys.stderr)
        return 1
    return 0
