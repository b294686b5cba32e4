"""Markdown tables, PNG charts and the README block from `run`/`storm` JSON results.

`python -m bench report --run bench/results/run.json [--storm bench/results/storm.json]
[--readme README.md]` rewrites the Markdown and charts next to the JSON and, with
``--readme``, the part of the README between ``<!-- bench:begin -->`` and
``<!-- bench:end -->``.  Everything shown is read from the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.core import write_json

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


def _ratio_table(data: Doc) -> list[str]:
    """Ratios over all operations: a / b for throughput, p50 and p99."""
    rows = [x for x in data["ratios"] if x["op"] == "all"]
    if not rows:
        return []
    spread = {
        (x["mode"], x["a"], x["b"]): x["throughput_per_round"]
        for x in data.get("round_ratios", [])
    }
    out = [
        "| mode | a / b | throughput | per round (min-max) | p50 | p99 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in rows:
        per_round = spread.get((x["mode"], x["a"], x["b"]))
        rng = "-" if not per_round else f"{min(per_round):.2f}-{max(per_round):.2f}"
        out.append(
            f"| {x['mode']} | {x['a']} / {x['b']} | {_ratio(x['throughput'])} | {rng} | "
            f"{_ratio(x['p50'])} | {_ratio(x['p99'])} |"
        )
    return out


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
            "| target | ops/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | ok | errors "
            "| unfinished | cache hits | load gen max cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in _rows(data, mode, "all"):
            lines.append(
                f"| {r['target']} | {r['ops_per_s']:.1f} | {_ms(r['p50_us'])} | "
                f"{_ms(r['p95_us'])} | {_ms(r['p99_us'])} | {_ms(r['p999_us'])} | "
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
        lines += ["## ratios (all operations)", "", *ratio_table, ""]
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


def latency_chart(data: Doc, mode: str, path: Path) -> None:
    """One panel per operation (and all): p50/p95/p99/p99.9 bars per target, log scale."""
    plt = _plt()
    rows = _rows(data, mode)
    ops = list(dict.fromkeys(r["op"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    by = {(r["op"], r["target"]): r for r in rows}
    pcts = (("p50", "p50_us"), ("p95", "p95_us"), ("p99", "p99_us"), ("p99.9", "p999_us"))
    ncols = 4
    nrows = (len(ops) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    width = 0.8 / max(len(targets), 1)
    for idx, op in enumerate(ops):
        ax = axes[idx // ncols][idx % ncols]
        for ti, t in enumerate(targets):
            r = by.get((op, t))
            values = [((r or {}).get(key) or 0) / 1000 for _, key in pcts]
            xs = [i + (ti - (len(targets) - 1) / 2) * width for i in range(len(pcts))]
            ax.bar(xs, values, width, label=t, color=TARGET_COLORS.get(t))
        counts = [by[(op, t)]["ok"] for t in targets if (op, t) in by]
        n = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        ax.set_title(f"{op} (n = {n} per target)", fontsize=9)
        ax.set_xticks(range(len(pcts)), [p for p, _ in pcts])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    for idx in range(len(ops), nrows * ncols):
        axes[idx // ncols][idx % ncols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"latency percentiles per target and operation: {_mode_title(data, mode)}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def throughput_chart(data: Doc, path: Path) -> None:
    plt = _plt()
    modes = data["config"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    for i, mode in enumerate(modes):
        ax = axes[0][i]
        rows = _rows(data, mode, "all")
        names = [r["target"] for r in rows]
        ax.bar(names, [r["ops_per_s"] for r in rows],
               color=[TARGET_COLORS.get(n, "#999999") for n in names])  # fmt: skip
        for x, r in enumerate(rows):
            ax.annotate(f"{r['ops_per_s']:.0f}", (x, r["ops_per_s"]), ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
        ax.set_title(_mode_title(data, mode), fontsize=9)
        ax.set_ylabel("operations/s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("throughput per target")
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


def storm_markdown(data: Doc) -> str:
    lines = [
        f"# bench storm {data['started_at']}",
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
            f"{r['worker_cores_while_opening']}); open took {r['open_wall_s']:.2f} s"
        )
    for w in data.get("warnings", []):
        lines.append(f"\nWARNING: {w}")
    return "\n".join(lines)


def readme_block(run_data: Doc, storm_data: Doc | None) -> str:
    """The README's performance table: throughput and p50/p99 per target, the ratios,
    the cache's speed-up and the storm figures."""
    cfg = run_data["config"]
    m = run_data["machine"]
    ds = cfg["dataset"]
    out = [
        BEGIN,
        f"Produced by `make bench` ({run_data['started_at'][:10]}, commit "
        f"{run_data['versions'].get('git_commit')}): `{run_data.get('command')}`"
        + (f" and `{storm_data.get('command')}`" if storm_data else "")
        + f". {m['cpu_usable']} cores shared by the load generator "
        f"({cfg['workers']} processes), FerretDB, both proxies, HAProxy and Redis; load "
        f"average {m['loadavg_at_start'][0]:.2f} at the start. Data set scale {ds['scale']:g} "
        f"({ds['counts']['tenants']} tenants, {ds['counts']['users']} users, "
        f"{ds['counts']['tasks']} tasks, {ds['counts']['timesheets']} timesheets); "
        f"{cfg['rounds']} interleaved rounds of {cfg['phase_s']:g} s per target and mode.",
        "",
        "| mode | target | ops/s | p50 ms | p99 ms | errors | cache hits |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in cfg["modes"]:
        for r in _rows(run_data, mode, "all"):
            label = "closed" if mode == "closed" else f"open {cfg['rate']:g}/s"
            if mode == "closed":
                label = f"closed, {cfg['concurrency']} clients"
            out.append(
                f"| {label} | {r['target']} | {r['ops_per_s']:.1f} | {_ms(r['p50_us'])} | "
                f"{_ms(r['p99_us'])} | {r['errors']} | {_pct(r.get('cache_hit_ratio'))} |"
            )
    out.append("")
    ratio_table = _ratio_table(run_data)
    if ratio_table:
        out += [*ratio_table, ""]
    for t, why in run_data["unavailable"].items():
        out.append(f"Target `{t}` unavailable in this run: {why}")
        out.append("")
    if storm_data:
        for r in storm_data["results"]:
            c, o = r["connect"], r["ops"]
            asked = r["connections"] * r["ops_per_connection"]
            codes = ", ".join(f"{k}: {n}" for k, n in r["errors_by_kind"].items())
            cores = ", ".join(
                f"{k} {v:.2f}" for k, v in (r.get("stack_cores") or {}).items() if v is not None
            )
            out.append(
                f"Storm ({r['target']}, `{storm_data.get('command')}`): {r['connections']} "
                f"connections opened at the same instant, {r['opened']} opened; connect + "
                f"hello p50 {_ms(c['p50_us'])} ms, p99 {_ms(c['p99_us'])} ms, max "
                f"{_ms(c['max_us'])} ms. {o['count']} of {asked} operations answered (p50 "
                f"{_ms(o['p50_us'])} ms, p99 {_ms(o['p99_us'])} ms); {r['errors']} errors"
                + (f" ({codes})" if codes else "")
                + f". {r['process']} RSS {r['rss_mb_before']} MB before, {r['rss_mb_peak']} MB "
                f"at the peak, {r['rss_mb_after']} MB after; at most {r['upstream_max']} "
                f"upstream connections; CPU during the storm (cores): {cores or '-'}."
            )
        out.append("")
    out.append(END)
    return "\n".join(out)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers")
    readme.write_text(text[:start] + block + text[end + len(END) :])


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="Markdown, charts and the README table from run/storm JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, metavar="JSON")
    p.add_argument("--storm", type=Path, metavar="JSON")
    p.add_argument("--readme", type=Path, help="rewrite this file's bench block")
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
    if args.readme is not None:
        update_readme(args.readme, readme_block(run_data, storm_data))
        paths.append(args.readme)
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0
