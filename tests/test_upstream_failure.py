"""The upstream goes away: clients get prompt, correctly labelled errors, nothing hangs,
and the proxy recovers once the upstream is back.

Each test owns a FerretDB (so it can be stopped, killed and restarted) and a proxy in
front of it with short upstream timeouts.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import bson
import pytest
from bson.binary import UUID_SUBTYPE, Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from proxy.wire import HEADER_SIZE, decode_body, encode_op_msg, parse_op_msg
from tests.support import FerretDBFactory, FerretDBProcess, ProxyFactory, ProxyProcess
from tests.support.clients import direct_client as direct
from tests.support.clients import strict_client

UPSTREAM_CONFIG: dict[str, Any] = {
    "upstream": {
        "pool": {"connect_timeout_ms": 1000, "wait_queue_timeout_ms": 2000},
        "socket_timeout_ms": 5000,
        # The proxy waits this long for a usable upstream server before answering
        # FailedToSatisfyReadPreference (default 10 s).
        "server_selection_timeout_ms": 2000,
        "heartbeat_ms": 500,
    }
}
# A bound on hanging, not a performance assertion.
HANG_BOUND_S = 10.0
# HostUnreachable, NetworkTimeout, and FailedToSatisfyReadPreference once the proxy's
# monitor has seen the upstream down and server selection times out.
NETWORK_CODES = {6, 89, 133}

Doc = dict[str, Any]
_ids = itertools.count(5000)


def mongo(uri: str, **kwargs: Any) -> MongoClient[Doc]:
    """Shorter timeouts than the shared strict client: these tests stop servers."""
    return strict_client(uri, **{"serverSelectionTimeoutMS": 3000, "socketTimeoutMS": 8000,
                                  "connectTimeoutMS": 3000, **kwargs})


# --------------------------------------------------------------------------- raw wire


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_command(proxy: ProxyProcess, command: Doc) -> tuple[int, int, Doc]:
    """Send one OP_MSG on a fresh socket: (requestID, reply responseTo, reply document)."""
    rid = next(_ids)
    with socket.create_connection((proxy.host, proxy.port), timeout=HANG_BOUND_S) as sock:
        sock.sendall(encode_op_msg(rid, 0, bson.encode(command)))
        header = recv_exact(sock, HEADER_SIZE)
        length, _, response_to, _ = struct.unpack("<iiii", header)
        message = header + recv_exact(sock, length - HEADER_SIZE)
    return rid, response_to, decode_body(parse_op_msg(message))


def lsid() -> Doc:
    import uuid

    return {"id": Binary(uuid.uuid4().bytes, UUID_SUBTYPE)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def upstream(ferretdb_factory: FerretDBFactory) -> FerretDBProcess:
    return ferretdb_factory()


@pytest.fixture
def fproxy(upstream: FerretDBProcess, proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(upstream.uri, UPSTREAM_CONFIG)


def _code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, OperationFailure) else None


# --------------------------------------------------------------------------- (a) upstream stopped


@pytest.mark.parametrize("operation", ["find_one", "insert_one", "ping"])
def test_stopped_upstream_prompt_error(
    upstream: FerretDBProcess, fproxy: ProxyProcess, db_name: str, operation: str
) -> None:
    with mongo(fproxy.uri) as client:
        coll = client[db_name]["c"]
        coll.insert_one({"_id": "warm"})  # the pool holds a live connection now
        upstream.stop()
        for attempt in range(3):  # the stale pooled connection, then fresh connects
            start = time.monotonic()
            with pytest.raises(OperationFailure) as info:
                if operation == "find_one":
                    coll.find_one({"_id": "warm"})
                elif operation == "insert_one":
                    coll.insert_one({"_id": f"x{attempt}"})
                else:
                    client[db_name].command("ping")
            elapsed = time.monotonic() - start
            assert elapsed < HANG_BOUND_S, f"attempt {attempt} took {elapsed:.1f} s"
            assert info.value.code in NETWORK_CODES, info.value.details
            details = info.value.details or {}
            assert details.get("codeName") in {
                "HostUnreachable", "NetworkTimeout", "FailedToSatisfyReadPreference"}
            assert fproxy.running


def test_stopped_upstream_retryable_write_labels(
    upstream: FerretDBProcess, fproxy: ProxyProcess, db_name: str
) -> None:
    upstream.stop()
    retryable: Doc = {
        "insert": "c",
        "documents": [{"_id": 1}],
        "lsid": lsid(),
        "txnNumber": bson.int64.Int64(1),
        "$db": db_name,
    }
    start = time.monotonic()
    rid, response_to, doc = raw_command(fproxy, retryable)
    assert time.monotonic() - start < HANG_BOUND_S
    assert response_to == rid
    assert doc["ok"] == 0.0
    assert doc["code"] in NETWORK_CODES, doc
    # FerretDB is a standalone server and does not deduplicate by txnNumber: the label
    # would make the driver apply the write twice (a replica set gets it:
    # tests/test_failover_election.py).
    assert "RetryableWriteError" not in doc.get("errorLabels", []), doc
    assert "TransientTransactionError" not in doc.get("errorLabels", []), doc

    rid, response_to, doc = raw_command(
        fproxy, {"insert": "c", "documents": [{"_id": 2}], "$db": db_name}
    )
    assert response_to == rid
    assert doc["ok"] == 0.0
    assert doc["code"] in NETWORK_CODES, doc
    assert "RetryableWriteError" not in doc.get("errorLabels", []), doc

    in_txn: Doc = {
        "insert": "c",
        "documents": [{"_id": 3}],
        "lsid": lsid(),
        "txnNumber": bson.int64.Int64(1),
        "autocommit": False,
        "startTransaction": True,
        "$db": db_name,
    }
    rid, response_to, doc = raw_command(fproxy, in_txn)
    assert response_to == rid
    assert doc["code"] in NETWORK_CODES, doc
    assert "TransientTransactionError" in doc.get("errorLabels", []), doc
    assert "RetryableWriteError" not in doc.get("errorLabels", []), doc


def test_proxy_started_while_upstream_down_recovers(
    ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, db_name: str
) -> None:
    fdb = ferretdb_factory(start=False)
    proxy = proxy_factory(fdb.uri, UPSTREAM_CONFIG)
    with mongo(proxy.uri) as client:
        start = time.monotonic()
        with pytest.raises(OperationFailure) as info:
            client[db_name]["c"].find_one()
        assert time.monotonic() - start < HANG_BOUND_S
        assert info.value.code in NETWORK_CODES
        fdb.start()
        client[db_name]["c"].insert_one({"_id": 1})
        assert client[db_name]["c"].find_one() == {"_id": 1}


def test_blackhole_upstream_times_out(proxy_factory: ProxyFactory, db_name: str) -> None:
    """An upstream that accepts TCP but never answers: a prompt error, not a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        proxy = proxy_factory(f"mongodb://127.0.0.1:{port}/", UPSTREAM_CONFIG)
        with mongo(proxy.uri) as client:
            start = time.monotonic()
            with pytest.raises(OperationFailure) as info:
                client[db_name]["c"].find_one()
            elapsed = time.monotonic() - start
            assert elapsed < HANG_BOUND_S, elapsed
            # NetworkTimeout from the pool's connect timeout, or FailedToSatisfyReadPreference
            # once the proxy's monitor has given up on the silent server.
            assert info.value.code in {89, 133}, info.value.details
    finally:
        stop.set()
        thread.join(5)
        for sock in accepted:
            sock.close()
        listener.close()


