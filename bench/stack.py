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
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

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


def pin_process(pid: int, cpus: set[int]) -> None:
    """Restrict every thread of ``pid`` to ``cpus`` (threads it starts later inherit
    it); the Go runtime of FerretDB runs many threads, and affinity is per thread."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


def process_affinity(pid: int) -> set[int]:
    """The CPUs any thread of ``pid`` may run on."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            cpus |= os.sched_getaffinity(int(task.name))
    return cpus


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
    """URIs of the benchmark targets, plus the processes when we started them.

    ``direct_uri``/``proxy_uri``/``admin_url`` are the original two targets; ``targets``
    maps every target name this stack offers ("direct", "proxy", and when asked for
    "tcp", "proxy-cache") to its URI, ``admin_urls`` each proxy's admin endpoint, and
    ``unavailable`` names the targets asked for that could not be started, with why.
    """

    direct_uri: str
    proxy_uri: str
    started: bool = False
    workdir: Path | None = None
    # The proxy's admin endpoint (http://host:port), when we started it.
    admin_url: str | None = None
    _children: list[_Child] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)
    admin_urls: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = {"direct": self.direct_uri, "proxy": self.proxy_uri, **self.targets}
        if self.admin_url is not None:
            self.admin_urls.setdefault("proxy", self.admin_url)

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the processes this stack started, by name ("ferretdb", "proxy",
        "redis", "proxy-cache", "haproxy")."""
        return {c.name: c.proc.pid for c in self._children if c.proc is not None}

    def stop(self) -> None:
        # Proxies first, then their upstreams.
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


def stop_processes(procs: Sequence[BaseProcess], pipes: Sequence[Connection]) -> None:
    """Join load-generator processes (killing any still alive after 10 s), close pipes."""
    for w in procs:
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    for p in pipes:
        p.close()


def find_haproxy() -> str | None:
    """haproxy on PATH or in /usr/sbin (Debian's place; `make tools` installs it)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def find_redis() -> str | None:
    """$MONGOPROXY_REDIS_SERVER (as the tests take it), else redis-server on PATH."""
    return os.environ.get("MONGOPROXY_REDIS_SERVER") or shutil.which("redis-server")


def proxy_config_text(
    proxy_port: int,
    admin_port: int,
    upstream_uri: str,
    pool_max_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A proxy config file: listen/admin/upstream plus any further top-level sections.

    Written as JSON, which YAML reads as flow style.
    """
    upstream: dict[str, Any] = {"uri": upstream_uri}
    if pool_max_size is not None:
        upstream["pool"] = {"max_size": int(pool_max_size)}
    config: dict[str, Any] = {
        "listen": {"host": HOST, "port": proxy_port},
        "admin": {"host": HOST, "port": admin_port},
        "upstream": upstream,
        **(extra or {}),
    }
    return json.dumps(config, indent=2) + "\n"


def haproxy_config_text(listen_port: int, upstream_port: int, maxconn: int) -> str:
    """HAProxy in plain TCP mode: one frontend, one backend server, no checks."""
    return (
        "global\n"
        f"  maxconn {maxconn}\n"
        "defaults\n"
        "  mode tcp\n"
        "  timeout connect 5s\n"
        "  timeout client 1h\n"
        "  timeout server 1h\n"
        "frontend bench\n"
        f"  bind {HOST}:{listen_port}\n"
        f"  maxconn {maxconn}\n"
        "  default_backend upstream\n"
        "backend upstream\n"
        f"  server ferretdb {HOST}:{upstream_port} maxconn {maxconn}\n"
    )


def check_proxy_config(path: Path) -> str | None:
    """None when `mongoproxy check-config` accepts the file, else its complaint."""
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")[:500]


def start_stack(
    timeout: float = 30.0,
    pool_max_size: int | None = None,
    *,
    tcp: bool = False,
    relay: bool = False,
    cache: dict[str, Any] | None = None,
    proxy_extra: dict[str, Any] | None = None,
    tls: bool = False,
) -> Stack:
    """Start FerretDB and the proxy in a fresh temporary directory.

    The proxy runs with the default config, except ``upstream.pool.max_size`` when
    ``pool_max_size`` is given and the top-level sections in ``proxy_extra`` (e.g.
    ``{"tenancy": {...}}``).  Children inherit this process's resource limits
    (RLIMIT_NOFILE included): raise them before calling this.

    ``tcp``: also HAProxy in TCP mode in front of FerretDB (target "tcp").
    ``relay``: also ``python -m bench.relay`` in front of FerretDB (target "relay").
    ``tls``: FerretDB also listens with TLS (target "direct-tls"), and a second proxy,
    "proxy-tls", serves TLS to clients and uses TLS to FerretDB (both sides); the
    certificates are made by ``bench.tls.make_certs`` (trustme) in the stack's directory.
    ``cache``: also redis-server and a second proxy, "proxy-cache", whose config is the
    proxy's plus ``cache: <this dict>`` with ``redis_url`` filled in.  A target that
    cannot be had (no haproxy binary; a cache config the proxy rejects; a child that
    fails to start) is listed in ``Stack.unavailable`` with the reason instead of
    failing the whole stack.
    """
    workdir = Path(tempfile.mkdtemp(prefix="mongoproxy-bench-"))
    data_dir, state_dir = workdir / "ferretdb-data", workdir / "ferretdb-state"
    data_dir.mkdir()
    state_dir.mkdir()
    fdb_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    direct_uri = f"mongodb://{HOST}:{fdb_port}/"
    tls_setup = _tls_setup(workdir) if tls else None

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
            *(tls_setup.ferretdb_args if isinstance(tls_setup, _TLSSetup) else []),
        ],
        workdir / "ferretdb.log",
    )
    config_path = workdir / "proxy.yaml"
    config_path.write_text(
        proxy_config_text(proxy_port, admin_port, direct_uri, pool_max_size, proxy_extra)
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    current = ferretdb
    try:
        deadline = time.monotonic() + timeout
        ferretdb.spawn()
        assert ferretdb.proc is not None
        _wait_for_port(fdb_port, ferretdb.proc, deadline)
        if isinstance(tls_setup, _TLSSetup):
            _wait_for_port(tls_setup.fdb_port, ferretdb.proc, deadline)

        current = proxy
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
    try:
        if tcp:
            _start_haproxy(stack, workdir, fdb_port, timeout)
        if relay:
            _start_relay(stack, workdir, fdb_port, env, timeout)
        if isinstance(tls_setup, _TLSSetup):
            _start_tls_proxy(stack, workdir, tls_setup, pool_max_size, proxy_extra, env,
                             timeout)
        elif isinstance(tls_setup, str):
            stack.unavailable["direct-tls"] = stack.unavailable["proxy-tls"] = tls_setup
        if cache is not None:
            _start_cached_proxy(
                stack, workdir, direct_uri, cache, pool_max_size, proxy_extra, env, timeout
            )
    except BaseException:
        stack.stop()
        raise
    return stack


@dataclass(frozen=True)
class _TLSSetup:
    fdb_port: int
    ca: Path
    cert: Path
    key: Path

    @property
    def ferretdb_args(self) -> list[str]:
        return [f"--listen-tls={HOST}:{self.fdb_port}", f"--listen-tls-cert-file={self.cert}",
                f"--listen-tls-key-file={self.key}"]

    def uri(self, port: int) -> str:
        return f"mongodb://{HOST}:{port}/?tls=true&tlsCAFile={self.ca}"


def _tls_setup(workdir: Path) -> _TLSSetup | str:
    """Certificates for the TLS targets, or why there are none."""
    try:
        from bench.tls import make_certs

        certs = make_certs(workdir)
    except ImportError as e:
        return f"no certificates: {e} (pip install trustme, a dev dependency)"
    return _TLSSetup(free_port(), certs.ca, certs.cert, certs.key)


def _start_second_proxy(
    stack: Stack, name: str, config_path: Path, port: int, admin_port: int, uri: str,
    env: dict[str, str], timeout: float,
) -> None:
    """A proxy target besides the main one (TLS, cache): ``uri`` once it serves."""
    workdir = config_path.parent
    child = _Child(
        name, [sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
        workdir / f"{name}.log",
    )

    def ready(deadline: float) -> None:
        assert child.proc is not None
        _wait_for_http_ok(f"http://{HOST}:{admin_port}/healthz", child.proc, deadline)
        _wait_for_port(port, child.proc, deadline)

    if _start_optional(stack, child, ready, timeout, cwd=REPO_ROOT, env=env):
        stack.targets[name] = uri
        stack.admin_urls[name] = f"http://{HOST}:{admin_port}"


def _start_tls_proxy(
    stack: Stack, workdir: Path, tls: _TLSSetup, pool_max_size: int | None,
    proxy_extra: dict[str, Any] | None, env: dict[str, str], timeout: float,
) -> None:
    name = "proxy-tls"
    stack.targets["direct-tls"] = tls.uri(tls.fdb_port)
    port, admin_port = free_port(), free_port()
    listen_tls = {"listen": {"host": HOST, "port": port,
                             "tls": {"cert_file": str(tls.cert), "key_file": str(tls.key)}}}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(proxy_config_text(
        port, admin_port, tls.uri(tls.fdb_port), pool_max_size,
        {**(proxy_extra or {}), **listen_tls}))
    _start_second_proxy(stack, name, config_path, port, admin_port, tls.uri(port), env,
                        timeout)


def _start_optional(stack: Stack, child: _Child, ready: Callable[[float], None],
                    timeout: float, **spawn: Any) -> bool:
    """Spawn an optional child; on failure stop it and mark it unavailable."""
    stack._children.append(child)
    try:
        child.spawn(**spawn)
        ready(time.monotonic() + timeout)
    except (StackError, OSError) as e:
        child.stop(timeout=2)
        stack._children.remove(child)
        tail = child.log_tail(600).strip().replace("\n", " | ")
        stack.unavailable[child.name] = f"{child.name} failed to start: {e}; log: {tail}"
        return False
    return True


def _start_haproxy(stack: Stack, workdir: Path, fdb_port: int, timeout: float) -> None:
    binary = find_haproxy()
    if binary is None:
        stack.unavailable["tcp"] = "haproxy not found (run `make tools`)"
        return
    port = free_port()
    cfg = workdir / "haproxy.cfg"
    # Two descriptors per proxied connection, within the limit HAProxy inherits.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    maxconn = 20000 if soft == resource.RLIM_INFINITY else max(100, min(20000, (soft - 200) // 2))
    cfg.write_text(haproxy_config_text(port, fdb_port, maxconn))
    child = _Child("haproxy", [binary, "-db", "-f", str(cfg)], workdir / "haproxy.log")

    def ready(deadline: float) -> None:
        assert child.proc is not None
        _wait_for_port(port, child.proc, deadline)

    if _start_optional(stack, child, ready, timeout):
        stack.targets["tcp"] = f"mongodb://{HOST}:{port}/"
    else:
        stack.unavailable["tcp"] = stack.unavailable.pop("haproxy")


def _start_relay(stack: Stack, workdir: Path, fdb_port: int, env: dict[str, str],
                 timeout: float) -> None:
    port = free_port()
    child = _Child("relay", [sys.executable, "-m", "bench.relay", str(fdb_port), str(port)],
                   workdir / "relay.log")

    def ready(deadline: float) -> None:
        assert child.proc is not None
        _wait_for_port(port, child.proc, deadline)

    if _start_optional(stack, child, ready, timeout, cwd=REPO_ROOT, env=env):
        stack.targets["relay"] = f"mongodb://{HOST}:{port}/"


def _start_cached_proxy(
    stack: Stack,
    workdir: Path,
    direct_uri: str,
    cache: dict[str, Any],
    pool_max_size: int | None,
    proxy_extra: dict[str, Any] | None,
    env: dict[str, str],
    timeout: float,
) -> None:
    name = "proxy-cache"
    binary = find_redis()
    if binary is None:
        stack.unavailable[name] = "redis-server not found (run `make tools`)"
        return
    redis_port, port, admin_port = free_port(), free_port(), free_port()
    redis = _Child(
        "redis",
        [binary, "--port", str(redis_port), "--bind", HOST, "--save", "", "--appendonly",
         "no", "--dir", str(workdir)],
        workdir / "redis.log",
    )

    def redis_ready(deadline: float) -> None:
        assert redis.proc is not None
        _wait_for_port(redis_port, redis.proc, deadline)

    if not _start_optional(stack, redis, redis_ready, timeout):
        stack.unavailable[name] = stack.unavailable.pop("redis")
        return
    section = {"redis_url": f"redis://{HOST}:{redis_port}/0", **cache}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(
        proxy_config_text(
            port, admin_port, direct_uri, pool_max_size, {**(proxy_extra or {}), "cache": section}
        )
    )
    problem = check_proxy_config(config_path)
    if problem is not None:
        stack.unavailable[name] = f"the proxy rejects the cache config: {problem}"
        return
    _start_second_proxy(stack, name, config_path, port, admin_port,
                        f"mongodb://{HOST}:{port}/", env, timeout)
