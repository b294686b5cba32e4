"""Process helpers: start/stop FerretDB, Redis and the proxy on free loopback ports.

Everything listens on 127.0.0.1 only.  Every started process is registered so an
interrupted test run (Ctrl-C, crash) still kills it at interpreter exit.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
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


class ToolMissingError(RuntimeError):
    """A required external binary is not installed; `make test` installs it."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until host:port accepts TCP connections.

    Raises TimeoutError, or RuntimeError at once if `proc` exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)


def wait_for_http(
    url: str,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until GET `url` answers 200 (raises like wait_for_port)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} was up")
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
            raise TimeoutError(f"GET {url} did not return 200 within {timeout}s (last: {last})")
        time.sleep(0.1)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Return base updated by extra, recursing into nested mappings."""
    out: dict[str, Any] = dict(base)
    for key, value in extra.items():
        cur = out.get(key)
        if isinstance(cur, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(cur, value)
        else:
            out[key] = value
    return out


class ManagedProcess:
    """A child process with its output in a log file, and stop/kill helpers."""

    name = "process"

    def __init__(self, workdir: Path | None = None) -> None:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"mongoproxy-{self.name}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # Subclasses provide the command line.
    def command(self) -> list[str]:
        raise NotImplementedError

    def _spawn(self, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        # Append so a restart keeps the earlier output for debugging.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
            )
        _live.add(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send `sig`, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _live.discard(proc)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (simulates a crash) and reap."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        _live.discard(proc)

    def _startup_failed(self, err: BaseException) -> RuntimeError:
        self.kill()
        return RuntimeError(
            f"{self.name} failed to start: {err}\n"
            f"command: {' '.join(self.command())}\n"
            f"--- {self.log_path} ---\n{self.log_text()}"
        )


class FerretDBProcess(ManagedProcess):
    """FerretDB with the SQLite handler and a private data dir, on a loopback port."""

    name = "ferretdb"

    def __init__(
        self,
        workdir: Path | None = None,
        port: int | None = None,
        binary: str | None = None,
        tls: tuple[Path, Path, Path | None] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA or None) files: FerretDB then listens with TLS
        only (no plaintext port), and with a CA file requires client certificates."""
        super().__init__(workdir)
        self.binary = binary or find_ferretdb()
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.data_dir = self.workdir / "data"
        self.state_dir = self.workdir / "state"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--handler=sqlite",
            # FerretDB wants a directory URI with a trailing slash.
            f"--sqlite-url=file:{self.data_dir}/",
            f"--state-dir={self.state_dir}",
            *self._listen_args(),
            # Port 0: parallel instances must not fight over the debug port.
            "--debug-addr=127.0.0.1:0",
            "--telemetry=disable",
            "--log-level=WARN",
        ]

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return [f"--listen-addr={self.address}"]
        cert, key, ca = self.tls
        return [
            "--listen-addr=",  # no plaintext port
            f"--listen-tls={self.address}",
            f"--listen-tls-cert-file={cert}",
            f"--listen-tls-key-file={key}",
            *([f"--listen-tls-ca-file={ca}"] if ca is not None else []),
        ]

    def start(self, timeout: float = 20.0) -> FerretDBProcess:
        # The SQLite handler does not create its directory.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._spawn()
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except (TimeoutError, RuntimeError) as e:
            raise self._startup_failed(e) from e
        return self

    def restart(self, timeout: float = 20.0) -> FerretDBProcess:
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)


class RedisProcess(ManagedProcess):
    """redis-server without persistence, on a loopback port."""

    name = "redis"

    def __init__(
        self,
        workdir: Path | None = None,
        port: int | None = None,
        binary: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA) files: TLS only (``--port 0``), and clients
        must present a certificate signed by the CA."""
        super().__init__(workdir)
        self.binary = binary or find_redis_server()
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.tls = tls

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--bind", self.host,
            *(["--port", str(self.port)] if self.tls is None else [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls[0]), "--tls-key-file", str(self.tls[1]),
                "--tls-ca-cert-file", str(self.tls[2]), "--tls-auth-clients", "yes"]),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self._spawn()
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except (TimeoutError, RuntimeError) as e:
            raise self._startup_failed(e) from e
        return self

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        self.stop()
        return self.start(timeout)


class ProxyProcess(ManagedProcess):
    """`python -m proxy run --config FILE` with a generated YAML config.

    The config is {listen, admin, upstream.uri} on free loopback ports, deep-merged
    with `extra`.  Ready when GET /healthz on the admin port is 200 and the listen
    port accepts connections.
    """

    name = "proxy"

    def __init__(
        self,
        upstream_uri: str,
        extra: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.host = HOST
        self.port = free_port()
        self.admin_port = free_port()
        base: dict[str, Any] = {
            "listen": {"host": self.host, "port": self.port},
            "admin": {"host": self.host, "port": self.admin_port},
            "upstream": {"uri": upstream_uri},
        }
        self.config: dict[str, Any] = deep_merge(base, extra or {})
        # The config may move the ports; follow it.
        self.port = int(self.config["listen"]["port"])
        self.admin_port = int(self.config["admin"]["port"])
        self.config_path = self.workdir / "proxy.yaml"
        self.extra_env = dict(env or {})

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)]

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self._spawn(cwd=REPO_ROOT, env=env)
        try:
            deadline = time.monotonic() + timeout
            wait_for_http(f"{self.admin_url}/healthz", timeout, self.proc)
            wait_for_port(self.host, self.port, max(0.5, deadline - time.monotonic()), self.proc)
        except (TimeoutError, RuntimeError) as e:
            raise self._startup_failed(e) from e
        return self


def _find_tool(env_var: str, default: Path | None, name: str, hint: str) -> str:
    explicit = os.environ.get(env_var)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ToolMissingError(f"{env_var}={explicit} is not an executable file; {hint}")
        return explicit
    if default is not None and os.access(default, os.X_OK):
        return str(default)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissingError(f"{name} not found (looked at ${env_var}, {default}, PATH); {hint}")


def find_ferretdb() -> str:
    """$MONGOPROXY_FERRETDB, else <repo>/.tools/bin/ferretdb (built by `make tools`)."""
    env_var = "MONGOPROXY_FERRETDB"
    explicit = os.environ.get(env_var)
    default = REPO_ROOT / ".tools" / "bin" / "ferretdb"
    path = explicit or str(default)
    if not os.access(path, os.X_OK):
        src = f"${env_var}" if explicit else "default location"
        raise ToolMissingError(
            f"FerretDB binary not found at {path} ({src}); run `make test` "
            "(or `make tools`) to build it, or set MONGOPROXY_FERRETDB"
        )
    return path


def find_redis_server() -> str:
    """$MONGOPROXY_REDIS_SERVER, else redis-server on PATH."""
    return _find_tool(
        "MONGOPROXY_REDIS_SERVER",
        None,
        "redis-server",
        "run `make test` (or `make tools`) to install it",
    )
