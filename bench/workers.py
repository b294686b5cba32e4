"""`python -m bench workers`: ``listen.workers: 1`` vs ``listen.workers: 2``, same run.

Method
------
* Stack (started here): FerretDB (SQLite handler), one ``redis-server``, and two proxies
  in front of them with the same configuration (result cache with a rule for the
  ``hot`` collection only; ``upstream.pool.max_size`` ``--pool-max-size`` per host)
  except ``listen.workers``: ``w1`` (1, a single process) and ``w2`` (2, a supervisor and
  two workers).
* Seed: ``--docs`` documents ``{_id: "k000000", ...}`` in ``hot`` and in ``items``
  (string ids: FerretDB's SQLite handler only uses its ``_id`` index for strings).
* Saturation: ``--clients`` raw OP_MSG clients, one request at a time each, in
  ``--load-workers`` processes (the load workers of ``python -m bench pool``:
  :func:`bench.pool.run_phase`), ``find`` by ``_id`` over the seeded ids:
  **hit** = the ``hot`` collection, answered from Redis after the warm-up (the
  cache counters of each proxy's ``/metrics`` over the run are reported: a hit ratio
  below 1 means some finds went to FerretDB); **forward** = ``items``, every find sent
  to FerretDB. Per round, ``w1`` and ``w2`` alternate order (ABBA) for each mode.
  Reported: ops/s per round and their mean, the w2/w1 ratio per round (its spread),
  and the cores (CPU seconds / wall seconds, from /proc) of the proxy (supervisor and
  workers summed), FerretDB, Redis and the load generator.
* Idle clients: ``--idle`` connections (connect + ``hello``, then silent) to each
  proxy in turn; the proxy's RSS (``VmRSS``, supervisor + workers) before and with them.

No CPU pinning: two workers need two cores to themselves to show their gain, and this
machine has two in all, shared with FerretDB, Redis and the load generator. The cores
columns say where the CPU went; on 2 cores a forwarded find is bound by FerretDB (and
the load generator), not by the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from statistics import mean
from typing import Any

from pymongo import MongoClient

from bench.cache_rw import cache_counts
from bench.core import _positive_int, machine_info, write_json
from bench.pool import LoadSpec, PhaseResult, _open_many, raise_nofile, rss_kb, run_phase
from bench.stack import (
    HOST,
    REPO_ROOT,
    Stack,
    StackError,
    _Child,
    _wait_for_http_ok,
    free_port,
    start_stack,
)

DEFAULT_JSON = Path("bench/results/workers.json")
TARGETS = ("w1", "w2")
MODES = {"hit": "hot", "forward": "items"}
Doc = dict[str, Any]


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "workers", help="listen.workers 1 vs 2: saturation throughput and idle RSS",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--clients", type=_positive_int, default=64,
                   help="raw wire clients per phase (default: %(default)s)")
    p.add_argument("--load-workers", type=_positive_int, default=2,
                   help="load-generator processes (default: %(default)s)")
    p.add_argument("--duration", type=float, default=3.0, help="measured s per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured s per phase")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds")
    p.add_argument("--docs", type=_positive_int, default=500, help="seeded ids")
    p.add_argument("--pool-max-size", type=_positive_int, default=20,
                   help="upstream.pool.max_size, per host (default: %(default)s)")
    p.add_argument("--idle", type=int, default=2000,
                   help="idle client connections for the RSS figure, 0 skips it")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH")
    p.set_defaults(func=main)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def start(pool_max_size: int) -> tuple[Stack, dict[str, str], dict[str, str]]:
    """The stack: FerretDB, Redis, ``w1`` (the stack's cached proxy) and ``w2`` (the same
    configuration with ``listen.workers: 2``); their URIs and admin URLs."""
    stack = start_stack(pool_max_size=pool_max_size, cache={
        "rules": [{"match": {"collection": MODES["hit"]}, "ttl_s": 3600}]})
    try:
        if "proxy-cache" not in stack.targets or stack.workdir is None:
            raise StackError(stack.unavailable.get("proxy-cache", "no cached proxy"))
        config = json.loads((stack.workdir / "proxy-cache.yaml").read_text())
        port, admin_port = free_port(), free_port()
        config["listen"] = {**config["listen"], "port": port, "workers": 2}
        config["admin"] = {**config["admin"], "port": admin_port}
        path = stack.workdir / "proxy-w2.yaml"
        path.write_text(json.dumps(config, indent=2))
        child = _Child("proxy-w2", [sys.executable, "-m", "proxy", "run", "--config", str(path)],
                       stack.workdir / "proxy-w2.log")
        stack._children.append(child)
        child.spawn(cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert child.proc is not None
        admin = f"http://{HOST}:{admin_port}"
        _wait_for_http_ok(f"{admin}/readyz", child.proc, time.monotonic() + 60)
    except BaseException:
        stack.stop()
        raise
    uris = {"w1": stack.targets["proxy-cache"], "w2": f"mongodb://{HOST}:{port}/"}
    admins = {"w1": stack.admin_urls["proxy-cache"], "w2": admin}
    return stack, uris, admins


def proxy_pids(stack: Stack, admins: dict[str, str], target: str) -> dict[str, int]:
    """The processes of one proxy: ``proxy`` (the supervisor or the single process) and
    ``worker-N``."""
    if target == "w1":
        return {"proxy": stack.pids["proxy-cache"]}
    pids = {"proxy": stack.pids["proxy-w2"]}
    for worker in _get_json(f"{admins[target]}/readyz")["workers"]:
        pids[f"worker-{worker['worker']}"] = int(worker["pid"])
    return pids


def _cores(p: PhaseResult, prefix: str) -> float:
    return sum(v or 0.0 for k, v in p.stack_cpu_cores.items()
               if k == prefix or k.startswith("worker-"))


def saturation(args: argparse.Namespace, stack: Stack, uris: dict[str, str],
               admins: dict[str, str], db: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, collection in MODES.items():
        load = LoadSpec(workers=args.load_workers, collection=collection, docs=args.docs,
                        insert_share=0.0, seed=1, warmup_s=args.warmup,
                        duration_s=args.duration, open_batch=200,
                        sample_interval_s=args.duration)
        before = {t: cache_counts(a) for t, a in admins.items()}
        phases: dict[str, list[PhaseResult]] = {t: [] for t in TARGETS}
        for rnd in range(args.rounds):
            for target in TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS)):
                print(f"bench workers: {mode} round {rnd + 1}/{args.rounds} {target}",
                      file=sys.stderr, flush=True)
                watched = {"ferretdb": stack.pids["ferretdb"], "redis": stack.pids["redis"],
                           **proxy_pids(stack, admins, target)}
                phase = run_phase(load, f"{mode}-{target}", rnd, uris[target], args.clients,
                                  db, watched, None, 0)
                if phase.errors:
                    raise RuntimeError(f"bench workers: {phase.errors} errors on {target}: "
                                       f"{phase.error_samples[:3]}")
                phases[target].append(phase)
        after = {t: cache_counts(a) for t, a in admins.items()}
        rows = {}
        for target, mine in phases.items():
            rows[target] = {
                "ops_per_s": mean(p.ops_per_s for p in mine),
                "per_round_ops_per_s": [round(p.ops_per_s) for p in mine],
                "p50_us": mean(p.p50_us or 0 for p in mine),
                "proxy_cores": mean(_cores(p, "proxy") for p in mine),
                "ferretdb_cores": mean(p.stack_cpu_cores.get("ferretdb") or 0 for p in mine),
                "redis_cores": mean(p.stack_cpu_cores.get("redis") or 0 for p in mine),
                "loadgen_cores": mean(sum(p.worker_cpu_cores) for p in mine),
                "cache": {k: after[target].get(k, 0.0) - before[target].get(k, 0.0)
                          for k in ("hit", "miss", "bypass")},
            }
        # A round where w1 completed nothing (an overloaded machine) has no ratio.
        ratios = [b.ops_per_s / a.ops_per_s if a.ops_per_s else None
                  for a, b in zip(phases["w1"], phases["w2"], strict=True)]
        known = [r for r in ratios if r is not None]
        out[mode] = {"targets": rows, "ratio_w2_w1": mean(known) if known else None,
                     "ratio_per_round": [None if r is None else round(r, 3) for r in ratios]}
    return out


def _each_rss_mb(pids: dict[str, int]) -> dict[str, float]:
    return {name: round((rss_kb(pid) or 0) / 1024, 1) for name, pid in pids.items()}


async def _hold(host: str, port: int, n: int,
                pids: dict[str, int]) -> tuple[int, int, dict[str, float]]:
    """Open ``n`` idle clients: (opened, errors, each process's RSS in MB with them open)."""
    clients, _lat, errors, _wall = await _open_many(host, port, n, 200, "bench-workers-idle")
    await asyncio.sleep(1.0)
    rss = _each_rss_mb(pids)
    for c in clients:
        c.close()
    return len(clients), errors.count, rss


def idle_rss(n: int, stack: Stack, uris: dict[str, str],
             admins: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in TARGETS:
        pids = proxy_pids(stack, admins, target)
        rest_each = _each_rss_mb(pids)
        rest = sum(rest_each.values())
        host, port = uris[target].split("//", 1)[1].rstrip("/").rsplit(":", 1)

        opened, errors, loaded_each = asyncio.run(_hold(host, int(port), n, pids))
        loaded = sum(loaded_each.values())
        out[target] = {"rss_rest_mb": round(rest, 1), "rss_idle_mb": round(loaded, 1),
                       "rss_rest_each_mb": rest_each, "rss_idle_each_mb": loaded_each,
                       "connections": opened, "errors": errors,
                       "kb_per_connection": round((loaded - rest) * 1024 / max(1, opened), 1),
                       "processes": len(pids)}
        print(f"bench workers: {target} {opened} idle clients: RSS {rest:.0f} -> "
              f"{loaded:.0f} MB", file=sys.stderr, flush=True)
        time.sleep(1.0)  # let the proxy see the closes
    return out


def format_report(data: dict[str, Any]) -> str:
    lines = [f"bench workers: {data['clients']} clients, {data['rounds']} rounds x "
             f"{data['duration_s']:g} s, load average at start "
             f"{data['machine'].get('loadavg_at_start')}"]
    for mode, result in data["saturation"].items():
        spread = result["ratio_per_round"]
        ratio = result["ratio_w2_w1"]
        lines.append(f"{mode}: w2/w1 = {'-' if ratio is None else f'{ratio:.2f}'} "
                     f"(rounds {spread})")
        for target, row in result["targets"].items():
            lines.append(
                f"  {target}: {row['ops_per_s']:8.0f} ops/s {row['per_round_ops_per_s']}  "
                f"cores proxy {row['proxy_cores']:.2f} ferretdb {row['ferretdb_cores']:.2f} "
                f"redis {row['redis_cores']:.2f} load {row['loadgen_cores']:.2f}  "
                f"cache {row['cache']}")
    for target, row in data.get("idle", {}).items():
        lines.append(f"idle {target}: {row['connections']} clients, RSS {row['rss_rest_mb']} -> "
                     f"{row['rss_idle_mb']} MB ({row['rss_rest_each_mb']} -> "
                     f"{row['rss_idle_each_mb']})")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    nofile = raise_nofile()
    t0 = time.perf_counter()
    stack, uris, admins = start(args.pool_max_size)
    with stack:
        db = f"bench_workers_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"
        direct: MongoClient[Doc] = MongoClient(stack.direct_uri, directConnection=True)
        with direct:
            for collection in MODES.values():
                direct[db][collection].insert_many(
                    [{"_id": f"k{i:06d}", "n": i, "v": "x" * 32} for i in range(args.docs)])
        data: dict[str, Any] = {
            "machine": machine_info(), "nofile": list(nofile), "clients": args.clients,
            "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
            "docs": args.docs, "pool_max_size": args.pool_max_size,
            "saturation": saturation(args, stack, uris, admins, db),
        }
        if args.idle:
            data["idle"] = idle_rss(args.idle, stack, uris, admins)
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    data["total_wall_s"] = time.perf_counter() - t0
    write_json(args.json, data)
    print(format_report(data))
    print(f"results: {args.json}")
    return 0
