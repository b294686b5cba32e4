"""`python -m bench moves`: an online tenant move under write load (docs/placement.md).

A private stack per round: two FerretDB (home, eu), redis-server and one proxy with
tenant placement (``redis_url`` set). ``--docs`` documents of tenant ``mover`` (and a
few of the others) are loaded on home. ``--others`` + 1 pymongo threads write through
the proxy (one per tenant: an insert, then an ``$inc`` of a recent document, in turn);
after ``--before`` s ``python -m proxy move-tenant mover --to eu`` runs, and the writers
go on ``--after`` s after it has finished.

Reported per round: the move's wall time; how long the tenant's writes were held (the
mover's own figure); the moving tenant's write latency before the move (p50) and during
it (p50, max: its pause is the hold); the other tenants' p99 before the move and
during it, and their ratio; errors seen by the moving tenant and by the others; whether
the target then holds exactly the acknowledged documents. JSON goes to
bench/results/moves.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import InsertOne, MongoClient
from pymongo.errors import PyMongoError

from bench.stack import (
    HOST,
    REPO_ROOT,
    StackError,
    _Child,
    _wait_for_http_ok,
    _wait_for_port,
    find_ferretdb,
    find_redis,
    free_port,
    proxy_config_text,
)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "moves.json"
DB = "bench_moves"
MOVER = "mover"


@dataclass
class _Writer:
    tenant: str
    uri: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: list[tuple[float, str]] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri)
        coll = client[DB].orders
        i = 0
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                key = f"{self.tenant}-w{i}"
                try:
                    if i % 2 == 0 or not self.acked:
                        coll.insert_one({"_id": key, "tenant_id": self.tenant, "n": 0})
                        self.acked.add(key)
                    else:
                        coll.update_one({"_id": f"{self.tenant}-w{i - 1}",
                                         "tenant_id": self.tenant}, {"$inc": {"n": 1}})
                except PyMongoError as exc:
                    self.errors.append((started, type(exc).__name__))
                self.samples.append((started, time.monotonic() - started))
                i += 1
        finally:
            client.close()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[_Child] = []

    def start(self, name: str, cmd: list[str], port: int, http: str | None = None) -> None:
        child = _Child(name, cmd, self.workdir / f"{name}.log")
        child.spawn(cwd=REPO_ROOT)
        self.children.append(child)
        assert child.proc is not None
        deadline = time.monotonic() + 30
        if http is not None:
            _wait_for_http_ok(http, child.proc, deadline)
        _wait_for_port(port, child.proc, deadline)

    def ferretdb(self, name: str) -> str:
        port = free_port()
        data, state = self.workdir / f"{name}-data", self.workdir / f"{name}-state"
        data.mkdir()
        state.mkdir()
        self.start(name, [find_ferretdb(), "--handler=sqlite", f"--sqlite-url=file:{data}/",
                          f"--state-dir={state}", f"--listen-addr={HOST}:{port}",
                          "--debug-addr=127.0.0.1:0", "--telemetry=disable",
                          "--log-level=WARN"], port)
        return f"mongodb://{HOST}:{port}/"

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _round(args: argparse.Namespace, number: int) -> dict[str, Any]:
    redis = find_redis()
    if redis is None:
        raise StackError("redis-server not found")
    stack = _Stack(Path(tempfile.mkdtemp(prefix="mongoproxy-bench-moves-")))
    try:
        home, eu = stack.ferretdb("home"), stack.ferretdb("eu")
        redis_port = free_port()
        stack.start("redis", [redis, "--port", str(redis_port), "--bind", HOST, "--save", "",
                              "--appendonly", "no"], redis_port)
        placement = {"tenancy": {"mode": "enforce", "field": "tenant_id"},
                     "placement": {"clusters": {"eu": {"uri": eu}},
                                   "redis_url": f"redis://{HOST}:{redis_port}/0",
                                   "key_prefix": f"bench{number}:"}}
        port, admin = free_port(), free_port()
        config = stack.workdir / "proxy.yaml"
        config.write_text(proxy_config_text(port, admin, home, extra=placement))
        stack.start("proxy", [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                    port, http=f"http://{HOST}:{admin}/healthz")
        direct: dict[str, MongoClient[dict[str, Any]]] = {
            "home": MongoClient(home), "eu": MongoClient(eu)}
        seeded = _seed(direct["home"], args.docs, args.others)
        uri = f"mongodb://{HOST}:{port}/"
        writers = [_Writer(MOVER, uri), *(_Writer(f"t{n}", uri) for n in range(args.others))]
        threads = [threading.Thread(target=w.run) for w in writers]
        for thread in threads:
            thread.start()
        try:
            time.sleep(args.before)
            move_start = time.monotonic()
            moved = subprocess.run(
                [sys.executable, "-m", "proxy", "move-tenant", "--config", str(config), MOVER,
                 "--to", "eu"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            move_end = time.monotonic()
            time.sleep(args.after)
        finally:
            for writer in writers:
                writer.stop.set()
            for thread in threads:
                thread.join()
        on_target = {d["_id"] for d in direct["eu"][DB].orders.find({"tenant_id": MOVER},
                                                                     {"_id": 1})}
        left = direct["home"][DB].orders.count_documents({"tenant_id": MOVER})
        for client in direct.values():
            client.close()
        return _summary(writers, move_start, move_end, moved, seeded | writers[0].acked,
                        on_target, left)
    finally:
        stack.stop()


def _seed(client: MongoClient[dict[str, Any]], docs: int, others: int) -> set[str]:
    coll = client[DB].orders
    ids = [f"{MOVER}-s{n}" for n in range(docs)]
    for start in range(0, docs, 5000):
        coll.bulk_write([InsertOne({"_id": i, "tenant_id": MOVER, "n": 0, "pad": "x" * 100})
                         for i in ids[start:start + 5000]], ordered=False)
    for n in range(others):
        coll.insert_many([{"tenant_id": f"t{n}", "n": k} for k in range(100)])
    return set(ids)


def _summary(writers: list[_Writer], start: float, end: float,
             moved: subprocess.CompletedProcess[str], acked: set[str], on_target: set[Any],
             left: int) -> dict[str, Any]:
    mover, others = writers[0], writers[1:]
    during = [s for t, s in mover.samples if start <= t <= end]
    before = [s for t, s in mover.samples if t < start]
    held = re.search(r"writes held (\d+) ms", moved.stdout)
    before_o = [s for w in others for t, s in w.samples if t < start]
    during_o = [s for w in others for t, s in w.samples if start <= t <= end]
    p99_before, p99_during = _quantile(before_o, 0.99), _quantile(during_o, 0.99)
    return {
        "move_exit": moved.returncode,
        "move_output": moved.stdout[-2000:] + moved.stderr[-2000:],
        "move_s": round(end - start, 3),
        "held_ms": int(held.group(1)) if held else None,
        "mover_p50_before_ms": _ms(_quantile(before, 0.5)),
        "mover_writes_during": len(during),
        "mover_p50_ms": _ms(_quantile(during, 0.5)),
        "mover_max_ms": _ms(max(during) if during else None),
        "mover_errors": len(mover.errors),
        "others_p99_before_ms": _ms(p99_before),
        "others_p99_during_ms": _ms(p99_during),
        "others_p99_ratio": (round(p99_during / p99_before, 2)
                             if p99_before and p99_during else None),
        "others_errors": sum(len(w.errors) for w in others),
        "target_exact": on_target == acked and left == 0,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def run(args: argparse.Namespace) -> int:
    rounds = []
    for number in range(args.rounds):
        result = _round(args, number)
        rounds.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "move_output"}), flush=True)
        if result["move_exit"] != 0:
            print(result["move_output"], file=sys.stderr)
    ratios = [r["others_p99_ratio"] for r in rounds if r["others_p99_ratio"] is not None]
    report = {"docs": args.docs, "others": args.others, "rounds": rounds,
              "others_p99_ratio_median": statistics.median(ratios) if ratios else None,
              "others_p99_ratio_spread": [min(ratios), max(ratios)] if ratios else None}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["move_exit"] == 0 and r["target_exact"] for r in rounds) else 1


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "moves", help="an online tenant move under write load: the moving tenant's pause, "
                      "the others' p99", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000,
                   help="documents of the moving tenant (default %(default)s)")
    p.add_argument("--others", type=int, default=3,
                   help="other tenants writing meanwhile (default %(default)s)")
    p.add_argument("--before", type=float, default=3.0, help="seconds of load before the move")
    p.add_argument("--after", type=float, default=1.0, help="seconds of load after it")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default: bench/results/moves.json)")
    p.set_defaults(func=run)
