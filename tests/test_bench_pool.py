"""`python -m bench pool` end to end, with tiny parameters, and its JSON's consistency."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import FerretDBProcess, ProxyFactory, ProxyProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
IDLE = 200
CLIENTS = 50
POOL = 5
DURATION = 2.0
ROUNDS = 2
WORKERS = 2


def _run_bench(json_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "bench", "pool",
        "--idle-connections", str(IDLE),
        "--batch", "64",
        "--settle", "0.3",
        "--clients", str(CLIENTS),
        "--pool-max-size", str(POOL),
        "--duration", str(DURATION),
        "--warmup", "0.3",
        "--rounds", str(ROUNDS),
        "--workers", str(WORKERS),
        "--docs", "100",
        "--sample-interval", "0.1",
        "--json", str(json_path),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _check_results(data: dict[str, Any], stdout: str) -> None:
    assert data["benchmark"] == "pool"
    cfg = data["config"]
    assert cfg["idle_connections"] == IDLE
    assert cfg["clients"] == CLIENTS
    assert cfg["direct_clients"] == POOL  # defaults to the pool size
    assert cfg["pool_max_size"] == POOL
    assert cfg["rounds"] == ROUNDS
    for name in ("cpu_count", "python", "platform"):
        assert data["machine"][name]
    assert len(data["machine"]["loadavg_at_start"]) == 3
    assert len(data["machine"]["loadavg_at_end"]) == 3
    assert data["bench_nofile"]["soft"] >= IDLE + 100

    # Phase 1: idle connections.
    idle = data["idle"]
    assert idle["requested"] == IDLE
    assert idle["opened"] == IDLE and idle["errors"] == 0 and idle["dropped"] == 0
    lat = idle["connect_hello_latency"]
    assert lat["count"] == IDLE
    assert 1 <= lat["p50_us"] <= lat["p99_us"] <= lat["max_us"]
    assert idle["open_wall_s"] > 0
    assert math.isclose(idle["open_per_s"], IDLE / idle["open_wall_s"])
    rest, at_idle = idle["rss_rest_kb"], idle["rss_idle_kb"]
    assert rest > 0 and at_idle > 0 and idle["rss_after_close_kb"] > 0
    assert math.isclose(idle["rss_per_connection_kb"], (at_idle - rest) / IDLE)
    assert math.isclose(
        idle["projected_rss_at_10000_mb"], (rest + idle["rss_per_connection_kb"] * 10_000) / 1024
    )
    assert idle["goal_basis"] == "projected"
    assert idle["goal_met"] == (idle["projected_rss_at_10000_mb"] < 300)
    # The proxy holds one socket per client (plus its listeners and upstream sockets).
    assert idle["proxy_open_fds"] >= IDLE
    if idle["healthz_client_connections"] is not None:
        assert idle["healthz_client_connections"] == IDLE

    # Phase 2: throughput, interleaved direct/proxy rounds.
    tput = data["throughput"]
    phases = tput["phases"]
    assert [(p["round"], p["target"]) for p in phases] == [
        (r, t) for r in range(ROUNDS) for t in ("direct", "proxy")
    ]
    for p in phases:
        assert p["clients"] == (CLIENTS if p["target"] == "proxy" else POOL)
        assert p["connected"] == p["clients"]
        assert p["errors"] == 0, p["error_samples"]
        assert p["ops"] > 0 and p["ops"] == p["finds"] + p["inserts"]
        assert math.isclose(p["ops_per_s"], p["ops"] / DURATION)
        assert 1 <= p["p50_us"] <= p["p99_us"] <= p["max_us"]
        assert len(p["worker_cpu_cores"]) == WORKERS
        assert all(c >= 0 for c in p["worker_cpu_cores"])
        # Closed loop: at most `clients` ops in flight, and a counted op ends inside the
        # window, so the summed latency (at least half the ops take >= p50) is bounded
        # by clients x (duration + the longest op).
        bound = p["clients"] * (DURATION * 1e6 + p["max_us"]) * 1.01
        assert p["p50_us"] * p["ops"] / 2 <= bound
        if p["target"] == "proxy":
            assert p["upstream_samples"] > 0 and p["upstream_max"] is not None
        else:
            assert p["upstream_max"] is None

    results = tput["results"]
    for target in ("direct", "proxy"):
        r = results[target]
        mine = [p for p in phases if p["target"] == target]
        assert r["ops"] == sum(p["ops"] for p in mine)
        assert math.isclose(r["duration_s"], DURATION * ROUNDS)
        assert math.isclose(r["ops_per_s"], r["ops"] / r["duration_s"])
        assert 1 <= r["p50_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"]
        assert r["errors"] == 0
    direct_ops, proxy_ops = results["direct"]["ops_per_s"], results["proxy"]["ops_per_s"]
    assert math.isclose(tput["ratio"], proxy_ops / direct_ops)
    assert tput["ratio_goal_met"] == (tput["ratio"] >= 0.9)
    for rnd, ratio in enumerate(tput["per_round_ratios"]):
        d = next(p for p in phases if p["round"] == rnd and p["target"] == "direct")
        x = next(p for p in phases if p["round"] == rnd and p["target"] == "proxy")
        assert math.isclose(ratio, x["ops_per_s"] / d["ops_per_s"])

    up = tput["upstream"]
    assert up["pool_max_size"] == POOL
    assert up["monitoring_baseline"] is not None and up["monitoring_baseline"] >= 0
    assert up["limit"] == POOL + up["monitoring_baseline"]
    assert up["max"] == max(p["upstream_max"] for p in phases if p["target"] == "proxy")
    # 50 clients on a pool of 5: the pool is full, and never above its bound.
    assert up["within_limit"] is True
    assert up["max"] <= up["limit"]
    assert up["max"] > up["monitoring_baseline"]

    ins = tput["inserts"]
    assert ins["consistent"] and ins["unknown"] == 0
    assert ins["on_server"] == ins["acked"] >= sum(p["inserts"] for p in phases)

    # The printed table shows the same figures.
    lines = stdout.splitlines()
    for target in ("direct", "proxy"):
        row = next(ln.split() for ln in lines if ln.split()[:1] == [target])
        assert row[1] == str(results[target]["clients"])
        assert row[2] == f"{results[target]['ops_per_s']:.1f}"
    assert any(f"ratio proxy/direct {tput['ratio']:.3f}" in ln for ln in lines)
    assert data["warnings"] == [w[len("WARNING: ") :] for w in lines if w.startswith("WARNING: ")]


def test_bench_pool_starts_its_own_stack(tmp_path: Path) -> None:
    out = tmp_path / "pool.json"
    proc = _run_bench(out)
    data = json.loads(out.read_text())
    assert data["config"]["stack"] == "started by bench"
    _check_results(data, proc.stdout)
    # The proxy subprocess inherited the raised open-files limit.
    assert data["proxy"]["nofile_soft"] == data["bench_nofile"]["soft"]
    assert data["proxy"]["pid"] is not None
    for target in ("direct", "proxy"):
        assert data["throughput"]["results"][target]["ferretdb_cpu_cores"] is not None


def test_bench_pool_cpu_split(tmp_path: Path) -> None:
    """``--cpu-split``: FerretDB's threads, also those it started during the run, stay on
    the first CPU; the proxy and the load generator get the others."""
    out = tmp_path / "pool.json"
    proc = _run_bench(out, "--cpu-split")
    data = json.loads(out.read_text())
    _check_results(data, proc.stdout)
    split = data["cpu_split"]
    cpus = sorted(os.sched_getaffinity(0))
    assert split["ferretdb"] == split["ferretdb_after_run"] == cpus[:1]
    assert split["others"] == cpus[1:]
    assert "CPUs split: FerretDB on" in proc.stdout


def test_bench_pool_against_given_uris(
    ferretdb: FerretDBProcess,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    px: ProxyProcess = proxy_factory(ferretdb.uri, {"upstream": {"pool": {"max_size": POOL}}})
    out = tmp_path / "pool.json"
    proc = _run_bench(out, "--direct", ferretdb.uri, "--proxy", px.uri, "--proxy-pid", str(px.pid))
    data = json.loads(out.read_text())
    assert data["config"]["stack"] == "external"
    assert data["config"]["proxy_uri"] == px.uri
    assert data["proxy"]["pid"] == px.pid
    _check_results(data, proc.stdout)


def test_bench_pool_rejects_half_a_stack() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "pool", "--direct", "mongodb://127.0.0.1:1/"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "both --direct and --proxy" in proc.stderr