# --------------------------------------------------------------------------- (b) SIGKILL mid-stream


@dataclass
class Outcome:
    started: float
    elapsed: float
    error: BaseException | None


@dataclass
class Worker:
    uri: str
    db: str
    index: int
    stop: threading.Event
    outcomes: list[Outcome] = field(default_factory=list)
    thread: threading.Thread | None = None

    def run(self) -> None:
        with mongo(self.uri) as client:
            coll = client[self.db]["load"]
            n = 0
            while not self.stop.is_set():
                n += 1
                start = time.monotonic()
                error: BaseException | None = None
                try:
                    if n % 2:
                        coll.insert_one({"_id": f"w{self.index}-{n}"})
                    else:
                        coll.find_one({"_id": f"w{self.index}-{n - 1}"})
                except PyMongoError as exc:
                    error = exc
                self.outcomes.append(Outcome(start, time.monotonic() - start, error))
                if error is not None:
                    time.sleep(0.02)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()


def _wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_upstream_killed_mid_stream_then_restarted(
    upstream: FerretDBProcess, fproxy: ProxyProcess, db_name: str
) -> None:
    stop = threading.Event()
    workers = [Worker(fproxy.uri, db_name, i, stop) for i in range(4)]
    for w in workers:
        w.start()
    try:
        _wait_until(lambda: all(len([o for o in w.outcomes if o.error is None]) >= 5
                                for w in workers), 15, "the load to be running")
        upstream.kill()
        killed_at = time.monotonic()
        _wait_until(lambda: all(any(o.error is not None and o.started > killed_at
                                    for o in w.outcomes) for w in workers),
                    HANG_BOUND_S, "every worker to see an error after the kill")
        time.sleep(0.5)  # keep failing for a while: nothing may pile up or hang
        upstream.start()
        restarted_at = time.monotonic()

        def all_recovered() -> bool:
            return all(
                sum(1 for o in w.outcomes if o.started > restarted_at and o.error is None) >= 3
                for w in workers
            )

        _wait_until(all_recovered, 15, "every worker to succeed again after the restart")
    finally:
        stop.set()
        for w in workers:
            assert w.thread is not None
            w.thread.join(HANG_BOUND_S + 5)
            assert not w.thread.is_alive(), f"worker {w.index} hangs"

    errors = [o for w in workers for o in w.outcomes if o.error is not None]
    assert errors, "the kill produced no errors at all"
    for o in errors:
        assert isinstance(o.error, OperationFailure), repr(o.error)
        assert o.error.code in NETWORK_CODES, o.error.details
    slowest = max(o.elapsed for w in workers for o in w.outcomes)
    assert slowest < HANG_BOUND_S, f"an operation took {slowest:.1f} s"
    assert fproxy.running

    # Once a worker has succeeded after the restart, it never fails again: dead pooled
    # connections were discarded rather than handed out later.
    for w in workers:
        after = [o for o in w.outcomes if o.started > restarted_at]
        first_ok = next(i for i, o in enumerate(after) if o.error is None)
        late = [o.error for o in after[first_ok:] if o.error is not None]
        assert not late, f"worker {w.index} failed after recovering: {late[:3]}"

    with direct(upstream) as client:
        assert client[db_name]["load"].count_documents({}) > 0


