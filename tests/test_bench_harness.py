"""`python -m bench seed|run|storm|report`: the load-test harness, at tiny scale, against
real servers (FerretDB, the proxy, HAProxy, Redis)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from bench import report
from bench.harness import TENANCY_SECTION, ratios
from bench.seed import seed_database
from bench.stack import start_stack
from bench.workload import (
    COLLECTIONS,
    DEFAULT_WEIGHTS,
    DOC_BYTES,
    INDEXES,
    Dataset,
    generate,
    parse_weights,
)
from proxy.config import Config
from tests.support import FerretDBProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.01
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CACHE_EXISTS = "cache" in Config.model_fields

Doc = dict[str, Any]


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _only(op: str) -> str:
    """--weights that keep one operation."""
    return ",".join(f"{name}={1 if name == op else 0}" for name in DEFAULT_WEIGHTS)


# ---------------------------------------------------------------- data set and units


def test_dataset_is_deterministic_and_skewed() -> None:
    ds = Dataset(SCALE, 7)
    a, b = generate(ds), generate(Dataset(SCALE, 7))
    assert a == b
    assert generate(Dataset(SCALE, 8))["users"] != a["users"]
    for coll in ds.counts:
        per_tenant = ds.counts[coll]
        assert per_tenant == sorted(per_tenant, reverse=True)
    assert ds.counts["tasks"][0] > 2 * ds.counts["tasks"][-1]
    big = Dataset(1.0, 1)
    assert big.tenants == 20 and big.total("tasks") == 8000 and big.total("users") == 1000


def test_parse_weights() -> None:
    w = parse_weights("report=50,timesheet_entry=0")
    assert w["report"] == 50 and "timesheet_entry" not in w
    assert w["permission_check"] == DEFAULT_WEIGHTS["permission_check"]
    with pytest.raises(ValueError):
        parse_weights("nope=1")
    with pytest.raises(ValueError):
        parse_weights(",".join(f"{n}=0" for n in DEFAULT_WEIGHTS))


def test_ratios_from_rows() -> None:
    rows = [
        {"mode": "closed", "target": t, "op": "all", "ops_per_s": q, "p50_us": p50, "p99_us": p99}
        for t, q, p50, p99 in (
            ("direct", 100.0, 1000, 5000),
            ("tcp", 90.0, 1100, 5500),
            ("proxy", 80.0, 1500, 8000),
            ("proxy-cache", 160.0, 300, 6000),
        )
    ]
    got = {(r["a"], r["b"]): r for r in ratios(rows)}
    assert got[("proxy", "direct")]["throughput"] == pytest.approx(0.8)
    assert got[("proxy", "direct")]["p50"] == pytest.approx(1.5)
    assert got[("proxy", "tcp")]["p99"] == pytest.approx(8000 / 5500)
    assert got[("proxy-cache", "proxy")]["throughput"] == pytest.approx(2.0)
    assert got[("proxy-cache", "proxy")]["p50"] == pytest.approx(0.2)


def test_page_block_replaced_between_markers(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.update_page(page, f"{report.BEGIN}\nnew\n{report.END}")
    assert page.read_text() == f"intro\n{report.BEGIN}\nnew\n{report.END}\ntail\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.update_page(tmp_path / "bare.md", "x")


def test_make_bench_writes_only_under_bench_results() -> None:
    """`make bench` runs its three commands with outputs in bench/results/ only: no
    --doc, no --readme, no --out or --json elsewhere."""
    make = (REPO_ROOT / "Makefile").read_text()
    recipe = make[make.index("\nbench:"):].split("\n\n")[0]
    variables = {line.split(":=")[0].strip(): line.split(":=")[1]
                 for line in make.splitlines() if line.startswith("BENCH_")}
    text = recipe + " ".join(variables.values())
    assert "--doc" not in text and "--readme" not in text and "README" not in text
    text = text.replace("$(BENCH_OUT)", variables["BENCH_OUT"].strip())
    for flag in ("--json", "--out", "--run", "--storm"):
        for value in text.split(flag)[1:]:
            assert value.split()[0].startswith("bench/results/latest"), (flag, value)
    # ... a directory git ignores: a run leaves no tracked file changed.
    assert "bench/results/latest/" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    # The report runs whatever the storm's verdict, then the storm's status is returned.
    assert "|| status=$$?" in recipe and "exit $$status" in recipe


# ---------------------------------------------------------------- seed


def test_seed_creates_collections_indexes_and_sizes(
    ferretdb: FerretDBProcess, db_name: str, tmp_path: Path
) -> None:
    summary_path = tmp_path / "seed.json"
    _bench("seed", "--uri", ferretdb.uri, "--db", db_name, "--scale", str(SCALE),
           "--seed", "3", "--json", str(summary_path))  # fmt: skip
    ds = Dataset(SCALE, 3)
    summary = json.loads(summary_path.read_text())
    raw: MongoClient[RawBSONDocument] = MongoClient(
        ferretdb.uri, directConnection=True, document_class=RawBSONDocument
    )
    client: MongoClient[Doc] = MongoClient(ferretdb.uri, directConnection=True)
    with raw, client:
        db = client[db_name]
        assert set(COLLECTIONS) <= set(db.list_collection_names())
        for coll in COLLECTIONS:
            docs = list(raw[db_name][coll].find({"kind": {"$ne": "bench_meta"}}))
            assert len(docs) == ds.total(coll) == summary["collections"][coll]["documents"]
            # Sizes as stored on the server (raw BSON of what it returns).
            sizes = [len(d.raw) for d in docs]
            avg = sum(sizes) / len(sizes)
            assert abs(avg - DOC_BYTES[coll]) <= 0.1 * DOC_BYTES[coll], (coll, avg)
            assert len({d["tenant_id"] for d in docs}) == ds.tenants
            # Tenant-first compound indexes, as declared.
            have = {
                tuple((k, int(v)) for k, v in ix["key"]): ix
                for ix in db[coll].index_information().values()
            }
            for keys, opts in INDEXES[coll]:
                assert tuple(keys) in have, (coll, keys, list(have))
                if opts.get("unique"):
                    assert have[tuple(keys)].get("unique") is True
        # The skew is on the server too: the first tenant has the most tasks.
        counts = [db.tasks.count_documents({"tenant_id": f"t{i:04d}"}) for i in range(ds.tenants)]
        assert counts == ds.counts["tasks"] and counts[0] > counts[-1]
        meta = db.tenants.find_one({"_id": "_bench_meta"})
        assert meta is not None and meta["scale"] == SCALE and meta["seed"] == 3


# ---------------------------------------------------------------- run: all four targets


def _check_run(data: Doc, modes: tuple[str, ...]) -> None:
    assert data["benchmark"] == "run"
    for key in ("cpu_count", "python", "platform", "loadavg_at_start", "loadavg_at_end"):
        assert data["machine"][key]
    assert data["versions"]["pymongo"] and data["versions"]["server"]["ferretdbVersion"]
    assert data["versions"]["haproxy"] and data["versions"]["redis"]
    cfg = data["config"]
    assert tuple(cfg["modes"]) == modes
    expected = ["direct", "tcp", "proxy", "proxy-cache"]
    if CACHE_EXISTS:
        assert cfg["measured_targets"] == expected, data["unavailable"]
    else:
        assert cfg["measured_targets"] == expected[:3]
        assert "proxy-cache" in data["unavailable"]
    targets = cfg["measured_targets"]
    ops = list(cfg["weights"])

    # Phases: one per (round, mode, target); issued = ok + errors + unfinished per op.
    phases = data["phases"]
    assert len(phases) == cfg["rounds"] * len(modes) * len(targets)
    for p in phases:
        assert p["ok"] == sum(o["ok"] for o in p["ops"].values())
        assert p["errors"] == sum(sum(o["errors"].values()) for o in p["ops"].values())
        for o in p["ops"].values():
            assert o["issued"] == o["ok"] + sum(o["errors"].values()) + o["unfinished"]
        assert p["wall_s"] >= p["duration_s"]
        assert math.isclose(p["ops_per_s"], p["ok"] / p["wall_s"])
        assert p["workers"] and all(w["cores"] >= 0 for w in p["workers"])

    rows = {(r["mode"], r["target"], r["op"]): r for r in data["results"]}
    for mode in modes:
        for t in targets:
            mine = [p for p in phases if p["mode"] == mode and p["target"] == t]
            total = rows[(mode, t, "all")]
            assert total["ok"] > 0, (mode, t)
            assert total["errors"] == 0, (mode, t, total["errors_by_code"])
            op_rows = [rows[(mode, t, op)] for op in ops]
            for field in ("issued", "ok", "errors", "unfinished"):
                assert total[field] == sum(r[field] for r in op_rows), (mode, t, field)
            assert total["ok"] == sum(p["ok"] for p in mine)
            assert total["issued"] == total["ok"] + total["errors"] + total["unfinished"]
            assert math.isclose(total["wall_s"], sum(p["wall_s"] for p in mine), rel_tol=1e-3)
            for r in [total, *op_rows]:
                assert math.isclose(r["ops_per_s"], r["ok"] / r["wall_s"], rel_tol=1e-3)
                if r["ok"] == 0:
                    continue
                pct = [r["p50_us"], r["p95_us"], r["p99_us"], r["p999_us"], r["max_us"]]
                assert pct == sorted(pct) and pct[0] > 0, (mode, t, r["op"], pct)
                svc = r["service"]
                assert svc["p50_us"] <= svc["max_us"]
                # Latency counts from the intended start: never below the service time.
                assert r["p50_us"] >= svc["p50_us"] * 0.99
            if t == "proxy-cache":
                assert total["cache_hit_ratio"] is not None and total["cache_hits"] > 0
                assert math.isclose(
                    total["cache_hit_ratio"],
                    total["cache_hits"] / (total["cache_hits"] + total["cache_misses"]),
                )
            else:
                assert total.get("cache_hits") in (None, 0)

    # Ratios are computed from the reported figures.
    got = {(x["mode"], x["op"], x["a"], x["b"]): x for x in data["ratios"]}
    for mode in modes:
        for a, b in (("proxy", "direct"), ("proxy", "tcp")):
            x = got[(mode, "all", a, b)]
            ra, rb = rows[(mode, a, "all")], rows[(mode, b, "all")]
            assert math.isclose(x["throughput"], ra["ops_per_s"] / rb["ops_per_s"])
            assert math.isclose(x["p50"], ra["p50_us"] / rb["p50_us"])
            assert math.isclose(x["p99"], ra["p99_us"] / rb["p99_us"])
        per_round = {(x["mode"], x["a"], x["b"]): x for x in data["round_ratios"]}
        pa = [p for p in phases if p["mode"] == mode and p["target"] == "proxy"]
        pb = [p for p in phases if p["mode"] == mode and p["target"] == "direct"]
        assert per_round[(mode, "proxy", "direct")]["throughput_per_round"] == [
            a["ops_per_s"] / b["ops_per_s"] for a, b in zip(pa, pb, strict=True)
        ]
        # Every ratio carries its value in each round, from the phases' own figures.
        spread = got[(mode, "all", "proxy", "direct")]["per_round"]
        assert spread["throughput"] == per_round[(mode, "proxy", "direct")][
            "throughput_per_round"]
        assert spread["p50"] == [a["latency"]["p50_us"] / b["latency"]["p50_us"]
                                 for a, b in zip(pa, pb, strict=True)]
        assert len(spread["p99"]) == len(pa)
        for op in ops:
            x = got[(mode, op, "proxy", "direct")]["per_round"]
            assert x["throughput"] == [
                (a["ops"][op]["ok"] / a["wall_s"]) / (b["ops"][op]["ok"] / b["wall_s"])
                for a, b in zip(pa, pb, strict=True) if b["ops"][op]["ok"]]
        if CACHE_EXISTS:
            x = got[(mode, "all", "proxy-cache", "proxy")]
            rc, rp = rows[(mode, "proxy-cache", "all")], rows[(mode, "proxy", "all")]
            assert math.isclose(x["throughput"], rc["ops_per_s"] / rp["ops_per_s"])


def test_run_all_targets_writes_consistent_json_markdown_and_charts(tmp_path: Path) -> None:
    modes = ("closed", "open")
    proc = _bench(
        "run", "--mode", ",".join(modes), "--duration", "2.5", "--rounds", "1",
        "--warmup", "0.5", "--drain", "10", "--scale", str(SCALE), "--concurrency", "4",
        "--rate", "20", "--out", str(tmp_path), "--name", "t",
    )  # fmt: skip
    data = json.loads((tmp_path / "t.json").read_text())
    _check_run(data, modes)
    # Live progress lines on stderr, one per target at least.
    for t in data["config"]["measured_targets"]:
        assert f"[{t:<11} closed round 1/1]" in proc.stderr
    md = (tmp_path / "t.md").read_text()
    assert "| target | ops/s | p50 ms |" in md and "proxy / direct" in md
    for t in data["config"]["measured_targets"]:
        assert f"| {t} |" in md
    for name in ("t-latency-closed.png", "t-latency-open.png", "t-throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # Every ratio with its spread over the rounds: "0.912 (0.91-0.91)" for one round.
    ratio_lines = [line for line in md.splitlines() if " / direct |" in line]
    assert ratio_lines and all(line.count("(") == 3 for line in ratio_lines), ratio_lines
    # Far fewer than 10,000 operations: no p99.9 in the tables.
    for line in md.splitlines():
        if line.startswith("| proxy |"):
            assert line.split("|")[6].strip() == "-", line
    # `report` regenerates the same files and the page's block from the JSON alone, and
    # leaves the rest of the page as it was.
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\nprose\n{report.BEGIN}\nold\n{report.END}\nmore prose\n")
    _bench("report", "--run", str(tmp_path / "t.json"), "--doc", str(page))
    text = page.read_text()
    assert text.startswith(f"# Performance\nprose\n{report.BEGIN}\n")
    assert text.endswith(f"{report.END}\nmore prose\n") and "old" not in text
    assert "| mode | target | ops/s (per round min-max) | p50 ms | p99 ms |" in text
    assert "proxy / direct" in text and "proxy / tcp" in text


# ---------------------------------------------------------------- open loop: queueing


class SlowRelay:
    """A TCP relay that holds every client->server chunk for ``delay_s`` before passing it
    on: a target whose service time is at least ``delay_s`` per request."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await r.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w, self.delay_s), pipe(up_r, writer, 0.0))

    def __enter__(self) -> SlowRelay:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def seeded(ferretdb: FerretDBProcess, db_name: str) -> Iterator[str]:
    client: MongoClient[Doc] = MongoClient(ferretdb.uri, directConnection=True)
    with client:
        seed_database(client[db_name], Dataset(SCALE, 1), log=False)
    yield db_name


