"""Local dev stack for `make run`: FerretDB + Redis in the background, proxy in front.

FerretDB (SQLite handler) listens on 127.0.0.1:27018 and Redis on 127.0.0.1:6380,
both keeping their files under ./var.  Their output goes to var/log/*.log so the
terminal shows only the proxy.  Ctrl-C or SIGTERM stops all three and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
LOG_DIR = VAR / "log"
CONFIG = "config/dev.yaml"
FERRETDB_PORT = 27018
REDIS_PORT = 6380
PROXY_URI = "mongodb://127.0.0.1:27016/app"
ADMIN_URL = "http://127.0.0.1:9216/"
STOP_TIMEOUT = 10.0


def wait_for_port(name: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; see {LOG_DIR}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s")


def port_in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def spawn(cmd: list[str], log_name: str | None) -> subprocess.Popen[bytes]:
    # A new session: the terminal's Ctrl-C reaches only us, so we decide the
    # shutdown order (proxy first, then its backends).
    if log_name is None:
        return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    with open(LOG_DIR / log_name, "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(name: str, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"devstack: {name} did not stop in {STOP_TIMEOUT}s; killing", file=sys.stderr)
            proc.kill()
            proc.wait()


def main() -> int:
    os.chdir(ROOT)
    ferretdb = os.environ.get("MONGOPROXY_FERRETDB", str(ROOT / ".tools/bin/ferretdb"))
    redis_server = shutil.which("redis-server")
    if not os.access(ferretdb, os.X_OK):
        print(f"devstack: {ferretdb} missing; run `make tools`", file=sys.stderr)
        return 1
    if redis_server is None:
        print("devstack: redis-server missing; run `make tools`", file=sys.stderr)
        return 1
    for port in (FERRETDB_PORT, REDIS_PORT, 27016, 9216):
        if port_in_use(port):
            print(f"devstack: port {port} is already in use (another devstack?)", file=sys.stderr)
            return 1

    # FerretDB's SQLite handler does not create its data directory.
    for d in (VAR / "ferretdb", VAR / "ferretdb-state", VAR / "redis", LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    code = 0
    try:
        fdb = spawn(
            [
                ferretdb,
                "--handler=sqlite",
                "--sqlite-url=file:./var/ferretdb/",
                "--state-dir=./var/ferretdb-state",
                f"--listen-addr=127.0.0.1:{FERRETDB_PORT}",
                "--debug-addr=127.0.0.1:0",
                "--telemetry=disable",
                "--log-level=WARN",
            ],
            "ferretdb.log",
        )
        procs.append(("ferretdb", fdb))
        rds = spawn(
            [
                redis_server,
                "--bind", "127.0.0.1",
                "--port", str(REDIS_PORT),
                "--dir", "./var/redis",
                "--save", "",
                "--appendonly", "no",
            ],
            "redis.log",
        )  # fmt: skip
        procs.append(("redis", rds))
        wait_for_port("ferretdb", FERRETDB_PORT, fdb, 30.0)
        wait_for_port("redis", REDIS_PORT, rds, 10.0)
        if stopping.is_set():
            return 0

        print(
            "\n"
            "==============================================================\n"
            " mongoproxy dev stack\n"
            f"   connect:  {PROXY_URI}\n"
            f"   admin:    {ADMIN_URL}  (GET /healthz)\n"
            f"   upstream: FerretDB 127.0.0.1:{FERRETDB_PORT}, Redis 127.0.0.1:{REDIS_PORT}\n"
            f"   logs:     {LOG_DIR}/ferretdb.log, {LOG_DIR}/redis.log\n"
            " Ctrl-C stops everything.\n"
            "==============================================================\n",
            flush=True,
        )
        proxy = spawn([sys.executable, "-m", "proxy", "run", "--config", CONFIG], None)
        procs.insert(0, ("proxy", proxy))  # stopped first

        # Wait for a signal, or for any process to die on its own.
        while not stopping.wait(0.2):
            dead = [(n, p) for n, p in procs if p.poll() is not None]
            if dead:
                name, p = dead[0]
                print(f"devstack: {name} exited with code {p.returncode}", file=sys.stderr)
                code = p.returncode or 1
                break
    except RuntimeError as e:
        print(f"devstack: {e}", file=sys.stderr)
        code = 1
    finally:
        for name, p in procs:
            stop(name, p)
    if stopping.is_set():
        print("devstack: stopped", file=sys.stderr)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
