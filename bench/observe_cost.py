"""`python -m bench observe`: what observability costs per operation.

The proxy has no switch that turns observability off (every operation is timed, shaped
and counted whatever ``observability:`` says), so "on versus off" cannot be run as two
configurations. The cost is measured two ways instead:

(a) **In process** (no I/O): for a typical driver ``find`` (3-field filter, sort,
    limit, full envelope, as in ``bench/observe_micro.py``) the per-operation path the
    request handler runs: ``Timer`` creation + 8 ``mark`` calls + ``record``,
    ``describe`` (shape, text, hash) and ``Observer.finish`` (digest + Prometheus
    metrics + slow-log decision); once with the default threshold (no line written) and
    once with ``slow_query_ms: 0`` writing every line to a file. Each part is also timed
    alone. Best of 5 repeats, µs per call. This is the "observability on" cost; "off"
    would be none of these calls.
(b) **End to end**: one FerretDB with two proxies in front of it, started at once:
    ``default`` (``slow_query_ms: 100``: nothing is written for fast operations) and
    ``log_all`` (``slow_query_ms: 0`` and a slow-log *file*: one JSON line per
    operation). The same closed-loop workload (``find_one`` by string ``_id``, pymongo,
    ``c`` threads) runs against each, interleaved in rounds (ABBA). The proxy's CPU
    time (utime + stime from ``/proc/<pid>/stat``, 10 ms ticks) over each cell divided
    by the operations gives CPU µs per operation; the difference between the two
    proxies is the end-to-end cost of formatting and writing one slow-log line. Both
    proxies still pay (a), so (b) does not isolate (a): it bounds what (a) can be
    relative to the whole proxy's per-operation CPU.

The load generator, both proxies and FerretDB share the machine's cores; latency
figures are therefore indicative, CPU per operation is the robust figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench.observe_micro import FIND, _per_call_us
from bench.stack import (
    HOST,
    REPO_ROOT,
    StackError,
    _Child,
    _wait_for_http_ok,
    _wait_for_port,
    find_ferretdb,
    free_port,
    process_cpu_seconds,
)
from proxy.observe.config import ObservabilityConfig
from proxy.observe.hub import Observer
from proxy.observe.record import PHASES, OperationRecord, Timer
from proxy.observe.shape import describe

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "observe.json"
PROXIES = ("default", "log_all")
GOAL_US = 15.0

Doc = dict[str, Any]


# -- (a) in process ----------------------------------------------------------------------


def _path(observer: Observer) -> Callable[[], None]:
    """What the request handler does per operation, minus the I/O."""

    def run() -> None:
        timer = Timer()
        for phase in PHASES:
            timer.mark(phase)
        shape = describe(FIND)
        observer.finish(timer.record(
            "find", database="app", collection="orders", shape_hash=shape.hash,
            shape_text=shape.text, app_name="billing", route_class="default",
            member="127.0.0.1:27017", member_role="standalone", docs_returned=1,
            reply_bytes=200, connection_id=1, raw_command=FIND,
        ))

    return run


def measure_in_process(scale: float, workdir: Path) -> dict[str, float]:
    """µs per call; ``scale`` multiplies the iteration counts (1.0: ~10 s in all)."""

    def n(base: int) -> int:
        return max(10, int(base * scale))

    shape = describe(FIND)
    op = OperationRecord(
        start_time=time.time(), duration_ms=1.234, command="find", database="app",
        collection="orders", phases_ns={p: 100_000 for p in PHASES}, shape_hash=shape.hash,
        shape_text=shape.text, app_name="billing", route_class="default",
        member="127.0.0.1:27017", member_role="standalone", docs_returned=1,
        reply_bytes=200, connection_id=1,
    )
    quiet = Observer(ObservabilityConfig(), slow_log_stream=io.StringIO())
    logging_all = Observer(ObservabilityConfig(
        slow_query_ms=0, slow_log=str(workdir / "micro-slow.log"), slow_log_max_bytes=0))
    finish_op = Observer(ObservabilityConfig(), slow_log_stream=io.StringIO())
    timer = Timer()

    def whole_timer() -> None:
        t = Timer()
        for phase in PHASES:
            t.mark(phase)
        t.record("find", database="app", collection="orders")

    try:
        return {
            "timer_mark_us": _per_call_us(lambda: timer.mark("upstream"), n(200_000)),
            "timer_8_marks_and_record_us": _per_call_us(whole_timer, n(50_000)),
            "shape_describe_us": _per_call_us(lambda: describe(FIND), n(20_000)),
            "observer_finish_us": _per_call_us(lambda: finish_op.finish(op), n(50_000)),
            "per_operation_us": _per_call_us(_path(quiet), n(20_000)),
            "per_operation_with_log_line_us": _per_call_us(_path(logging_all), n(10_000)),
        }
    finally:
        for observer in (quiet, logging_all, finish_op):
            observer.close()


# -- (b) end to end ----------------------------------------------------------------------


@dataclass
class TwoProxies:
    workdir: Path
    direct_uri: str
    uris: dict[str, str]
    admin: dict[str, str]
    slow_log: Path
    children: list[_Child] = field(default_factory=list)

    def pid(self, name: str) -> int:
        for child in self.children:
            if child.name == name and child.proc is not None:
                return child.proc.pid
        raise KeyError(name)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_two_proxies(timeout: float = 30.0, control: bool = False) -> TwoProxies:
    """``control``: an A/A run, both proxies with the default config (``log_all`` then
    writes nothing), to see the noise floor of the end-to-end comparison."""
    workdir = Path(tempfile.mkdtemp(prefix="mongoproxy-bench-observe-"))
    data_dir, state_dir = workdir / "ferretdb-data", workdir / "ferretdb-state"
    data_dir.mkdir()
    state_dir.mkdir()
    fdb_port = free_port()
    direct_uri = f"mongodb://{HOST}:{fdb_port}/"
    ferretdb = _Child("ferretdb", [
        find_ferretdb(), "--handler=sqlite", f"--sqlite-url=file:{data_dir}/",
        f"--state-dir={state_dir}", f"--listen-addr={HOST}:{fdb_port}",
        "--debug-addr=127.0.0.1:0", "--telemetry=disable", "--log-level=WARN",
    ], workdir / "ferretdb.log")
    slow_log = workdir / "slow.log"
    observability = {
        "default": "{}",
        # No rotation: every line of the run stays in one file (counted afterwards).
        "log_all": f'{{slow_query_ms: 0, slow_log: "{slow_log}", slow_log_max_bytes: 0}}',
    }
    if control:
        observability["log_all"] = f'{{slow_log: "{slow_log}"}}'
    stack = TwoProxies(workdir, direct_uri, {}, {}, slow_log, [ferretdb])
    ports: dict[str, tuple[int, int]] = {}
    for name in PROXIES:
        port, admin_port = free_port(), free_port()
        ports[name] = (port, admin_port)
        config = workdir / f"proxy-{name}.yaml"
        config.write_text(
            f"listen: {{host: {HOST}, port: {port}}}\n"
            f"admin: {{host: {HOST}, port: {admin_port}}}\n"
            f'upstream: {{uri: "{direct_uri}"}}\n'
            f"observability: {observability[name]}\n"
        )
        stack.children.append(_Child(
            name, [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            workdir / f"proxy-{name}.log"))
        stack.uris[name] = f"mongodb://{HOST}:{port}/"
        stack.admin[name] = f"http://{HOST}:{admin_port}"
    current = ferretdb
    try:
        deadline = time.monotonic() + timeout
        ferretdb.spawn()
        assert ferretdb.proc is not None
        _wait_for_port(fdb_port, ferretdb.proc, deadline)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for child in stack.children[1:]:
            current = child
            child.spawn(cwd=REPO_ROOT, env=env)
        for child in stack.children[1:]:
            current = child
            assert child.proc is not None
            port, admin_port = ports[child.name]
            _wait_for_http_ok(f"http://{HOST}:{admin_port}/healthz", child.proc, deadline)
            _wait_for_port(port, child.proc, deadline)
    except BaseException as e:
        tail = current.log_tail()
        stack.stop()
        raise StackError(f"{current.name} failed to start: {e}\n{tail}") from e
    return stack


def _finds_counted(admin_url: str) -> int:
    """``find`` operations in mongoproxy_operations_total on one proxy's /metrics (the
    drivers' own ``endSessions`` at close may come later and is not counted)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(sum(
        s.value for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mongoproxy_operations_total" and s.labels.get("command") == "find"
    ))


