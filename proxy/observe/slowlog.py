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

Lines are written to stdout or, for a file, through a
:class:`~logging.handlers.RotatingFileHandler`'s stream and rotation, but not through
the logging machinery: under a flood of slow operations (a saturated pool makes every
operation slow) a log record, a formatter and a flush per line cost more than the line.
Lines are collected and written once per event-loop iteration (at once when no loop
runs), so an operation's line reaches the file a moment after its reply reaches the
client, as before.
"""

from __future__ import annotations

import asyncio
import datetime
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

# Seconds of the last timestamp and its text up to the seconds: one strftime a second.
_stamp_second = -1
_stamp_prefix = ""
# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
# Stands for the shape while the line is encoded; the shape's own JSON text replaces it
# (it is JSON already: decoding and re-encoding it cost a fifth of the line). Control
# characters come out escaped, so no encoded value can contain this text.
_SHAPE_MARK = "\x00shape\x00"
_SHAPE_MARK_JSON = '"shape":' + _encode(_SHAPE_MARK)


def _timestamp(wall: float) -> str:
    global _stamp_second, _stamp_prefix
    second = int(wall)
    if second != _stamp_second:
        moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _stamp_prefix = moment.strftime("%Y-%m-%dT%H:%M:%S.")
        _stamp_second = second
    # Milliseconds as datetime would show them (microseconds rounded first).
    millis = min(999, int((wall - second) * 1e6 + 0.5) // 1000)
    return f"{_stamp_prefix}{millis:03d}Z"


def format_line(op: OperationRecord, slow: bool, log_values: bool = False) -> str:
    """The JSON line (without newline) for one operation."""
    shape_text = op.shape_text
    shaped = shape_text is not None and shape_text[:1] == "{"
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
        "shape": _SHAPE_MARK if shaped else shape_text,
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
    text = _encode(line)
    if shaped:
        assert shape_text is not None
        text = text.replace(_SHAPE_MARK_JSON, '"shape":' + shape_text, 1)
    return text


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
        self._pending: list[str] = []
        self._worker_prefix = ""
        self._file: logging.handlers.RotatingFileHandler | None = None
        self._max_bytes = 0
        self._position = 0
        if config.slow_log == "-":
            self._stream: IO[str] = stream if stream is not None else sys.stdout
        else:
            # Used for its stream and its rotation (doRollover), never to emit records.
            self._file = logging.handlers.RotatingFileHandler(
                config.slow_log,
                maxBytes=config.slow_log_max_bytes,
                backupCount=config.slow_log_backups,
                encoding="utf-8",
            )
            self._stream = self._file_stream()
            self._max_bytes = config.slow_log_max_bytes
            self._position = self._stream.tell()

    def record(self, op: OperationRecord) -> bool:
        """Log the operation if it is slow or sampled; True when a line was written."""
        if op.duration_ms >= self.threshold_ms:
            slow = True
        elif self.sample_rate and self._rng() < self.sample_rate:
            slow = False
        else:
            return False
        line = format_line(op, slow, self.log_values)
        if self._worker_prefix:
            line = self._worker_prefix + line[1:]
        self.append(line)
        return True

    def tag_worker(self, index: int) -> None:
        """Lines of a worker process (``listen.workers`` > 1) start ``{"worker":N,``."""
        self._worker_prefix = f'{{"worker":{index},'

    def append(self, line: str) -> None:
        """Write a finished line (no newline) with the next flush (the supervisor
        passes its workers' lines through here: one stream, one rotation)."""
        self._pending.append(line)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (tools, tests): write now
                self.flush()

    def flush(self) -> None:
        """Write the collected lines (rotating the file as they cross its size limit)."""
        lines, self._pending = self._pending, []
        if not lines:
            return
        if self._file is None or not self._max_bytes:
            self._stream.write("".join(f"{line}\n" for line in lines))
        else:
            for line in lines:
                text = f"{line}\n"
                size = len(text.encode())
                if self._position and self._position + size > self._max_bytes:
                    self._file.doRollover()
                    self._stream = self._file_stream()
                    self._position = 0
                self._stream.write(text)
                self._position += size
        self._stream.flush()

    def _file_stream(self) -> IO[str]:
        assert self._file is not None and self._file.stream is not None  # not delay=True
        return self._file.stream

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
