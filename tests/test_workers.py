"""``listen.workers: 2``: two real proxy processes sharing the port under the supervisor,
in front of the session FerretDB (and, for transactions, mockupdb routers).

Which worker served a client is read from the one slow-log stream (``slow_query_ms: 0``:
every operation is a line, each starting ``{"worker":N,``) by the client's ``appName``.
Every client here has its own ``MongoClient`` with ``maxPoolSize=1``, so its operations
travel on one connection, which the kernel gave to one worker.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import bson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from proxy.identity.credentials import hash_password
from proxy.wire import HEADER_SIZE, decode_body, encode_op_msg, parse_op_msg
from proxy.worker import FAIL_AT_START_ENV
from tests.support import REPO_ROOT, FerretDBProcess, ProxyFactory, ProxyProcess, RedisProcess
from tests.test_pinning import Routers, _statements_by_transaction, _transaction_statements
from tests.test_shutdown import DelayRelay

pytestmark = pytest.mark.timeout(180)
Doc = dict[str, Any]
WORKERS = {"listen": {"workers": 2}, "observability": {"slow_query_ms": 0}}


def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def get(proxy: ProxyProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"{proxy.admin_url}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def readyz(proxy: ProxyProcess) -> Doc:
    status, body = get(proxy, "/readyz")
    document: Doc = json.loads(body)
    assert (status == 200) == document["ready"], document
    return document


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in readyz(proxy)["workers"]}


def start(proxy_factory: ProxyFactory, uri: str, extra: Doc | None = None,
          **kwargs: Any) -> ProxyProcess:
    """A supervisor with two workers, both ready."""
    config: Doc = json.loads(json.dumps(WORKERS))
    for key, value in (extra or {}).items():
        config[key] = {**config.get(key, {}), **value}
    proxy = proxy_factory(uri, config, **kwargs)
    eventually(lambda: readyz(proxy)["ready"], "both workers ready")
    return proxy


def slow_lines(proxy: ProxyProcess) -> list[Doc]:
    """The slow-log lines written so far; a last line still being written (no newline
    yet) is left for the next read."""
    text = proxy.log_text()
    complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()
            if line.startswith('{"worker":')]


def workers_of(proxy: ProxyProcess, command: str | None = None) -> dict[str, set[int]]:
    """appName -> the workers that served its operations (of ``command``)."""
    out: dict[str, set[int]] = {}
    for line in slow_lines(proxy):
        if line["app_name"] and (command is None or line["command"] == command):
            out.setdefault(line["app_name"], set()).add(line["worker"])
    return out


def client(proxy: ProxyProcess, app: str, **kwargs: Any) -> MongoClient[Doc]:
    options: Doc = {"appname": app, "maxPoolSize": 1, "serverSelectionTimeoutMS": 10_000,
                    "socketTimeoutMS": 20_000, "retryReads": False, "retryWrites": False}
    return MongoClient(proxy.uri, **{**options, **kwargs})


def direct(fdb: FerretDBProcess) -> MongoClient[Doc]:
    return MongoClient(fdb.uri, directConnection=True, serverSelectionTimeoutMS=5000)


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


# --------------------------------------------------------------------------- cursors


def test_many_connections_doing_getmore_across_both_workers(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    with direct(ferretdb) as mc:
        mc[db_name].items.insert_many([{"_id": i, "pad": "x" * 50} for i in range(120)])
    proxy = start(proxy_factory, ferretdb.uri, {"upstream": {"pool": {"max_size": 7}}})
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def reader(n: int) -> None:
        app = f"reader-{n}"
        try:
            with client(proxy, app) as mc:
                coll = mc[db_name].items
                for _ in range(3):  # each cursor: a find and 11 getMores, one connection
                    ids = [d["_id"] for d in coll.find({}, batch_size=10).sort("_id", 1)]
                    results.setdefault(app, []).extend(ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[:3]
    assert len(results) == 16
    for app, ids in results.items():
        assert ids == list(range(120)) * 3, app
    served = workers_of(proxy, "getMore")
    assert len(served) == 16, served
    # A connection lives in one worker, and both workers served cursors (2**-15 to miss).
    assert all(len(w) == 1 for w in served.values()), served
    assert set().union(*served.values()) == {0, 1}, served
    # The per-host pool budget is divided (4 + 3), not multiplied.
    text = get(proxy, "/metrics")[1].decode()
    assert metric(text, "mongoproxy_pool_max_size", f'{{member="{ferretdb.address}"}}') == 7
    assert metric(text, "mongoproxy_pool_connections", f'{{member="{ferretdb.address}"}}') <= 7


# --------------------------------------------------------------------------- transactions


def test_transactions_stay_on_one_router_with_two_workers(
    proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    """FerretDB has no transactions and is a single server, so two mockupdb routers
    (``isdbgrid``) stand in: every statement could go to either, and only the worker's
    own transaction table keeps a transaction's statements on the router that started it.
    Each transaction runs on its own client connection, so both workers run some."""
    routers = Routers(open_cursors=False)
    try:
        proxy = start(proxy_factory, routers.uri, {"upstream": {
            "heartbeat_ms": 500, "local_threshold_ms": 1000,
            "server_selection_timeout_ms": 5000}})
        eventually(lambda: all(m.hellos >= 4 for m in routers.all),
                   "both workers' monitors checked both routers")
        for t in range(16):
            with client(proxy, f"txn-{t}") as mc, mc.start_session() as s, \
                    s.start_transaction():
                coll = mc.db.c
                coll.insert_one({"_id": f"{t}-0"}, session=s)
                coll.find_one({"_id": f"{t}-0"}, session=s)
                coll.update_one({"_id": f"{t}-0"}, {"$set": {"x": 1}}, session=s)
                coll.insert_one({"_id": f"{t}-1"}, session=s)
        where = _statements_by_transaction(routers)
        assert len(where) == 16, where
        assert all(len(names) == 1 for names in where.values()), where
        for key, names in where.items():
            owner = routers.by_name(next(iter(names)))
            assert _transaction_statements(owner, key) == [
                "insert", "find", "update", "insert", "commitTransaction"]
        served = workers_of(proxy, "commitTransaction")
        assert len(served) == 16 and all(len(w) == 1 for w in served.values()), served
        assert set().union(*served.values()) == {0, 1}, served
    finally:
        routers.stop()


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_of_a_worker_under_load(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    with direct(ferretdb) as mc:
        mc[db_name].items.insert_many([{"_id": i} for i in range(20)])
    proxy = start(proxy_factory, ferretdb.uri)
    stop = threading.Event()
    lock = threading.Lock()
    errors: dict[str, list[str]] = {}
    done: dict[str, int] = {}

    def load(n: int) -> None:
        app = f"load-{n}"
        with client(proxy, app) as mc:
            coll = mc[db_name].items
            while not stop.is_set():
                try:
                    assert coll.find_one({"_id": n % 20}) == {"_id": n % 20}
                except PyMongoError as exc:
                    with lock:
                        errors.setdefault(app, []).append(repr(exc))
                    time.sleep(0.05)
                else:
                    with lock:
                        done[app] = done.get(app, 0) + 1

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(12)]
    for th in threads:
        th.start()
    eventually(lambda: len(workers_of(proxy)) == 12 and min(done.values(), default=0) >= 5,
               "every client served")
    before = workers_of(proxy)
    assert all(len(w) == 1 for w in before.values()), before
    victim = 0
    on_victim = {app for app, w in before.items() if w == {victim}}
    others = set(before) - on_victim
    assert on_victim and others, before  # both workers have clients (2**-11 to miss)
    old_pid = worker_pids(proxy)[victim]
    with lock:
        served_before = dict(done)
    subprocess.run(["kill", "-KILL", str(old_pid)], check=True)
    eventually(lambda: worker_pids(proxy).get(victim, old_pid) != old_pid
               and readyz(proxy)["ready"], "a replacement worker is ready")
    # Every client goes on; the other worker's clients never noticed.
    eventually(lambda: all(done[a] >= served_before[a] + 5 for a in before),
               "every client served after the kill")
    stop.set()
    for th in threads:
        th.join(30)
    assert not (set(errors) & others), {a: errors[a][:2] for a in set(errors) & others}
    assert set(errors) <= on_victim
    assert errors, "the killed worker's clients must have seen their connection closed"
    # The replacement serves: new connections until the kernel hands one to it.
    new_pid = worker_pids(proxy)[victim]
    for n in itertools.count():
        assert n < 64, "the replacement worker served none of 64 new connections"
        with client(proxy, f"after-{n}") as mc:
            mc[db_name].items.find_one({"_id": 1})
        lines = [x for x in slow_lines(proxy) if x["app_name"] == f"after-{n}"]
        if any(x["worker"] == victim for x in lines):
            break
    assert f"worker {victim} (pid {old_pid}) killed by SIGKILL" in proxy.log_text()
    assert f"worker {victim} started (pid {new_pid})" in proxy.log_text()
    text = get(proxy, "/metrics")[1].decode()
    assert metric(text, "mongoproxy_worker_restarts_total") == 1


# --------------------------------------------------------------------------- reload


def test_reload_reaches_both_workers_and_a_replacement(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = start(proxy_factory, ferretdb.uri)
    with client(proxy, "warmup") as mc:
        mc[db_name].items.insert_one({"_id": 1})

    def probe_all(tag: str, count: int = 12) -> dict[int, set[str]]:
        """worker -> outcomes ("ok" or the error code) of ``count`` fresh clients."""
        outcomes: dict[int, set[str]] = {}
        for n in range(count):
            app = f"probe-{tag}-{n}"
            with client(proxy, app) as mc:
                try:
                    mc[db_name].items.find_one({"_id": 1})
                    outcome = "ok"
                except OperationFailure as exc:
                    outcome = str(exc.code)
            for line in slow_lines(proxy):
                if line["app_name"] == app and line["command"] == "find":
                    outcomes.setdefault(line["worker"], set()).add(outcome)
        return outcomes

    assert probe_all("before") == {0: {"ok"}, 1: {"ok"}}
    config = yaml.safe_load(proxy.config_path.read_text())
    config["routing"] = {
        "classes": {"blocked": {"deny": "probes are off"}},
        "rules": [{"match": {"app_name": "probe-*"}, "class": "blocked"}],
    }
    proxy.config_path.write_text(yaml.safe_dump(config))
    proxy.send_signal(signal.SIGHUP)
    eventually(lambda: metric(get(proxy, "/metrics")[1].decode(),
                              "mongoproxy_config_reloads_total", '{result="ok"}') >= 2,
               "both workers reloaded")
    assert probe_all("after") == {0: {"13"}, 1: {"13"}}
    assert "[supervisor] config reloaded" in proxy.log_text()
    # A worker started after the reload runs the supervisor's view: the new rules.
    old = worker_pids(proxy)[1]
    subprocess.run(["kill", "-KILL", str(old)], check=True)
    eventually(lambda: worker_pids(proxy).get(1, old) != old and readyz(proxy)["ready"],
               "replacement ready")
    assert probe_all("replaced", 16).get(1) == {"13"}
    # A reload while a worker is starting (it ignores SIGHUP until it can reload): once
    # it serves, it runs the reloaded rules too (its snapshot has them, or the
    # supervisor makes it catch up).
    old = worker_pids(proxy)[0]
    subprocess.run(["kill", "-KILL", str(old)], check=True)
    del config["routing"]
    proxy.config_path.write_text(yaml.safe_dump(config))
    proxy.send_signal(signal.SIGHUP)
    eventually(lambda: worker_pids(proxy).get(0, old) != old and readyz(proxy)["ready"],
               "replacement ready")
    rounds = itertools.count()
    eventually(lambda: probe_all(f"caught-up-{next(rounds)}") == {0: {"ok"}, 1: {"ok"}},
               "both workers run the rules of the last reload")


# --------------------------------------------------------------------------- metrics


def test_metrics_and_digest_sum_over_workers(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = start(proxy_factory, ferretdb.uri)
    with direct(ferretdb) as mc:
        mc[db_name].items.insert_one({"_id": 1, "v": "x"})
    for n in range(10):
        with client(proxy, f"m-{n}") as mc:
            for _ in range(3):
                assert mc[db_name].items.find_one({"_id": 1})
    served = workers_of(proxy, "find")
    assert set().union(*served.values()) == {0, 1}, served  # a real sum (2**-9 to miss)
    text = get(proxy, "/metrics")[1].decode()
    assert metric(text, "mongoproxy_operations_total", '{command="find",error_code="0"}') == 30
    assert metric(text, "mongoproxy_operation_duration_seconds_count",
                  '{cache="none",command="find",member_role="standalone",'
                  'route_class="default"}') == 30
    assert metric(text, "mongoproxy_client_connections_opened_total") >= 10
    assert metric(text, "mongoproxy_workers_scraped") == 2
    assert metric(text, "mongoproxy_primary_available") == 1  # min, not a sum
    document = json.loads(get(proxy, "/digest?limit=5&order=count")[1])
    row = next(r for r in document["top"]
               if r["command"] == "find" and r["namespace"] == f"{db_name}.items")
    assert row["count"] == 30 and row["errors"] == 0
    assert document["workers"] == 2
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["max_ms"]  # from the merged sketches
    rules = json.loads(get(proxy, "/rules")[1])
    default = next(r for r in rules["routing"] if r["rule"] == "(default)")
    assert default["hits"] >= 30  # every worker's, added up
    connections = json.loads(get(proxy, "/connections")[1])
    assert connections["workers"] == 2 and connections["total"] >= 0
    top = subprocess.run(
        [*proxy.command()[:3], "top", "--once", "--admin", proxy.admin_url, "--order",
         "count"], capture_output=True, text=True, timeout=60, check=True)
    assert re.search(rf"^{row['shape_hash']} find .* 30 ", top.stdout, re.M), top.stdout
    request = urllib.request.Request(f"{proxy.admin_url}/digest/reset", data=b"",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        reset = json.loads(reply.read())
    assert reset["workers"] == 2
    assert reset["before"]["operations"] == document["operations"] >= 30
    assert json.loads(get(proxy, "/digest")[1])["operations"] == 0


def test_the_supervisors_admin_port_checks_the_token(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    """With workers, the operator's admin port is the supervisor's: admin.token holds
    there too (probes stay open, everything else needs the bearer token)."""
    token = "t0ken-with-at-least-16-chars"
    proxy = start(proxy_factory, ferretdb.uri, {"admin": {"token": token}})
    assert get(proxy, "/metrics")[0] == 401
    assert get(proxy, "/connections")[0] == 401
    request = urllib.request.Request(f"{proxy.admin_url}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200 and b"mongoproxy_workers_scraped 2" in reply.read()


# --------------------------------------------------------------------------- shutdown


def test_sigterm_under_load_drains_both_workers(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """Replies are held back 0.2 s, so SIGTERM finds inserts in flight in both workers:
    the ids in the database are exactly the acknowledged ones (a cut-off insert would
    be in the database without an acknowledgement)."""
    relay = DelayRelay((ferretdb.host, ferretdb.port))
    try:
        proxy = start(proxy_factory, relay.uri, {"shutdown": {"drain_timeout_ms": 8000}})
        relay.delay = 0.2
        acked: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def writer(t: int) -> None:
            with client(proxy, f"w-{t}") as mc:
                coll = mc[db_name].load
                for n in itertools.count():
                    if stop.is_set():
                        return
                    try:
                        coll.insert_one({"_id": f"{t}-{n}"})
                    except PyMongoError:
                        return
                    with lock:
                        acked.append(f"{t}-{n}")

        threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(10)]
        for th in threads:
            th.start()
        eventually(lambda: {w for ws in workers_of(proxy, "insert").values() for w in ws}
                   == {0, 1}, "both workers serve inserts")
        proxy.send_signal(signal.SIGTERM)
        assert proxy.proc is not None
        code = proxy.proc.wait(timeout=60)
        stop.set()
        for th in threads:
            th.join(30)
        assert code == 0, proxy.log_text()[-3000:]
        log = proxy.log_text()
        assert "[worker 0] mongoproxy stopped" in log and "[worker 1] mongoproxy stopped" in log
        relay.delay = 0
        with direct(ferretdb) as mc:
            stored = {d["_id"] for d in mc[db_name].load.find({}, {"_id": 1})}
        assert stored == set(acked)
        assert acked
    finally:
        relay.close()


# --------------------------------------------------------------------------- crash loop


def _run_to_exit(proxy: ProxyProcess, env: dict[str, str]) -> tuple[int, str]:
    proxy.write_config()
    proxy._spawn(cwd=REPO_ROOT, env=env)
    assert proxy.proc is not None
    return proxy.proc.wait(timeout=120), proxy.log_text()


def test_crash_loop_ends_with_a_clear_error(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    import os

    proxy = proxy_factory(ferretdb.uri, WORKERS, start=False)
    code, log = _run_to_exit(proxy, {**os.environ, FAIL_AT_START_ENV: "1"})
    assert code == 1, log
    assert re.search(r"worker \d exited 5 times in a row, each within 10 s of its start "
                     r"\(last: exit status 3\); giving up", log), log
    assert f"{FAIL_AT_START_ENV} is set: exiting at start" in log


def test_a_port_in_use_is_refused_before_any_worker_starts(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    import os

    proxy = proxy_factory(ferretdb.uri, WORKERS, start=False)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind((proxy.host, proxy.port))
        squatter.listen()
        code, log = _run_to_exit(proxy, dict(os.environ))
    assert code == 1, log
    assert "cannot start: [Errno 98] " in log and "is in use" in log, log
    assert "worker 0 started" not in log, log



# --------------------------------------------------------------------------- cache + SCRAM


def test_shared_cache_and_scram_tenants_across_workers(
    ferretdb: FerretDBProcess, redis_server: RedisProcess, proxy_factory: ProxyFactory,
    db_name: str
) -> None:
    """Each client authenticates (SCRAM-SHA-256 with a proxy user) on its one connection,
    so in one worker; the result cache is Redis, so what one worker stored is a hit in
    the other: one miss per tenant in all, whatever worker each client landed on."""
    passwords = {"acme_app": "acme-secret", "globex_app": "globex-secret"}
    users = [{"username": u, "password_sha256": hash_password(p, iterations=4096),
              "tenant": u.split("_")[0]} for u, p in passwords.items()]
    with direct(ferretdb) as mc:
        mc[db_name].tasks.insert_many([{"_id": f"{t}-{i}", "tenant_id": t, "i": i}
                                       for t in ("acme", "globex") for i in range(3)])
    proxy = start(proxy_factory, ferretdb.uri, {
        "tenancy": {"mode": "enforce", "users": users},
        "cache": {"redis_url": redis_server.url, "timeout_ms": 200,
                  "rules": [{"match": {"database": db_name}, "ttl_s": 300}]},
    })
    for n in range(12):
        user = sorted(passwords)[n % 2]
        tenant = user.split("_")[0]
        with client(proxy, f"scram-{n}", username=user, password=passwords[user],
                    authMechanism="SCRAM-SHA-256") as mc:
            tasks = mc[db_name].tasks
            found = tasks.find_one({"tenant_id": tenant, "i": 1})
            assert found == {"_id": f"{tenant}-1", "tenant_id": tenant, "i": 1}
            with pytest.raises(OperationFailure) as info:
                tasks.find_one({"tenant_id": "globex" if tenant == "acme" else "acme"})
            assert info.value.code == 13
    served = workers_of(proxy, "find")
    assert set().union(*served.values()) == {0, 1}, served  # 2**-11 to miss
    text = get(proxy, "/metrics")[1].decode()
    results: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mongoproxy_cache_operations_total":
                key = sample.labels["result"]
                results[key] = results.get(key, 0.0) + sample.value
    assert results.get("miss") == 2 and results.get("hit") == 10, results


# --------------------------------------------------------------------------- cursor hops


def test_a_cursor_continued_on_a_connection_of_the_other_worker(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, db_name: str
) -> None:
    """Drivers send a getMore on any free pooled connection, which may live in the
    worker that did not open the cursor: that worker learns the cursor's server and
    tenant from its sibling, so the cursor goes on (and stays its tenant's)."""
    passwords = {"acme_app": "acme-secret", "globex_app": "globex-secret"}
    users = [{"username": u, "password_sha256": hash_password(p, iterations=4096),
              "tenant": u.split("_")[0]} for u, p in passwords.items()]
    with direct(ferretdb) as mc:
        mc[db_name].tasks.insert_many([{"_id": f"{t}-{i:02d}", "tenant_id": t}
                                       for t in ("acme", "globex") for i in range(10)])
    proxy = start(proxy_factory, ferretdb.uri,
                  {"tenancy": {"mode": "enforce", "users": users}})
    opened: list[MongoClient[Doc]] = []

    def in_worker(user: str, worker: int) -> MongoClient[Doc]:
        for n in range(64):
            app = f"hop-{user}-{worker}-{n}"
            mc = client(proxy, app, username=user, password=passwords[user],
                        authMechanism="SCRAM-SHA-256")
            opened.append(mc)
            mc[db_name].tasks.find_one({"tenant_id": user.split("_")[0]})
            if workers_of(proxy).get(app) == {worker}:
                return mc
        raise AssertionError(f"no connection of {user} landed in worker {worker}")

    try:
        acme0, acme1 = in_worker("acme_app", 0), in_worker("acme_app", 1)
        globex1 = in_worker("globex_app", 1)
        first = acme0[db_name].command("find", "tasks", filter={"tenant_id": "acme"},
                                       sort={"_id": 1}, batchSize=3)
        cursor_id = first["cursor"]["id"]
        ids = [d["_id"] for d in first["cursor"]["firstBatch"]]
        for via in (acme1, acme0, acme1):  # the other worker, the owner, the other again
            more = via[db_name].command("getMore", cursor_id, collection="tasks",
                                        batchSize=2)
            ids += [d["_id"] for d in more["cursor"]["nextBatch"]]
        assert ids == [f"acme-{i:02d}" for i in range(9)]
        with pytest.raises(OperationFailure) as info:  # another tenant, in worker 1
            globex1[db_name].command("getMore", cursor_id, collection="tasks")
        assert info.value.code == 13 and "another tenant" in str(info.value)
        killed = acme1[db_name].command("killCursors", "tasks", cursors=[cursor_id])
        assert killed["cursorsKilled"] == [cursor_id]
        with pytest.raises(OperationFailure) as info:
            acme0[db_name].command("getMore", cursor_id, collection="tasks")
        assert info.value.code == 43  # CursorNotFound: it was killed through worker 1
    finally:
        for mc in opened:
            mc.close()


class RawConnection:
    """One client connection speaking OP_MSG, introduced by its ``appName``."""

    def __init__(self, proxy: ProxyProcess, app: str) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=20)
        self.ids = itertools.count(1)
        self.command({"hello": 1, "client": {"application": {"name": app}}, "$db": "admin"})

    def command(self, doc: Doc) -> Doc:
        request_id = next(self.ids)
        self.sock.sendall(encode_op_msg(request_id, 0, bson.encode(doc)))
        header = self._exact(HEADER_SIZE)
        body = self._exact(int.from_bytes(header[:4], "little") - HEADER_SIZE)
        reply: Doc = decode_body(parse_op_msg(header + body))
        return reply

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def test_a_transaction_spread_over_connections_in_both_workers(
    proxy_factory: ProxyFactory,
) -> None:
    """A driver may send one transaction's statements on several pooled connections.
    Two mockupdb mongos routers stand in for the upstream (FerretDB has no transactions
    and is one server): a statement that reaches the worker the transaction did not
    start in must still go to the router that took the first statement."""
    routers = Routers(open_cursors=False)
    opened: list[RawConnection] = []
    try:
        proxy = start(proxy_factory, routers.uri, {"upstream": {
            "heartbeat_ms": 500, "local_threshold_ms": 1000,
            "server_selection_timeout_ms": 5000}})
        eventually(lambda: all(m.hellos >= 4 for m in routers.all),
                   "both workers' monitors checked both routers")
        by_worker: dict[int, RawConnection] = {}
        for n in itertools.count():
            assert n < 64, "no connection landed in one of the workers"
            conn = RawConnection(proxy, f"raw-{n}")
            opened.append(conn)
            assert conn.command({"ping": 1, "$db": "admin"})["ok"] == 1
            # The slow-log line reaches the supervisor's stream after the reply.
            eventually(lambda n=n: f"raw-{n}" in workers_of(proxy), f"raw-{n}'s log line")
            worker = next(iter(workers_of(proxy)[f"raw-{n}"]))
            by_worker.setdefault(worker, conn)
            if 0 in by_worker and 1 in by_worker:
                break
        pair = (by_worker[0], by_worker[1])
        for t in range(8):
            first, other = pair if t % 2 == 0 else pair[::-1]
            txn = {"lsid": {"id": bson.Binary(uuid.uuid4().bytes, 4)},
                   "txnNumber": bson.Int64(1), "autocommit": False}
            for conn, statement in [
                (first, {"insert": "c", "documents": [{"_id": t}], "startTransaction": True,
                         "$db": "db"}),
                (other, {"find": "c", "filter": {"_id": t}, "$db": "db"}),
                (first, {"update": "c", "updates": [{"q": {"_id": t}, "u": {"$set": {"x": 1}}}],
                         "$db": "db"}),
                (other, {"commitTransaction": 1, "$db": "admin"}),
            ]:
                assert conn.command({**statement, **txn})["ok"] == 1
        where = _statements_by_transaction(routers)
        assert len(where) == 8 and all(len(names) == 1 for names in where.values()), where
        for key, names in where.items():
            assert _transaction_statements(routers.by_name(next(iter(names))), key) == [
                "insert", "find", "update", "commitTransaction"]
    finally:
        for conn in opened:
            conn.close()
        routers.stop()