def _percentile(sorted_ns: Sequence[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1000


def _cell(client: MongoClient[Doc], db: str, ops: int, threads: int, docs: int,
          offset: int) -> tuple[float, list[int]]:
    """``ops`` find_one by _id over ``threads`` threads; (wall seconds, latencies ns)."""
    coll = client[db]["items"]
    shares = [ops // threads + (1 if i < ops % threads else 0) for i in range(threads)]
    latencies: list[list[int]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        out = latencies[index]
        barrier.wait()
        try:
            for i in range(shares[index]):
                key = f"k{(offset + index * 7919 + i * 31) % docs:06d}"
                t0 = time.perf_counter_ns()
                if coll.find_one({"_id": key}) is None:
                    raise RuntimeError(f"document {key} not found")
                out.append(time.perf_counter_ns() - t0)
        except BaseException as exc:  # reported after the cell
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall, [x for part in latencies for x in part]


def run_end_to_end(ops: int, rounds: int, warmup: int, concurrency: Sequence[int],
                   docs: int, control: bool = False) -> dict[str, Any]:
    stack = start_two_proxies(control=control)
    try:
        db = f"bench_observe_{os.getpid()}_{int(time.time())}"
        with MongoClient[Doc](stack.direct_uri, directConnection=True) as direct:
            direct[db]["items"].insert_many(
                [{"_id": f"k{i:06d}", "n": i, "pad": "x" * 100} for i in range(docs)])
        top = max(concurrency)
        clients = {name: MongoClient[Doc](stack.uris[name], maxPoolSize=top,
                                           appname=f"bench-observe-{name}")
                   for name in PROXIES}
        rows: list[dict[str, Any]] = []
        try:
            for name in PROXIES:  # warm-up (also opens the pools)
                for c in concurrency:
                    _cell(clients[name], db, warmup, c, docs, 0)
            per_round = [ops // rounds + (1 if i < ops % rounds else 0) for i in range(rounds)]
            acc: dict[tuple[str, int], dict[str, Any]] = {
                (name, c): {"ops": 0, "wall_s": 0.0, "cpu_s": 0.0, "lat": []}
                for name in PROXIES for c in concurrency
            }
            for r, n in enumerate(per_round):
                order = PROXIES if r % 2 == 0 else tuple(reversed(PROXIES))
                for c in concurrency:
                    for name in order:
                        pid = stack.pid(name)
                        cpu0 = process_cpu_seconds(pid)
                        wall, lat = _cell(clients[name], db, n, c, docs, r * 1_000_003)
                        cpu1 = process_cpu_seconds(pid)
                        cell = acc[(name, c)]
                        cell["ops"] += n
                        cell["wall_s"] += wall
                        cell["cpu_s"] += (cpu1 or 0.0) - (cpu0 or 0.0)
                        cell["lat"].extend(lat)
            counted = {name: _finds_counted(stack.admin[name]) for name in PROXIES}
        finally:
            for client in clients.values():
                client.close()
        for (name, c), cell in acc.items():
            lat = sorted(cell["lat"])
            rows.append({
                "proxy": name,
                "concurrency": c,
                "ops": cell["ops"],
                "wall_s": cell["wall_s"],
                "ops_per_s": cell["ops"] / cell["wall_s"] if cell["wall_s"] else 0.0,
                "proxy_cpu_s": cell["cpu_s"],
                "proxy_cpu_us_per_op": cell["cpu_s"] / cell["ops"] * 1e6 if cell["ops"] else 0.0,
                "p50_us": _percentile(lat, 0.50),
                "p99_us": _percentile(lat, 0.99),
            })
        deltas = []
        for c in concurrency:
            by = {row["proxy"]: row for row in rows if row["concurrency"] == c}
            deltas.append({
                "concurrency": c,
                "log_all_minus_default_cpu_us_per_op":
                    by["log_all"]["proxy_cpu_us_per_op"] - by["default"]["proxy_cpu_us_per_op"],
                "log_all_minus_default_p50_us": by["log_all"]["p50_us"] - by["default"]["p50_us"],
            })
        with open(stack.slow_log, encoding="utf-8") as fh:
            lines = sum(1 for line in fh if '"command":"find"' in line)
        return {"rows": rows, "deltas": deltas, "finds_counted": counted,
                "slow_log_find_lines": lines, "control": control}
    finally:
        stack.stop()


# -- command line ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("thread counts must be at least 1")
    return values


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "observe",
        help="cost of timing + shape + digest + metrics (+ slow-log line) per operation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ops", type=_positive_int, default=8000,
                   help="measured finds per (proxy, concurrency) (default: %(default)s)")
    p.add_argument("--rounds", type=_positive_int, default=4, help="ABBA rounds (default: 4)")
    p.add_argument("--warmup", type=_positive_int, default=300,
                   help="warm-up finds per (proxy, concurrency) (default: %(default)s)")
    p.add_argument("--concurrency", type=_concurrency, default=(1, 8),
                   help="comma-separated thread counts (default: 1,8)")
    p.add_argument("--docs", type=_positive_int, default=1000,
                   help="seeded documents (default: %(default)s)")
    p.add_argument("--micro-scale", type=float, default=1.0,
                   help="multiplier of the in-process iteration counts (default: 1.0)")
    p.add_argument("--control", action="store_true",
                   help="A/A run: the second proxy also uses the default config (noise floor)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default: bench/results/observe.json)")
    p.set_defaults(func=run)


def format_table(data: dict[str, Any]) -> str:
    micro = data["in_process_us"]
    lines = [
        "(a) in process, per operation (typical driver find; µs per call, best of 5)",
        *(f"  {k:34s} {v:9.3f}" for k, v in micro.items()),
        f"  goal: per_operation_us under {GOAL_US:g} µs: "
        f"{'met' if micro['per_operation_us'] < GOAL_US else 'NOT met'}",
        "",
        "(b) end to end: proxy CPU per find_one (utime+stime from /proc), same FerretDB",
        f"  {'proxy':8s} {'conc':>4s} {'ops':>7s} {'ops/s':>8s} {'cpu µs/op':>10s} "
        f"{'p50 µs':>8s} {'p99 µs':>8s}",
    ]
    for row in data["end_to_end"]["rows"]:
        lines.append(
            f"  {row['proxy']:8s} {row['concurrency']:4d} {row['ops']:7d} "
            f"{row['ops_per_s']:8.0f} {row['proxy_cpu_us_per_op']:10.1f} "
            f"{row['p50_us']:8.0f} {row['p99_us']:8.0f}"
        )
    for d in data["end_to_end"]["deltas"]:
        lines.append(
            f"  concurrency {d['concurrency']}: log_all - default = "
            f"{d['log_all_minus_default_cpu_us_per_op']:+.1f} CPU µs/op, "
            f"{d['log_all_minus_default_p50_us']:+.0f} µs p50"
        )
    e2e = data["end_to_end"]
    if e2e["control"]:
        lines.append("  CONTROL run (A/A): both proxies use the default config")
    lines.append(f"  find lines in log_all's slow log: {e2e['slow_log_find_lines']}; finds "
                 f"counted in /metrics: {e2e['finds_counted']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory(prefix="mongoproxy-observe-micro-") as tmp:
        micro = measure_in_process(args.micro_scale, Path(tmp))
    e2e = run_end_to_end(args.ops, args.rounds, args.warmup, args.concurrency, args.docs,
                         args.control)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    data: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "config": {"ops": args.ops, "rounds": args.rounds, "warmup": args.warmup,
                   "concurrency": list(args.concurrency), "docs": args.docs,
                   "micro_scale": args.micro_scale},
        "method": {
            "in_process": "Timer + 8 marks + record, describe(find), Observer.finish "
                          "(digest, metrics, slow-log decision); with_log_line: "
                          "slow_query_ms 0 writing to a file",
            "end_to_end": "two proxies on one FerretDB: default (slow_query_ms 100) and "
                          "log_all (slow_query_ms 0, file); proxy CPU per op from /proc",
        },
        "goal_us": GOAL_US,
        "in_process_us": {k: round(v, 3) for k, v in micro.items()},
        "end_to_end": e2e,
        "loadgen_cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
        "run_wall_s": time.perf_counter() - started,
    }
    print(format_table(data))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0
