"""`python -m bench ab --base REV`: the proxy at git revision REV against this checkout.

On a shared 2-core machine the proxy's CPU per operation moves by ±20 % between runs
minutes apart, more than most changes to the request path. This bench compares two
versions of the proxy side by side instead:

* one FerretDB and one Redis; two proxies with the same config (result cache rules for
  the collection ``hot`` only): ``base`` runs from a temporary ``git worktree`` of REV,
  ``head`` from this checkout (uncommitted changes included);
* per round and path, ``--ops`` sequential ``find_one`` by string ``_id`` through each
  proxy: ``forward`` on collection ``t`` (never cached) and ``hit`` on ``hot`` (every
  measured lookup a cache hit); rounds alternate which proxy goes first;
* figures: the proxy's CPU per operation (utime+stime from ``/proc/<pid>/stat``, so
  10 ms ticks: ±5 µs at 2,000 ops) and the client's wall time per operation, as the
  mean over rounds, with every round's value in the JSON.

Results go to ``bench/results/ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench.stack import (
    HOST,
    REPO_ROOT,
    Stack,
    StackError,
    _Child,
    _wait_for_http_ok,
    _wait_for_port,
    free_port,
    process_cpu_seconds,
    start_stack,
)

DEFAULT_JSON = Path(__file__).parent / "results" / "ab.json"
PATHS = {"forward": "t", "hit": "hot"}
CACHE = {"timeout_ms": 20, "rules": [{"match": {"collection": "hot"}, "ttl_s": 3600}]}
IDS = 50


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ab", help="the proxy at a git revision against this checkout, side by side",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--base", default="HEAD",
                   help="git revision to compare with (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default: %(default)s)")
    p.add_argument("--ops", type=int, default=2000,
                   help="operations per proxy, path and round (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="results file (default: bench/results/ab.json)")
    p.set_defaults(func=main)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def _start_base(stack: Stack, worktree: Path) -> tuple[str, int]:
    """The base proxy (run from ``worktree``) with the head proxy's config; its URI and pid."""
    assert stack.workdir is not None
    config = json.loads((stack.workdir / "proxy-cache.yaml").read_text())
    port, admin_port = free_port(), free_port()
    config["listen"]["port"], config["admin"]["port"] = port, admin_port
    config["cache"]["key_prefix"] = "base:"  # its own entries, not the head proxy's
    path = stack.workdir / "proxy-base.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    child = _Child("proxy-base", [sys.executable, "-m", "proxy", "run", "--config", str(path)],
                   stack.workdir / "proxy-base.log")
    stack._children.append(child)
    # cwd comes first on sys.path: `python -m proxy` imports the worktree's package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child.spawn(cwd=worktree, env={**env, "PYTHONUNBUFFERED": "1"})
    assert child.proc is not None
    deadline = time.monotonic() + 30
    try:
        _wait_for_http_ok(f"http://{HOST}:{admin_port}/healthz", child.proc, deadline)
        _wait_for_port(port, child.proc, deadline)
    except BaseException as e:
        raise StackError(f"the base proxy failed to start: {e}\n{child.log_tail()}") from e
    return f"mongodb://{HOST}:{port}/", child.proc.pid


def _measure(client: MongoClient[dict[str, Any]], pid: int, collection: str,
             ops: int) -> tuple[float, float]:
    """(proxy CPU µs per op, client wall µs per op) for ``ops`` sequential finds."""
    coll = client.bench_ab[collection]
    cpu_before = process_cpu_seconds(pid) or 0.0
    started = time.perf_counter()
    for i in range(ops):
        if coll.find_one({"_id": f"k{i % IDS}"}) is None:
            raise RuntimeError(f"bench ab: k{i % IDS} not found in {collection}")
    wall = time.perf_counter() - started
    cpu = (process_cpu_seconds(pid) or 0.0) - cpu_before
    return cpu / ops * 1e6, wall / ops * 1e6


