"""The shipped alert rules and dashboard: promtool checks and unit tests, and every
metric they name exists in what the proxy exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.cache.metrics import CacheMetrics
from proxy.observe.config import ObservabilityConfig
from proxy.observe.metrics import Metrics
from proxy.observe.record import OperationRecord

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "mongoproxy.json"
METRIC_NAME = re.compile(r"\b((?:mongoproxy|process)_[a-z_]+)\b")


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool"
                                         if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        pytest.fail("promtool is not installed (Debian package prometheus); `make test` "
                    "installs it", pytrace=False)
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_promtool_check_rules() -> None:
    assert "SUCCESS" in run("check", "rules", "alerts.yml").stdout


def test_promtool_test_rules() -> None:
    assert "SUCCESS" in run("test", "rules", "alerts_test.yml").stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert alerts == tested


def _exported_names() -> set[str]:
    metrics = Metrics(
        ObservabilityConfig(tenant_labels=("a",)),
        pool_stats=lambda: {"a:1": {"size": 1, "in_use": 0, "idle": 1, "waiting": 0}},
        pool_max_size=10,
        topology=lambda: {"a:1": {"up": True, "role": "primary", "rtt_s": 0.001,
                                  "lag_s": 0.0}},
    )
    metrics.observe(OperationRecord(start_time=0.0, duration_ms=500.0, command="find",
                                    cache="hit", tenant="a", member="a:1",
                                    phases_ns={"checkout_wait": 100_000}))
    metrics.tenancy_violation("c", "r")
    # The result cache registers its own metrics on the same registry.
    CacheMetrics(metrics.registry).errors.labels("get", "timeout").inc()
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_rules_and_dashboard_use_exported_metrics() -> None:
    exported = _exported_names()
    text = (PROMETHEUS / "alerts.yml").read_text() + "\n".join(_dashboard_exprs())
    used = set(METRIC_NAME.findall(text))
    assert used, "no metric names found"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:panel_{i}",
              "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, e in enumerate(_dashboard_exprs())]
    assert len(rules) >= 15
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
