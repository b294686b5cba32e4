"""Command-class routing end to end: the example rules of ``config/routing.yaml`` in front
of two real FerretDB servers with declared roles (primary + secondary tagged
``{use: analytics}``).

FerretDB does not replicate, so each member holds its own marker documents and a read's
result tells which member answered. Both members run with ``--log-level=DEBUG``, which
makes FerretDB log every request document it receives: that is how these tests see what
reached a member when the result cannot tell (a command FerretDB refuses, the
``maxTimeMS`` the proxy injected, a denied command that must reach nobody).

1. every class of the example config, chosen by the rules alone (the client sends no read
   preference), reads from the member its class names; writes never reach the secondary;
2. with the secondary stopped, ``secondaryPreferred`` falls back to the primary and
   ``secondary`` fails promptly with 133;
3. ``max_time_ms`` is injected/capped in what the member receives, and a tiny cap makes
   FerretDB stop a slow query with MaxTimeMSExpired (50);
4. a ``deny`` class refuses with code 13 and the message, and nothing reaches a member;
5. live reload under load: SIGHUP swaps the rules with no failed request, an invalid file
   is refused with its key path and counted, the file watcher applies an edit by itself;
6. ``python -m proxy explain-route`` output for the example config.

FerretDB v1.24 limitations met here (not proxy bugs): it rejects a *document* ``comment``
on ``find``/``distinct``/``update``/``delete`` (14 TypeMismatch; ``aggregate``, ``count``
and ``insert`` accept one), and it has no ``$text`` operator (2 BadValue). The tests accept
exactly those replies and check in the members' logs which member received the command.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymongo.errors import OperationFailure, PyMongoError

from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess
from tests.support.clients import direct_client as direct
from tests.support.clients import strict_client as mongo

Doc = dict[str, Any]

EXAMPLE_CONFIG = REPO_ROOT / "config" / "routing.yaml"
HEARTBEAT_MS = 500
SELECTION_TIMEOUT_MS = 2000
# Slack on top of server_selection_timeout_ms for "fails promptly" (one heartbeat, the
# round trip and a busy 2-core machine).
PROMPT_SLACK_S = 2.0
UNAUTHORIZED = 13
TYPE_MISMATCH = 14  # FerretDB: a document comment on find/distinct/update/delete
BAD_VALUE = 2  # FerretDB: unknown top level operator $text
MAX_TIME_MS_EXPIRED = 50
NOT_IMPLEMENTED = 238  # FerretDB: $out
FAILED_TO_SATISFY_READ_PREFERENCE = 133
DENY_MESSAGE = "exports are disabled during business hours"
# Every config file this module writes is padded to this size (see PaddedProxy).
CONFIG_FILE_SIZE = 16_384
WRITE_COMMANDS = ("insert", "update", "delete", "findAndModify")


# --------------------------------------------------------------------------- processes


class DebugFerretDB(FerretDBProcess):
    """FerretDB logging every request document it receives (``--log-level=DEBUG``)."""

    def command(self) -> list[str]:
        return [a if not a.startswith("--log-level=") else "--log-level=DEBUG"
                for a in super().command()]

    def log_offset(self) -> int:
        return len(self.log_text())

    def requests(self, since: int = 0) -> list[str]:
        """The request messages logged since ``since`` (a ``log_offset()``), as text."""
        blocks = self.log_text()[since:].split("Request message:\n")[1:]
        return [block.split("\n}\n", 1)[0] for block in blocks]

    def requests_with(self, needle: str, since: int = 0) -> list[str]:
        return [r for r in self.requests(since) if needle in r]


class PaddedProxy(ProxyProcess):
    """A proxy whose config file always has the same size (``CONFIG_FILE_SIZE``).

    The proxy's file watcher notices a change by (mtime, size). Writing a new file of the
    same size with the old mtime (``rewrite(..., keep_stamp=True)``) hides an edit from
    the watcher, so only SIGHUP can apply it: the SIGHUP path is tested on its own.
    """

    def render(self, config: Doc) -> bytes:
        text = yaml.safe_dump(config, sort_keys=False).encode()
        if len(text) + 2 > CONFIG_FILE_SIZE:
            raise AssertionError(f"config of {len(text)} bytes does not fit the padding")
        return text + b"#" + b"." * (CONFIG_FILE_SIZE - len(text) - 2) + b"\n"

    def write_config(self) -> None:
        self.config_path.write_bytes(self.render(self.config))

    def rewrite(self, config: Doc, *, keep_stamp: bool) -> None:
        """Replace the config file atomically (the watcher never sees half a file)."""
        old = os.stat(self.config_path)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_bytes(self.render(config))
        if keep_stamp:
            os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(tmp, self.config_path)
        self.config = config


@dataclass
class Members:
    primary: DebugFerretDB
    secondary: DebugFerretDB

    def by_role(self) -> dict[str, DebugFerretDB]:
        return {"primary": self.primary, "secondary": self.secondary}


@pytest.fixture
def members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Members]:
    started: list[DebugFerretDB] = []
    try:
        for _ in range(2):
            proc = DebugFerretDB(tmp_path_factory.mktemp("ferretdb"))
            proc.start()
            started.append(proc)
        yield Members(primary=started[0], secondary=started[1])
    finally:
        for proc in reversed(started):
            proc.stop()


ProxyStarter = Callable[..., PaddedProxy]


@pytest.fixture
def start_proxy(
    members: Members, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyStarter]:
    """``start_proxy(routing=None, rules=None)``: a proxy in front of ``members`` with the
    example routing section (or ``routing``), declared roles and a slow log of every
    operation (``proxy.workdir / "slow.log"``)."""
    started: list[PaddedProxy] = []

    def make(routing: Doc | None = None) -> PaddedProxy:
        workdir = tmp_path_factory.mktemp("proxy")
        extra = {
            "upstream": declared_upstream(members),
            "routing": routing if routing is not None else example_routing(),
            "observability": {"slow_query_ms": 0, "slow_log": str(workdir / "slow.log")},
        }
        proxy = PaddedProxy(members.primary.uri, extra, workdir=workdir)
        started.append(proxy)
        proxy.start()
        assert proxy.config["upstream"]["uri"] is None
        return proxy

    yield make
    for proc in reversed(started):
        proc.stop()


# --------------------------------------------------------------------------- helpers


def example_routing() -> Doc:
    """The routing section of the example config, as the file has it."""
    routing: Doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())["routing"]
    return routing


def declared_upstream(members: Members) -> Doc:
    return {
        # deep_merge replaces the fixture's uri by None (YAML null): members only.
        "uri": None,
        "members": [
            {"host": members.primary.address, "role": "primary"},
            {"host": members.secondary.address, "role": "secondary",
             "tags": {"use": "analytics"}},
        ],
        "heartbeat_ms": HEARTBEAT_MS,
        "server_selection_timeout_ms": SELECTION_TIMEOUT_MS,
    }


COLLECTIONS = ("users", "projects", "orders", "docs")


def write_markers(members: Members, db_name: str) -> None:
    """``{_id: "marker", who: <role>}`` in every test collection of each member."""
    for who, fdb in members.by_role().items():
        with direct(fdb) as client:
            client.drop_database(db_name)
            for name in COLLECTIONS:
                client[db_name][name].insert_one({"_id": "marker", "who": who, "text": "foo"})


def who(doc: Doc | None) -> str:
    assert doc is not None, "the marker document is missing"
    answer: str = doc["who"]
    return answer


def ids_on(fdb: FerretDBProcess, db_name: str, collection: str) -> set[Any]:
    with direct(fdb) as client:
        return {d["_id"] for d in client[db_name][collection].find()}


def slow_ops(proxy: ProxyProcess) -> list[Doc]:
    path = proxy.workdir / "slow.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_slow_op(proxy: ProxyProcess, pred: Callable[[Doc], bool]) -> Doc:
    deadline = time.monotonic() + 5
    while True:
        found = [op for op in slow_ops(proxy) if pred(op)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no such slow-log line:\n{slow_ops(proxy)[-5:]}"
        time.sleep(0.05)


def nth_slow_op(proxy: ProxyProcess, route_class: str, n: int) -> Doc:
    """The n-th (from 0) slow-log line of ``route_class``, waiting for it."""
    deadline = time.monotonic() + 5
    while True:
        found = [op for op in slow_ops(proxy) if op["route_class"] == route_class]
        if len(found) > n:
            return found[n]
        assert time.monotonic() < deadline, f"no line {n} of {route_class}: {found}"
        time.sleep(0.05)


def metrics_text(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def reloads(proxy: ProxyProcess) -> dict[str, float]:
    found = re.findall(r'^mongoproxy_config_reloads_total\{result="(\w+)"\} (\S+)$',
                       metrics_text(proxy), re.M)
    return {result: float(value) for result, value in found}


def log_tail(proxy: ProxyProcess, lines: int = 40) -> str:
    return f"--- {proxy.log_path} (tail) ---\n" + "\n".join(
        proxy.log_text().splitlines()[-lines:]
    )


def max_time_of(request: str) -> int | None:
    found = re.search(r'"maxTimeMS": (\d+)', request)
    return int(found.group(1)) if found else None


def write_requests(fdb: DebugFerretDB, since: int) -> list[str]:
    return [r for r in fdb.requests(since)
            if any(f'"Document": {{\n        "{name}": ' in r for name in WRITE_COMMANDS)]


# --------------------------------------------------------------------------- 1. classes


def test_each_class_reads_from_its_member_and_writes_stay_on_primary(
    members: Members, start_proxy: ProxyStarter, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy()
    since = {role: fdb.log_offset() for role, fdb in members.by_role().items()}
    with mongo(proxy.uri) as client, mongo(proxy.uri, appname="billing-export") as export:
        db = client[db_name]
        for _ in range(5):  # never a lucky random choice
            # rule 0 (auth): users lookups read the primary.
            assert who(db.users.find_one({"_id": "marker"})) == "primary"
            assert db.users.count_documents({"who": "primary"}) == 1
            # rule 2 (dashboard, secondaryPreferred): the secondary while it is up.
            groups = list(db.projects.aggregate([{"$group": {"_id": "$who"}}]))
            assert groups == [{"_id": "secondary"}], log_tail(proxy)
            # Not a $group: no rule, the default class (primary).
            assert [d["who"] for d in db.projects.aggregate([{"$match": {}}])] == ["primary"]
            # rule 4 (report via appName): the tagged secondary.
            assert who(export[db_name].orders.find_one({"_id": "marker"})) == "secondary"
            # ... but rule 0 comes first: the export job's users lookups read the primary.
            assert who(export[db_name].users.find_one({"_id": "marker"})) == "primary"
            # No rule: default (primary), for any client.
            assert who(db.orders.find_one({"_id": "marker"})) == "primary"

        # rule 1 (report via comment {class: report}): the secondary. aggregate and count
        # accept a document comment on FerretDB and read the secondary's marker.
        report = {"class": "report", "by": "integration-test"}
        docs = list(db.orders.aggregate([{"$match": {"_id": "marker"}}], comment=report))
        assert [d["who"] for d in docs] == ["secondary"]
        assert db.orders.count_documents({"who": "secondary"}, comment=report) == 1
        # A find with that comment: FerretDB v1.24 refuses a document comment on find
        # (14 TypeMismatch). The reply still shows where the proxy sent it: the request
        # is in the secondary's log only.
        probe = "find-with-report-comment"
        try:
            found = db.orders.find_one({"probe": {"$ne": probe}, "_id": "marker"},
                                       comment=report)
        except OperationFailure as exc:
            assert exc.code == TYPE_MISMATCH, exc.details
            assert members.secondary.requests_with(probe), "the find never reached the secondary"
            assert not members.primary.requests_with(probe), "the find reached the primary"
        else:
            assert who(found) == "secondary"
        op = wait_for_slow_op(proxy, lambda o: o["command"] == "find"
                              and o["route_class"] == "report" and o["app_name"] is None)
        assert (op["route_rule"], op["member_role"]) == (1, "secondary"), op

        # rule 3 (search, nearest): either member. FerretDB v1.24 has no $text (2 BadValue);
        # the member that received each one is read from its own log, and agrees with the
        # proxy's slow log.
        for attempt in range(6):
            probe = f"text-probe-{attempt}"
            try:
                db.docs.find_one({"$text": {"$search": probe}})
            except OperationFailure as exc:
                assert exc.code == BAD_VALUE, exc.details
            receivers = [role for role, fdb in members.by_role().items()
                         if fdb.requests_with(probe)]
            assert len(receivers) == 1, receivers
            op = nth_slow_op(proxy, "search", attempt)
            assert (op["route_rule"], op["member_role"]) == (3, receivers[0]), op

        # Writes: to the primary, even in classes that read from a secondary.
        db.orders.insert_one({"_id": "report-insert"}, comment=report)           # rule 1
        db.orders.insert_one({"_id": "plain-insert"})                           # default
        db.users.insert_one({"_id": "user-insert"})                             # default
        exp = export[db_name]                                                   # rule 4
        exp.orders.insert_one({"_id": "export-insert"})
        exp.orders.insert_many([{"_id": "export-many-1"}, {"_id": "export-many-2"}])
        assert exp.orders.update_one({"_id": "export-insert"},
                                     {"$set": {"x": 1}}).modified_count == 1
        assert exp.orders.delete_one({"_id": "export-many-2"}).deleted_count == 1
        assert exp.orders.find_one_and_update({"_id": "export-many-1"},
                                              {"$set": {"y": 1}}) is not None
        # An aggregate that writes ($out) in the dashboard shape: a write, so the primary.
        # FerretDB v1.24 has no $out (238 NotImplemented): its log shows who received it.
        try:
            db.projects.aggregate([{"$match": {"probe": {"$ne": "out-probe"}}},
                                   {"$group": {"_id": "$who"}}, {"$out": "projects_out"}])
        except OperationFailure as exc:
            assert exc.code == NOT_IMPLEMENTED, exc.details
        assert members.primary.requests_with("out-probe")
        assert not members.secondary.requests_with("out-probe")

    assert ids_on(members.primary, db_name, "orders") == {
        "marker", "report-insert", "plain-insert", "export-insert", "export-many-1"}
    assert ids_on(members.primary, db_name, "users") == {"marker", "user-insert"}
    assert ids_on(members.secondary, db_name, "orders") == {"marker"}
    assert ids_on(members.secondary, db_name, "users") == {"marker"}
    # And in the members' own logs: no write command reached the secondary.
    assert write_requests(members.secondary, since["secondary"]) == []
    assert len(write_requests(members.primary, since["primary"])) >= 7


# --------------------------------------------------------------------------- 2. member down


def test_stopped_secondary_dashboard_falls_back_report_fails_promptly(
    members: Members, start_proxy: ProxyStarter, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy()
    with mongo(proxy.uri) as client:
        db = client[db_name]
        report = {"class": "report"}
        assert list(db.projects.aggregate([{"$group": {"_id": "$who"}}])) == [
            {"_id": "secondary"}]
        assert db.orders.count_documents({"who": "secondary"}, comment=report) == 1

        members.secondary.stop()
        # Two heartbeats and some slack: the monitor has seen the secondary down.
        time.sleep(2 * HEARTBEAT_MS / 1000 + 1.0)
        for _ in range(5):
            # dashboard (secondaryPreferred): the primary.
            groups = list(db.projects.aggregate([{"$group": {"_id": "$who"}}]))
            assert groups == [{"_id": "primary"}], log_tail(proxy)
        for attempt in range(2):
            # report (secondary, tags use=analytics): no server, promptly.
            started = time.monotonic()
            with pytest.raises(OperationFailure) as info:
                if attempt == 0:
                    db.orders.count_documents({}, comment=report)       # rule 1
                else:
                    with mongo(proxy.uri, appname="billing-export") as export:
                        export[db_name].orders.find_one()              # rule 4
            elapsed = time.monotonic() - started
            assert info.value.code == FAILED_TO_SATISFY_READ_PREFERENCE, info.value.details
            assert elapsed < SELECTION_TIMEOUT_MS / 1000 + PROMPT_SLACK_S, elapsed
        # auth and the default class are unaffected.
        assert who(db.users.find_one({"_id": "marker"})) == "primary"
        assert who(db.orders.find_one({"_id": "marker"})) == "primary"


# --------------------------------------------------------------------------- 3. maxTimeMS


def test_max_time_ms_is_injected_capped_and_enforced_by_the_server(
    members: Members, start_proxy: ProxyStarter, db_name: str
) -> None:
    write_markers(members, db_name)
    with direct(members.primary) as d:
        d[db_name]["big"].insert_many(
            [{"_id": i, "s": f"word{i:05d} foo"} for i in range(5000)])
    routing = example_routing()
    routing["classes"]["capped"] = {"read_preference": "primary", "max_time_ms": 1}
    routing["rules"].insert(0, {"match": {"comment": "tiny-cap"}, "class": "capped"})
    proxy = start_proxy(routing)
    with mongo(proxy.uri) as client:
        db = client[db_name]
        # The report class (cap 60000): injected when the client sets none, a larger one
        # is lowered, a smaller one is left alone. What the secondary received shows it,
        # with the $readPreference the proxy wrote for the class.
        cases = [(None, 60000), (120_000, 60000), (5000, 5000), (0, 60000)]
        for client_max, expected in cases:
            probe = f"mt-{client_max}"
            options: Doc = {} if client_max is None else {"maxTimeMS": client_max}
            docs = list(db.orders.aggregate([{"$match": {"_id": "marker"}}],
                                            comment={"class": "report", "probe": probe},
                                            **options))
            assert [d["who"] for d in docs] == ["secondary"]
            (request,) = members.secondary.requests_with(probe)
            assert max_time_of(request) == expected, request
            assert '"$readPreference": {"mode": "secondary", "tags": [{"use": "analytics"}]}' \
                in request, request
            assert not members.primary.requests_with(probe)
        # A class without a cap leaves the command alone.
        db.orders.find_one({"probe": "no-cap"})
        (request,) = members.primary.requests_with("no-cap")
        assert max_time_of(request) is None, request

        # A tiny cap (1 ms) on a 5,000-document sort: FerretDB enforces what the proxy
        # injected with MaxTimeMSExpired; the same query outside the class succeeds.
        query = {"s": {"$gte": ""}}
        for _ in range(3):
            with pytest.raises(OperationFailure) as info:
                db.big.find_one(query, sort=[("s", -1)], comment="tiny-cap")
            assert info.value.code == MAX_TIME_MS_EXPIRED, info.value.details
        (request, *_) = members.primary.requests_with('"comment": "tiny-cap"')
        assert max_time_of(request) == 1, request
        assert db.big.find_one(query, sort=[("s", -1)])["_id"] == 4999  # type: ignore[index]


# --------------------------------------------------------------------------- 4. deny


def test_deny_class_refuses_with_code_13_and_nothing_reaches_a_member(
    members: Members, start_proxy: ProxyStarter, db_name: str
) -> None:
    write_markers(members, db_name)
    routing = example_routing()
    # As the example config suggests: refuse the export job, before its report rule.
    routing["rules"].insert(4, {"match": {"app_name": "billing-export"}, "class": "blocked"})
    proxy = start_proxy(routing)
    since = {role: fdb.log_offset() for role, fdb in members.by_role().items()}
    expected = (f"mongoproxy refused this command (routing class 'blocked', rule 4): "
                f"{DENY_MESSAGE}")
    with mongo(proxy.uri, appname="billing-export") as export, mongo(proxy.uri) as client:
        exp = export[db_name]
        export.admin.command("ping")  # housekeeping is never refused
        attempts: list[Callable[[], object]] = [
            lambda: exp.orders.find_one({"probe": "deny-find"}),
            lambda: exp.orders.insert_one({"_id": "deny-insert"}),
            lambda: exp.orders.update_one({"probe": "deny-update"}, {"$set": {"x": 1}}),
            lambda: list(exp.projects.aggregate([{"$match": {"probe": "deny-aggregate"}}])),
        ]
        for attempt in attempts:
            with pytest.raises(OperationFailure) as info:
                attempt()
            assert info.value.code == UNAUTHORIZED, info.value.details
            assert info.value.details is not None
            assert info.value.details["codeName"] == "Unauthorized"
            assert info.value.details["errmsg"] == expected
        # Rule 0 comes first: the export job's users lookups still work.
        assert who(exp.users.find_one({"_id": "marker"})) == "primary"
        # Other clients are not affected.
        assert who(client[db_name].orders.find_one({"_id": "marker"})) == "primary"

    for role, fdb in members.by_role().items():
        for probe in ("deny-find", "deny-insert", "deny-update", "deny-aggregate"):
            assert not fdb.requests_with(probe, since[role]), (role, probe)
    assert ids_on(members.primary, db_name, "orders") == {"marker"}
    assert ids_on(members.secondary, db_name, "orders") == {"marker"}
    denied = [op for op in slow_ops(proxy) if op["error_code"] == UNAUTHORIZED]
    assert len(denied) == len(attempts), denied
    assert all(op["member"] is None for op in denied), denied


# --------------------------------------------------------------------------- 5. reload


def test_reload_under_load_sighup_invalid_file_and_file_watch(
    members: Members, start_proxy: ProxyStarter, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy()
    assert reloads(proxy) == {"ok": 0.0, "failed": 0.0}
    results: list[tuple[float, str]] = []
    errors: list[tuple[float, BaseException]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def traffic() -> None:
        with mongo(proxy.uri) as client:
            users = client[db_name].users
            while not stop.is_set():
                try:
                    answer = who(users.find_one({"_id": "marker"}))  # rule 0
                    with lock:
                        results.append((time.monotonic(), answer))
                except (PyMongoError, AssertionError) as exc:
                    with lock:
                        errors.append((time.monotonic(), exc))

    def answers_between(start: float, end: float = float("inf")) -> set[str]:
        with lock:
            return {answer for t, answer in results if start <= t < end}

    def until(label: str, timeout: float, expected: str) -> float:
        """Seconds until every new request of the traffic threads answers ``expected``."""
        started = time.monotonic()
        while True:
            now = time.monotonic()
            time.sleep(0.3)
            if answers_between(now) == {expected}:
                return now - started
            assert now - started < timeout, f"{label}: {answers_between(now)}\n" + log_tail(
                proxy)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        assert answers_between(0) == {"primary"}

        # 1. SIGHUP: rule 0 now routes to the report class (the tagged secondary). The
        # file keeps its size and mtime, so the watcher cannot be what applies it.
        new = copy.deepcopy(proxy.config)
        new["routing"]["rules"][0]["class"] = "report"
        proxy.rewrite(new, keep_stamp=True)
        time.sleep(1.5)  # more than the watcher's poll interval: nothing changes
        assert answers_between(time.monotonic() - 0.5) == {"primary"}
        proxy.send_signal(signal.SIGHUP)
        took = until("after SIGHUP", 2.0, "secondary")
        assert reloads(proxy) == {"ok": 1.0, "failed": 0.0}
        assert "config reloaded from" in proxy.log_text()

        # 2. An invalid edit (an unknown class in rule 5) and SIGHUP: refused, the key
        # path is logged, the old rules keep serving.
        bad = copy.deepcopy(new)
        bad["routing"]["rules"].append({"match": {"collection": "users"}, "class": "nope"})
        proxy.rewrite(bad, keep_stamp=True)
        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "routing.rules.5.class" not in proxy.log_text():
            assert time.monotonic() < deadline, log_tail(proxy)
            time.sleep(0.05)
        refused = [line for line in proxy.log_text().splitlines()
                   if "routing.rules.5.class" in line]
        assert len(refused) == 1, refused
        assert "ERROR" in refused[0] and "unknown class 'nope'" in refused[0], refused
        after_bad = time.monotonic()
        time.sleep(1.0)
        assert answers_between(after_bad) == {"secondary"}
        assert reloads(proxy) == {"ok": 1.0, "failed": 1.0}

        # 3. The file watcher: a valid edit, no signal, applied within ~3 s.
        back = copy.deepcopy(new)
        back["routing"]["rules"][0]["class"] = "auth"
        proxy.rewrite(back, keep_stamp=False)
        watched = until("file watch", 3.0, "primary")
        assert reloads(proxy) == {"ok": 2.0, "failed": 1.0}
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}\n" + log_tail(
        proxy)
    assert len(results) > 100, len(results)
    print(f"SIGHUP applied within {took:.2f} s, the file watch within {watched:.2f} s, "
          f"{len(results)} requests, none failed")


# --------------------------------------------------------------------------- 6. explain-route


def explain(config: Path, command: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "explain-route", "--config", str(config), command,
         *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


EXPLAIN_OFFLINE = [
    ('{"find": "users", "filter": {"_id": "u1"}, "$db": "app"}', (), """\
