"""The bench's report tells the truth: every ratio with its spread over the rounds,
charts that mark panels without data and leave out a p99.9 from too few samples, and a
storm that says PASSED or FAILED first and exits 1 past its error threshold (run for
real against the proxy and FerretDB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench import report, spread
from bench.seed import seed_database
from bench.workload import Dataset
from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess

Doc = dict[str, Any]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _phase(target: str, rnd: int, ops_per_s: float, p50: int, op_ok: dict[str, int]) -> Doc:
    return {
        "mode": "closed", "target": target, "round": rnd, "wall_s": 10.0,
        "ops_per_s": ops_per_s,
        "latency": {"p50_us": p50, "p95_us": 2 * p50, "p99_us": 3 * p50, "p999_us": 4 * p50},
        "ops": {op: {"ok": ok, "p50_us": p50 if ok else None, "p95_us": 2 * p50 if ok else None,
                     "p99_us": 3 * p50 if ok else None, "p999_us": 4 * p50 if ok else None}
                for op, ok in op_ok.items()},
    }  # fmt: skip


def _row(target: str, op: str, ok: int, p50: int | None, ops_per_s: float) -> Doc:
    pct = {k: (None if p50 is None else m * p50)
           for k, m in (("p50_us", 1), ("p95_us", 2), ("p99_us", 3), ("p999_us", 4))}
    return {"mode": "closed", "target": target, "op": op, "ok": ok, "ops_per_s": ops_per_s,
            "errors": 0, "errors_by_code": {}, "unfinished": 0, "max_us": None,
            "service": {"p50_us": p50}, **pct}  # fmt: skip


def _data() -> Doc:
    """Two targets, two rounds; `report` never completes for the proxy (n = 0)."""
    phases = [
        _phase("direct", 0, 100.0, 1000, {"find": 900, "report": 100}),
        _phase("proxy", 0, 80.0, 1500, {"find": 800, "report": 0}),
        _phase("direct", 1, 120.0, 900, {"find": 1100, "report": 100}),
        _phase("proxy", 1, 60.0, 1800, {"find": 600, "report": 0}),
    ]
    rows = [
        _row("direct", "all", 2200, 950, 110.0), _row("direct", "find", 2000, 950, 100.0),
        _row("direct", "report", 200, 950, 10.0), _row("proxy", "all", 1400, 1650, 70.0),
        _row("proxy", "find", 1400, 1650, 70.0), _row("proxy", "report", 0, None, 0.0),
    ]
    ratios = [{"mode": "closed", "op": op, "a": "proxy", "b": "direct",
               "throughput": a["ops_per_s"] / b["ops_per_s"],
               "p50": None if a["p50_us"] is None else a["p50_us"] / b["p50_us"],
               "p99": None if a["p99_us"] is None else a["p99_us"] / b["p99_us"]}
              for op in ("all", "find", "report")
              for a in rows if a["target"] == "proxy" and a["op"] == op
              for b in rows if b["target"] == "direct" and b["op"] == op]  # fmt: skip
    return {"config": {"concurrency": 4, "modes": ["closed"]}, "phases": phases,
            "results": rows, "ratios": spread.with_spread(ratios, phases)}


def test_every_ratio_has_its_rounds() -> None:
    data = _data()
    by_op = {x["op"]: x["per_round"] for x in data["ratios"]}
    assert by_op["all"]["throughput"] == [0.8, 0.5]
    assert by_op["all"]["p50"] == [1.5, 2.0]
    assert by_op["find"]["throughput"] == [800 / 900, 600 / 1100]
    assert by_op["report"]["throughput"] == [0.0, 0.0]
    assert by_op["report"]["p50"] == []  # the proxy has no p50 for it in any round
    assert spread.ratio_text(0.7, [0.8, 0.5]) == "0.700 (0.50-0.80)"
    assert spread.ratio_text(None, [1.0]) == "-"
    assert spread.ratio_text(1.0, []) == "1.000"
    assert spread.ratio_text(1.0, None) == "1.000 (rounds not recorded)"
    table = report._ratio_table(data)
    assert table[2] == "| closed | proxy / direct | 0.636 (0.50-0.80) | 1.737 (1.50-2.00) | " \
                       "1.737 (1.50-2.00) |"


def test_p999_needs_ten_thousand_samples() -> None:
    assert not spread.enough_samples(9_999, "p999_us")
    assert spread.enough_samples(10_000, "p999_us")
    assert spread.enough_samples(1, "p99_us") and not spread.enough_samples(0, "p50_us")
    assert report._p999({"ok": 2200, "p999_us": 3800}) == "-"
    assert report._p999({"ok": 20_000, "p999_us": 3800}) == "3.80"


def test_charts_mark_empty_panels_and_draw_error_bars(tmp_path: Path) -> None:
    data = _data()
    titles = report.latency_chart(data, "closed", tmp_path / "lat.png")
    by_op = {t.split(" ")[0]: t for t in titles}
    assert "proxy n = 0" in by_op["report"] and "n = 0-200 per target" in by_op["report"]
    assert "n = 0" not in by_op["find"].split("per target")[1]
    assert all("p99.9 needs n >= 10,000" in t for t in titles)
    report.throughput_chart(data, tmp_path / "tp.png")
    for name in ("lat.png", "tp.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # The error bar spans the rounds: 70 ops/s over the run, 60..80 in the rounds.
    assert report._error_bar(70.0, [80.0, 60.0], 1) == [10.0, 10.0]
    assert report._error_bar(70.0, [], 1) == [0.0, 0.0]
    assert report._ops_text(data, data["results"][3]) == "70.0 (60.0-80.0)"


def _storm(proxy: ProxyProcess, db: str, out: Path, *extra: str) -> tuple[int, Doc, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "storm", "--uri", f"proxy={proxy.uri}", "--db", db,
         "--connections", "40", "--ops", "1", "--workers", "1", "--json", str(out),
         "--quiet", *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_storm_fails_past_its_error_threshold(
    ferretdb: FerretDBProcess, proxy: ProxyProcess, db_name: str, tmp_path: Path
) -> None:
    client: MongoClient[Doc] = MongoClient(ferretdb.uri, directConnection=True)
    with client:
        seed_database(client[db_name], Dataset(0.01, 1), log=False)
        code, data, output = _storm(proxy, db_name, tmp_path / "ok.json")
        assert code == 0, output
        assert data["verdict"]["passed"] and data["results"][0]["errors"] == 0
        md = (tmp_path / "ok.md").read_text()
        assert md.splitlines()[2].startswith("**Storm PASSED**")
        # Every storm operation now finds nothing: each connection's one operation fails.
        client[db_name].users.delete_many({})
        code, data, output = _storm(proxy, db_name, tmp_path / "bad.json")
    assert code == 1, output
    (target,) = data["verdict"]["targets"]
    assert target == {"target": "proxy", "connections": 40, "failed": 40, "error_rate": 1.0,
                      "passed": False}  # fmt: skip
    md = (tmp_path / "bad.md").read_text()
    assert md.splitlines()[2].startswith(
        "**Storm FAILED** (allowed: 0.0% of the connections failing): proxy: 40 of 40 "
        "connections failed (100.0%)"), md
    assert "bench storm: **Storm FAILED**" in output
    # The threshold is the operator's: allowing every connection to fail passes.
    code, data, output = _storm(proxy, db_name, tmp_path / "lenient.json",
                                "--max-error-rate", "1")
    assert code == 0 and data["verdict"]["passed"], output


def test_storm_verdict_explains_code_89() -> None:
    result = {"target": "proxy", "connections": 10_000, "errors": 4_643,
              "errors_by_kind": {"code 89": 4_643}}
    data = {"results": [result], "verdict": report.storm_verdict([result], 0.01)}
    text = report.storm_verdict_text(data)
    assert text.startswith("**Storm FAILED** (allowed: 1.0% of the connections failing): "
                           "proxy: 4,643 of 10,000 connections failed (46.4%)")
    assert "wait_queue_timeout_ms" in text and ": 4,643]" in text
