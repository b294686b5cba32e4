"""Graceful shutdown: SIGTERM/SIGINT stop accepting, drain in-flight requests within
``shutdown.drain_timeout_ms``, never lose an acknowledged write, and exit with code 0."""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from proxy.wire import HEADER_SIZE, decode_body, encode_op_msg, parse_op_msg
from tests.support import FerretDBProcess, ProxyFactory, ProxyProcess

Doc = dict[str, Any]
_ids = itertools.count(9000)


def direct(fdb: FerretDBProcess) -> MongoClient[Doc]:
    return MongoClient(fdb.uri, directConnection=True, serverSelectionTimeoutMS=5000)


def through(proxy: ProxyProcess, **kwargs: Any) -> MongoClient[Doc]:
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": 2000,
        "connectTimeoutMS": 2000,
        "socketTimeoutMS": 15000,
        "retryWrites": False,
        "retryReads": False,
        "w": 1,
    }
    options.update(kwargs)
    return MongoClient(proxy.uri, **options)


def wait_exit(proxy: ProxyProcess, timeout: float) -> tuple[int, float]:
    """Wait for the proxy process to exit: (exit code, seconds waited)."""
    assert proxy.proc is not None
    start = time.monotonic()
    try:
        code = proxy.proc.wait(timeout=timeout)
    except Exception:
        pytest.fail(f"proxy did not exit within {timeout} s; log:\n{proxy.log_text()}")
    return code, time.monotonic() - start


def connect_refused(proxy: ProxyProcess) -> bool:
    """True if a new TCP connection is refused (or at once closed without a reply)."""
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=2)
    except ConnectionRefusedError:
        return True
    with sock:
        # Accepted by the kernel: the proxy must not serve it.
        rid = next(_ids)
        try:
            sock.sendall(encode_op_msg(rid, 0, bson.encode({"ping": 1, "$db": "admin"})))
            data = sock.recv(HEADER_SIZE)
        except (ConnectionError, TimeoutError):
            return True
        return not data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def raw_ping(sock: socket.socket) -> tuple[int, Doc]:
    rid = next(_ids)
    sock.sendall(encode_op_msg(rid, 0, bson.encode({"ping": 1, "$db": "admin"})))
    header = recv_exact(sock, HEADER_SIZE)
    length, _, response_to, _ = struct.unpack("<iiii", header)
    body = recv_exact(sock, length - HEADER_SIZE)
    assert response_to == rid
    return response_to, decode_body(parse_op_msg(header + body))


