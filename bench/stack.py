"""A throw-away benchmark stack: FerretDB (SQLite handler) with the proxy in front.

Both listen on free 127.0.0.1 ports and keep their files in one temporary directory,
which is removed on a clean stop (kept, and named in the error, when startup fails).
Everything started here is killed at interpreter exit if `stop()` was never reached.

This module deliberately does not import ``tests.support``: the bench package must
work without the test tree.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    _live.clear()


class StackError(RuntimeError):
    """FerretDB or the proxy could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def find_ferretdb() -> str:
    """$MONGOPROXY_FERRETDB, else <repo>/.tools/bin/ferretdb (built by `make tools`)."""
    path = os.environ.get("MONGOPROXY_FERRETDB") or str(REPO_ROOT / ".tools" / "bin" / "ferretdb")
    if not os.access(path, os.X_OK):
        raise StackError(
            f"FerretDB binary not found at {path}; run `make tools` or set MONGOPROXY_FERRETDB"
        )
    return path


def process_cpu_seconds(pid: int) -> float | None:
    """user+system CPU seconds of a live process, from /proc (None where unavailable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise StackError(f"exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise StackError(f"{HOST}:{port} did not accept connections in time")
        time.sleep(0.05)


def _wait_for_http_ok(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    last = "no attempt"
    while True:
        if proc.poll() is not None:
            raise StackError(f"exited with code {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = repr(e)
        if time.monotonic() >= deadline:
            raise StackError(f"GET {url} did not return 200 in time (last: {last})")
        time.sleep(0.1)


@dataclass
class _Child:
    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
            )
        _live.add(self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _live.discard(proc)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


@dataclass
class Stack:
    """URIs of the two benchmark targets, plus the processes when we started them."""

    direct_uri: str
    proxy_uri: str
    started: bool = False
    workdir: Path | None = None
    # The proxy's admin endpoint (http://host:port), when we started it.
    admin_url: str | None = None
    _children: list[_Child] = field(default_factory=list)

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the processes this stack started, by name ("ferretdb", "proxy")."""
        return {c.name: c.proc.pid for c in self._children if c.proc is not None}

    def stop(self) -> None:
        # Proxy first, then its upstream.
        for child in reversed(self._children):
            child.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def external_stack(direct_uri: str, proxy_uri: str) -> Stack:
    """Targets that are already running (nothing to start or stop)."""
    return Stack(direct_uri=direct_uri, proxy_uri=proxy_uri)


def start_stack(timeout: float = 30.0, pool_max_size: int | None = None) -> Stack:
    """Start FerretDB and the proxy in a fresh temporary directory.

    The proxy runs with the default config, except ``upstream.pool.max_size`` when
    ``pool_max_size`` is given.  Children inherit this process's resource limits
    (RLIMIT_NOFILE included): raise them before calling this.
    """
    workdir = Path(tempfile.mkdtemp(prefix="mongoproxy-bench-"))
    data_dir, state_dir = workdir / "ferretdb-data", workdir / "ferretdb-state"
    data_dir.mkdir()
    state_dir.mkdir()
    fdb_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    direct_uri = f"mongodb://{HOST}:{fdb_port}/"

    ferretdb = _Child(
        "ferretdb",
        [
            find_ferretdb(),
            "--handler=sqlite",
            f"--sqlite-url=file:{data_dir}/",  # FerretDB wants the trailing slash
            f"--state-dir={state_dir}",
            f"--listen-addr={HOST}:{fdb_port}",
            "--debug-addr=127.0.0.1:0",
            "--telemetry=disable",
            "--log-level=WARN",
        ],
        workdir / "ferretdb.log",
    )
    config_path = workdir / "proxy.yaml"
    pool = "" if pool_max_size is None else f", pool: {{max_size: {int(pool_max_size)}}}"
    # Flow-style YAML by hand: no PyYAML dependency for three lines.
    config_path.write_text(
        f"listen: {{host: {HOST}, port: {proxy_port}}}\n"
        f"admin: {{host: {HOST}, port: {admin_port}}}\n"
        f'upstream: {{uri: "{direct_uri}"{pool}}}\n'
    )
    proxy = _Child(
        "proxy",
        [sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
        workdir / "proxy.log",
    )
    stack = Stack(
        direct_uri=direct_uri,
        proxy_uri=f"mongodb://{HOST}:{proxy_port}/",
        started=True,
        workdir=workdir,
        admin_url=f"http://{HOST}:{admin_port}",
        _children=[ferretdb, proxy],
    )

    current = ferretdb
    try:
        deadline = time.monotonic() + timeout
        ferretdb.spawn()
        assert ferretdb.proc is not None
        _wait_for_port(fdb_port, ferretdb.proc, deadline)

        current = proxy
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proxy.spawn(cwd=REPO_ROOT, env=env)
        assert proxy.proc is not None
        _wait_for_http_ok(f"http://{HOST}:{admin_port}/healthz", proxy.proc, deadline)
        _wait_for_port(proxy_port, proxy.proc, deadline)
    except BaseException as e:
        for child in reversed(stack._children):
            child.stop(timeout=2)
        stack.workdir = None  # keep the logs for the operator
        raise StackError(
            f"{current.name} failed to start: {e}\n"
            f"command: {' '.join(current.cmd)}\n"
            f"--- {current.log_path} (files kept in {workdir}) ---\n{current.log_tail()}"
        ) from e
    return stack
