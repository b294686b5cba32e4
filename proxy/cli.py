"""Command line: ``mongoproxy run --config FILE``, ``check-config FILE``, ``top``,
``advise``, ``explain-route``, ``hash-password`` and ``move-tenant``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pymongo.topology_description import TopologyDescription

from proxy import __version__
from proxy.config import Config, ConfigError, load_config
from proxy.identity.hash_cli import add_arguments as add_hash_arguments
from proxy.identity.hash_cli import run as run_hash_password


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mongoproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mongoproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="YAML configuration file")
    run.add_argument("--log-level", default="INFO")
    # Started by the supervisor of listen.workers > 1 (proxy/supervisor.py), not by hand.
    from proxy.worker import add_arguments as add_worker_arguments

    add_worker_arguments(sub.add_parser("worker", help="(internal) one of listen.workers"))
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file")
    sub.add_parser("top", help="the query digest of a running proxy, refreshing",
                   add_help=False)
    sub.add_parser("advise", help="index advice from a running proxy's query shapes",
                   add_help=False)
    hash_password = sub.add_parser(
        "hash-password", help="print the stored SCRAM-SHA-256 credential for a proxy user",
    )
    add_hash_arguments(hash_password)
    explain = sub.add_parser(
        "explain-route",
        help="show the tenancy verdict, class, rule, read preference, member and cache "
             "decision a command would get",
    )
    explain.add_argument("--config", required=True, help="YAML configuration file")
    explain.add_argument("command_json", help="the command as (Extended) JSON")
    explain.add_argument("--app-name", default=None, help="the client's appName")
    explain.add_argument("--user", default=None,
                         help="a configured proxy user (tenancy.users) the command runs as")
    explain.add_argument(
        "--offline", action="store_true",
        help="do not contact the upstream: no member is chosen",
    )
    from proxy.placement.cli import add_arguments as add_move_arguments

    add_move_arguments(sub.add_parser(
        "move-tenant", help="move a tenant's documents to another cluster online"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["top"]:
        from proxy.observe.top import main as top_main

        return top_main(argv[1:])
    if argv[:1] == ["advise"]:
        from proxy.advice.cli import main as advise_main

        return advise_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return run_hash_password(args)
    if args.command == "worker":
        from proxy.worker import main as worker_main

        return worker_main(args)
    path = args.file if args.command == "check-config" else args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"mongoproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{path}: OK")
        if config.placement.redis_url is not None:
            from proxy.placement.cli import print_state

            print_state(config)
        return 0
    if args.command == "move-tenant":
        from proxy.placement.cli import run as run_move

        return run_move(config, args)
    if args.command == "explain-route":
        return _explain_route(config, args.command_json, args.app_name, args.offline,
                              args.user)
    workers = config.listen.worker_count()
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s "
               + ("[supervisor] " if workers > 1 else "") + "%(message)s",
        stream=sys.stderr,
    )
    if workers > 1:
        from proxy.supervisor import run as run_supervisor

        return run_supervisor(config, Path(path), args.log_level)
    from proxy.app import run as run_proxy  # deferred: check-config needs no event loop

    run_proxy(config, Path(path))
    return 0


def _explain_route(config: Config, command_json: str, app_name: str | None,
                   offline: bool, user: str | None = None) -> int:
    import asyncio

    from proxy.explain.route import ExplainError, explain_route

    logging.basicConfig(level=logging.ERROR)  # the monitor's member-state lines are noise here
    description = None if offline else asyncio.run(_current_topology(config))
    try:
        print(explain_route(config.routing, command_json, app_name, description,
                            tenancy=config.tenancy, cache=config.cache, explain_cache=True,
                            user=user, placement=config.placement))
    except ExplainError as exc:
        print(f"mongoproxy explain-route: {exc}", file=sys.stderr)
        return 2
    return 0


async def _current_topology(config: Config) -> TopologyDescription:
    """The upstream as the proxy would see it now: one round of monitoring."""
    import asyncio

    from proxy.route.topology import make_topology

    topology = make_topology(config.upstream)
    await topology.start()
    try:
        deadline = asyncio.get_running_loop().time() + 3.0
        while (not topology.description().known_servers
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.05)
        return topology.description()
    finally:
        await topology.close()