command:          find on app.users (read)
features:         -
tenancy:          off (tenancy.mode: off): not checked
class:            auth
rule:             #0 {match: {command: [find, count], collection: users}, class: auth}
read preference:  {mode: primary} (class 'auth')
cache:            not configured (no cache: section)
"""),
    ('{"find": "orders", "filter": {}, "comment": {"class": "report"}, "$db": "app"}', (), """\
command:          find on app.orders (read)
features:         comment {"class": "report"}
tenancy:          off (tenancy.mode: off): not checked
class:            report
rule:             #1 {match: {comment: {class: report}}, class: report}
read preference:  {mode: secondary, tags: [{"use": "analytics"}]} (class 'report')
maxTimeMS:        set to 60000 (class cap)
cache:            not configured (no cache: section)
"""),
    ('{"aggregate": "projects", "pipeline": [{"$group": {"_id": "$owner"}}], "cursor": {},'
     ' "$db": "app"}', (), """\
command:          aggregate on app.projects (read)
features:         stages $group
tenancy:          off (tenancy.mode: off): not checked
class:            dashboard
rule:             #2 {match: {command: aggregate, collection: projects|portfolios, \
has_stage: $group}, class: dashboard}
read preference:  {mode: secondaryPreferred, maxStalenessSeconds: 90} (class 'dashboard')
cache:            not configured (no cache: section)
"""),
    ('{"find": "docs", "filter": {"$text": {"$search": "mongo"}}, "$db": "app"}', (), """\
