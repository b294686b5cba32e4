"""``python -m bench tenancy`` runs every command through the real gate (none refused)
and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main
from bench.tenancy_cost import COMMANDS


def test_bench_tenancy_writes_a_figure_per_mode_and_command(tmp_path: Path) -> None:
    out = tmp_path / "tenancy.json"
    assert main(["tenancy", "--number", "20", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["us_per_command"]) == {"enforce", "inject"}
    for figures in data["us_per_command"].values():
        assert set(figures) == set(COMMANDS)
        assert all(value > 0 for value in figures.values())
