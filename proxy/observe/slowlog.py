"""The slow-query log: one JSON line per operation at or above ``slow_query_ms``,
plus a random ``sample_rate`` fraction of the faster ones.

Every line carries every field (``null`` when unknown), so ``jq`` filters need no
guards::

    {"ts": "2024-05-01T12:00:00.123Z", "duration_ms": 152.3, "slow": true,
     "phases": {"read": 0.01, "decode": 0.02, "select": 0.003, "checkout_wait": 0.01,
                "upstream": 152.1, "write": 0.02},
     "command": "find", "ns": "app.orders", "db": "app", "collection": "orders",
     "shape_hash": "3f2a...", "shape": {"cmd": "find", ...}, "tenant": "acme",
     "user": null, "app_name": "billing", "route_class": "report", "route_rule": "r1",
     "member": "db2:27017", "member_role": "secondary", "cache": "miss",
     "docs_returned": 20, "reply_bytes": 4120, "error_code": null, "connection_id": 17}

Values are never written: the shape has placeholders instead of literals and error
messages (which can quote values) are not logged, only their code. With
``log_values: true`` the line also has ``"command_values"``: the raw command as relaxed
Extended JSON.

Output goes through a private :class:`logging.Logger` (not attached to the logging
tree, so the application's log configuration neither duplicates nor reformats it),
with a :class:`~logging.handlers.RotatingFileHandler` for a file.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import logging.handlers
import random
import sys
from collections.abc import Callable
from typing import IO, Any

from proxy.observe.config import ObservabilityConfig
from proxy.observe.record import OperationRecord

__all__ = ["SlowLog", "format_line"]

_ids = itertools.count(1)


def _timestamp(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_line(op: OperationRecord, slow: bool, log_values: bool = False) -> str:
    """The JSON line (without newline) for one operation."""
    shape: Any = None
    if op.shape_text is not None:
        try:
            shape = json.loads(op.shape_text)
        except ValueError:
            shape = op.shape_text
    line: dict[str, Any] = {
        "ts": _timestamp(op.start_time),
        "duration_ms": round(op.duration_ms, 3),
        "slow": slow,
        "phases": {name: round(ms, 3) for name, ms in op.phases.items()},
        "command": op.command,
        "ns": op.namespace,
        "db": op.database,
        "collection": op.collection,
        "shape_hash": op.shape_hash,
        "shape": shape,
        "tenant": op.tenant,
        "user": op.user,
        "app_name": op.app_name,
        "route_class": op.route_class,
        "route_rule": op.route_rule,
        "member": op.member,
        "member_role": op.member_role,
        "cache": op.cache,
        "docs_returned": op.docs_returned,
        "reply_bytes": op.reply_bytes,
        "error_code": op.error_code,
        "connection_id": op.connection_id,
    }
    if log_values:
        from bson import json_util

        line["command_values"] = (
            None if op.raw_command is None else json.loads(
                json_util.dumps(op.raw_command, json_options=json_util.RELAXED_JSON_OPTIONS)
            )
        )
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False, default=str)


class SlowLog:
    """Decides which operations are logged and writes them."""

    def __init__(
        self,
        config: ObservabilityConfig,
        stream: IO[str] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """``stream`` overrides ``config.slow_log == "-"`` (stdout), for tests."""
        self.config = config
        self.threshold_ms = config.slow_query_ms
        self.sample_rate = config.sample_rate
        self.log_values = config.log_values
        self._rng = rng
        self.written = 0
        self.logger = logging.Logger(f"mongoproxy.slowlog.{next(_ids)}", logging.INFO)
        self.logger.propagate = False
        handler: logging.Handler
        if config.slow_log == "-":
            handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
        else:
            handler = logging.handlers.RotatingFileHandler(
                config.slow_log,
                maxBytes=config.slow_log_max_bytes,
                backupCount=config.slow_log_backups,
                encoding="utf-8",
            )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler = handler
        self.logger.addHandler(handler)

    def record(self, op: OperationRecord) -> bool:
        """Log the operation if it is slow or sampled; True when a line was written."""
        if op.duration_ms >= self.threshold_ms:
            slow = True
        elif self.sample_rate and self._rng() < self.sample_rate:
            slow = False
        else:
            return False
        self.logger.info(format_line(op, slow, self.log_values))
        self.written += 1
        return True

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
