"""`python -m bench <subcommand>`: the mongoproxy benchmarks.

Subcommands:
  core   proxy vs direct (and HAProxy, a bare Python relay: bench/relay.py) on
         find-by-_id and insert_one (bench/core.py)
  pool   proxy RSS with many idle clients; many clients on a small pool vs direct
         (bench/pool.py)
  observe  cost of timing + shape + digest + metrics (+ a slow-log line) per operation:
           in process, and as proxy CPU per operation end to end (bench/observe_cost.py)
  tenancy  tenancy policy cost per command, in process (bench/tenancy_cost.py)
  placement  tenant placement's decision cost per command, in process
             (bench/placement_cost.py)
  placement-fanout  fan-out find latency over 2 clusters vs one (bench/placement_fanout.py)
  cache  hot cacheable find: proxy + result cache vs FerretDB directly (bench/cache.py)
  seed   load the multi-tenant project-management data set (bench/seed.py, bench/workload.py)
  run    the multi-tenant workload: direct vs tcp vs proxy vs proxy-cache, closed and open
         loop, interleaved (bench/harness.py)
  storm  N connections opened at once, each running a few operations (bench/storm.py)
  report Markdown and charts from run/storm JSON, the tables of docs/performance.md
         (bench/report.py)
  attack a well-behaved client's p50 with and without each hostile client of issue 15
         (bench/attack.py)
  ab     the proxy at a git revision against this checkout, side by side: CPU and wall
         time per forwarded find and per cache hit (bench/ab.py)
  failover  FerretDB SIGKILLed and restarted under load: client-visible errors, lost
            and doubled writes, recovery; direct vs the proxy (bench/failover.py)
  moves  an online tenant move under write load: the moving tenant's write pause, the
         other tenants' p99 before and during (bench/moves.py)
  workers  listen.workers 1 vs 2: throughput at saturation (cache hits, forwarded finds),
           cores per process, RSS with idle clients (bench/workers.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import (
    ab,
    attack,
    cache,
    core,
    failover,
    harness,
    moves,
    observe_cost,
    placement_cost,
    placement_fanout,
    pool,
    report,
    seed,
    storm,
    tenancy_cost,
    workers,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="mongoproxy benchmarks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Each benchmark module registers its own subcommand (and sets `func`).
    core.add_parser(subparsers)
    pool.add_parser(subparsers)
    observe_cost.add_parser(subparsers)
    tenancy_cost.add_parser(subparsers)
    placement_cost.add_parser(subparsers)
    cache.add_parser(subparsers)
    seed.add_parser(subparsers)
    harness.add_parser(subparsers)
    storm.add_parser(subparsers)
    report.add_parser(subparsers)
    ab.add_parser(subparsers)
    attack.add_parser(subparsers)
    workers.add_parser(subparsers)
    failover.add_parser(subparsers)
    placement_fanout.add_parser(subparsers)
    moves.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
