"""`python -m bench workers` end to end at tiny scale, and its JSON's consistency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_workers_runs_and_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "workers", "--clients", "4", "--rounds", "2",
         "--duration", "1", "--warmup", "0.5", "--docs", "20", "--idle", "40",
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert set(data["saturation"]) == {"hit", "forward"}
    for mode, result in data["saturation"].items():
        assert set(result["targets"]) == {"w1", "w2"}
        assert len(result["ratio_per_round"]) == 2
        for target, row in result["targets"].items():
            assert row["ops_per_s"] > 0 and len(row["per_round_ops_per_s"]) == 2, (mode, target)
            assert row["ferretdb_cores"] >= 0 and row["proxy_cores"] >= 0
            cache = row["cache"]
            if mode == "forward":  # the items collection has no cache rule
                assert cache == {"hit": 0.0, "miss": 0.0, "bypass": 0.0}, target
            else:
                assert cache["hit"] + cache["miss"] + cache["bypass"] > 0, target
    idle = data["idle"]
    assert idle["w1"]["connections"] == idle["w2"]["connections"] == 40
    assert idle["w1"]["errors"] == idle["w2"]["errors"] == 0
    assert set(idle["w2"]["rss_idle_each_mb"]) == {"proxy", "worker-0", "worker-1"}
    assert set(idle["w1"]["rss_idle_each_mb"]) == {"proxy"}
