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

import json
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
from pymongo.errors import PyMongoError

from bench.failover_load import WorkerStats, scenario, verify
from tests.support import REPO_ROOT, FerretDBFactory, FerretDBProcess, ProxyFactory
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
    # not retried: FerretDB does not deduplicate): one per worker; those sent later
    # wait. Twice that as margin for an operation that took a pooled connection in the
    # instant before the first timeout marked the server failed.
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


def node_load(uri: str, db: str, tag: str, fdb: FerretDBProcess,
              seconds: float = 7.0) -> list[WorkerStats]:
    """tests/node/failover_load.js for ``seconds``; FerretDB killed after 2 s and
    restarted 2 s later."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js >= 20", pytrace=False)
    node_dir = REPO_ROOT / "tests" / "node"
    if not (node_dir / "node_modules" / "mongodb").is_dir():
        pytest.fail(f"{node_dir}/node_modules/mongodb missing; run `make node`", pytrace=False)
    proc = subprocess.Popen(
        [node, str(node_dir / "failover_load.js"), uri, db, tag, str(seconds), str(WORKERS)],
        cwd=node_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        fdb.kill()
        time.sleep(2.0)
        fdb.start()
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, f"failover_load.js exited {proc.returncode}:\n{err}"
    return [
        WorkerStats(acked_incs=w["acked_incs"], failed_incs=w["failed_incs"],
                    acked_ids=w["acked_ids"], duplicate_keys=w["duplicate_keys"],
                    errors=w["errors"], slowest_s=w["slowest_s"])
        for w in json.loads(out.strip().splitlines()[-1])
    ]


def test_node_driver_restart_under_load(
    ferretdb_factory: FerretDBFactory, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """The official Node.js driver (retryWrites) through a FerretDB restart: errors
    through the proxy no more than straight (or one per worker in flight at the kill),
    nothing lost or applied twice."""
    fdb = ferretdb_factory()
    proxy = proxy_factory(fdb.uri, proxy_config("uri", fdb))
    results = {}
    with direct_client(fdb) as direct:
        for target, uri in (("direct", f"{fdb.uri}?directConnection=true"),
                            ("proxy", proxy.uri)):
            stats = node_load(uri, db_name, f"node-{target}", fdb)
            results[target] = {
                "ok": sum(len(s.acked_ids) + len(s.acked_incs) for s in stats),
                "errors": sum(sum(s.errors.values()) for s in stats),
                "kinds": [dict(s.errors) for s in stats if s.errors],
                **verify(direct[db_name], stats),
            }
    print(f"\nnode: {results}")
    for result in results.values():
        assert result["ok"] > 0, results
        assert result["lost"] == 0, results
        assert result["doubled"] == 0, results
    assert results["proxy"]["errors"] <= max(results["direct"]["errors"], WORKERS), results