def _open_run(uri: str, db: str, rate: float, out: Path) -> Doc:
    _bench(
        "run", "--uri", f"slow={uri}", "--db", db, "--mode", "open", "--rate", str(rate),
        "--max-inflight", "1", "--workers", "1", "--duration", "3", "--rounds", "1",
        "--warmup", "0", "--drain", "30", "--weights", _only("permission_check"),
        "--out", str(out), "--name", "open", "--quiet",
    )  # fmt: skip
    data = json.loads((out / "open.json").read_text())
    row: Doc = next(r for r in data["results"] if r["op"] == "permission_check")
    return row


def test_open_loop_latency_includes_queueing(
    ferretdb: FerretDBProcess, seeded: str, tmp_path: Path
) -> None:
    delay = 0.03
    with SlowRelay(ferretdb.port, delay) as relay:
        uri = f"mongodb://127.0.0.1:{relay.port}/"
        # One request at a time, each >= 30 ms: at most ~33/s. At 8/s nothing queues.
        calm = _open_run(uri, seeded, 8, tmp_path / "calm")
        # At 80/s arrivals outrun service: a queue builds for the whole 3 s window.
        busy = _open_run(uri, seeded, 80, tmp_path / "busy")
    for r in (calm, busy):
        assert r["errors"] == 0 and r["unfinished"] == 0
        assert r["issued"] == r["ok"]
        assert r["service"]["p50_us"] >= delay * 1e6
    assert calm["issued"] == pytest.approx(24, abs=2)
    assert busy["issued"] == pytest.approx(240, abs=2)
    # Without a queue the latency is the service time; with one it is far above it:
    # measured from the intended send time, the wait for the busy target counts.
    assert calm["p50_us"] < 2 * calm["service"]["p50_us"]
    assert busy["service"]["p50_us"] < 3 * calm["service"]["p50_us"]
    assert busy["p50_us"] > 10 * busy["service"]["p50_us"]
    # 240 arrivals over 3 s served at <= 33/s: the last ones wait > 3 s.
    assert busy["max_us"] > 3_000_000
    # Throughput is what was served, not what was offered.
    assert busy["ops_per_s"] < 40


