"""`python -m bench cache` end to end at tiny scale, and its JSON's consistency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_cache_runs_and_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cache", "--ops", "40", "--rounds", "2",
         "--concurrency", "1,2", "--docs", "100", "--hot", "10", "--json", str(out),
         "--saturation-clients", "4", "--saturation-s", "1", "--saturation-rounds", "2",
         "--write-shares", "0.25"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(r["target"], r["op"], r["concurrency"]) for r in rows} == {
        (t, op, c) for t in ("direct", "proxy", "proxy-cache") for op in ("by_id", "list20")
        for c in (1, 2)}
    for row in rows:
        assert row["ops"] == 40 and row["ops_per_s"] > 0
        assert 0 < row["p50_us"] <= row["p99_us"]
        if row["target"] == "direct":
            assert row["ratio_vs_direct"] == 1.0
    cache = data["cache_during_measurement"]
    # every measured proxy-cache find was a hit (the warm-up filled the cache), but for
    # lookups Redis did not answer within the lookup budget (up to 50 ms here): on a
    # loaded host a healthy Redis is off the CPU that long now and then, and such a
    # lookup is a bypass by design. What made this test flaky (issue 16) was the
    # breaker opening on those timeouts: 1,600 bypasses in one run. It must never open.
    counts = cache["counts"]
    timeouts = counts.get("bypass:redis_timeout", 0)
    assert cache["lookups"] == 2 * 2 * 40 - timeouts and cache["hits"] == cache["lookups"]
    assert cache["bypasses"] == timeouts and counts["circuit_opened"] == 0
    saturation = data["saturation"]
    assert saturation["clients"] == 4 and saturation["rounds"] == 2
    for target, row in saturation["results"].items():
        assert row["ops_per_s"] > 0 and 0 < row["p50_us"] <= row["p99_us"], target
        assert len(row["per_round_ops_per_s"]) == 2
    assert saturation["results"]["direct"]["ratio_vs_direct"] == 1.0
    # the cached proxy served every saturation find from Redis, never from FerretDB
    # (but for lookups past the budget, as above); the breaker never opened
    sat = saturation["cache"]
    assert sat["hit"] > 0 and sat["miss"] == 0 and sat["circuit_opened"] == 0
    assert sat["bypass"] == sat.get("bypass:redis_timeout", 0)
    assert saturation["results"]["proxy-cache"]["ferretdb_cores"] < 0.25
    # one of the 4 clients writes; the readers found no stale read, the breaker held
    mixed = data["writer_shares"]["0.25"]
    for target in ("direct", "proxy-cache"):
        row = mixed["results"][target]
        assert row["writes_per_s"] > 0 and row["reads_per_s"] > 0, target
        assert row["checked_reads"] > 0 and row["stale_reads"] == 0 and row["errors"] == 0
        assert len(row["per_round_reads_per_s"]) == 2
    # (an invalidation Redis did not answer within invalidate_timeout_ms would be
    # pending: possible on a host loaded enough to keep Redis off the CPU that long, and
    # without a stale read through the instance that took the write: docs/cache.md)
    assert mixed["cache"]["hit"] > 0 and mixed["cache"]["circuit_opened"] == 0
    assert mixed["ratio"] > 0
    assert data["goal"]["ratio"] == 2.0
    assert data["goal"]["measured"] == saturation["ratio"]
    assert "goal proxy-cache >= 2.0x direct at saturation" in proc.stdout
