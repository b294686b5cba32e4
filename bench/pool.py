"""`python -m bench pool`: the proxy's memory per idle client and its pooled throughput.

One run, on a stack it starts itself (FerretDB + the proxy with
``upstream.pool.max_size`` = ``--pool-max-size``) or on given URIs, measures:

1. **Idle connections.**  The proxy's RSS (``VmRSS`` from ``/proc/<pid>/status``) at
   rest, then with ``--idle-connections`` client connections open and idle.  Clients
   are raw asyncio sockets in this process: connect, send an OP_MSG ``hello`` with
   ``client`` metadata (what every driver sends first), read the reply, then keep the
   socket open without sending anything.  They are opened ``--batch`` at a time (all
   of a batch concurrently) so the listen backlog is never overrun.  Reported: RSS at
   rest, with all connections open (after ``--settle`` seconds), per connection, and
   after they are closed again; connect+hello latency (p50/p99/max, HdrHistogram);
   errors; then every idle connection is asked ``hello`` again to prove it is still
   served ("dropped" counts those that are not).  The issue's goal is < 300 MB at
   10,000 idle connections; with fewer connections the figure is also projected
   linearly (rest + per-connection x 10,000).
2. **Throughput through a small pool.**  ``--clients`` clients through the proxy (pool
   of ``--pool-max-size``) versus ``--direct-clients`` clients straight to FerretDB,
   the same operation mix: find-by-``_id`` on a seeded collection with *string* ids
   (``"k000123"``; FerretDB's SQLite handler uses the ``_id`` index only for
   string/ObjectId ids) and an ``--insert-share`` of single-document inserts.  Each
   client is one raw socket running a closed loop (send, wait for the reply, repeat),
   so a client never has more than one request in flight, like a driver connection.
   Clients live in ``--workers`` processes (spawned, uvloop) so the load generator is
   not one GIL; each worker reports its CPU use over the measured window and a
   warning is printed above 0.9 cores per process.  A phase opens its connections,
   runs ``--warmup`` seconds unmeasured, then ``--duration`` seconds measured: ops
   that *complete* inside the window count (ops/s = count / duration) and their
   latency goes to an HdrHistogram (µs, 1 µs .. 60 s, 3 significant figures).  Phases
   are interleaved in rounds (direct, proxy, direct, proxy, ...) so drift and other
   load on the machine hit both targets.  While a proxy phase runs, the number of TCP
   connections from the proxy process to the FerretDB port (the proxy pid's socket
   inodes from ``/proc/<pid>/fd`` matched against ``/proc/net/tcp{,6}``) is sampled
   every ``--sample-interval`` seconds; its maximum must not exceed the pool size plus
   the monitoring connections (counted at rest, before any client connected).

With 1,000 closed-loop clients on 20 upstream connections, most of a proxy op's
latency is queueing for a pooled connection (Little's law: latency ≈ clients /
throughput), so proxy and direct latencies are reported side by side but are not
expected to match; the throughput ratio is the figure of merit (goal >= 0.9).

RLIMIT_NOFILE is raised to its hard limit before the stack starts, so the proxy
subprocess inherits it; the limit the proxy actually runs with (from
``/proc/<pid>/limits``) is recorded.  The load average at start and end is recorded
too: this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import secrets
import struct
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import bson
import uvloop
from bson.errors import BSONError
from hdrh.histogram import HdrHistogram
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from bench.core import machine_info, write_json
from bench.stack import (
    Stack,
    external_stack,
    pin_process,
    process_affinity,
    process_cpu_seconds,
    start_stack,
    stop_processes,
)
from proxy.wire import HEADER_SIZE, OpCode, decode_body, encode_op_msg, parse_op_msg

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "pool.json"
TARGETS = ("direct", "proxy")

HIST_LOWEST_US = 1
HIST_HIGHEST_US = 60_000_000
HIST_SIGFIGS = 3

CPU_WARN_CORES = 0.9
GOAL_IDLE_RSS_MB = 300.0
GOAL_IDLE_CONNECTIONS = 10_000
GOAL_RATIO = 0.9

OPEN_TIMEOUT_S = 30.0
OP_TIMEOUT_S = 60.0
MAX_ERROR_SAMPLES = 5

Doc = dict[str, Any]
_HEADER = struct.Struct("<iiii")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PoolBenchConfig:
    idle_connections: int
    batch: int
    settle_s: float
    clients: int  # through the proxy
    direct_clients: int
    pool_max_size: int
    duration_s: float
    warmup_s: float
    rounds: int
    workers: int
    docs: int
    insert_share: float
    sample_interval_s: float
    seed: int
    json_path: Path
    direct_uri: str | None
    proxy_uri: str | None
    proxy_pid: int | None
    cpu_split: bool = False

    @property
    def load(self) -> LoadSpec:
        return LoadSpec(
            workers=self.workers, collection="items", docs=self.docs,
            insert_share=self.insert_share, seed=self.seed, warmup_s=self.warmup_s,
            duration_s=self.duration_s, open_batch=min(self.batch, 200),
            sample_interval_s=self.sample_interval_s,
        )


@dataclass(frozen=True)
class LoadSpec:
    """What one :func:`run_phase` has its worker processes do: closed-loop raw OP_MSG
    clients, each a ``find`` by ``_id`` over ``docs`` seeded ids of ``collection`` (or,
    with probability ``insert_share``, a one-document insert into ``ins``)."""

    workers: int
    collection: str
    docs: int
    insert_share: float
    seed: int
    warmup_s: float
    duration_s: float
    open_batch: int
    sample_interval_s: float


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register the `pool` subcommand on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "pool",
        help="proxy RSS with many idle clients; 1,000 clients on a small pool vs direct",
        description=(
            "Measure the proxy's memory with many idle client connections, and the "
            "throughput of many clients through a small upstream pool versus a few "
            "clients connected directly to FerretDB.  Without --direct/--proxy a private "
            "FerretDB + proxy stack (pool max_size = --pool-max-size) is started."
        ),
    )
    p.add_argument("--direct", metavar="URI", help="upstream MongoDB/FerretDB URI")
    p.add_argument("--proxy", metavar="URI", help="URI of the proxy in front of --direct")
    p.add_argument(
        "--proxy-pid",
        type=_positive_int,
        metavar="PID",
        help="pid of the external proxy (for RSS and upstream-connection counts)",
    )
    p.add_argument(
        "--idle-connections",
        type=_positive_int,
        default=10_000,
        help="idle client connections to open (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=500,
        help="connections opened concurrently per batch (default: %(default)s)",
    )
    p.add_argument(
        "--settle",
        type=_non_negative_float,
        default=3.0,
        help="seconds to wait before reading RSS (default: %(default)s)",
    )
    p.add_argument(
        "--clients",
        type=_positive_int,
        default=1000,
        help="active clients through the proxy (default: %(default)s)",
    )
    p.add_argument(
        "--direct-clients",
        type=_positive_int,
        help="active clients straight to FerretDB (default: --pool-max-size)",
    )
    p.add_argument(
        "--pool-max-size",
        type=_positive_int,
        default=20,
        help="the proxy's upstream.pool.max_size (set when the bench starts the proxy; "
        "declared for an external one) (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=15.0,
        help="measured seconds per phase (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative_float,
        default=2.0,
        help="unmeasured seconds at the start of each phase (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=2,
        help="rounds of (direct, proxy) phases (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="load-generator processes (default: %(default)s)",
    )
    p.add_argument(
        "--docs", type=_positive_int, default=1000, help="seeded documents (default: 1000)"
    )
    p.add_argument(
        "--insert-share",
        type=_share,
        default=0.1,
        help="fraction of ops that are single inserts, the rest find-by-_id "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--sample-interval",
        type=_positive_float,
        default=0.25,
        help="seconds between upstream-connection samples (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for the op mix")
    p.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results (default: bench/results/pool.json)",
    )
    p.add_argument(
        "--cpu-split",
        action="store_true",
        help="FerretDB on the first usable CPU, everything else (proxy, load workers) on "
        "the others, in both phases: the database keeps the same cores whether the proxy "
        "runs or not, as on a deployment where it has a machine of its own",
    )
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> PoolBenchConfig:
    if (args.direct is None) != (args.proxy is None):
        raise SystemExit("bench pool: give both --direct and --proxy, or neither")
    if args.proxy_pid is not None and args.proxy is None:
        raise SystemExit("bench pool: --proxy-pid only goes with --direct and --proxy")
    if args.cpu_split and args.direct is not None:
        raise SystemExit("bench pool: --cpu-split needs the stack the bench starts itself")
    if args.cpu_split and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench pool: --cpu-split needs at least 2 usable CPUs")
    return PoolBenchConfig(
        idle_connections=args.idle_connections,
        batch=args.batch,
        settle_s=args.settle,
        clients=args.clients,
        direct_clients=args.direct_clients or args.pool_max_size,
        pool_max_size=args.pool_max_size,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rounds=args.rounds,
        workers=args.workers,
        docs=args.docs,
        insert_share=args.insert_share,
        sample_interval_s=args.sample_interval,
        seed=args.seed,
        json_path=args.json,
        direct_uri=args.direct,
        proxy_uri=args.proxy,
        proxy_pid=args.proxy_pid,
        cpu_split=args.cpu_split,
    )


# ---------------------------------------------------------------- /proc probes


def read_status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM etc. (kB) from /proc/<pid>/status; empty if the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def rss_kb(pid: int | None) -> int | None:
    return None if pid is None else read_status_kb(pid).get("VmRSS")


def nofile_limit_of(pid: int) -> tuple[int | None, int | None]:
    """(soft, hard) "Max open files" of a process, from /proc/<pid>/limits."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            parts = line[len("Max open files") :].split()

            def num(s: str) -> int | None:
                return None if s == "unlimited" else int(s)

            return num(parts[0]), num(parts[1])
    return None, None


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _established_to_port(port: int) -> set[int]:
    """Inodes of ESTABLISHED TCP sockets (v4 and v6) whose remote port is ``port``."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(f) < 10 or f[3] != "01":
                continue
            if int(f[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(f[9]))
    return inodes


def upstream_connections(pid: int, upstream_port: int) -> int:
    """TCP connections owned by process ``pid`` to ``upstream_port`` (established)."""
    return len(_socket_inodes(pid) & _established_to_port(upstream_port))


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def raise_nofile() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- raw wire client


class ReplyError(Exception):
    """The server answered, but not with what the bench expected."""


def hello_command(app_name: str) -> Doc:
    return {
        "hello": 1,
        "helloOk": True,
        "client": {
            "application": {"name": app_name},
            "driver": {"name": "mongoproxy-bench", "version": "0.1.0"},
            "os": {"type": platform.system(), "architecture": platform.machine()},
            "platform": f"CPython {platform.python_version()}",
        },
        "$db": "admin",
    }


class WireClient:
    """One raw client connection: OP_MSG command in, OP_MSG reply out, one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._next_id = 0

    @classmethod
    async def open(cls, host: str, port: int, app_name: str) -> WireClient:
        """Connect and send the driver handshake; raises on any failure."""
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            reply = await client.command(hello_command(app_name))
            if reply.get("ok") != 1:
                raise ReplyError(f"hello failed: {reply}")
        except BaseException:
            client.close()
            raise
        return client

    async def command(self, doc: Doc) -> Doc:
        self._next_id = (self._next_id + 1) & 0x7FFFFFFF
        request_id = self._next_id
        self.writer.write(encode_op_msg(request_id, 0, bson.encode(doc)))
        header = await self.reader.readexactly(HEADER_SIZE)
        length, _, response_to, op_code = _HEADER.unpack(header)
        if op_code != OpCode.OP_MSG or response_to != request_id or length < HEADER_SIZE:
            raise ReplyError(
                f"unexpected reply header: opCode {op_code}, responseTo {response_to} "
                f"(sent {request_id}), length {length}"
            )
        rest = await self.reader.readexactly(length - HEADER_SIZE)
        return decode_body(parse_op_msg(header + rest))

    def close(self) -> None:
        self.writer.close()


