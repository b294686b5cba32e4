"""Per-round spread of the `run` figures: every ratio and every bar of the report comes
with the lowest and highest value its rounds gave.

`run` measures each target in ``--rounds`` interleaved rounds; a figure over the whole
run (ops/s, a percentile, a ratio of two targets) hides how much it moved from round to
round on a shared machine. The JSON keeps, per phase (one target, mode and round), its
throughput and its latency percentiles, overall and per operation; this module turns
those into the per-round series the report prints as ``min-max`` and draws as error bars.

A tail percentile means little with few samples: p99.9 of 2,000 operations is decided
by two of them. It is reported only with at least ``MIN_SAMPLES`` operations (10 beyond
it), shown as ``-`` otherwise.
"""

from __future__ import annotations

from typing import Any

Doc = dict[str, Any]

# Percentiles kept per phase in the JSON (for the per-round spread).
ROUND_PERCENTILES = ("p50_us", "p95_us", "p99_us", "p999_us")
# At least 10 samples beyond a percentile before it is shown.
MIN_SAMPLES = {"p999_us": 10_000}
# The ratio columns: the row key each one divides.
RATIO_KEYS = {"throughput": "ops_per_s", "p50": "p50_us", "p99": "p99_us"}


def enough_samples(count: int | None, key: str) -> bool:
    """Whether a percentile over ``count`` operations is worth showing."""
    return (count or 0) >= MIN_SAMPLES.get(key, 1)


def round_values(phases: list[Doc], mode: str, target: str, op: str) -> list[Doc]:
    """Per round, in round order: ``ops_per_s`` and the percentiles of one operation
    (``op="all"``: every operation) of one target and mode. Phases written before these
    figures were kept give empty dicts."""
    out: list[Doc] = []
    mine = sorted((p for p in phases if p["mode"] == mode and p["target"] == target),
                  key=lambda p: int(p["round"]))  # fmt: skip
    for p in mine:
        if op == "all":
            values: Doc = {"ops_per_s": p["ops_per_s"], **(p.get("latency") or {})}
        else:
            o = (p.get("ops") or {}).get(op) or {}
            wall = p.get("wall_s") or 0
            values = {k: o.get(k) for k in ROUND_PERCENTILES if k in o}
            if "ok" in o and wall > 0:
                values["ops_per_s"] = o["ok"] / wall
        out.append(values)
    return out


def span(values: list[float | None]) -> tuple[float, float] | None:
    """(lowest, highest) of the values that exist."""
    have = [v for v in values if v is not None]
    return (min(have), max(have)) if have else None


def per_round_ratios(phases: list[Doc], mode: str, op: str, a: str, b: str) -> Doc:
    """a / b within each round, for every ratio column (a round where either side has no
    figure is left out of that column)."""
    ra, rb = round_values(phases, mode, a, op), round_values(phases, mode, b, op)
    out: Doc = {}
    for name, key in RATIO_KEYS.items():
        series = []
        for x, y in zip(ra, rb, strict=False):
            top, bottom = x.get(key), y.get(key)
            if top is not None and bottom:
                series.append(top / bottom)
        out[name] = series
    return out


def with_spread(ratios: list[Doc], phases: list[Doc]) -> list[Doc]:
    """The run's ratios, each with ``per_round``: its value in every round."""
    return [{**x, "per_round": per_round_ratios(phases, x["mode"], x["op"], x["a"], x["b"])}
            for x in ratios]  # fmt: skip


def ratio_text(value: float | None, per_round: list[float] | None) -> str:
    """``0.851 (0.76-0.93)``: the run's ratio and its lowest and highest round."""
    if value is None:
        return "-"
    if per_round is None:  # JSON written before the rounds were kept
        return f"{value:.3f} (rounds not recorded)"
    rng = span(list(per_round))
    if rng is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({rng[0]:.2f}-{rng[1]:.2f})"
