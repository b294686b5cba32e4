"""The version a user sees: `mongoproxy --version` from a source checkout and from an
installed wheel, and `mongoproxy_build_info` on a running proxy's /metrics (checked by
promtool as Prometheus would see it)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.support import REPO_ROOT, FerretDBProcess
from tests.support.factories import ProxyFactory
from tests.test_prometheus_rules import promtool


def _env(pythonpath: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def test_version_matches_the_package_metadata() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = {attr = "proxy.__version__"}' in pyproject
    assert __version__.count(".") >= 2


def test_cli_version_from_the_checkout() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=REPO_ROOT,
                            env=_env(REPO_ROOT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mongoproxy {__version__}\n"


def test_installed_wheel_gives_the_mongoproxy_command(tmp_path: Path) -> None:
    """What `pip install` / `pipx install` of the project does: build the wheel from a
    copy of the sources, install it, and run the console script it declares."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for package in ("proxy", "bench"):
        shutil.copytree(REPO_ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src),
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((tmp_path / "dist").glob("mongoproxy-*.whl"))
    assert [w.name for w in wheels] == [f"mongoproxy-{__version__}-py3-none-any.whl"]
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site),
                                str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = site / "bin" / "mongoproxy"
    assert script.exists(), sorted(p.name for p in site.iterdir())
    # PYTHONPATH is the installed copy only: the checkout is not importable from there.
    result = subprocess.run([str(script), "--version"], cwd=tmp_path, env=_env(site),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mongoproxy {__version__}\n"
    where = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"],
                           cwd=tmp_path, env=_env(site), capture_output=True, text=True,
                           timeout=60)
    assert where.stdout.strip() == str(site / "proxy" / "__init__.py")


def test_build_info_on_a_running_proxy(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(ferretdb.uri)
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=10) as reply:
        body = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    info = families["mongoproxy_build_info"]
    assert info.type == "gauge"
    assert [(s.labels, s.value) for s in info.samples] == [
        ({"version": __version__, "python": platform.python_version()}, 1.0)]
    # The whole exposition as Prometheus parses it, lint included.
    path = tmp_path / "metrics.txt"
    path.write_text(body)
    with path.open("rb") as stdin:
        checked = subprocess.run([promtool(), "check", "metrics"], stdin=stdin,
                                 capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
