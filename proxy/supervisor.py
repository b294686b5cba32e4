"""``listen.workers: N`` (N > 1): the process the operator starts, owning N workers.

Each worker (:mod:`proxy.worker`, ``python -m proxy worker ...``) is a whole proxy
binding the listening port with ``SO_REUSEPORT``; the kernel spreads new connections
over them, and a client connection lives in the worker that accepted it. The supervisor
serves no client; it

* **replaces** a worker that exits at once (one that crashes again within
  ``STABLE_S`` of its start is restarted after a growing delay, and after
  ``CRASH_LIMIT`` such exits in a row the supervisor stops every worker and exits 1,
  saying which worker, how often and how it last ended);
* on **SIGHUP** reloads its own view of the file (so a replacement starts with the
  rules the others run) and sends SIGHUP to every worker; on **SIGTERM/SIGINT** sends
  SIGTERM to every worker, each drains within ``shutdown.drain_timeout_ms``, then exits;
* serves the host's **admin endpoint** (:mod:`proxy.supervisor_admin`);
* writes the workers' **slow-log** lines (read from their stdout pipes) to the one
  slow log: one stream, one process rotating the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from prometheus_client.metrics_core import Metric

from proxy.admin.http import AdminServer
from proxy.config import Config
from proxy.observe.slowlog import SlowLog
from proxy.reload import ConfigReloader
from proxy.supervisor_admin import WorkerView, endpoint_routes, http_get
from proxy.worker import snapshot_text

if TYPE_CHECKING:
    from proxy.app import Proxy

__all__ = ["CRASH_LIMIT", "STABLE_S", "Supervisor", "run"]

log = logging.getLogger("mongoproxy.supervisor")

# A worker that exits sooner than this after its start counts as a crash in a row.
STABLE_S = 10.0
# Crashes in a row of one worker before the supervisor gives up.
CRASH_LIMIT = 5
# Delay before the n-th restart in a row (n >= 2): BACKOFF_S * 2**(n-2), at most BACKOFF_MAX_S.
BACKOFF_S = 0.25
BACKOFF_MAX_S = 5.0
# After the drain time, how long workers get to close before they are killed.
EXIT_GRACE_S = 5.0
# A worker's stdout line (one slow-log line) longer than this is dropped, not fatal:
# the pipe must keep being read or the worker blocks on its next write.
MAX_LOG_LINE = 16 * 1024 * 1024


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def check_port_free(host: str, port: int) -> None:
    """Raise OSError if something accepts connections on host:port already: workers bind
    it with SO_REUSEPORT, which would share it silently with an older proxy still
    running. (A connect, not a bind: a bind without SO_REUSEPORT trips on the TIME_WAIT
    connections an earlier proxy left.)"""
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        target = address
        if address[0] in ("0.0.0.0", "::"):
            target = ("127.0.0.1" if family == socket.AF_INET else "::1", *address[1:])
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(target)
            except OSError:
                continue  # refused (free), or unreachable: the workers' bind will tell
        raise OSError(errno.EADDRINUSE, f"{host}:{port} is in use: something accepts "
                      f"connections there (another mongoproxy?)")


class _LineStream:
    """Standard output for the workers' slow-log lines: whole lines per ``os.write``, in
    pieces of at most PIPE_BUF where the lines allow, so a worker's log line (stderr,
    often the same file or pipe) never lands inside one."""

    def write(self, text: str) -> int:
        data = text.encode()
        start = 0
        while start < len(data):
            end = start + select.PIPE_BUF
            if end >= len(data):
                end = len(data)
            else:
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else (data.find(b"\n", end) + 1 or len(data))
            piece = memoryview(data)[start:end]
            while piece:
                piece = piece[os.write(sys.stdout.fileno(), piece):]
            start = end
        return len(text)

    def flush(self) -> None:
        pass


class _View:
    """The supervisor's view of the configuration, in the shape
    :class:`~proxy.reload.ConfigReloader` updates (``.config``, ``.observer.metrics``):
    its reload rules are the workers', by construction."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.observer = self
        self.metrics = self
        self.reloads = {True: 0, False: 0}

    def config_reloaded(self, ok: bool) -> None:
        self.reloads[ok] += 1


