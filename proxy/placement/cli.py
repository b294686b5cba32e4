"""The ``move-tenant`` subcommand's arguments, and the shared state as ``check-config``
shows it."""

from __future__ import annotations

import argparse

from proxy.config import Config
from proxy.placement.move_phases import Limits

__all__ = ["add_arguments", "print_state", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML configuration file")
    parser.add_argument("tenant", help="the tenant (its value as a string)")
    parser.add_argument("--to", default=None, help="the target cluster (a placement.clusters "
                                                   "name, or home)")
    parser.add_argument("--abort", action="store_true",
                        help="abort the move (before its switch): the tenant stays where "
                             "it is, the target's copy is deleted")
    parser.add_argument("--status", action="store_true", help="show the move's state")
    defaults = Limits()
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="documents per copy batch (default %(default)s)")
    parser.add_argument("--pop", type=int, default=defaults.pop,
                        help="written ids per catch-up step (default %(default)s)")
    parser.add_argument("--small", type=int, default=defaults.small,
                        help="catch-up ends when this few ids are left (default "
                             "%(default)s)")
    parser.add_argument("--passes", type=int, default=defaults.passes,
                        help="at most this many catch-up passes before the hold "
                             "(default %(default)s)")
    parser.add_argument("--settle-ms", type=int, default=None,
                        help="wait after lease_ms before copying (default: lease_ms)")
    parser.add_argument("--hold-ms", type=int, default=None,
                        help="the hold's length (default: placement.hold_timeout_ms)")


def run(config: Config, args: argparse.Namespace) -> int:
    from proxy.placement.mover import main

    for name in ("batch", "pop", "passes"):
        if getattr(args, name) <= 0:
            print(f"mongoproxy move-tenant: --{name} must be positive")
            return 2
    limits = Limits(batch=args.batch, pop=args.pop, small=max(args.small, 0),
                    passes=args.passes, settle_ms=args.settle_ms, hold_ms=args.hold_ms)
    return main(config, args.tenant, args.to, args.abort, args.status, limits)


def print_state(config: Config) -> None:
    """The overrides and moves in progress of the shared state (or why it is unread)."""
    from redis import Redis
    from redis.exceptions import RedisError

    from proxy.placement.shared import Keys, parse_state

    placement = config.placement
    assert placement.redis_url is not None
    client = Redis.from_url(placement.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        state = parse_state(client.get(Keys(placement.key_prefix).state))
    except (RedisError, OSError, ValueError) as exc:
        print(f"placement state: not readable from {placement.redis_url}: {exc}")
        return
    finally:
        client.close()
    print(f"placement state: version {state.version}")
    for tenant, cluster in sorted(state.overrides.items()):
        print(f"  override: tenant {tenant} -> {cluster} (a finished move)")
    for tenant, move in sorted(state.moves.items()):
        print(f"  move in progress: tenant {tenant} {move.get('from')} -> {move.get('to')}, "
              f"phase {move.get('phase')}")
