"""``python -m bench placement-fanout`` runs (tiny: 2 rounds of 3 finds per path) against
real FerretDB processes and a real proxy, checks that every path answers the same, and
writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main
from bench.placement_fanout import _PATHS, _RATIOS


def test_bench_placement_fanout_writes_every_path_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "placement-fanout.json"
    assert main(["placement-fanout", "--docs", "200", "--rounds", "2", "--ops", "3",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2
    for path in _PATHS:
        assert data["summary"][path]["p50_us"] > 0
    for key in _RATIOS:
        ratio = data["summary"][key]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