def main(args: argparse.Namespace) -> int:
    base_rev = _git("rev-parse", "--short", args.base)
    head_rev = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "proxy"))
    worktree = Path(tempfile.mkdtemp(prefix="mongoproxy-ab-")) / "base"
    _git("worktree", "add", "--detach", str(worktree), base_rev)
    print(f"bench ab: base {base_rev} (worktree {worktree}) vs head {head_rev}"
          f"{' + uncommitted changes' if dirty else ''}", flush=True)
    try:
        with start_stack(cache=CACHE) as stack:
            if "proxy-cache" in stack.unavailable:
                raise StackError(stack.unavailable["proxy-cache"])
            base_uri, base_pid = _start_base(stack, worktree)
            targets = {"base": (base_uri, base_pid),
                       "head": (stack.targets["proxy-cache"], stack.pids["proxy-cache"])}
            direct: MongoClient[dict[str, Any]] = MongoClient(stack.direct_uri)
            with direct:
                for collection in PATHS.values():
                    docs: list[dict[str, Any]] = [
                        {"_id": f"k{i}", "pad": "x" * 100} for i in range(IDS)]
                    direct.bench_ab[collection].insert_many(docs)
            clients: dict[str, MongoClient[dict[str, Any]]] = {
                name: MongoClient(uri) for name, (uri, _) in targets.items()}
            rounds: dict[str, dict[str, list[tuple[float, float]]]] = {
                name: {path: [] for path in PATHS} for name in targets}
            try:
                for name, client in clients.items():  # warm-up: pools, shapes, cache fill
                    for collection in PATHS.values():
                        _measure(client, targets[name][1], collection, 300)
                for r in range(args.rounds):
                    order = ("base", "head") if r % 2 == 0 else ("head", "base")
                    print(f"bench ab: round {r + 1}/{args.rounds} ({' first, '.join(order)} "
                          "second)", flush=True)
                    for name in order:
                        for path, collection in PATHS.items():
                            rounds[name][path].append(
                                _measure(clients[name], targets[name][1], collection,
                                         args.ops))
            finally:
                for client in clients.values():
                    client.close()
    finally:
        _git("worktree", "remove", "--force", str(worktree))
    return _report(args, base_rev, head_rev, dirty, rounds)


def _report(args: argparse.Namespace, base_rev: str, head_rev: str, dirty: bool,
            rounds: dict[str, dict[str, list[tuple[float, float]]]]) -> int:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    summary: dict[str, Any] = {}
    print(f"\n{'path':8s} {'proxy':5s} {'cpu µs/op':>10s} {'wall µs/op':>11s}")
    for path in PATHS:
        row: dict[str, Any] = {}
        for name in ("base", "head"):
            cpu = [c for c, _ in rounds[name][path]]
            wall = [w for _, w in rounds[name][path]]
            row[name] = {"cpu_us_per_op": round(mean(cpu), 1),
                         "wall_us_per_op": round(mean(wall), 1),
                         "rounds_cpu": [round(c, 1) for c in cpu],
                         "rounds_wall": [round(w, 1) for w in wall]}
            print(f"{path:8s} {name:5s} {mean(cpu):10.0f} {mean(wall):11.0f}")
        base_cpu, head_cpu = row["base"]["cpu_us_per_op"], row["head"]["cpu_us_per_op"]
        # None when too few operations for a 10 ms CPU tick on either side.
        row["head_over_base_cpu"] = (
            round(head_cpu / base_cpu, 3) if base_cpu and head_cpu else None)
        print(f"{path:8s} head/base CPU {row['head_over_base_cpu']}")
        summary[path] = row
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "ab", "base": base_rev, "head": head_rev,
        "head_has_uncommitted_changes": dirty, "rounds": args.rounds, "ops": args.ops,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": summary,
    }, indent=2) + "\n")
    print(f"results: {args.json}")
    return 0
