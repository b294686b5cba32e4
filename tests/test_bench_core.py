"""`python -m bench core` end to end, with tiny op counts, and its JSON's consistency."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import FerretDBProcess, ProxyProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = 50
ROUNDS = 2
WARMUP = 5
CONCURRENCY = (1, 4)


def _run_bench(json_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "bench", "core",
        "--ops", str(OPS),
        "--rounds", str(ROUNDS),
        "--warmup", str(WARMUP),
        "--concurrency", ",".join(map(str, CONCURRENCY)),
        "--docs", "100",
        "--handshakes", "20",
        "--json", str(json_path),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _check_results(data: dict[str, Any], stdout: str) -> None:
    cfg = data["config"]
    assert cfg["ops_per_target_op_concurrency"] == OPS
    assert cfg["rounds"] == ROUNDS
    assert sum(cfg["ops_per_round"]) == OPS
    assert cfg["concurrency"] == list(CONCURRENCY)
    for name in ("cpu_count", "python", "platform"):
        assert data["machine"][name]

    rows = data["results"]
    cells = data["cells"]
    keys = {(r["target"], r["op"], r["concurrency"]) for r in rows}
    assert keys == {
        (t, op, c) for t in cfg["targets"] for op in ("find", "insert") for c in CONCURRENCY
    }
    assert len(cells) == len(keys) * ROUNDS

    by_key = {(r["target"], r["op"], r["concurrency"]): r for r in rows}
    for key, r in by_key.items():
        mine = [c for c in cells if (c["target"], c["op"], c["concurrency"]) == key]
        assert sorted(c["round"] for c in mine) == list(range(ROUNDS))
        assert sum(c["ops"] for c in mine) == r["count"] == OPS
        assert math.isclose(sum(c["wall_s"] for c in mine), r["wall_s"], rel_tol=1e-9)
        assert math.isclose(r["ops_per_s"], r["count"] / r["wall_s"], rel_tol=1e-9)
        assert 1 <= r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"]
        assert r["loadgen_cpu_s"] >= 0
        # Closed loop: c threads can overlap at most c ops at a time, so the summed
        # latency is bounded by c x wall time (with slack for histogram rounding).
        assert r["mean_us"] * r["count"] <= r["concurrency"] * r["wall_s"] * 1e6 * 1.01 + 1000

        if key[0] != "direct":
            d = by_key[("direct", key[1], key[2])]
            assert math.isclose(r["throughput_ratio"], r["ops_per_s"] / d["ops_per_s"])
            assert r["added_p50_us"] == r["p50_us"] - d["p50_us"]
            assert r["added_p99_us"] == r["p99_us"] - d["p99_us"]
            # The printed table shows the same figures.
            line = next(
                ln for ln in stdout.splitlines() if ln.split()[:3] == [key[0], key[1], str(key[2])]
            )
            assert f"{r['throughput_ratio']:.3f}" in line.split()
            assert f"{r['added_p50_us']:+d}" in line.split()
        else:
            assert r["throughput_ratio"] is None and r["added_p50_us"] is None

    lc = data["loadgen_cpu"]
    assert lc["measure_wall_s"] > 0 and lc["measure_cpu_s"] >= 0
    assert lc["run_wall_s"] >= lc["measure_wall_s"]


def test_bench_core_against_given_uris(
    ferretdb: FerretDBProcess, proxy: ProxyProcess, tmp_path: Path
) -> None:
    out = tmp_path / "core.json"
    proc = _run_bench(out, "--direct", ferretdb.uri, "--proxy", proxy.uri)
    data = json.loads(out.read_text())
    assert data["config"]["stack"] == "external"
    assert data["config"]["targets"] == ["direct", "proxy"]
    assert data["config"]["direct_uri"] == ferretdb.uri
    _check_results(data, proc.stdout)
    # Against an external stack nothing reports the servers' CPU.
    assert all(r["proxy_cpu_us_per_op"] is None for r in data["results"])


def test_bench_core_starts_its_own_stack(tmp_path: Path) -> None:
    out = tmp_path / "core.json"
    proc = _run_bench(out)
    data = json.loads(out.read_text())
    assert data["config"]["stack"] == "started by bench"
    # HAProxy is part of the stack `make test` installs: the tcp target is measured,
    # and so is the bare Python relay.
    assert data["config"]["targets"] == [
        "direct", "direct-tls", "tcp", "relay", "proxy", "proxy-tls"]
    # The TLS phases: the handshake rate of each direct/proxy target, plain and TLS.
    assert [r["target"] for r in data["tls"]["handshakes"]] == [
        "direct", "direct-tls", "proxy", "proxy-tls"]
    assert all(r["per_s_median"] > 0 for r in data["tls"]["handshakes"])
    _check_results(data, proc.stdout)
    assert all(r["proxy_cpu_us_per_op"] is not None for r in data["results"])


def test_bench_core_rejects_half_a_stack(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "core", "--direct", "mongodb://127.0.0.1:1/"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "both --direct and --proxy" in proc.stderr