# ---------------------------------------------------------------- storm


def test_storm_small(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    _bench("storm", "--connections", "300", "--ops", "2", "--scale", str(SCALE),
           "--json", str(out), "--quiet")  # fmt: skip
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["target"] == "proxy" and r["opened"] == 300 and r["errors"] == 0
    assert r["connect"]["count"] == 300 and r["ops"]["count"] == 600
    c = r["connect"]
    assert c["p50_us"] <= c["p90_us"] <= c["p99_us"] <= c["max_us"]
    assert r["rss_mb_before"] and r["rss_mb_peak"] >= r["rss_mb_before"]
    # 300 clients share the pool: never more upstream connections than the default 100
    # plus the monitoring one.
    assert 1 <= r["upstream_max"] <= 101
    assert (tmp_path / "storm.md").read_text().count("| proxy |") == 1


def test_run_with_tenancy_enforced_has_no_refusals(tmp_path: Path) -> None:
    """Every filter and document of the workload carries tenant_id: an enforcing proxy
    refuses none of it."""
    _bench("run", "--targets", "proxy", "--tenancy", "enforce", "--duration", "1.5",
           "--rounds", "1", "--warmup", "0.3", "--scale", str(SCALE), "--concurrency", "4",
           "--weights", ",".join(f"{n}=1" for n in DEFAULT_WEIGHTS),
           "--out", str(tmp_path), "--name", "ten", "--quiet")  # fmt: skip
    data = json.loads((tmp_path / "ten.json").read_text())
    assert data["config"]["tenancy"] == "enforce"
    rows = {r["op"]: r for r in data["results"] if r["target"] == "proxy"}
    assert rows["all"]["ok"] > 0 and rows["all"]["errors"] == 0, rows["all"]["errors_by_code"]
    assert all(rows[op]["issued"] > 0 for op in DEFAULT_WEIGHTS), {
        op: rows[op]["issued"] for op in DEFAULT_WEIGHTS
    }
    # The section the harness gives the proxies does enforce: an unscoped read is refused.
    with start_stack(proxy_extra={"tenancy": TENANCY_SECTION}) as stack:
        client: MongoClient[Doc] = MongoClient(stack.proxy_uri, directConnection=True)
        with client:
            coll = client.bench.tasks
            assert coll.find_one({"tenant_id": "t0000"}) is None
            with pytest.raises(OperationFailure) as err:
                coll.find_one({"status": "todo"})
            assert err.value.code == 13
