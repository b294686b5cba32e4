"""``python -m bench moves`` moves a tenant under load through a real proxy and writes
its JSON (a tiny run: the figures themselves are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main


def test_bench_moves_moves_a_tenant_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "moves.json"
    assert main(["moves", "--docs", "300", "--others", "1", "--before", "0.5",
                 "--after", "0.3", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (round_,) = data["rounds"]
    assert round_["move_exit"] == 0 and round_["target_exact"]
    assert round_["others_errors"] == 0
    assert round_["held_ms"] is not None and round_["mover_p50_before_ms"] is not None
