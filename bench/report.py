"""Markdown tables, PNG charts and the performance page's tables from `run`/`storm` JSON.

`python -m bench report --run bench/results/bench.json [--storm bench/results/storm.json]
[--doc docs/performance.md]` rewrites the Markdown and charts next to the JSON and, with
``--doc``, only the part of that page between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` (nothing else in the file changes). Everything shown is read from
the JSON: every ratio with the lowest and highest value of its rounds, every bar with
error bars over the rounds, p99.9 only with enough samples (bench/spread.py), and the
storm's verdict first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.core import write_json
from bench.spread import ROUND_PERCENTILES, enough_samples, ratio_text, round_values, span

Doc = dict[str, Any]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
TARGET_COLORS = {
    "direct": "#4c72b0",
    "tcp": "#8c8c8c",
    "proxy": "#dd8452",
    "proxy-cache": "#55a868",
}


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _mode_title(data: Doc, mode: str) -> str:
    cfg = data["config"]
    if mode == "closed":
        return f"closed loop, {cfg['concurrency']} clients"
    return (
        f"open loop, {cfg['rate']:g} ops/s offered "
        f"(at most {cfg['max_inflight_per_worker']} in flight per worker)"
    )


def _rows(data: Doc, mode: str, op: str | None = None) -> list[Doc]:
    return [
        r for r in data["results"] if r["mode"] == mode and (op is None or r["op"] == op)
    ]


def _p999(row: Doc) -> str:
    return _ms(row["p999_us"]) if enough_samples(row["ok"], "p999_us") else "-"


def _ratio_table(data: Doc, op: str = "all", pairs: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Ratios a / b of throughput, p50 and p99, each with the lowest and highest value of
    the rounds in parentheses."""
    rows = [x for x in data["ratios"] if x["op"] == op
            and (not pairs or (x["a"], x["b"]) in pairs)]  # fmt: skip
    if not rows:
        return []
    # JSON written before ratios carried per_round: the throughput spread only.
    older = {(x["mode"], x["a"], x["b"]): x["throughput_per_round"]
             for x in data.get("round_ratios", []) if op == "all"}  # fmt: skip
    out = [
        "| mode | a / b | throughput (per round min-max) | p50 (min-max) | p99 (min-max) |",
        "|---|---|---:|---:|---:|",
    ]
    for x in rows:
        per_round = x.get("per_round") or {
            "throughput": older.get((x["mode"], x["a"], x["b"]))}
        cells = [ratio_text(x[k], per_round.get(k)) for k in ("throughput", "p50", "p99")]
        out.append(f"| {x['mode']} | {x['a']} / {x['b']} | " + " | ".join(cells) + " |")
    return out


RATIO_NOTE = ("A ratio is a / b over the whole run; in parentheses the lowest and highest "
              "ratio of the single rounds. Throughput above 1: a served more; p50/p99 "
              "above 1: a was slower.")
P999_NOTE = ("p99.9 is shown only for at least 10,000 operations (10 beyond it); "
             "fewer: `-`.")