class DelayRelay:
    """A TCP relay to FerretDB that can hold back the server's replies (a slow upstream)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.requests = 0  # client->server chunks seen
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delayed and self.delay:
                    time.sleep(self.delay)
                elif not delayed:
                    self.requests += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def relay(ferretdb: FerretDBProcess) -> Iterator[DelayRelay]:
    r = DelayRelay((ferretdb.host, ferretdb.port))
    yield r
    r.close()


# --------------------------------------------------------------------------- write load


def test_sigterm_during_write_load_loses_no_acknowledged_write(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    drain_s = 5.0
    proxy = proxy_factory(ferretdb.uri, {"shutdown": {"drain_timeout_ms": int(drain_s * 1000)}})
    with direct(ferretdb) as mc:
        mc.drop_database(db_name)

    stop = threading.Event()
    acked: list[str] = []
    failed: list[tuple[str, BaseException]] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        with through(proxy) as client:
            coll = client[db_name]["load"]
            for n in itertools.count():
                if stop.is_set():
                    return
                _id = f"{t}-{n}"
                try:
                    coll.insert_one({"_id": _id, "pad": "x" * 200})
                except PyMongoError as exc:
                    with lock:
                        failed.append((_id, exc))
                    time.sleep(0.05)
                else:
                    with lock:
                        acked.append(_id)

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(6)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 15
    while len(acked) < 200:
        assert time.monotonic() < deadline, f"load did not start: {failed[:3]}"
        time.sleep(0.02)

    proxy.send_signal(signal.SIGTERM)
    code, waited = wait_exit(proxy, drain_s + 5)
    refused = connect_refused(proxy)
    time.sleep(0.3)  # let the writers notice
    stop.set()
    for th in threads:
        th.join(20)
        assert not th.is_alive(), "a writer hangs after the proxy stopped"

    assert code == 0, proxy.log_text()
    assert waited < drain_s + 2, f"exit took {waited:.1f} s with a {drain_s} s drain time"
    assert refused
    assert failed, "no insert failed after SIGTERM: were writes still being served?"

    with direct(ferretdb) as mc:
        on_server = {d["_id"] for d in mc[db_name]["load"].find({}, {"_id": 1})}
        mc.drop_database(db_name)
    missing = sorted(set(acked) - on_server)
    assert not missing, f"{len(missing)} acknowledged inserts are missing: {missing[:10]}"
    assert "mongoproxy stopped" in proxy.log_text()


# --------------------------------------------------------------------------- drain


def test_sigterm_drains_in_flight_request_and_refuses_new_connections(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, relay: DelayRelay, db_name: str
) -> None:
    proxy = proxy_factory(relay.uri, {"shutdown": {"drain_timeout_ms": 8000}})
    result: dict[str, Any] = {}
    with through(proxy) as client, socket.create_connection(
        (proxy.host, proxy.port), timeout=10
    ) as idle:
        raw_ping(idle)  # an idle, already-working client connection
        client[db_name]["c"].find_one()  # handshake + pooled upstream connection
        relay.delay = 2.0
        seen = relay.requests

        def slow_insert() -> None:
            try:
                result["reply"] = client[db_name]["c"].insert_one({"_id": "in-flight"})
            except PyMongoError as exc:
                result["error"] = exc

        th = threading.Thread(target=slow_insert)
        th.start()
        deadline = time.monotonic() + 5
        while relay.requests == seen:
            assert time.monotonic() < deadline, "the insert never reached the upstream"
            time.sleep(0.01)
        sent_at = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        time.sleep(0.3)

        # Draining: still running, but no longer accepting connections.
        assert proxy.running, "proxy exited before its in-flight request finished"
        assert connect_refused(proxy), "a new connection was accepted after SIGTERM"

        # A request on an idle existing connection is refused with ShutdownInProgress
        # (or the connection is closed), never forwarded.
        try:
            _, doc = raw_ping(idle)
        except (ConnectionError, TimeoutError):
            pass
        else:
            assert doc.get("ok") == 0.0 and doc.get("code") == 91, doc

        th.join(15)
        assert not th.is_alive()
    assert "error" not in result, f"in-flight insert failed: {result.get('error')!r}"
    assert result["reply"].acknowledged
    code, _ = wait_exit(proxy, 10)
    assert code == 0, proxy.log_text()
    elapsed = time.monotonic() - sent_at
    assert elapsed < 8, f"shutdown took {elapsed:.1f} s for a 2 s request"
    relay.delay = 0
    with direct(ferretdb) as mc:
        assert mc[db_name]["c"].find_one({"_id": "in-flight"}) == {"_id": "in-flight"}
        mc.drop_database(db_name)


def test_sigterm_drain_timeout_bounds_shutdown(
    proxy_factory: ProxyFactory, relay: DelayRelay, db_name: str
) -> None:
    """A request slower than the drain time is answered ShutdownInProgress (or its
    connection closed) and the proxy still exits 0 shortly after the drain time."""
    proxy = proxy_factory(relay.uri, {"shutdown": {"drain_timeout_ms": 1000}})
    result: dict[str, Any] = {}
    with through(proxy) as client:
        client[db_name]["c"].find_one()
        relay.delay = 8.0
        seen = relay.requests

        def slow_find() -> None:
            start = time.monotonic()
            try:
                result["reply"] = client[db_name]["c"].find_one()
            except PyMongoError as exc:
                result["error"] = exc
            result["elapsed"] = time.monotonic() - start

        th = threading.Thread(target=slow_find)
        th.start()
        deadline = time.monotonic() + 5
        while relay.requests == seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proxy.send_signal(signal.SIGTERM)
        code, waited = wait_exit(proxy, 8)
        th.join(15)
    assert code == 0, proxy.log_text()
    assert waited < 4, f"exit took {waited:.1f} s with a 1 s drain time"
    assert "reply" not in result, "the request cannot have completed"
    err = result["error"]
    if isinstance(err, OperationFailure):
        assert err.code == 91, err.details
    assert result["elapsed"] < 6


# --------------------------------------------------------------------------- SIGINT


def test_sigint_exits_cleanly(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri)
    with through(proxy) as client:
        client[db_name]["c"].insert_one({"_id": 1})
    proxy.send_signal(signal.SIGINT)
    code, waited = wait_exit(proxy, 10)
    assert code == 0, proxy.log_text()
    assert waited < 5
    log = proxy.log_text()
    assert "Traceback" not in log, log
    assert "KeyboardInterrupt" not in log, log
    assert "mongoproxy stopped" in log
    assert connect_refused(proxy)
    with direct(ferretdb) as mc:
        mc.drop_database(db_name)


def test_sigterm_idle_proxy_exits_at_once(ferretdb: FerretDBProcess,
                                          proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(ferretdb.uri, {"shutdown": {"drain_timeout_ms": 10000}})
    # Idle client connections do not hold up shutdown.
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as idle:
        raw_ping(idle)
        proxy.send_signal(signal.SIGTERM)
        code, waited = wait_exit(proxy, 10)
        assert idle.recv(1) == b""
    assert code == 0, proxy.log_text()
    assert waited < 3, f"an idle proxy took {waited:.1f} s to stop"
    assert "Traceback" not in proxy.log_text()
