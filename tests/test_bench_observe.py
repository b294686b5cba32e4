"""`python -m bench observe` end to end at tiny scale, and its JSON's consistency."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = 40
ROUNDS = 2
WARMUP = 5
CONCURRENCY = (1, 2)
PROXIES = ("default", "log_all")
MICRO_KEYS = {
    "timer_mark_us", "timer_8_marks_and_record_us", "shape_describe_us",
    "observer_finish_us", "per_operation_us", "per_operation_with_log_line_us",
}  # fmt: skip


def test_bench_observe_tiny(tmp_path: Path) -> None:
    out = tmp_path / "observe.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "observe",
         "--ops", str(OPS), "--rounds", str(ROUNDS), "--warmup", str(WARMUP),
         "--concurrency", ",".join(map(str, CONCURRENCY)), "--docs", "50",
         "--micro-scale", "0.01", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())

    cfg = data["config"]
    assert (cfg["ops"], cfg["rounds"], cfg["warmup"]) == (OPS, ROUNDS, WARMUP)
    assert cfg["concurrency"] == list(CONCURRENCY)
    for name in ("cpu_count", "python", "platform"):
        assert data["machine"][name]

    micro = data["in_process_us"]
    assert set(micro) == MICRO_KEYS
    assert all(v > 0 for v in micro.values())
    # The whole per-operation path costs more than its parts alone, and writing a line
    # costs more than deciding not to.
    assert micro["per_operation_us"] >= micro["shape_describe_us"] * 0.8
    assert micro["per_operation_with_log_line_us"] > micro["timer_mark_us"]

    e2e = data["end_to_end"]
    rows = e2e["rows"]
    assert {(r["proxy"], r["concurrency"]) for r in rows} == {
        (p, c) for p in PROXIES for c in CONCURRENCY}
    for r in rows:
        assert r["ops"] == OPS
        assert r["wall_s"] > 0 and math.isclose(r["ops_per_s"], r["ops"] / r["wall_s"])
        assert r["proxy_cpu_s"] >= 0
        assert math.isclose(r["proxy_cpu_us_per_op"], r["proxy_cpu_s"] / r["ops"] * 1e6)
        assert 0 < r["p50_us"] <= r["p99_us"]
    by = {(r["proxy"], r["concurrency"]): r for r in rows}
    assert [d["concurrency"] for d in e2e["deltas"]] == list(CONCURRENCY)
    for d in e2e["deltas"]:
        c = d["concurrency"]
        assert math.isclose(
            d["log_all_minus_default_cpu_us_per_op"],
            by[("log_all", c)]["proxy_cpu_us_per_op"] - by[("default", c)]["proxy_cpu_us_per_op"],
            abs_tol=1e-9)

    # Every find reached its proxy and was counted; log_all wrote one line for each.
    per_proxy = OPS * len(CONCURRENCY) + WARMUP * len(CONCURRENCY)
    assert e2e["finds_counted"] == {p: per_proxy for p in PROXIES}
    assert e2e["slow_log_find_lines"] == per_proxy
    assert e2e["control"] is False

    # The printed table shows the same figures.
    for r in rows:
        line = next(ln for ln in proc.stdout.splitlines()
                    if ln.split()[:2] == [r["proxy"], str(r["concurrency"])])
        assert f"{r['proxy_cpu_us_per_op']:.1f}" in line.split()
    assert f"{micro['per_operation_us']:.3f}" in proc.stdout
