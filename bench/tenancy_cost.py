"""Cost of the tenancy policy per command (no I/O): ``python -m bench tenancy``.

Each figure is the whole admission a request pays, ``proxy.tenancy.gate.admit``: the
repeated-key check of the body (already decoded by the request path for every stage) and
the decoding of the document sequences, then ``TenantPolicy.check``; for
driver-shaped commands with the usual envelope (``lsid``, ``$clusterTime``, ``$db``), in
the modes where the policy does work. The best of five repeats is reported, in µs per
command; the goal is under 10 µs for a typical find. Writes bench/results/tenancy.json.
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

import bson
from bson import Binary, Int64

from proxy.tenancy import TenancyConfig, TenancyMode, TenantPolicy
from proxy.tenancy.gate import admit
from proxy.wire import DocumentSequence

DEFAULT_JSON = Path(__file__).parent / "results" / "tenancy.json"

_ENVELOPE: dict[str, Any] = {
    "lsid": {"id": Binary(b"\x01" * 16, 4)},
    "$clusterTime": {"clusterTime": bson.Timestamp(1, 1),
                     "signature": {"hash": b"\x00" * 20, "keyId": Int64(0)}},
    "$db": "app",
}
_TASK = {"tenant_id": "acme", "title": "Write the report", "status": "open",
         "assignee_id": "u42", "priority": 3, "tags": ["q4", "finance"]}

# name -> (command body, document sequences)
COMMANDS: dict[str, tuple[dict[str, Any], list[tuple[str, list[dict[str, Any]]]]]] = {
    "find (typical)": ({
        "find": "tasks", "filter": {"tenant_id": "acme", "assignee_id": "u42",
                                    "status": {"$in": ["open", "blocked"]}},
        "sort": {"priority": -1}, "limit": 50, **_ENVELOPE}, []),
    "aggregate ($match+$group+$sort)": ({
        "aggregate": "projects", "pipeline": [
            {"$match": {"tenant_id": "acme", "portfolio_id": "p7"}},
            {"$group": {"_id": "$status", "n": {"$sum": 1}, "budget": {"$sum": "$budget"}}},
            {"$sort": {"n": -1}}],
        "cursor": {}, **_ENVELOPE}, []),
    "insert (1 doc, sequence)": ({"insert": "tasks", "ordered": True, **_ENVELOPE},
                                 [("documents", [_TASK])]),
    "insert (50 docs, sequence)": ({"insert": "notifications", "ordered": True, **_ENVELOPE},
                                   [("documents", [dict(_TASK, n=i) for i in range(50)])]),
    "update ($set, 1 statement)": ({"update": "timesheets", "ordered": True, **_ENVELOPE},
                                   [("updates", [{"q": {"tenant_id": "acme", "_id": "t1"},
                                                  "u": {"$set": {"approved": True}}}])]),
}


def _no_cursor(_cursor_id: int) -> tuple[bool, Any]:
    return False, None


def measure(number: int) -> dict[str, dict[str, float]]:
    """µs per command, per mode: {mode: {command: µs}}."""
    results: dict[str, dict[str, float]] = {}
    modes: tuple[TenancyMode, ...] = ("enforce", "inject")
    for mode in modes:
        bound = "acme"  # a connection bound to a tenant by its proxy user
        policy = TenantPolicy(TenancyConfig(mode=mode, collections=("*",),
                                            exempt=("tenants", "system.*")))
        row: dict[str, float] = {}
        for label, (body, sequences) in COMMANDS.items():
            raw = bson.encode(body)
            raw_sequences = [DocumentSequence(ident, b"".join(bson.encode(d) for d in docs))
                             for ident, docs in sequences]
            name = next(iter(body))

            # The request path decodes the body once for every stage (decode_body) and
            # hands the result over; that decoding is not the policy's cost.
            decoded = bson.decode(raw)

            once = functools.partial(admit, policy, name, decoded, raw, raw_sequences,
                                     bound_tenant=bound,
                                     cursor_tenant=_no_cursor)
            probe = once()
            if probe.refused is not None:  # a benchmark of refusals would measure nothing
                raise SystemExit(f"bench tenancy: {label} refused in {mode}: {probe.refused}")
            best = min(timeit.repeat(once, number=number, repeat=5))
            row[label] = best / number * 1e6
        results[mode] = row
    return results


def run(args: argparse.Namespace) -> int:
    results = measure(args.number)
    print(f"{'command':36s} " + " ".join(f"{mode:>9s}" for mode in results))
    for label in COMMANDS:
        print(f"{label:36s} " + " ".join(f"{results[m][label]:7.2f}µs" for m in results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "number": args.number,
        "us_per_command": {m: {k: round(v, 2) for k, v in r.items()} for m, r in
                           results.items()},
    }, indent=2) + "\n")
    return 0


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "tenancy", help="tenancy policy cost per command (in process)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--number", type=int, default=5000,
                   help="calls per repeat (default: %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default: bench/results/tenancy.json)")
    p.set_defaults(func=run)