@dataclass
class ErrorTally:
    count: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def add(self, exc: BaseException) -> None:
        self.count += 1
        kind = type(exc).__name__
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{kind}: {exc}"[:300])

    def merge(self, other: ErrorTally) -> None:
        self.count += other.count
        for k, v in other.by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + v
        room = MAX_ERROR_SAMPLES - len(self.samples)
        self.samples.extend(other.samples[: max(room, 0)])


# ---------------------------------------------------------------- histograms


def new_histogram() -> Any:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_SIGFIGS)


def record_ns(hist: Any, latencies_ns: Sequence[int]) -> None:
    for ns in latencies_ns:
        us = (ns + 500) // 1000
        hist.record_value(min(max(us, HIST_LOWEST_US), HIST_HIGHEST_US))


def hist_summary(hist: Any) -> dict[str, Any]:
    if hist.get_total_count() == 0:
        return {"count": 0, "p50_us": None, "p99_us": None, "p999_us": None,
                "max_us": None, "mean_us": None}  # fmt: skip
    return {
        "count": int(hist.get_total_count()),
        "p50_us": int(hist.get_value_at_percentile(50)),
        "p99_us": int(hist.get_value_at_percentile(99)),
        "p999_us": int(hist.get_value_at_percentile(99.9)),
        "max_us": int(hist.get_max_value()),
        "mean_us": float(hist.get_mean_value()),
    }


