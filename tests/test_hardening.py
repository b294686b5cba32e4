"""Hostile clients against a proxy in front of the real FerretDB (issue 15).

Each test is one finding of the issue, with raw sockets where a driver would not send
the hostile input, and pymongo for the well-behaved client whose operations must all
succeed while the attack runs (outcomes, never timings).
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
from bson.min_key import MinKey
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from proxy.identity.credentials import hash_password
from proxy.wire import OpCode
from tests.support import FerretDBProcess, ProxyFactory, ProxyProcess
from tests.test_bad_input import connect, negotiate, next_id, op_msg, raw_message, read_reply

Doc = dict[str, Any]
PASSWORD = "right-password"


def _users() -> list[Doc]:
    return [{"username": "app", "password_sha256": hash_password(PASSWORD, iterations=4096),
             "tenant": "acme"}]


def _metric(proxy: ProxyProcess, name: str) -> float:
    text = urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _closed_by_proxy(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the proxy closed the socket (EOF or reset), reading whatever comes."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


class GoodClient:
    """A well-behaved pymongo client reading in a loop on its own thread."""

    def __init__(self, proxy: ProxyProcess, db: str, **kwargs: Any) -> None:
        self.client: MongoClient[Doc] = MongoClient(proxy.uri, **kwargs)
        self.coll = self.client[db].good
        self.coll.insert_one({"_id": 1, "tenant_id": "acme"})
        self.ops = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                assert self.coll.find_one({"_id": 1, "tenant_id": "acme"}) is not None
                self.ops += 1
            except BaseException as exc:  # every failure is a finding
                self.errors.append(exc)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


# --------------------------------------------------------------------------- 1: compression


@pytest.fixture
def users_proxy(ferretdb: FerretDBProcess, proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(ferretdb.uri, {"tenancy": {"users": _users()}})


def test_compression_bomb_before_login_is_refused_unread(users_proxy: ProxyProcess) -> None:
    """Before login a compressed message may not declare more than the pre-auth limit:
    a 47 KB zlib bomb of 48 MB is refused from its header, nothing is inflated."""
    sock = connect(users_proxy)
    negotiate(sock, ["zlib"])
    rid = next_id()
    bomb = zlib.compress(b"\x00" * 40_000_000, 9)
    rest = struct.pack("<iiB", OpCode.OP_MSG, 40_000_000, 2) + bomb
    sock.sendall(raw_message(rid, OpCode.OP_COMPRESSED, rest))
    reply = read_reply(sock)
    assert reply.response_to == rid and reply.doc["code"] == 17, reply.doc
    assert "uncompressedSize" in reply.doc["errmsg"] and "65520" in reply.doc["errmsg"]


def test_large_compressed_messages_do_not_stop_other_clients(
    ferretdb: FerretDBProcess, proxy: ProxyProcess, db_name: str
) -> None:
    """Bombs of 40 MB from a client that negotiated zlib are inflated off the event
    loop: a well-behaved client's reads all succeed while they arrive."""
    bomb = zlib.compress(b"\x00" * 40_000_000, 9)
    with GoodClient(proxy, db_name) as good:
        sock = connect(proxy)
        negotiate(sock, ["zlib"])
        for _ in range(5):
            rid = next_id()
            rest = struct.pack("<iiB", OpCode.OP_MSG, 40_000_000, 2) + bomb
            sock.sendall(raw_message(rid, OpCode.OP_COMPRESSED, rest))
            reply = read_reply(sock)  # the inflated body is not an OP_MSG: an error
            assert reply.response_to == rid and reply.doc["ok"] == 0.0
        sock.close()
        time.sleep(0.3)
    assert good.ops > 0 and not good.errors, good.errors[:3]


# --------------------------------------------------------------------------- 2: outliers


