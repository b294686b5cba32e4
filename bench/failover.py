"""`python -m bench failover`: FerretDB SIGKILLed under write load and restarted, straight
to FerretDB and through the proxy, in one run.

A private stack is started: FerretDB, the proxy in ``uri`` mode (its default config)
and a second proxy in declared-``members`` mode (the same server as its one primary).
Each round runs the scenario of bench/failover_load.py once per target, one after the
other: ``--workers`` pymongo threads (``retryWrites``, ``serverSelectionTimeoutMS``
3000) doing ``$inc`` upserts, inserts of unique ``_id``s and finds; after ``--warm`` s
FerretDB is SIGKILLed, after ``--down`` s more started again on the same port and data.

Reported per target: operations that succeeded, client-visible errors (by kind),
acknowledged writes lost and writes applied twice (read back over a direct connection),
the slowest operation, and the time from the restart until every worker had succeeded
again. JSON goes to bench/results/failover.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench.failover_load import scenario
from bench.stack import (
    HOST,
    REPO_ROOT,
    Stack,
    _Child,
    _start_optional,
    _wait_for_port,
    free_port,
    proxy_config_text,
    start_stack,
)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "failover.json"
TARGETS = ("direct", "proxy", "proxy-members")


def _start_members_proxy(stack: Stack, fdb_port: int) -> None:
    """A second proxy with ``upstream.members`` naming the same FerretDB."""
    assert stack.workdir is not None
    port, admin_port = free_port(), free_port()
    config = stack.workdir / "proxy-members.yaml"
    config.write_text(proxy_config_text(port, admin_port, stack.direct_uri, extra={
        "upstream": {"members": [{"host": f"{HOST}:{fdb_port}", "role": "primary"}]}}))
    child = _Child("proxy-members", [sys.executable, "-m", "proxy", "run", "--config",
                                     str(config)], stack.workdir / "proxy-members.log")

    def ready(deadline: float) -> None:
        assert child.proc is not None
        _wait_for_port(port, child.proc, deadline)

    if _start_optional(stack, child, ready, 30.0, cwd=REPO_ROOT):
        stack.targets["proxy-members"] = f"mongodb://{HOST}:{port}/"


class _FerretDB:
    """Kill and restart the stack's FerretDB (same port, same data)."""

    def __init__(self, stack: Stack) -> None:
        self.child = next(c for c in stack._children if c.name == "ferretdb")
        self.port = int(stack.direct_uri.rsplit(":", 1)[1].strip("/"))

    def kill(self) -> None:
        assert self.child.proc is not None
        self.child.proc.kill()
        self.child.proc.wait(10)

    def restart(self) -> None:
        self.child.spawn()
        assert self.child.proc is not None
        _wait_for_port(self.port, self.child.proc, time.monotonic() + 30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    stack = start_stack()
    try:
        fdb = _FerretDB(stack)
        _start_members_proxy(stack, fdb.port)
        rounds: list[dict[str, Any]] = []
        direct: MongoClient[dict[str, Any]] = MongoClient(
            stack.direct_uri, directConnection=True, serverSelectionTimeoutMS=10_000)
        with direct:
            for round_no in range(args.rounds):
                row: dict[str, Any] = {}
                for target in TARGETS:
                    uri = stack.targets.get(target)
                    if uri is None:
                        row[target] = {"unavailable": stack.unavailable.get(target, "?")}
                        continue
                    row[target] = scenario(
                        uri, "bench_failover", f"{target}-{round_no}", direct, fdb.kill,
                        fdb.restart, workers=args.workers, warm_s=args.warm,
                        down_s=args.down)
                    print(f"round {round_no + 1} {target}: {row[target]}", flush=True)
                rounds.append(row)
            direct.drop_database("bench_failover")
    finally:
        stack.stop()
    return {"scenario": {"workers": args.workers, "warm_s": args.warm, "down_s": args.down,
                         "kill": "SIGKILL", "proxy_config": "default (uri) / members"},
            "rounds": rounds}


def _table(result: dict[str, Any]) -> str:
    lines = ["| round | target | ok | errors | lost | applied twice | slowest s | recovery s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(result["rounds"], 1):
        for target, r in row.items():
            if "unavailable" in r:
                lines.append(f"| {i} | {target} | unavailable: {r['unavailable']} |")
                continue
            lines.append(f"| {i} | {target} | {r['ok']} | {r['errors']} | {r['lost']} | "
                         f"{r['doubled']} | {r['slowest_s']} | {r['recovery_s']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "failover", help="FerretDB killed and restarted under load: direct vs the proxy "
                         "(uri and members modes)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--warm", type=float, default=1.5, help="seconds of load before the kill")
    parser.add_argument("--down", type=float, default=2.0, help="seconds FerretDB stays down")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.set_defaults(func=main)
