"""The slow-query log: well-formed JSON lines with every field, threshold, sampling,
values hidden unless log_values, file rotation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pydantic import ValidationError

from proxy.observe.config import ObservabilityConfig
from proxy.observe.record import OperationRecord
from proxy.observe.shape import describe
from proxy.observe.slowlog import SlowLog

FIELDS = {
    "ts", "duration_ms", "slow", "phases", "command", "ns", "db", "collection",
    "shape_hash", "shape", "tenant", "user", "app_name", "route_class", "route_rule",
    "member", "member_role", "cache", "docs_returned", "reply_bytes", "error_code",
    "connection_id",
}
SECRET = "alice@example.com"
RAW = {"find": "users", "filter": {"email": SECRET, "_id": ObjectId()}, "$db": "app"}


def record(ms: float, **fields: Any) -> OperationRecord:
    shape = describe(RAW)
    defaults: dict[str, Any] = {
        "start_time": 1_700_000_000.5, "command": "find", "database": "app",
        "collection": "users", "phases_ns": {"read": 10_000, "upstream": round((ms - 0.01) * 1e6)},
        "shape_hash": shape.hash, "shape_text": shape.text, "tenant": "acme",
        "user": "svc", "app_name": "billing", "route_class": "oltp", "route_rule": "default",
        "member": "db1:27017", "member_role": "primary", "cache": "miss",
        "docs_returned": 1, "reply_bytes": 321, "connection_id": 7, "raw_command": RAW,
    }
    defaults.update(fields)
    return OperationRecord(duration_ms=ms, **defaults)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def make(stream: io.StringIO, **config: Any) -> SlowLog:
    return SlowLog(ObservabilityConfig(**config), stream=stream)


def test_line_has_every_field() -> None:
    out = io.StringIO()
    log = make(out, slow_query_ms=0)
    assert log.record(record(150.0))
    assert log.record(OperationRecord(start_time=0.0, duration_ms=0.0, command="ping"))
    first, second = lines(out)
    assert set(first) == FIELDS and set(second) == FIELDS
    assert first["ts"] == "2023-11-14T22:13:20.500Z"
    assert first["duration_ms"] == 150.0 and first["slow"] is True
    assert first["phases"] == {"read": 0.01, "upstream": 149.99}
    assert first["ns"] == "app.users" and first["shape"]["filter"]["email"] == "?str"
    assert (first["tenant"], first["member"], first["reply_bytes"]) == ("acme", "db1:27017", 321)
    assert first["error_code"] is None and second["shape"] is None


def test_threshold() -> None:
    out = io.StringIO()
    log = make(out)  # default: 100 ms
    assert not log.record(record(99.9))
    assert log.record(record(100.0))
    assert [line["duration_ms"] for line in lines(out)] == [100.0]


def test_sampling_of_fast_operations() -> None:
    out = io.StringIO()
    draws = iter([0.05, 0.5, 0.09, 0.99])
    log = SlowLog(ObservabilityConfig(sample_rate=0.1), stream=out, rng=lambda: next(draws))
    results = [log.record(record(1.0)) for _ in range(4)]
    assert results == [True, False, True, False]
    assert [line["slow"] for line in lines(out)] == [False, False]


def test_sampling_rate_roughly_respected() -> None:
    out = io.StringIO()
    log = make(out, sample_rate=0.25)
    written = sum(log.record(record(1.0)) for _ in range(4000))
    assert 800 < written < 1200


def test_values_hidden_unless_log_values() -> None:
    out = io.StringIO()
    make(out, slow_query_ms=0).record(record(5.0))
    assert SECRET not in out.getvalue()
    assert "command_values" not in lines(out)[0]
    shown = io.StringIO()
    make(shown, slow_query_ms=0, log_values=True).record(record(5.0))
    values = lines(shown)[0]["command_values"]
    assert values["filter"]["email"] == SECRET
    assert "$oid" in values["filter"]["_id"]  # Extended JSON


def test_file_rotation(tmp_path: Path) -> None:
    path = tmp_path / "slow.log"
    log = SlowLog(ObservabilityConfig(slow_query_ms=0, slow_log=str(path),
                                      slow_log_max_bytes=2000, slow_log_backups=2))
    for _ in range(50):
        log.record(record(1.0))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["slow.log", "slow.log.1", "slow.log.2"]
    for name in files:
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 2000
        for line in text.splitlines():
            assert set(json.loads(line)) == FIELDS


def test_config_validation() -> None:
    assert ObservabilityConfig().slow_query_ms == 100
    with pytest.raises(ValidationError):
        ObservabilityConfig(sample_rate=1.5)
    with pytest.raises(ValidationError):
        ObservabilityConfig(slow_query_ms=-1)
    with pytest.raises(ValidationError):
        ObservabilityConfig.model_validate({"slow_query": 5})  # unknown key
    config = ObservabilityConfig.model_validate({"tenant_labels": ["a", "b"]})
    assert config.tenant_labels == ("a", "b")
    with pytest.raises(ValidationError):
        config.slow_query_ms = 5