def _warm_pool(uri: str, db: str, width: int) -> None:
    """Leave ``width`` idle upstream connections in the proxy's pool."""
    barrier = threading.Barrier(width)
    failures: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with mongo(uri) as client:
                client[db]["c"].find_one()  # connection + handshake done
                barrier.wait(10)
                # A slowish command in parallel forces separate upstream connections.
                client[db]["c"].insert_many([{"_id": f"{i}-{k}", "pad": "x" * 1000}
                                             for k in range(200)])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures


def test_dead_idle_connections_are_not_reused(
    upstream: FerretDBProcess, fproxy: ProxyProcess, db_name: str
) -> None:
    """Idle pooled connections that died with the upstream must not fail later requests.

    The pool holds several idle connections; FerretDB is SIGKILLed (every one of them
    gets FIN/RST) and started again before any request. Every request afterwards must
    succeed: a closed idle connection is detectable before it is handed out.
    """
    _warm_pool(fproxy.uri, db_name, 6)
    upstream.kill()
    upstream.start()
    failures: list[str] = []
    with mongo(fproxy.uri) as client:
        for i in range(12):
            try:
                client[db_name]["c"].find_one({"_id": f"0-{i}"})
            except PyMongoError as exc:
                failures.append(f"request {i}: {exc}")
    assert not failures, (
        f"{len(failures)} of 12 requests after the restart failed:\n" + "\n".join(failures)
    )


# --------------------------------------------------------------------------- (c) retryable writes


def test_write_held_while_upstream_restarts_lands_once(
    upstream: FerretDBProcess, fproxy: ProxyProcess, db_name: str
) -> None:
    """pymongo (retryWrites=True) inserts while FerretDB is down for 0.5 s: the proxy's
    connect is refused before anything was sent, so the request waits in server
    selection and goes to the restarted server; the driver makes one attempt and the
    document lands exactly once. (A failure after sending is never labelled
    RetryableWriteError for FerretDB, a standalone server: see the labels test.)"""
    from pymongo import monitoring

    class Listener(monitoring.CommandListener):
        def __init__(self) -> None:
            self.inserts: list[monitoring.CommandStartedEvent] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "insert":
                self.inserts.append(event)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    listener = Listener()
    with mongo(fproxy.uri, retryWrites=True, event_listeners=[listener]) as client:
        coll = client[db_name]["c"]
        coll.insert_one({"_id": "warm"})
        upstream.stop()

        def restart_soon() -> None:
            time.sleep(0.5)
            upstream.start()

        restarter = threading.Thread(target=restart_soon)
        restarter.start()
        try:
            coll.insert_one({"_id": "held"})
        finally:
            restarter.join(30)
    assert len(listener.inserts) == 2, "the held insert was attempted more than once"
    with direct(upstream) as client:
        assert client[db_name]["c"].count_documents({"_id": "held"}) == 1
