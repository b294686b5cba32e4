"""One serving process of ``listen.workers: N`` (started by :mod:`proxy.supervisor`).

``python -m proxy worker --config FILE --snapshot JSON --index I --count N
--admin-socket PATH`` runs an ordinary :class:`~proxy.app.Proxy` with three differences:

* it binds the listening port with ``SO_REUSEPORT`` (the kernel spreads new client
  connections over the workers; a connection stays in the worker that accepted it, so
  its cursors and transactions stay there too);
* its admin endpoint is a private unix socket the supervisor reads and aggregates;
* its configuration is the supervisor's view (``--snapshot``, so a worker started after
  an edit of the file gets the rules the others run with) with the per-host budgets
  divided: see :func:`worker_config`. ``--config`` is the operator's file, for reloads.

Its slow-log lines go to stdout, a pipe the supervisor reads: one stream for the host,
rotated by one process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import Config, ConfigError, parse_config

__all__ = ["FAIL_AT_START_ENV", "WorkerSlot", "add_arguments", "main", "share", "worker_config"]

log = logging.getLogger("mongoproxy.worker")

# Test hook (the crash-loop test): a worker started with this set exits at once with
# status 3, as a worker that cannot start would.
FAIL_AT_START_ENV = "MONGOPROXY_WORKER_FAIL_AT_START"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker this process is: ``index`` in ``0 .. count-1``."""

    index: int
    count: int
    admin_socket: str

    def adapt(self, config: Config) -> Config:
        """A configuration as this worker runs it (for the reloader's comparison)."""
        return worker_config(config, self.index, self.count)


def share(total: int, index: int, count: int) -> int:
    """Worker ``index``'s part of a per-host ``total``: ``total // count``, plus one for
    the first ``total % count`` workers, so the parts add up to ``total`` exactly."""
    base, extra = divmod(total, count)
    return base + (1 if index < extra else 0)


def _divided(section: Any, names: tuple[str, ...], index: int, count: int,
             floor: int = 0) -> Any:
    update = {name: max(floor, share(getattr(section, name), index, count))
              for name in names if getattr(section, name, None)}
    return section.model_copy(update=update) if update else section


def worker_config(config: Config, index: int, count: int) -> Config:
    """The configuration worker ``index`` of ``count`` runs with: the upstream pool's
    ``max_size`` and ``min_size``, ``listen.max_connections`` and the memory budget
    ``listen.max_buffered_bytes`` divided among the workers; the slow log to stdout (the
    supervisor writes the file)."""
    upstream = config.upstream
    pool = _divided(upstream.pool, ("max_size", "min_size"), index, count)
    # At least one connection each (a limit below the worker count is rounded up).
    listen = _divided(config.listen, ("max_connections", "max_buffered_bytes"), index, count,
                      floor=1)
    return config.model_copy(update={
        "listen": listen,
        "upstream": upstream.model_copy(update={"pool": pool}),
        "observability": config.observability.model_copy(update={"slow_log": "-"}),
    })


def snapshot_text(config: Config) -> str:
    """The supervisor's view, as the worker reads it back with :func:`parse_config`."""
    return json.dumps(config.model_dump(mode="json", by_alias=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the operator's file (reloads)")
    parser.add_argument("--snapshot", required=True, help="the configuration to start with")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--log-level", default="INFO")


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by SIGKILL): no orphan keeps
    serving the port unsupervised."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM still works
        return


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.index}] %(message)s",
        stream=sys.stderr,
    )
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        return 1
    if os.environ.get(FAIL_AT_START_ENV):
        log.error("%s is set: exiting at start", FAIL_AT_START_ENV)
        return 3
    try:
        config = parse_config(json.loads(Path(args.snapshot).read_text(encoding="utf-8")))
    except (OSError, ValueError, ConfigError) as exc:
        log.error("cannot read the configuration snapshot %s: %s", args.snapshot, exc)
        return 2
    slot = WorkerSlot(args.index, args.count, args.admin_socket)
    from proxy.app import run  # deferred like the cli's: the event loop only here

    try:
        run(worker_config(config, slot.index, slot.count), Path(args.config), slot)
    except OSError as exc:  # e.g. the port is taken by a process without SO_REUSEPORT
        log.error("cannot serve: %s", exc)
        return 4
    return 0