# ---------------------------------------------------------------- phase 1: idle


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _healthz_clients(admin_url: str | None) -> int | None:
    if admin_url is None:
        return None
    try:
        with urllib.request.urlopen(f"{admin_url}/healthz", timeout=5) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    value = data.get("client_connections")
    return value if isinstance(value, int) else None


async def _open_many(
    host: str, port: int, n: int, batch: int, app: str
) -> tuple[list[WireClient], list[int], ErrorTally, float]:
    """Open ``n`` handshaken connections, ``batch`` at a time; (clients, ns, errors, wall)."""
    clients: list[WireClient] = []
    latencies: list[int] = []
    errors = ErrorTally()

    async def one() -> None:
        t0 = time.perf_counter_ns()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                client = await WireClient.open(host, port, app)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ReplyError) as e:
            errors.add(e)
            return
        except Exception as e:  # a malformed reply from the codec, etc.
            errors.add(e)
            return
        latencies.append(time.perf_counter_ns() - t0)
        clients.append(client)

    t_start = time.perf_counter()
    for start in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
    return clients, latencies, errors, time.perf_counter() - t_start


async def _ping_all(clients: list[WireClient], batch: int) -> ErrorTally:
    """hello on every connection; failures are connections the proxy no longer serves."""
    errors = ErrorTally()

    async def one(c: WireClient) -> None:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                reply = await c.command(hello_command("mongoproxy-bench-pool-idle"))
            if reply.get("ok") != 1:
                raise ReplyError(f"hello failed: {reply}")
        except Exception as e:
            errors.add(e)

    for start in range(0, len(clients), batch):
        await asyncio.gather(*(one(c) for c in clients[start : start + batch]))
    return errors


def _kb_to_mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


