"""Command line: ``mongoproxy run --config FILE`` and ``mongoproxy check-config FILE``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from proxy.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mongoproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="YAML configuration file")
    run.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file")
    sub.add_parser("top", help="the query digest of a running proxy, refreshing",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["top"]:
        from proxy.observe.top import main as top_main

        return top_main(argv[1:])
    args = _parser().parse_args(argv)
    path = args.config if args.command == "run" else args.file
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"mongoproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{path}: OK")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    from proxy.app import run as run_proxy  # deferred: check-config needs no event loop

    run_proxy(config)
    return 0
