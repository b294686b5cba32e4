"""`python -m bench ab` end to end at tiny scale: two proxies (HEAD's worktree and this
checkout) on one FerretDB and Redis, and its JSON's consistency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_ab_runs_and_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "ab", "--base", "HEAD", "--rounds", "2",
         "--ops", "30", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and data["ops"] == 30
    for path in ("forward", "hit"):
        row = data["results"][path]
        for name in ("base", "head"):
            assert len(row[name]["rounds_cpu"]) == 2
            assert all(w > 0 for w in row[name]["rounds_wall"])
        ratio = row["head_over_base_cpu"]  # None below one CPU tick
        assert ratio is None or ratio > 0
    # the temporary worktree is gone again
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "mongoproxy-ab-" not in worktrees