def test_one_client_cannot_evict_the_server(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """FerretDB drops the connection on ``{ping: 1, x: MinKey()}``. That fails the
    attacker's request only: the server is not marked down for everyone (with a 10 s
    heartbeat and a 300 ms selection timeout, a mark would fail the good client)."""
    proxy = proxy_factory(ferretdb.uri, {"upstream": {
        "members": [{"host": ferretdb.address, "role": "primary"}],
        "heartbeat_ms": 10_000, "server_selection_timeout_ms": 300}})
    with GoodClient(proxy, db_name, retryReads=False) as good:
        sock = connect(proxy)
        for _ in range(15):
            rid = next_id()
            sock.sendall(op_msg({"ping": 1, "x": MinKey(), "$db": "admin"}, rid))
            reply = read_reply(sock)
            assert reply.response_to == rid and reply.doc["codeName"] == "HostUnreachable"
            time.sleep(0.05)
        sock.close()
    assert good.ops > 0 and not good.errors, good.errors[:3]
    assert _metric(proxy, "mongoproxy_upstream_ejections_total") == 0


def test_a_logged_in_client_cannot_evict_the_server(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """The same with users: before login the MinKey ping is answered by the proxy (see
    the pre-auth tests); after login it reaches FerretDB, which drops the connection,
    and still only the attacker's request fails."""
    proxy = proxy_factory(ferretdb.uri, {
        "tenancy": {"users": _users()},
        "upstream": {"members": [{"host": ferretdb.address, "role": "primary"}],
                     "heartbeat_ms": 10_000, "server_selection_timeout_ms": 300}})
    login = {"username": "app", "password": PASSWORD, "authMechanism": "SCRAM-SHA-256"}
    with GoodClient(proxy, db_name, retryReads=False, **login) as good:
        attacker: MongoClient[Doc] = MongoClient(proxy.uri, retryReads=False, **login)
        for _ in range(10):
            with pytest.raises(OperationFailure) as dropped:
                attacker.admin.command({"ping": 1, "x": MinKey()})
            assert dropped.value.code == 6, dropped.value.details
            time.sleep(0.05)
        attacker.close()
    assert good.ops > 0 and not good.errors, good.errors[:3]
    assert _metric(proxy, "mongoproxy_upstream_ejections_total") == 0


# --------------------------------------------------------------------------- 5: limits


def test_connections_beyond_max_connections_are_refused_and_logged(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(ferretdb.uri, {"listen": {"max_connections": 3}})
    kept = [connect(proxy) for _ in range(3)]
    for sock in kept:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
        assert read_reply(sock).doc["ok"] == 1.0
    extra = connect(proxy)
    assert _closed_by_proxy(extra)
    assert _wait_until(lambda: "refused client connection" in proxy.log_text())
    assert "listen.max_connections" in proxy.log_text()
    kept.pop().close()
    assert _wait_until(lambda: _metric(proxy, "mongoproxy_client_connections ") <= 2)
    again = connect(proxy)
    again.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
    assert read_reply(again).doc["ok"] == 1.0


class _FewDescriptors(ProxyProcess):
    """The proxy run under ``prlimit --nofile=300:300``."""

    def command(self) -> list[str]:
        return ["prlimit", "--nofile=300:300", *super().command()]


def test_connections_stay_below_the_descriptor_limit_and_say_so(
    ferretdb: FerretDBProcess, tmp_path: Path
) -> None:
    """uvloop accepts and closes connections silently at EMFILE: the proxy lowers its
    connection limit below the descriptor limit at start (with a warning) and refuses
    the excess with a log line, so it never gets there; a freed slot serves again."""
    proxy = _FewDescriptors(ferretdb.uri, workdir=tmp_path).start()
    try:
        assert "listen.max_connections 10000 lowered to 134" in proxy.log_text()
        socks = []
        for _ in range(140):
            socks.append(connect(proxy))
        served = 0
        for sock in socks:
            try:
                sock.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
                served += read_reply(sock).doc["ok"] == 1.0
            except (ConnectionError, OSError):
                pass
        assert served == 134, served
        assert _wait_until(lambda: "the file descriptor limit" in proxy.log_text())
        for sock in socks:
            sock.close()
        assert _wait_until(lambda: _metric(proxy, "mongoproxy_client_connections ") == 0)
        again = connect(proxy)
        again.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
        assert read_reply(again).doc["ok"] == 1.0
        again.close()
    finally:
        proxy.stop()


def test_idle_connection_is_closed(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(ferretdb.uri, {"listen": {"idle_timeout_ms": 300}})
    sock = connect(proxy)
    sock.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
    assert read_reply(sock).doc["ok"] == 1.0
    assert _closed_by_proxy(sock)
    assert "idle timeout" in proxy.log_text()


def test_login_timeout_spares_handshake_only_connections(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    """A connection that asked for anything but the handshake must log in within
    login_timeout_ms; a driver monitor (hello only) is never asked to."""
    proxy = proxy_factory(ferretdb.uri, {"tenancy": {"users": _users()},
                                         "listen": {"login_timeout_ms": 300}})
    monitor, loiterer = connect(proxy), connect(proxy)
    loiterer.sendall(op_msg({"ping": 1, "$db": "admin"}, next_id()))
    assert read_reply(loiterer).doc["ok"] == 1.0
    for _ in range(3):
        monitor.sendall(op_msg({"hello": 1, "$db": "admin"}, next_id()))
        assert read_reply(monitor).doc["ok"] == 1.0
        time.sleep(0.25)
    assert _closed_by_proxy(loiterer)
    assert "login timeout" in proxy.log_text()
    monitor.sendall(op_msg({"hello": 1, "$db": "admin"}, next_id()))
    assert read_reply(monitor).doc["ok"] == 1.0


def test_preauth_message_size_limit(users_proxy: ProxyProcess) -> None:
    """Before login a 100 KB message is refused from its header (and the connection
    closed: the stream cannot be re-framed without reading it)."""
    sock = connect(users_proxy)
    rid = next_id()
    sock.sendall(op_msg({"ping": 1, "pad": "x" * 100_000, "$db": "admin"}, rid))
    reply = read_reply(sock)
    assert reply.response_to == rid and reply.doc["ok"] == 0.0
    assert "65536" in reply.doc["errmsg"], reply.doc
    assert _closed_by_proxy(sock)


def test_a_client_that_never_reads_is_dropped(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """A client that does not read an 8 MB reply is paused, then dropped after the
    write timeout: its reply is not held for ever."""
    proxy = proxy_factory(ferretdb.uri, {"listen": {"write_timeout_ms": 500}})
    direct: MongoClient[Doc] = MongoClient(ferretdb.uri)
    direct[db_name].big.insert_many([{"_id": i, "pad": "x" * 100_000} for i in range(80)])
    direct.close()
    sock = connect(proxy)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(op_msg({"find": "big", "batchSize": 80, "$db": db_name}, next_id()))
    assert _wait_until(lambda: "write timeout" in proxy.log_text(), timeout=20)
    assert _wait_until(lambda: _metric(proxy, "mongoproxy_client_connections ") == 0)
    sock.close()


# --------------------------------------------------------------------------- 6: pre-auth


@pytest.mark.parametrize("command", [
    {"listDatabases": 1, "$db": "admin"},
    {"listCollections": 1, "$db": "app"},
    {"find": "tasks", "$db": "app"},
    {"connectionStatus": 1, "$db": "admin"},
])
def test_before_login_nothing_names_databases(users_proxy: ProxyProcess, command: Doc) -> None:
    sock = connect(users_proxy)
    rid = next_id()
    sock.sendall(op_msg(command, rid))
    reply = read_reply(sock)
    assert reply.response_to == rid and reply.doc["code"] == 13, reply.doc
    assert "requires authentication" in reply.doc["errmsg"]
    assert "databases" not in reply.doc and "cursor" not in reply.doc


def test_before_login_allowlist_is_answered_by_the_proxy(users_proxy: ProxyProcess) -> None:
    """ping and a reduced buildInfo answer before login without reaching FerretDB: the
    ping that would make FerretDB drop its connection is just ok."""
    sock = connect(users_proxy)
    rid = next_id()
    sock.sendall(op_msg({"ping": 1, "x": MinKey(), "$db": "admin"}, rid))
    assert read_reply(sock).doc == {"ok": 1.0}
    rid = next_id()
    sock.sendall(op_msg({"buildInfo": 1, "$db": "admin"}, rid))
    info = read_reply(sock).doc
    assert set(info) == {"version", "versionArray", "ok"}, info


# --------------------------------------------------------------------------- 6: auth


def test_failed_logins_are_throttled_logged_and_locked_out(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(ferretdb.uri, {
        "tenancy": {"users": _users()},
        "auth_throttle": {"free_failures": 1, "base_delay_ms": 1, "max_delay_ms": 5,
                          "lockout_failures": 5, "lockout_ms": 60_000},
    })

    def login(password: str) -> bool:
        client: MongoClient[Doc] = MongoClient(
            proxy.uri, username="app", password=password, authMechanism="SCRAM-SHA-256",
            serverSelectionTimeoutMS=5000)
        try:
            client.admin.command("ping")
            return True
        except OperationFailure as exc:
            assert exc.code == 18, exc.details
            return False
        finally:
            client.close()

    assert login(PASSWORD)
    for _ in range(5):
        assert not login("wrong")
    assert not login(PASSWORD), "the right password must not work during the lockout"
    log = proxy.log_text()
    assert re.search(r"authentication from \('127\.0\.0\.1', \d+\) failed", log), log[-2000:]
    assert "locked out" in log
    assert _metric(proxy, 'mongoproxy_auth_failures_total{result="failed"}') == 5
    assert _metric(proxy, 'mongoproxy_auth_failures_total{result="locked"}') >= 1


# --------------------------------------------------------------------------- 7: values


def test_no_values_in_logs_without_log_values(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, {
        "observability": {"slow_query_ms": 0},
        "tenancy": {"mode": "enforce", "collections": ["tasks"]},
    })
    client: MongoClient[Doc] = MongoClient(proxy.uri)
    coll = client[db_name].tasks
    coll.find_one({"tenant_id": "acme", "x": {"$exists": "SECRET_EXISTS"}})
    with pytest.raises(OperationFailure) as refused:
        coll.find_one({"tenant_id": "SECRET_XTENANT", "$and": [{"tenant_id": "other"}]})
    assert refused.value.code == 13
    digest = urllib.request.urlopen(f"{proxy.admin_url}/digest", timeout=5).read().decode()
    client.close()
    # The slow log is written in the background: wait for the find's line.
    assert _wait_until(lambda: '"$exists":"?str"' in proxy.log_text())
    log = proxy.log_text()
    assert "tenancy rejection" in log
    for secret in ("SECRET_EXISTS", "SECRET_XTENANT"):
        assert secret not in log, secret
        assert secret not in digest, secret


def test_admin_port_bounds_requests_and_checks_the_token(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    token = "t0ken-with-at-least-16-chars"
    proxy = proxy_factory(ferretdb.uri, {"admin": {"token": token}})
    sock = socket.create_connection((proxy.host, proxy.admin_port), timeout=5)
    sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except ConnectionError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:100]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5)
    assert denied.value.code == 401
    request = urllib.request.Request(f"{proxy.admin_url}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=5).status == 200
    assert "Traceback" not in proxy.log_text()