async def idle_phase(
    cfg: PoolBenchConfig,
    host: str,
    port: int,
    pid: int | None,
    upstream_port: int,
    admin_url: str | None,
) -> dict[str, Any]:
    n = cfg.idle_connections
    rest_status = read_status_kb(pid) if pid is not None else {}
    rest = rest_status.get("VmRSS")
    _log(f"bench pool: opening {n} idle connections, {cfg.batch} at a time")
    clients, lat_ns, errors, wall = await _open_many(
        host, port, n, cfg.batch, "mongoproxy-bench-pool-idle"
    )
    _log(f"bench pool: {len(clients)} open ({errors.count} errors) in {wall:.1f} s; settling")
    try:
        await asyncio.sleep(cfg.settle_s)
        status = read_status_kb(pid) if pid is not None else {}
        idle = status.get("VmRSS")
        proxy_fds = open_fds(pid) if pid is not None else None
        upstream = upstream_connections(pid, upstream_port) if pid is not None else None
        healthz = _healthz_clients(admin_url)
        _log("bench pool: checking that every idle connection is still served")
        ping_errors = await _ping_all(clients, cfg.batch)
        after_ping = rss_kb(pid)
    finally:
        for c in clients:
            c.close()
        await asyncio.sleep(0)  # let the transports close
    await asyncio.sleep(cfg.settle_s)
    after_close = rss_kb(pid)

    hist = new_histogram()
    record_ns(hist, lat_ns)
    opened = len(clients)
    per_conn_kb = None if idle is None or rest is None or opened == 0 else (idle - rest) / opened
    projected_mb = (
        None
        if per_conn_kb is None or rest is None
        else (rest + per_conn_kb * GOAL_IDLE_CONNECTIONS) / 1024
    )
    goal_basis = _kb_to_mb(idle) if opened >= GOAL_IDLE_CONNECTIONS else projected_mb
    return {
        "requested": n,
        "opened": opened,
        "batch": cfg.batch,
        "open_wall_s": wall,
        "open_per_s": opened / wall if wall > 0 else None,
        "errors": errors.count,
        "errors_by_kind": errors.by_kind,
        "error_samples": errors.samples,
        "dropped": ping_errors.count,
        "dropped_samples": ping_errors.samples,
        "connect_hello_latency": hist_summary(hist),
        "settle_s": cfg.settle_s,
        "rss_rest_kb": rest,
        "rss_idle_kb": idle,
        "rss_after_ping_kb": after_ping,
        "rss_after_close_kb": after_close,
        "hwm_kb": status.get("VmHWM"),
        "rss_rest_mb": _kb_to_mb(rest),
        "rss_idle_mb": _kb_to_mb(idle),
        "rss_after_close_mb": _kb_to_mb(after_close),
        "rss_per_connection_kb": per_conn_kb,
        "projected_rss_at_10000_mb": projected_mb,
        "goal_rss_mb": GOAL_IDLE_RSS_MB,
        "goal_met": None if goal_basis is None else goal_basis < GOAL_IDLE_RSS_MB,
        "goal_basis": "measured" if opened >= GOAL_IDLE_CONNECTIONS else "projected",
        "proxy_open_fds": proxy_fds,
        "proxy_upstream_connections": upstream,
        "healthz_client_connections": healthz,
    }


# ---------------------------------------------------------------- phase 2: load workers


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    target: str
    host: str
    port: int
    clients: int
    tag: str  # unique per (phase, worker): keeps inserted _ids and random streams apart
    database: str
    load: LoadSpec


def doc_id(i: int) -> str:
    return f"k{i:06d}"


