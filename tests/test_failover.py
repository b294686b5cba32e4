"""Upstream restarts and stops hidden from applications, the way mongos hides them.

A real FerretDB is SIGKILLed and restarted (or SIGSTOPped and SIGCONTed) under load from
pymongo writer threads with ``retryWrites``: once straight to FerretDB and once through
the proxy, in the same test. Every client-visible error is counted, and every write is
read back over a direct connection: none acknowledged may be lost, none applied twice
(``$inc`` counters and unique ``_id``s, see bench/failover_load.py).

FerretDB is a standalone server and does not deduplicate retryable writes, so the
proxy must not label its failed writes ``RetryableWriteError``; what a replica set can
show (a primary change, the proxy's retry of a retryable write) is tested with mockupdb
in tests/test_failover_election.py.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from pymongo.errors import PyMongoError

from bench.failover_load import scenario
from tests.support import FerretDBFactory, FerretDBProcess, ProxyFactory
from tests.support.clients import direct_client, strict_client

pytestmark = pytest.mark.timeout(240)

WORKERS = 8
UPSTREAM: dict[str, Any] = {
    "pool": {"connect_timeout_ms": 1000},
    "server_selection_timeout_ms": 10_000,
    "heartbeat_ms": 500,
}


def proxy_config(mode: str, fdb: FerretDBProcess, **upstream: Any) -> dict[str, Any]:
    if mode == "uri":
        return {"upstream": {**UPSTREAM, **upstream}}
    return {"upstream": {**UPSTREAM, **upstream, "uri": None,
                         "members": [{"host": fdb.address, "role": "primary"}]}}


@pytest.mark.parametrize("mode", ["uri", "members"])
def test_restart_under_load_no_error_storm(
    mode: str, ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, db_name: str
) -> None:
    fdb = ferretdb_factory()
    proxy = proxy_factory(fdb.uri, proxy_config(mode, fdb))
    with direct_client(fdb) as direct:
        straight = scenario(fdb.uri, db_name, "direct", direct, fdb.kill, fdb.start,
                            workers=WORKERS)
        through = scenario(proxy.uri, db_name, "proxy", direct, fdb.kill, fdb.start,
                           workers=WORKERS)
    print(f"\n{mode}: direct {straight}\n{mode}: proxy  {through}")
    for result in (straight, through):
        assert result["hung"] == 0, result
        assert result["lost"] == 0, result
        assert result["doubled"] == 0, result
        assert result["recovery_s"] is not None, result
    # Requests wait for the restarted server instead of failing: what fails is what was
    # in flight when the server died (at most one operation per worker), as straight
    # to FerretDB. Before: 24-48 errors (uri) and 1,444 (a connect storm).
    assert through["errors"] <= max(straight["errors"], WORKERS), (straight, through)
    assert fdb.running and proxy.running


@pytest.mark.parametrize("mode", ["uri", "members"])
def test_stopped_upstream_requests_wait_and_recover(
    mode: str, ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """SIGSTOP for 5 s: requests wait (none beyond socket_timeout_ms plus the selection
    timeout), nothing is lost or applied twice, and traffic resumes after SIGCONT."""
    fdb = ferretdb_factory()
    proxy = proxy_factory(fdb.uri, proxy_config(mode, fdb, socket_timeout_ms=3000))
    bound_s = 3.0 + 10.0 + 1.0 + 5.0  # socket + selection + connect timeouts, slack
    with direct_client(fdb) as direct:
        through = scenario(
            proxy.uri, db_name, "proxy", direct,
            lambda: fdb.send_signal(signal.SIGSTOP), lambda: fdb.send_signal(signal.SIGCONT),
            workers=WORKERS, down_s=5.0)
    print(f"\n{mode}: proxy {through}")
    assert through["hung"] == 0, through
    assert through["lost"] == 0, through
    assert through["doubled"] == 0, through
    assert through["recovery_s"] is not None, through
    assert through["slowest_s"] < bound_s, through
    # The operations in flight when the server stopped time out (socket_timeout_ms,
    # not retried: FerretDB does not deduplicate); those sent later wait.
    assert through["errors"] <= 2 * WORKERS, through


def test_shutdown_answers_requests_waiting_for_a_server(
    ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """A request waiting in server selection (upstream down, 30 s selection timeout) is
    answered ShutdownInProgress when the 1 s drain ends, and the proxy exits."""
    fdb = ferretdb_factory()
    proxy = proxy_factory(fdb.uri, {
        "upstream": {**UPSTREAM, "server_selection_timeout_ms": 30_000},
        "shutdown": {"drain_timeout_ms": 1000}})
    result: dict[str, Any] = {}
    with strict_client(proxy.uri, socketTimeoutMS=60_000) as client:
        client[db_name]["c"].insert_one({"_id": 0})
        fdb.kill()

        def waiting_insert() -> None:
            try:
                result["reply"] = client[db_name]["c"].insert_one({"_id": 1})
            except PyMongoError as exc:
                result["error"] = exc

        thread = threading.Thread(target=waiting_insert)
        thread.start()
        time.sleep(1.5)  # the request is waiting for the server now
        assert thread.is_alive(), result
        proxy.send_signal(signal.SIGTERM)
        assert proxy.proc is not None
        assert proxy.proc.wait(timeout=20) == 0, proxy.log_text()[-2000:]
        thread.join(20)
    error = result.get("error")
    # pymongo raises a 91 reply as NotPrimaryError (no code attribute), with the reply.
    assert isinstance(error, PyMongoError), result
    details = getattr(error, "details", None) or {}
    assert details.get("code") == 91, result