def run_markdown(data: Doc) -> str:
    cfg = data["config"]
    m = data["machine"]
    v = data["versions"]
    ds = cfg["dataset"]
    lines = [
        f"# bench run {data['started_at']}",
        "",
        f"- command: `{data.get('command') or 'python -m bench run'}`",
        f"- machine: {m['cpu_usable']} usable CPUs, {m['platform']}, Python {m['python']}, "
        f"load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{m['loadavg_at_end'][0]:.2f} at end",
        f"- server: FerretDB {v['server'].get('ferretdbVersion', '?')}; mongoproxy "
        f"{v.get('mongoproxy')} ({v.get('git_commit')}); pymongo {v.get('pymongo')}",
        f"- data set: scale {ds['scale']:g}, seed {ds['seed']}: "
        + ", ".join(f"{k} {n}" for k, n in ds["counts"].items()),
        f"- {cfg['rounds']} rounds x {cfg['phase_s']:g} s measured per target and mode "
        f"({cfg['warmup_s']:g} s warm-up each), {cfg['workers']} load processes; "
        f"tenancy {cfg['tenancy']}",
        "",
    ]
    for mode in cfg["modes"]:
        lines += [
            f"## {_mode_title(data, mode)}",
            "",
            "| target | ops/s (per round min-max) | p50 ms | p95 ms | p99 ms | p99.9 ms "
            "| max ms | ok | errors | unfinished | cache hits | load gen max cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in _rows(data, mode, "all"):
            lines.append(
                f"| {r['target']} | {_ops_text(data, r)} | {_ms(r['p50_us'])} | "
                f"{_ms(r['p95_us'])} | {_ms(r['p99_us'])} | {_p999(r)} | "
                f"{_ms(r['max_us'])} | {r['ok']} | {r['errors']} | {r['unfinished']} | "
                f"{_pct(r.get('cache_hit_ratio'))} | {r['loadgen_cores_max']:.2f} |"
            )
        lines += [
            "",
            "| operation | target | ops/s | p50 ms | p99 ms | max ms | service p50 ms "
            "| errors |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in _rows(data, mode):
            if r["op"] == "all":
                continue
            errs = ", ".join(f"{k}: {n}" for k, n in r["errors_by_code"].items()) or "0"
            lines.append(
                f"| {r['op']} | {r['target']} | {r['ops_per_s']:.1f} | {_ms(r['p50_us'])} | "
                f"{_ms(r['p99_us'])} | {_ms(r['max_us'])} | {_ms(r['service']['p50_us'])} | "
                f"{errs} |"
            )
        lines.append("")
    ratio_table = _ratio_table(data)
    if ratio_table:
        lines += ["## ratios (all operations)", "", *ratio_table, "", RATIO_NOTE, P999_NOTE,
                  ""]
    for a, b in (("proxy", "direct"), ("proxy-cache", "proxy")):
        per_op = [x["op"] for x in data["ratios"]
                  if x["op"] != "all" and (x["a"], x["b"]) == (a, b)]  # fmt: skip
        if not per_op:
            continue
        lines += [f"## {a} / {b} per operation", "",
                  "| operation | mode | throughput (min-max) | p50 (min-max) | p99 (min-max) |",
                  "|---|---|---:|---:|---:|"]
        for op in dict.fromkeys(per_op):
            for row in _ratio_table(data, op, ((a, b),))[2:]:
                lines.append(f"| {op} " + row.replace(f" {a} / {b} |", ""))
        lines.append("")
    if data["unavailable"]:
        lines += ["## unavailable targets", ""]
        lines += [f"- {t}: {why}" for t, why in data["unavailable"].items()]
        lines.append("")
    if data["warnings"]:
        lines += ["## warnings", ""]
        lines += [f"- {w}" for w in data["warnings"]]
        lines.append("")
    return "\n".join(lines)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ops_text(data: Doc, row: Doc) -> str:
    per_round = [v.get("ops_per_s") for v in
                 round_values(data.get("phases", []), row["mode"], row["target"], row["op"])]
    rng = span(per_round)
    text = f"{row['ops_per_s']:.1f}"
    return text if rng is None else f"{text} ({rng[0]:.1f}-{rng[1]:.1f})"


def _error_bar(value: float, per_round: list[float | None], scale: float) -> list[float]:
    """[below, above] the bar: down to the lowest and up to the highest round."""
    rng = span(per_round)
    if rng is None:
        return [0.0, 0.0]
    return [max(0.0, value - rng[0] / scale), max(0.0, rng[1] / scale - value)]


def latency_chart(data: Doc, mode: str, path: Path) -> list[str]:
    """One panel per operation (and all): p50/p95/p99/p99.9 bars per target, log scale,
    error bars from the lowest to the highest round; a target without a completed
    operation is marked n = 0, a p99.9 without enough samples is left out (and said).
    Returns the panels' titles."""
    plt = _plt()
    rows = _rows(data, mode)
    ops = list(dict.fromkeys(r["op"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    by = {(r["op"], r["target"]): r for r in rows}
    pcts = tuple(zip(("p50", "p95", "p99", "p99.9"), ROUND_PERCENTILES, strict=True))
    ncols = 4
    nrows = (len(ops) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    width = 0.8 / max(len(targets), 1)
    titles: list[str] = []
    for idx, op in enumerate(ops):
        ax = axes[idx // ncols][idx % ncols]
        notes: list[str] = []
        for ti, t in enumerate(targets):
            r = by.get((op, t)) or {}
            n = int(r.get("ok") or 0)
            rounds = round_values(data.get("phases", []), mode, t, op)
            offset = (ti - (len(targets) - 1) / 2) * width
            if n == 0:
                ax.text(1.5 + offset, 0.5, f"{t}: n = 0", transform=ax.get_xaxis_transform(),
                        rotation=90, ha="center", va="center", fontsize=7, color="#c44e52")
                notes.append(f"{t} n = 0")
                continue
            xs, values, errs = [], [], []
            for i, (_, key) in enumerate(pcts):
                if r.get(key) is None or not enough_samples(n, key):
                    continue
                xs.append(i + offset)
                values.append(r[key] / 1000)
                errs.append(_error_bar(r[key] / 1000, [v.get(key) for v in rounds], 1000))
            ax.bar(xs, values, width, label=t, color=TARGET_COLORS.get(t),
                   yerr=list(zip(*errs, strict=True)) if errs else None, capsize=2,
                   error_kw={"elinewidth": 0.8})  # fmt: skip
        counts = [int(by[(op, t)]["ok"]) for t in targets if (op, t) in by]
        n_text = "-" if not counts else (
            f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}")
        if counts and not all(enough_samples(c, "p999_us") for c in counts):
            notes.append("p99.9 needs n >= 10,000")
        titles.append(f"{op} (n = {n_text} per target)" + ("\n" + "; ".join(notes)
                                                            if notes else ""))
        ax.set_title(titles[-1], fontsize=8)
        ax.set_xticks(range(len(pcts)), [p for p, _ in pcts])
        if any(c > 0 for c in counts):
            ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    for idx in range(len(ops), nrows * ncols):
        axes[idx // ncols][idx % ncols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"latency percentiles per target and operation: {_mode_title(data, mode)} "
                 "(error bars: lowest to highest round)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return titles


def throughput_chart(data: Doc, path: Path) -> None:
    plt = _plt()
    modes = data["config"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    for i, mode in enumerate(modes):
        ax = axes[0][i]
        rows = _rows(data, mode, "all")
        names = [r["target"] for r in rows]
        errs = [_error_bar(r["ops_per_s"], [v.get("ops_per_s") for v in round_values(
            data.get("phases", []), mode, r["target"], "all")], 1) for r in rows]
        ax.bar(names, [r["ops_per_s"] for r in rows],
               color=[TARGET_COLORS.get(n, "#999999") for n in names],
               yerr=list(zip(*errs, strict=True)) if errs else None, capsize=3)  # fmt: skip
        for x, r in enumerate(rows):
            # Beside the bar's top, clear of its error bar.
            ax.annotate(f"{r['ops_per_s']:.0f}", (x + 0.1, r["ops_per_s"]), ha="left",
                        va="bottom", fontsize=8)  # fmt: skip
        ax.set_title(_mode_title(data, mode), fontsize=9)
        ax.set_ylabel("operations/s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("throughput per target (error bars: lowest to highest round)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_run_outputs(data: Doc, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_json(paths[0], data)
    paths[1].write_text(run_markdown(data) + "\n")
    for mode in data["config"]["modes"]:
        p = out / f"{name}-latency-{mode}.png"
        latency_chart(data, mode, p)
        paths.append(p)
    p = out / f"{name}-throughput.png"
    throughput_chart(data, p)
    paths.append(p)
    return paths


def storm_verdict(results: list[Doc], max_error_rate: float) -> Doc:
    """Pass when, for every target, at most ``max_error_rate`` of the connections failed
    (a connection that could not open, or whose operation failed, is one failure)."""
    targets = []
    for r in results:
        rate = r["errors"] / r["connections"] if r["connections"] else 0.0
        targets.append({"target": r["target"], "connections": r["connections"],
                        "failed": r["errors"], "error_rate": rate,
                        "passed": rate <= max_error_rate})  # fmt: skip
    return {"passed": all(t["passed"] for t in targets), "max_error_rate": max_error_rate,
            "targets": targets}


# What a storm error code means (the codes the proxy answers under load).
STORM_CODES = {
    "code 89": "89 NetworkTimeout: waited longer than upstream.pool.wait_queue_timeout_ms "
               "for a pooled upstream connection",
    "code 6": "6 HostUnreachable: the upstream dropped or refused the connection",
}


def storm_verdict_text(data: Doc) -> str:
    """One line, first in every storm report: PASSED or FAILED, and why."""
    verdict = data.get("verdict") or storm_verdict(data["results"], 0.0)
    parts = []
    for t, r in zip(verdict["targets"], data["results"], strict=True):
        kinds = "; ".join(f"{STORM_CODES.get(k, k)}: {n:,}" for k, n in
                          r["errors_by_kind"].items())  # fmt: skip
        parts.append(f"{t['target']}: {t['failed']:,} of {t['connections']:,} connections "
                     f"failed ({t['error_rate']:.1%})" + (f" [{kinds}]" if kinds else ""))
    head = "PASSED" if verdict["passed"] else "FAILED"
    return (f"**Storm {head}** (allowed: {verdict['max_error_rate']:.1%} of the connections "
            f"failing): " + "; ".join(parts) + ".")


def storm_markdown(data: Doc) -> str:
    lines = [
        f"# bench storm {data['started_at']}",
        "",
        storm_verdict_text(data),
        "",
        f"- command: `{data.get('command') or 'python -m bench storm'}`",
        "",
        "| target | connections | opened | connect p50 ms | p99 ms | max ms | ops | op p50 ms "
        "| op p99 ms | errors | RSS before / peak / after MB | upstream connections max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in data["results"]:
        c, o = r["connect"], r["ops"]
        rss = " / ".join("-" if x is None else f"{x:.1f}" for x in
                         (r["rss_mb_before"], r["rss_mb_peak"], r["rss_mb_after"]))  # fmt: skip
        up = "-" if r["upstream_max"] is None else str(r["upstream_max"])
        lines.append(
            f"| {r['target']} | {r['connections']} | {r['opened']} | {_ms(c['p50_us'])} | "
            f"{_ms(c['p99_us'])} | {_ms(c['max_us'])} | {o['count']} | {_ms(o['p50_us'])} | "
            f"{_ms(o['p99_us'])} | {r['errors']} | {rss} | {up} |"
        )
    for r in data["results"]:
        cores = r.get("stack_cores") or {}
        lines.append(
            f"\n{r['target']}: CPU during the storm (cores): "
            + (", ".join(f"{k} {v}" for k, v in cores.items()) or "-")
            + f"; load workers {r['worker_cores']} (while opening "
            f"{r['worker_cores_while_opening']}); open took {r['open_wall_s']:.2f} s; "
            f"every operation answered {r['storm_wall_s']:.2f} s after the start"
        )
        for sample in r.get("error_samples", [])[:3]:
            lines.append(f"\n{r['target']} error sample: `{sample}`")
    for w in data.get("warnings", []):
        lines.append(f"\nWARNING: {w}")
    return "\n".join(lines)


def page_block(run_data: Doc, storm_data: Doc | None) -> str:
    """The generated part of docs/performance.md: per target throughput (with its
    rounds' range) and p50/p99, the ratios with their spread, and the storm's verdict."""
    cfg = run_data["config"]
    m = run_data["machine"]
    ds = cfg["dataset"]
    v = run_data["versions"]
    commands = f"`{run_data.get('command')}`" + (
        f" and `{storm_data.get('command')}`" if storm_data else "")
    out = [
        BEGIN,
        "<!-- Generated by `python -m bench report --doc` from bench/results/*.json: a new "
        "report replaces everything down to bench:end. -->",
        "",
        f"From {commands}: mongoproxy {v.get('mongoproxy')}, FerretDB "
        f"{v['server'].get('ferretdbVersion', '?')}; {m['cpu_usable']} cores shared by the "
        f"load generator ({cfg['workers']} processes), FerretDB, the proxies, HAProxy and "
        f"Redis; load average {m['loadavg_at_start'][0]:.2f} at the start. Data set scale "
        f"{ds['scale']:g} ({ds['counts']['tenants']} tenants, {ds['counts']['users']} users, "
        f"{ds['counts']['tasks']} tasks, {ds['counts']['timesheets']} timesheets); "
        f"{cfg['rounds']} interleaved rounds of {cfg['phase_s']:g} s per target and mode.",
        "",
        "| mode | target | ops/s (per round min-max) | p50 ms | p99 ms | errors | cache hits |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in cfg["modes"]:
        label = f"closed, {cfg['concurrency']} clients" if mode == "closed" else (
            f"open {cfg['rate']:g}/s")
        for r in _rows(run_data, mode, "all"):
            out.append(
                f"| {label} | {r['target']} | {_ops_text(run_data, r)} | {_ms(r['p50_us'])} | "
                f"{_ms(r['p99_us'])} | {r['errors']} | {_pct(r.get('cache_hit_ratio'))} |"
            )
    out.append("")
    ratio_table = _ratio_table(run_data)
    if ratio_table:
        out += [*ratio_table, "", RATIO_NOTE, ""]
    for t, why in run_data["unavailable"].items():
        out += [f"Target `{t}` unavailable in this run: {why}", ""]
    if storm_data:
        out += [storm_verdict_text(storm_data), ""]
        for r in storm_data["results"]:
            c, o = r["connect"], r["ops"]
            asked = r["connections"] * r["ops_per_connection"]
            cores = ", ".join(
                f"{k} {x:.2f}" for k, x in (r.get("stack_cores") or {}).items() if x is not None
            )
            out.append(
                f"Storm ({r['target']}): {r['connections']:,} connections opened at the same "
                f"instant, {r['opened']:,} opened; connect + hello p50 {_ms(c['p50_us'])} ms, "
                f"p99 {_ms(c['p99_us'])} ms, max {_ms(c['max_us'])} ms. {o['count']:,} of "
                f"{asked:,} operations answered (p50 {_ms(o['p50_us'])} ms, p99 "
                f"{_ms(o['p99_us'])} ms), the last {r['storm_wall_s']:.1f} s after the start. "
                f"{r['process']} RSS {r['rss_mb_before']} MB before, {r['rss_mb_peak']} MB at "
                f"the peak, {r['rss_mb_after']} MB after; at most {r['upstream_max']} upstream "
                f"connections; CPU during the storm (cores): {cores or '-'}."
            )
        out.append("")
    out.append(END)
    return "\n".join(out)


def update_page(page: Path, block: str) -> None:
    """Replace the generated block of ``page``; every other byte stays as it was."""
    text = page.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{page}: no {BEGIN} ... {END} markers")
    page.write_text(text[:start] + block + text[end + len(END) :])


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="Markdown and charts from run/storm JSON (and the performance page's tables)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, metavar="JSON")
    p.add_argument("--storm", type=Path, metavar="JSON")
    p.add_argument("--doc", type=Path, metavar="PAGE",
                   help="rewrite the generated block of this page (docs/performance.md); "
                   "`make bench` leaves it alone")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    run_data = json.loads(args.run.read_text())
    paths = write_run_outputs(run_data, args.run.parent, args.run.stem)
    storm_data = None
    if args.storm is not None:
        storm_data = json.loads(args.storm.read_text())
        md = args.storm.with_suffix(".md")
        md.write_text(storm_markdown(storm_data) + "\n")
        paths.append(md)
    if args.doc is not None:
        update_page(args.doc, page_block(run_data, storm_data))
        paths.append(args.doc)
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0