def _worker_entry(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (spawned): run the worker, send its result dict."""
    try:
        result = uvloop.run(_worker(spec, conn))
    except BaseException as e:
        conn.send({"kind": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    conn.send({"kind": "result", **result})
    conn.close()


async def _worker(spec: WorkerSpec, conn: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    app = f"mongoproxy-bench-pool-{spec.target}"
    clients, _, open_errors, _ = await _open_many(
        spec.host, spec.port, spec.clients, spec.load.open_batch, app
    )
    conn.send({"kind": "ready", "connected": len(clients), "errors": open_errors.count})
    start_ns: int = await loop.run_in_executor(None, conn.recv)
    measure_ns = start_ns + int(spec.load.warmup_s * 1e9)
    end_ns = measure_ns + int(spec.load.duration_s * 1e9)

    lat: list[int] = []
    errors = ErrorTally()
    counts = {"find": 0, "insert": 0}
    inserts_acked = 0  # every acknowledged insert, warm-up included (seen on the server)
    inserts_unknown = 0  # failed inserts that may or may not have been applied
    ops_total = 0
    cpu_marks: dict[str, float] = {}

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, (measure_ns - time.monotonic_ns()) / 1e9))
        cpu_marks["start"] = _cpu_self()
        cpu_marks["start_wall"] = time.monotonic_ns() / 1e9
        await asyncio.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
        cpu_marks["end"] = _cpu_self()
        cpu_marks["end_wall"] = time.monotonic_ns() / 1e9

    async def run_client(local: int, client: WireClient) -> None:
        nonlocal inserts_acked, inserts_unknown, ops_total
        rng = random.Random(f"{spec.load.seed}-{spec.tag}-{local}")
        await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        seq = 0
        while True:
            t0 = time.monotonic_ns()
            if t0 >= end_ns:
                return
            is_insert = rng.random() < spec.load.insert_share
            if is_insert:
                seq += 1
                cmd: Doc = {
                    "insert": "ins",
                    "documents": [{"_id": f"{spec.tag}-{local}-{seq}", "v": "x" * 32}],
                    "$db": spec.database,
                }
            else:
                key = doc_id(rng.randrange(spec.load.docs))
                cmd = {
                    "find": spec.load.collection,
                    "filter": {"_id": key},
                    "limit": 1,
                    "singleBatch": True,
                    "$db": spec.database,
                }
            try:
                async with asyncio.timeout(OP_TIMEOUT_S):
                    reply = await client.command(cmd)
                if reply.get("ok") != 1:
                    raise ReplyError(f"{next(iter(cmd))} failed: {reply}")
                if is_insert:
                    if reply.get("n") != 1 or reply.get("writeErrors"):
                        raise ReplyError(f"insert not applied: {reply}")
                    inserts_acked += 1
                else:
                    batch = reply.get("cursor", {}).get("firstBatch", [])
                    if len(batch) != 1 or batch[0].get("_id") != key:
                        raise ReplyError(f"find {key!r} returned {batch!r}")
            except (ReplyError, BSONError) as e:
                errors.add(e)
                continue
            except Exception as e:  # network trouble: reconnect and go on
                errors.add(e)
                if is_insert:
                    inserts_unknown += 1
                client.close()
                try:
                    async with asyncio.timeout(OPEN_TIMEOUT_S):
                        client = await WireClient.open(spec.host, spec.port, app)
                except Exception as e2:
                    errors.add(e2)
                    await asyncio.sleep(0.1)
                continue
            t1 = time.monotonic_ns()
            ops_total += 1
            if t1 > measure_ns and t1 <= end_ns:
                lat.append(t1 - t0)
                counts["insert" if is_insert else "find"] += 1

    marker = asyncio.create_task(mark_cpu())
    await asyncio.gather(*(run_client(i, c) for i, c in enumerate(clients)))
    await marker
    for c in clients:
        c.close()
    hist = new_histogram()
    record_ns(hist, lat)
    cpu = cpu_marks["end"] - cpu_marks["start"]
    wall = cpu_marks["end_wall"] - cpu_marks["start_wall"]
    return {
        "index": spec.index,
        "clients": spec.clients,
        "connected": len(clients),
        "open_errors": open_errors.count,
        "ops": counts["find"] + counts["insert"],
        "finds": counts["find"],
        "inserts": counts["insert"],
        "ops_total": ops_total,
        "inserts_acked": inserts_acked,
        "inserts_unknown": inserts_unknown,
        "errors": errors.count + open_errors.count,
        "errors_by_kind": {**open_errors.by_kind, **errors.by_kind},
        "error_samples": (open_errors.samples + errors.samples)[:MAX_ERROR_SAMPLES],
        "cpu_s": cpu,
        "cpu_wall_s": wall,
        "hist": hist.encode(),
    }


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class PhaseResult:
    target: str
    round: int
    clients: int
    connected: int
    duration_s: float
    ops: int
    finds: int
    inserts: int
    ops_per_s: float
    p50_us: int | None
    p99_us: int | None
    max_us: int | None
    errors: int
    error_samples: list[str]
    inserts_acked: int
    inserts_unknown: int
    worker_cpu_cores: list[float]
    proxy_cpu_cores: float | None
    ferretdb_cpu_cores: float | None
    upstream_max: int | None
    upstream_samples: list[int] = field(repr=False)
    hist: Any = field(repr=False, default=None)
    # Cores of every watched pid (``pids`` of run_phase), by its name there.
    stack_cpu_cores: dict[str, float | None] = field(default_factory=dict)


def run_phase(
    cfg: LoadSpec,
    target: str,
    round_no: int,
    uri: str,
    n_clients: int,
    database: str,
    pids: dict[str, int],
    proxy_pid: int | None,
    upstream_port: int,
) -> PhaseResult:
    host, port = parse_uri(uri)["nodelist"][0]
    ctx = multiprocessing.get_context("spawn")
    shares = [s for s in _split(n_clients, cfg.workers) if s > 0]
    procs: list[BaseProcess] = []
    pipes: list[Connection] = []
    for i, share in enumerate(shares):
        spec = WorkerSpec(
            index=i,
            target=target,
            host=str(host),
            port=int(port),
            clients=share,
            tag=f"r{round_no}-{target}-w{i}",
            database=database,
            load=cfg,
        )
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_entry, args=(spec, child), name=f"bench-pool-{target}-{i}", daemon=True
        )
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)

    def recv(pipe: Connection, proc: BaseProcess, timeout: float) -> dict[str, Any]:
        if not pipe.poll(timeout):
            raise RuntimeError(f"{proc.name}: no message within {timeout:.0f} s")
        try:
            msg: dict[str, Any] = pipe.recv()
        except EOFError:
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}") from None
        if msg.get("kind") == "failed":
            raise RuntimeError(f"{proc.name} failed: {msg.get('error')}")
        return msg

    try:
        ready = [recv(p, w, 120.0) for p, w in zip(pipes, procs, strict=True)]
        connected = sum(int(m["connected"]) for m in ready)
        start_ns = time.monotonic_ns() + 200_000_000
        for p in pipes:
            p.send(start_ns)
        measure_ns = start_ns + int(cfg.warmup_s * 1e9)
        end_ns = measure_ns + int(cfg.duration_s * 1e9)

        samples: list[int] = []
        stack_cpu0: dict[str, float | None] = {}
        measured = False
        while True:
            now = time.monotonic_ns()
            if not measured and now >= measure_ns:
                stack_cpu0 = {k: process_cpu_seconds(v) for k, v in pids.items()}
                measured = True
            if now >= end_ns:
                break
            if target == "proxy" and proxy_pid is not None:
                samples.append(upstream_connections(proxy_pid, upstream_port))
            next_wake = now + int(cfg.sample_interval_s * 1e9)
            if not measured:
                next_wake = min(next_wake, measure_ns)
            time.sleep(max(0.0, (min(next_wake, end_ns) - time.monotonic_ns()) / 1e9))
        stack_cpu1 = {k: process_cpu_seconds(v) for k, v in pids.items()}
        if target == "proxy" and proxy_pid is not None:
            samples.append(upstream_connections(proxy_pid, upstream_port))
        results = [
            recv(p, w, OP_TIMEOUT_S + 60.0) for p, w in zip(pipes, procs, strict=True)
        ]
    finally:
        stop_processes(procs, pipes)

    hist = new_histogram()
    for r in results:
        hist.add(HdrHistogram.decode(r["hist"]))
    errors = ErrorTally()
    for r in results:
        errors.merge(ErrorTally(int(r["errors"]), dict(r["errors_by_kind"]), r["error_samples"]))

    def cores(name: str) -> float | None:
        a, b = stack_cpu0.get(name), stack_cpu1.get(name)
        return None if a is None or b is None else (b - a) / cfg.duration_s

    ops = sum(int(r["ops"]) for r in results)
    summary = hist_summary(hist)
    return PhaseResult(
        target=target,
        round=round_no,
        clients=n_clients,
        connected=connected,
        duration_s=cfg.duration_s,
        ops=ops,
        finds=sum(int(r["finds"]) for r in results),
        inserts=sum(int(r["inserts"]) for r in results),
        ops_per_s=ops / cfg.duration_s,
        p50_us=summary["p50_us"],
        p99_us=summary["p99_us"],
        max_us=summary["max_us"],
        errors=errors.count,
        error_samples=errors.samples,
        inserts_acked=sum(int(r["inserts_acked"]) for r in results),
        inserts_unknown=sum(int(r["inserts_unknown"]) for r in results),
        worker_cpu_cores=[
            float(r["cpu_s"]) / float(r["cpu_wall_s"]) if r["cpu_wall_s"] > 0 else 0.0
            for r in results
        ],
        proxy_cpu_cores=cores("proxy"),
        ferretdb_cpu_cores=cores("ferretdb"),
        upstream_max=max(samples) if samples else None,
        upstream_samples=samples,
        hist=hist,
        stack_cpu_cores={name: cores(name) for name in pids},
    )


def _phase_json(p: PhaseResult) -> dict[str, Any]:
    out = {f.name: getattr(p, f.name) for f in fields(p) if f.name != "hist"}
    out["upstream_samples"] = len(p.upstream_samples)
    return out


def throughput_phase(
    cfg: PoolBenchConfig,
    stack: Stack,
    proxy_pid: int | None,
    upstream_port: int,
    upstream_baseline: int | None,
) -> dict[str, Any]:
    database = f"bench_pool_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"
    direct: MongoClient[Doc] = MongoClient(
        stack.direct_uri, directConnection=True, serverSelectionTimeoutMS=10_000
    )
    via_proxy: MongoClient[Doc] = MongoClient(
        stack.proxy_uri, directConnection=True, serverSelectionTimeoutMS=10_000
    )
    phases: list[PhaseResult] = []
    pids = stack.pids or ({"proxy": proxy_pid} if proxy_pid is not None else {})
    try:
        db = direct[database]
        docs = [{"_id": doc_id(i), "n": i, "v": "x" * 32} for i in range(cfg.docs)]
        for start in range(0, len(docs), 1000):
            db["items"].insert_many(docs[start : start + 1000], ordered=True)
        db.create_collection("ins")
        seen = via_proxy[database]["items"].count_documents({})
        if seen != cfg.docs:
            raise RuntimeError(f"proxy sees {seen} seeded documents, expected {cfg.docs}")
        via_proxy.close()
        uris = {"direct": stack.direct_uri, "proxy": stack.proxy_uri}
        n_clients = {"direct": cfg.direct_clients, "proxy": cfg.clients}
        for rnd in range(cfg.rounds):
            for target in TARGETS:
                _log(
                    f"bench pool: round {rnd + 1}/{cfg.rounds} {target}: {n_clients[target]} "
                    f"clients, {cfg.warmup_s:g} s warm-up + {cfg.duration_s:g} s"
                )
                phase = run_phase(
                    cfg.load, target, rnd, uris[target], n_clients[target], database, pids,
                    proxy_pid, upstream_port,
                )  # fmt: skip
                _log(
                    f"bench pool:   {phase.ops_per_s:.0f} ops/s, p50 {phase.p50_us} µs, "
                    f"p99 {phase.p99_us} µs, errors {phase.errors}"
                    + (f", upstream max {phase.upstream_max}" if target == "proxy" else "")
                )
                phases.append(phase)
        inserted = db["ins"].count_documents({})
    finally:
        try:
            direct.drop_database(database)
        finally:
            direct.close()
            via_proxy.close()

    acked = sum(p.inserts_acked for p in phases)
    unknown = sum(p.inserts_unknown for p in phases)
    results: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        mine = [p for p in phases if p.target == target]
        hist = new_histogram()
        for p in mine:
            hist.add(p.hist)
        ops = sum(p.ops for p in mine)
        duration = sum(p.duration_s for p in mine)
        results[target] = {
            "clients": n_clients[target],
            "phases": len(mine),
            "duration_s": duration,
            "ops": ops,
            "finds": sum(p.finds for p in mine),
            "inserts": sum(p.inserts for p in mine),
            "ops_per_s": ops / duration,
            **{k: v for k, v in hist_summary(hist).items() if k != "count"},
            "errors": sum(p.errors for p in mine),
            "worker_cpu_cores_max": max(c for p in mine for c in p.worker_cpu_cores),
            "loadgen_cpu_cores_max": max(sum(p.worker_cpu_cores) for p in mine),
            "proxy_cpu_cores": _mean_opt([p.proxy_cpu_cores for p in mine]),
            "ferretdb_cpu_cores": _mean_opt([p.ferretdb_cpu_cores for p in mine]),
        }
    d, px = results["direct"], results["proxy"]
    ratio = px["ops_per_s"] / d["ops_per_s"] if d["ops_per_s"] > 0 else None
    per_round = []
    for rnd in range(cfg.rounds):
        pd = next(p for p in phases if p.round == rnd and p.target == "direct")
        pp = next(p for p in phases if p.round == rnd and p.target == "proxy")
        per_round.append(pp.ops_per_s / pd.ops_per_s if pd.ops_per_s > 0 else None)
    proxy_samples = [s for p in phases if p.target == "proxy" for s in p.upstream_samples]
    upstream_max = max(proxy_samples) if proxy_samples else None
    limit = None if upstream_baseline is None else cfg.pool_max_size + upstream_baseline
    return {
        "database": database,
        "phases": [_phase_json(p) for p in phases],
        "results": results,
        "ratio": ratio,
        "per_round_ratios": per_round,
        "goal_ratio": GOAL_RATIO,
        "ratio_goal_met": None if ratio is None else ratio >= GOAL_RATIO,
        "upstream": {
            "pool_max_size": cfg.pool_max_size,
            "monitoring_baseline": upstream_baseline,
            "limit": limit,
            "max": upstream_max,
            "samples": len(proxy_samples),
            "within_limit": None if upstream_max is None or limit is None
            else upstream_max <= limit,
        },
        "inserts": {
            "on_server": inserted,
            "acked": acked,
            "unknown": unknown,
            "consistent": acked <= inserted <= acked + unknown,
        },
    }


def _mean_opt(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


# ---------------------------------------------------------------- the run


def run(cfg: PoolBenchConfig, stack: Stack, nofile: tuple[int, int]) -> dict[str, Any]:
    machine = machine_info()
    proxy_pid = cfg.proxy_pid if cfg.proxy_pid is not None else stack.pids.get("proxy")
    up_host, up_port = parse_uri(stack.direct_uri)["nodelist"][0]
    px_host, px_port = parse_uri(stack.proxy_uri)["nodelist"][0]
    upstream_port = int(up_port)
    proxy_nofile = nofile_limit_of(proxy_pid) if proxy_pid is not None else (None, None)
    warnings: list[str] = []
    need = cfg.idle_connections + 100
    if nofile[0] < need:
        warnings.append(
            f"RLIMIT_NOFILE of the bench is {nofile[0]} (< {need}): idle connections "
            "beyond it fail with EMFILE"
        )
    if proxy_nofile[0] is not None and proxy_nofile[0] < need:
        warnings.append(
            f"the proxy runs with RLIMIT_NOFILE {proxy_nofile[0]} (< {need}): it cannot "
            "hold all idle connections"
        )
    baseline = upstream_connections(proxy_pid, upstream_port) if proxy_pid is not None else None

    idle = uvloop.run(
        idle_phase(cfg, str(px_host), int(px_port), proxy_pid, upstream_port, stack.admin_url)
    )
    tput = throughput_phase(cfg, stack, proxy_pid, upstream_port, baseline)

    if idle["errors"]:
        warnings.append(f"{idle['errors']} idle connections failed to open")
    if idle["dropped"]:
        warnings.append(f"{idle['dropped']} idle connections were no longer served")
    if idle["goal_met"] is False:
        warnings.append(
            f"proxy RSS at {GOAL_IDLE_CONNECTIONS} idle connections "
            f"({idle['goal_basis']}) is not below {GOAL_IDLE_RSS_MB:.0f} MB"
        )
    for p in tput["phases"]:
        for i, c in enumerate(p["worker_cpu_cores"]):
            if c > CPU_WARN_CORES:
                warnings.append(
                    f"load-generator worker {i} used {c:.0%} of a core in {p['target']} "
                    f"round {p['round'] + 1}: the client may be the bottleneck"
                )
        if p["errors"]:
            warnings.append(f"{p['errors']} errors in {p['target']} round {p['round'] + 1}")
        if p["connected"] != p["clients"]:
            warnings.append(
                f"{p['target']} round {p['round'] + 1}: only {p['connected']} of "
                f"{p['clients']} clients connected"
            )
    if tput["ratio_goal_met"] is False:
        warnings.append(f"proxy/direct throughput ratio {tput['ratio']:.3f} < {GOAL_RATIO}")
    if tput["upstream"]["within_limit"] is False:
        warnings.append(
            f"the proxy held {tput['upstream']['max']} upstream connections "
            f"(limit {tput['upstream']['limit']})"
        )
    if not tput["inserts"]["consistent"]:
        warnings.append(f"insert count mismatch: {tput['inserts']}")

    return {
        "benchmark": "pool",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "machine": machine,
        "config": {
            "idle_connections": cfg.idle_connections,
            "batch": cfg.batch,
            "settle_s": cfg.settle_s,
            "clients": cfg.clients,
            "direct_clients": cfg.direct_clients,
            "pool_max_size": cfg.pool_max_size,
            "duration_s": cfg.duration_s,
            "warmup_s": cfg.warmup_s,
            "rounds": cfg.rounds,
            "workers": cfg.workers,
            "docs": cfg.docs,
            "insert_share": cfg.insert_share,
            "sample_interval_s": cfg.sample_interval_s,
            "seed": cfg.seed,
            "stack": "started by bench" if stack.started else "external",
            "direct_uri": stack.direct_uri,
            "proxy_uri": stack.proxy_uri,
            "order": "per round: direct phase, then proxy phase",
            "clients_kind": "raw asyncio sockets (uvloop), OP_MSG, one request in flight each",
            "histogram": {
                "unit": "us",
                "lowest": HIST_LOWEST_US,
                "highest": HIST_HIGHEST_US,
                "significant_figures": HIST_SIGFIGS,
            },
        },
        "bench_nofile": {"soft": nofile[0], "hard": nofile[1]},
        "proxy": {
            "pid": proxy_pid,
            "nofile_soft": proxy_nofile[0],
            "nofile_hard": proxy_nofile[1],
            "upstream": f"{up_host}:{up_port}",
        },
        "idle": idle,
        "throughput": tput,
        "warnings": warnings,
    }


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "NOT met")


def format_report(data: dict[str, Any]) -> str:
    idle, tput = data["idle"], data["throughput"]
    lat = idle["connect_hello_latency"]
    lines = [
        f"idle connections (proxy pid {data['proxy']['pid']}, "
        f"RLIMIT_NOFILE {data['proxy']['nofile_soft']})",
        f"  opened          {idle['opened']} / {idle['requested']} in "
        f"{idle['open_wall_s']:.1f} s ({_fmt(idle['open_per_s'], '.0f')}/s, "
        f"batches of {idle['batch']}); errors {idle['errors']}, dropped {idle['dropped']}",
        f"  connect+hello   p50 {lat['p50_us']} µs   p99 {lat['p99_us']} µs   "
        f"max {lat['max_us']} µs",
        f"  RSS at rest     {_fmt(idle['rss_rest_mb'], '.1f', ' MB')}",
        f"  RSS idle        {_fmt(idle['rss_idle_mb'], '.1f', ' MB')} with {idle['opened']} "
        f"open ({_fmt(idle['rss_per_connection_kb'], '.1f', ' KB')} per connection)",
        f"  RSS after close {_fmt(idle['rss_after_close_mb'], '.1f', ' MB')}",
        f"  at 10,000       {_fmt(idle['projected_rss_at_10000_mb'], '.1f', ' MB')} "
        f"({'measured' if idle['goal_basis'] == 'measured' else 'projected linearly'}); "
        f"goal < {GOAL_IDLE_RSS_MB:.0f} MB: {_met(idle['goal_met'])}",
        "",
        f"throughput: find-by-_id + {data['config']['insert_share']:.0%} insert, "
        f"{data['config']['duration_s']:g} s x {data['config']['rounds']} rounds per target, "
        f"{data['config']['workers']} worker processes",
    ]
    header = (
        f"{'target':<7} {'clients':>7} {'ops/s':>9} {'p50 µs':>9} {'p99 µs':>9} "
        f"{'errors':>6} {'lg cores':>8} {'proxy':>6} {'ferretdb':>8}"
    )
    lines += [header, "-" * len(header)]
    for target in TARGETS:
        r = tput["results"][target]
        lines.append(
            f"{target:<7} {r['clients']:>7} {r['ops_per_s']:>9.1f} "
            f"{_fmt(r['p50_us'], 'd'):>9} {_fmt(r['p99_us'], 'd'):>9} {r['errors']:>6} "
            f"{r['loadgen_cpu_cores_max']:>8.2f} {_fmt(r['proxy_cpu_cores'], '.2f'):>6} "
            f"{_fmt(r['ferretdb_cpu_cores'], '.2f'):>8}"
        )
    rounds = ", ".join(_fmt(x, ".3f") for x in tput["per_round_ratios"])
    up = tput["upstream"]
    lines += [
        f"ratio proxy/direct {_fmt(tput['ratio'], '.3f')} (per round: {rounds}); "
        f"goal >= {GOAL_RATIO}: {_met(tput['ratio_goal_met'])}",
        f"upstream connections held by the proxy: max {up['max']} "
        f"(limit {up['limit']} = pool {up['pool_max_size']} + "
        f"{up['monitoring_baseline']} monitoring, {up['samples']} samples): "
        f"{'ok' if up['within_limit'] else ('n/a' if up['within_limit'] is None else 'EXCEEDED')}",
    ]
    split = data.get("cpu_split")
    if split:
        lines.append(f"CPUs split: FerretDB on {split['ferretdb']}, proxy and load "
                     f"generator on {split['others']} (both phases)")
    m = data["machine"]
    lines.append(
        f"load average start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'] or [])}; "
        f"end {', '.join(f'{x:.2f}' for x in m.get('loadavg_at_end') or [])}"
    )
    return "\n".join(lines)


def split_cpus(stack: Stack) -> dict[str, list[int]]:
    """FerretDB on the first usable CPU; the proxy and this process (whose load workers
    inherit it) on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    database, others = {cpus[0]}, set(cpus[1:])
    pin_process(stack.pids["ferretdb"], database)
    pin_process(stack.pids["proxy"], others)
    pin_process(os.getpid(), others)
    _log(f"bench pool: FerretDB on CPU {cpus[0]}, proxy and load on CPUs {sorted(others)}")
    return {"ferretdb": sorted(database), "others": sorted(others)}


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    # Before the stack starts: the proxy subprocess inherits this limit.
    nofile = raise_nofile()
    if cfg.direct_uri is not None and cfg.proxy_uri is not None:
        stack = external_stack(cfg.direct_uri, cfg.proxy_uri)
    else:
        _log(f"bench pool: starting FerretDB + proxy (pool max_size {cfg.pool_max_size})")
        stack = start_stack(pool_max_size=cfg.pool_max_size)
    with stack:
        _log(f"bench pool: direct {stack.direct_uri}  proxy {stack.proxy_uri}")
        split = split_cpus(stack) if cfg.cpu_split else None
        data = run(cfg, stack, nofile)
        if split is not None:  # threads FerretDB started meanwhile inherited the pinning
            split["ferretdb_after_run"] = sorted(process_affinity(stack.pids["ferretdb"]))
        data["cpu_split"] = split
    data["total_wall_s"] = time.perf_counter() - t0
    data["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_json(cfg.json_path, data)
    print(format_report(data))
    for w in data["warnings"]:
        print(f"WARNING: {w}")
    print(f"results: {cfg.json_path} (total {data['total_wall_s']:.1f} s)")
    return 0