class _ViewReloader(ConfigReloader):
    """Counts the supervisor's successful reloads (SIGHUP or its file watch), so a
    worker that started before one can be told to catch up."""

    generation = 0

    def reload(self) -> bool:
        ok = super().reload()
        if ok:
            self.generation += 1
        return ok


class _Slot:
    def __init__(self, index: int, admin_socket: str) -> None:
        self.index = index
        self.admin_socket = admin_socket
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.crashes = 0  # in a row, each within STABLE_S of its start
        self.generation = 0  # the supervisor's reload generation its snapshot has
        self.tasks: set[asyncio.Task[None]] = set()


class Supervisor:
    def __init__(self, config: Config, path: Path, log_level: str = "INFO") -> None:
        self.view = _View(config)
        self.path = path
        self.log_level = log_level
        self.count = config.listen.worker_count()
        self.runtime = Path(tempfile.mkdtemp(prefix="mongoproxy-workers-"))
        self.slots = [_Slot(i, str(self.runtime / f"worker-{i}.sock")) for i in range(self.count)]
        self.slowlog = SlowLog(config.observability, stream=cast("IO[str]", _LineStream()))
        self.restarts = 0
        self.stopping = False
        self.failure: str | None = None
        self.stop = asyncio.Event()
        self.reloader = _ViewReloader(cast("Proxy", self.view), path)
        self.admin = AdminServer(*endpoint_routes(self._running, self.count, self._facts,
                                                  self._own_metrics),
                                 token=config.admin.token)
        self._started = time.monotonic()

    @property
    def config(self) -> Config:
        return self.view.config

    def _running(self) -> list[WorkerView]:
        return [WorkerView(s.index, s.proc.pid, s.admin_socket) for s in self.slots
                if s.proc is not None and s.proc.returncode is None]

    def _facts(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "shutting_down": self.stopping,
            "workers_configured": self.count,
            "workers_running": len(self._running()),
            "worker_restarts": self.restarts,
        }

    def _own_metrics(self) -> list[Metric]:
        def gauge(name: str, doc: str, value: float) -> Metric:
            metric = Metric(name, doc, "gauge")
            metric.add_sample(name, {}, value)
            return metric

        restarts = Metric("mongoproxy_worker_restarts", "Workers replaced after they exited",
                          "counter")
        restarts.add_sample("mongoproxy_worker_restarts_total", {}, float(self.restarts))
        return [gauge("mongoproxy_workers", "Worker processes configured", self.count),
                gauge("mongoproxy_workers_running", "Worker processes running",
                      len(self._running())),
                restarts]

    async def start(self) -> None:
        listen = self.config.listen
        check_port_free(listen.host, listen.port)
        await self.admin.start(self.config.admin.host, self.config.admin.port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.reloader.start()
        for slot in self.slots:
            await self._spawn(slot)
        log.info("mongoproxy supervisor: %d workers on %s:%d (SO_REUSEPORT), admin %s",
                 self.count, listen.host, listen.port, self.admin.address)

    async def _spawn(self, slot: _Slot) -> None:
        generation = self.reloader.generation  # before the snapshot: never newer than it
        snapshot = self.runtime / f"worker-{slot.index}.json"
        snapshot.write_text(snapshot_text(self.config), encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.admin_socket)
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "worker", "--config", str(self.path),
            "--snapshot", str(snapshot), "--index", str(slot.index), "--count",
            str(self.count), "--admin-socket", slot.admin_socket, "--log-level",
            self.log_level,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            limit=MAX_LOG_LINE,
            # SIGHUP ignored until the worker installs its reload handler: a reload
            # while it starts must not kill it (SIG_IGN survives exec, handlers do not).
            preexec_fn=_ignore_sighup,
        )
        slot.started = time.monotonic()
        slot.generation = generation
        if self.stopping:  # a stop came while it was being started
            slot.proc.send_signal(signal.SIGTERM)
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)
        for job in (self._pump(slot.proc), self._watch(slot, slot.proc),
                    self._catch_up(slot, slot.proc)):
            task = asyncio.create_task(job)
            slot.tasks.add(task)
            task.add_done_callback(slot.tasks.discard)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """The worker's slow-log lines (its stdout) into the one slow log."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over MAX_LOG_LINE: asyncio dropped it; go on
                log.warning("worker pid %d wrote a log line over %d bytes; dropped",
                            proc.pid, MAX_LOG_LINE)
                continue
            if not line:
                return
            self.slowlog.append(line.decode(errors="replace").rstrip("\n"))

    async def _watch(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping:
            return
        uptime = time.monotonic() - slot.started
        slot.crashes = slot.crashes + 1 if uptime < STABLE_S else 1
        how = describe_exit(code)
        if slot.crashes >= CRASH_LIMIT:
            self.failure = (f"worker {slot.index} exited {slot.crashes} times in a row, each "
                            f"within {STABLE_S:.0f} s of its start (last: {how}); giving up")
            log.error("%s", self.failure)
            self._request_stop()
            return
        delay = 0.0 if slot.crashes == 1 else min(BACKOFF_MAX_S,
                                                    BACKOFF_S * 2 ** (slot.crashes - 2))
        log.warning("worker %d (pid %d) %s after %.1f s; replacing it%s", slot.index, proc.pid,
                    how, uptime, f" in {delay:.2f} s" if delay else "")
        await asyncio.sleep(delay)
        if not self.stopping:
            self.restarts += 1
            try:
                await self._spawn(slot)
            except OSError as exc:  # no process or no snapshot file: stop, saying why
                self.failure = f"could not start worker {slot.index}: {exc}"
                log.error("%s", self.failure)
                self._request_stop()

    def _request_stop(self) -> None:
        self.stopping = True  # from now on nothing is (re)started
        self.stop.set()

    async def _catch_up(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        """Once the worker serves, SIGHUP it if the supervisor reloaded since its
        snapshot was written: a reload while it started (SIGHUP was ignored, and its
        file watch took the edited file as its starting point) would be missed."""
        while proc.returncode is None and not self.stopping:
            try:
                status, _body = await http_get(slot.admin_socket, "/healthz", 1.0)
            except (OSError, TimeoutError, ConnectionError):
                status = 0
            if status == 200:
                if slot.generation != self.reloader.generation:
                    log.info("worker %d started before the last reload: reloading it",
                             slot.index)
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGHUP)
                return
            await asyncio.sleep(0.1)

    def reload(self) -> None:
        """SIGHUP: the supervisor's view, then every worker."""
        self.reloader.reload()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGHUP)

    async def shutdown(self) -> None:
        """SIGTERM every worker; each drains within shutdown.drain_timeout_ms."""
        self.stopping = True
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        limit = self.config.shutdown.drain_timeout_ms / 1000 + EXIT_GRACE_S
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        _done, late = await asyncio.wait(waits, timeout=limit) if waits else (set(), set())
        if late:
            log.error("%d workers still running %.1f s after SIGTERM: killing them",
                      len(late), limit)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.wait(late, timeout=5)
        tasks = [t for s in self.slots for t in s.tasks]
        if tasks:  # the pumps end at the pipes' EOF: the last slow-log lines get written
            await asyncio.wait(tasks, timeout=5)
        await self.reloader.close()
        self.slowlog.close()
        await self.admin.close()
        shutil.rmtree(self.runtime, ignore_errors=True)


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def supervise(config: Config, path: Path, log_level: str) -> int:
    supervisor = Supervisor(config, path, log_level)
    try:
        await supervisor.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await supervisor.shutdown()
        return 1
    await supervisor.stop.wait()
    if supervisor.failure is None:
        log.info("signal received: draining %d workers", supervisor.count)
    await supervisor.shutdown()
    if supervisor.failure is not None:
        log.error("mongoproxy stopped: %s", supervisor.failure)
        return 1
    log.info("mongoproxy stopped")
    return 0


def run(config: Config, path: Path, log_level: str = "INFO") -> int:
    """The supervisor's exit status: 0 after a signal, 1 when a worker crash-looped."""
    return asyncio.run(supervise(config, path, log_level))