command:          find on app.docs (read)
features:         text search
tenancy:          off (tenancy.mode: off): not checked
class:            search
rule:             #3 {match: {text_search: true}, class: search}
read preference:  {mode: nearest} (class 'search')
cache:            not configured (no cache: section)
"""),
    ('{"find": "orders", "filter": {}, "$readPreference": {"mode": "primary"}, "$db": "app"}',
     ("--app-name", "billing-export"), """\
command:          find on app.orders (read)
features:         appName 'billing-export'
tenancy:          off (tenancy.mode: off): not checked
class:            report
rule:             #4 {match: {app_name: billing-export}, class: report}
read preference:  {mode: secondary, tags: [{"use": "analytics"}]} (class 'report'; \
the client's {mode: primary} is overridden)
maxTimeMS:        set to 60000 (class cap)
cache:            not configured (no cache: section)
"""),
    ('{"insert": "orders", "documents": [{"_id": 1}], "comment": {"class": "report"},'
     ' "$db": "app"}', (), """\
command:          insert on app.orders (write)
features:         comment {"class": "report"}
tenancy:          off (tenancy.mode: off): not checked
class:            report
rule:             #1 {match: {comment: {class: report}}, class: report}
read preference:  {mode: primary} (writes always go to the primary)
maxTimeMS:        set to 60000 (class cap)
cache:            not configured (no cache: section)
"""),
    ('{"find": "orders", "filter": {}, "$db": "app"}', (), """\
command:          find on app.orders (read)
features:         -
tenancy:          off (tenancy.mode: off): not checked
class:            default
rule:             none matched (routing.default)
read preference:  {mode: primary} (class 'default')
cache:            not configured (no cache: section)
"""),
]


@pytest.mark.parametrize(("command", "extra", "expected"), EXPLAIN_OFFLINE,
                         ids=["auth", "report-comment", "dashboard", "search",
                              "report-app-name", "write", "default"])
def test_explain_route_offline_for_the_example_config(
    command: str, extra: tuple[str, ...], expected: str
) -> None:
    output = explain(EXAMPLE_CONFIG, command, "--offline", *extra)
    # Compared line by line; the CLI prints one empty line after the block.
    assert output.rstrip("\n").splitlines() == expected.rstrip("\n").splitlines()


def test_explain_route_names_the_member_it_would_pick_now(
    members: Members, tmp_path: Path
) -> None:
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["upstream"] = declared_upstream(members)
    del config["upstream"]["uri"]
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    primary, secondary = members.primary.address, members.secondary.address

    def member_line(command: str, *extra: str) -> str:
        lines = explain(path, command, *extra).splitlines()
        (line,) = [line for line in lines if line.startswith("member:")]
        return line

    rtt = r"rtt \d+\.\d ms"
    line = member_line('{"find": "users", "filter": {}, "$db": "app"}')
    assert re.fullmatch(rf"member: +{primary} \(RSPrimary, {rtt}\)", line), line
    line = member_line('{"find": "orders", "filter": {}, "$db": "app"}',
                       "--app-name", "billing-export")
    assert re.fullmatch(
        rf'member: +{secondary} \(RSSecondary, {rtt}, tags \{{"use": "analytics"\}}\)',
        line), line
    line = member_line('{"aggregate": "projects", "pipeline": [{"$group": {"_id": 1}}], '
                       '"cursor": {}, "$db": "app"}')
    assert re.fullmatch(
        rf'member: +{secondary} \(RSSecondary, {rtt}, tags \{{"use": "analytics"\}}\) '
        r"\(maxStalenessSeconds not applied: the members report no lastWrite\)", line), line
    line = member_line('{"find": "docs", "filter": {"$text": {"$search": "x"}}, "$db": "app"}')
    assert line.startswith("member:") and (primary in line or secondary in line), line

    members.secondary.stop()
    line = member_line('{"find": "orders", "filter": {}, "comment": {"class": "report"}, '
                       '"$db": "app"}')
    assert line == (
        'member:           none: no member is suitable for {mode: secondary, tags: '
        f'[{{"use": "analytics"}}]}}; topology: ReplicaSetWithPrimary [{primary} RSPrimary, '
        f"{secondary} Unknown]"), line
