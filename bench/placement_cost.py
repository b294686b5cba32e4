"""Cost of tenant placement's decision per command (no I/O): ``python -m bench placement``.

For each command, the admission the request path pays without placement
(``proxy.tenancy.gate.admit``) and with it (``admit(placement=True)`` then
``PlacementRouter.place``): a connection bound to a tenant, and the ``"*"`` identity
naming one tenant (placement checks it as a tenant's command would be) or none (a
fan-out decision). The directory lists 1,000 tenants and hashes the others over three
clusters. Best of five repeats, in µs per command; the difference is placement's cost.
Writes bench/results/placement.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import timeit
from pathlib import Path
from typing import Any

from bench.tenancy_cost import _ENVELOPE
from proxy.config import PlacementConfig, UpstreamConfig
from proxy.placement.clusters import Clusters
from proxy.placement.directory import EMPTY_STATE
from proxy.placement.route import PlacementRouter
from proxy.pool.config import PoolConfig
from proxy.pool.registry import Pools
from proxy.request import request_from_command
from proxy.route.cursors import CursorTable
from proxy.route.topology import make_topology
from proxy.tenancy import TenancyConfig, TenantPolicy
from proxy.tenancy.gate import admit
from proxy.upstream.roundtrip import Roundtrip

DEFAULT_JSON = Path(__file__).parent / "results" / "placement.json"

_FIND = {"find": "tasks", "filter": {"tenant_id": "tenant-17", "status": "open"},
         "sort": {"priority": -1}, "limit": 50, **_ENVELOPE}
# label -> (command, the connection's bound tenant)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "find, bound tenant (listed)": (_FIND, "tenant-17"),
    "find, bound tenant (hashed)": ({**_FIND, "filter": {"tenant_id": "other-9"}},
                                    "other-9"),
    "find, '*' naming one tenant": (_FIND, "*"),
    "find, '*' naming none (fan-out)": ({**_FIND, "filter": {"status": "open"}}, "*"),
}


def _members(port: int) -> UpstreamConfig:
    return UpstreamConfig.model_validate(
        {"members": [{"host": f"127.0.0.1:{port}", "role": "primary"}]})


def _router() -> tuple[PlacementRouter, PlacementConfig]:
    home = Roundtrip(make_topology(_members(1)), Pools(PoolConfig()), CursorTable(), 1000)
    others = {"eu": _members(2), "big": _members(3)}
    config = PlacementConfig(clusters=others,
                             tenants={f"tenant-{i}": ("eu", "big")[i % 2]
                                      for i in range(1000)},
                             hash=("home", "eu", "big"))
    return PlacementRouter(Clusters(home, others), home.cursors), config


def _no_cursor(_cursor_id: int) -> tuple[bool, Any]:
    return False, None


def measure(number: int) -> dict[str, dict[str, float]]:
    """µs per command: {case: {"without": µs, "with": µs}}."""
    policy = TenantPolicy(TenancyConfig(mode="enforce"))
    router, config = _router()
    results: dict[str, dict[str, float]] = {}
    for label, (command, bound) in CASES.items():
        request = request_from_command(command)
        base = functools.partial(admit, policy, request.raw_name, request.command,
                                 request.msg.body, request.sequences, bound_tenant=bound,
                                 cursor_tenant=_no_cursor)

        def placed(base: Any = base, request: Any = request, bound: str = bound) -> Any:
            admission = base(placement=True)
            return router.place(request, admission, bound, config, EMPTY_STATE)

        if placed().refused is not None and not placed().fanout:
            raise SystemExit(f"bench placement: {label} refused")
        timeit.repeat(base, number=number, repeat=1)  # warm both paths' caches
        timeit.repeat(placed, number=number, repeat=1)
        results[label] = {
            "without": min(timeit.repeat(base, number=number, repeat=5)) / number * 1e6,
            "with": min(timeit.repeat(placed, number=number, repeat=5)) / number * 1e6,
        }
    return results


def run(args: argparse.Namespace) -> int:
    results = measure(args.number)
    print(f"{'command':34s} {'without':>9s} {'with':>9s} {'placement':>10s}")
    for label, row in results.items():
        print(f"{label:34s} {row['without']:7.2f}µs {row['with']:7.2f}µs "
              f"{row['with'] - row['without']:+8.2f}µs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "python": sys.version.split()[0], "machine": platform.machine(),
        "number": args.number,
        "us_per_command": {k: {m: round(v, 2) for m, v in r.items()}
                           for k, r in results.items()},
    }, indent=2) + "\n")
    return 0


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "placement", help="tenant placement's decision cost per command (in process)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--number", type=int, default=5000,
                   help="calls per repeat (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default: bench/results/placement.json)")
    p.set_defaults(func=run)
