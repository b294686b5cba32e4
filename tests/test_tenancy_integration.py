"""Tenant isolation end to end: real pymongo clients, the proxy, a real FerretDB.

1. A table of commands in ``enforce`` mode (no proxy users: each command must name one
   tenant), each checked for its exact outcome, and -- for every refusal -- that the
   database is byte-for-byte unchanged, read over a direct connection to FerretDB.
2. Two tenants with SCRAM-SHA-256 proxy users: each sees only its own documents through
   find, aggregate, count, distinct and cursors; neither can write, update, delete or
   upsert into the other; a cursor id of one is refused to the other.
3. ``inject`` mode: an application that never mentions ``tenant_id`` reads and writes only
   its tenant's documents.
4. ``audit`` mode forwards, logs one structured line and counts the violation.

FerretDB v1.24 has no ``$lookup``/``$unionWith``/``$graphLookup``/``$facet``/``$out``/
``$merge``: for those stages the table checks the proxy's side only -- a confined stage is
forwarded (FerretDB then answers with its own error, never code 13) and an unconfined one
is refused by the proxy before anything reaches the server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import Int64
from pymongo import InsertOne, MongoClient, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

from proxy.identity.credentials import hash_password
from tests.support import FerretDBProcess, ProxyProcess

Doc = dict[str, Any]
UNAUTHORIZED = 13
DB = "tenancy_e2e"
EXEMPT = ["tenants", "system.*", "admin.*", "config.*", "local.*"]
PASSWORDS = {"acme_app": "acme-secret", "globex_app": "globex-secret", "ops_admin": "ops"}
TENANT_OF = {"acme_app": "acme", "globex_app": "globex", "ops_admin": "*"}
FORWARDED = "forwarded"  # reached FerretDB: ok, or FerretDB's own error (never 13)


def _cli_credential(user: str) -> str:
    """The stored credential as an operator makes it: ``mongoproxy hash-password``."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-password", "--iterations", "4096", user],
        input=PASSWORDS[user] + "\n", capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


def _users() -> list[Doc]:
    return [{"username": u,
             "password_sha256": _cli_credential(u) if u == "acme_app"
             else hash_password(p, iterations=4096),
             "tenant": TENANT_OF[u]} for u, p in PASSWORDS.items()]


def _proxy(ferretdb: FerretDBProcess, workdir: Path, tenancy: Doc) -> ProxyProcess:
    return ProxyProcess(ferretdb.uri, {"tenancy": {"exempt": EXEMPT, **tenancy}},
                        workdir=workdir).start()


@pytest.fixture(scope="module")
def direct(ferretdb: FerretDBProcess) -> Iterator[MongoClient[Doc]]:
    client: MongoClient[Doc] = MongoClient(ferretdb.uri)
    yield client
    client.close()


def _seed(direct: MongoClient[Doc], db: str) -> None:
    direct.drop_database(db)
    tasks = [{"_id": f"{t}-{i}", "tenant_id": t, "status": "open" if i % 2 else "done",
              "n": i} for t in ("a", "b", "acme", "globex") for i in range(5)]
    direct[db].tasks.insert_many(tasks)
    direct[db].projects.insert_many([{"_id": f"p-{t}", "tenant_id": t}
                                     for t in ("a", "b", "acme", "globex")])
    direct[db].tenants.insert_many([{"_id": t} for t in ("a", "b", "acme", "globex")])


def _snapshot(direct: MongoClient[Doc], db: str) -> dict[str, list[Doc]]:
    database = direct[db]
    return {name: sorted(database[name].find(), key=repr)
            for name in sorted(database.list_collection_names())}


# ---------------------------------------------------------------------- the command table

def _c(name: str, target: Any = "tasks", **fields: Any) -> Doc:
    return {name: target, **fields}


def _agg(*stages: Doc, coll: str = "tasks") -> Doc:
    return {"aggregate": coll, "pipeline": list(stages), "cursor": {}}


A = {"$match": {"tenant_id": "a"}}
GROUP = {"$group": {"_id": "$status", "n": {"$sum": 1}}}

# (id, command, expected: None = ok, FORWARDED, or an error code, errmsg fragment)
TABLE: list[tuple[str, Doc, Any, str]] = [
    # --- reads that name exactly one tenant
    ("find-eq", _c("find", filter={"tenant_id": "a"}), None, ""),
    ("find-eq-and-more", _c("find", filter={"tenant_id": "a", "status": "open"}), None, ""),
    ("find-in-and", _c("find", filter={"$and": [{"tenant_id": "a"}, {"n": 1}]}), None, ""),
    ("find-$eq", _c("find", filter={"tenant_id": {"$eq": "a"}}), None, ""),
    ("find-or-beside-tenant",
     _c("find", filter={"tenant_id": "a", "$or": [{"n": 1}, {"n": 2}]}), None, ""),
    ("find-sort-projection",
     _c("find", filter={"tenant_id": "a"}, sort={"n": -1}, projection={"n": 1}), None, ""),
    ("count-eq", _c("count", query={"tenant_id": "a"}), None, ""),
    ("distinct-eq", _c("distinct", key="status", query={"tenant_id": "a"}), None, ""),
    ("aggregate-match-group", _agg(A, GROUP), None, ""),
    ("aggregate-match-and", _agg({"$match": {"$and": [{"tenant_id": "a"}, {"n": 2}]}}),
     None, ""),
    ("explain-find", {"explain": _c("find", filter={"tenant_id": "a"})}, None, ""),
    ("explain-aggregate", {"explain": _agg(A, GROUP)}, None, ""),
    ("find-exempt", _c("find", "tenants", filter={}), None, ""),
    ("findAndModify-eq",
     _c("findAndModify", query={"tenant_id": "a", "_id": "a-1"},
        update={"$set": {"status": "seen"}}), None, ""),
    # --- reads that are not confined
    ("find-no-filter", _c("find"), UNAUTHORIZED, "filter of find"),
    ("find-empty-filter", _c("find", filter={}), UNAUTHORIZED, "tenant_id"),
    ("find-other-field", _c("find", filter={"status": "open"}), UNAUTHORIZED, "tenant_id"),
    ("find-$in", _c("find", filter={"tenant_id": {"$in": ["a", "b"]}}), UNAUTHORIZED, ""),
    ("find-$ne", _c("find", filter={"tenant_id": {"$ne": "a"}}), UNAUTHORIZED, ""),
    ("find-$regex", _c("find", filter={"tenant_id": {"$regex": "^a"}}), UNAUTHORIZED, ""),
    ("find-$exists", _c("find", filter={"tenant_id": {"$exists": True}}), UNAUTHORIZED, ""),
    ("find-null", _c("find", filter={"tenant_id": None}), UNAUTHORIZED, ""),
    ("find-or-of-tenants",
     _c("find", filter={"$or": [{"tenant_id": "a"}, {"tenant_id": "b"}]}), UNAUTHORIZED, ""),
    ("find-two-tenants-in-and",
     _c("find", filter={"tenant_id": "a", "$and": [{"tenant_id": "b"}]}), UNAUTHORIZED, ""),
    ("find-nor", _c("find", filter={"$nor": [{"tenant_id": "a"}]}), UNAUTHORIZED, ""),
    ("count-no-query", _c("count"), UNAUTHORIZED, "count"),
    ("count-other-tenant-widened",
     _c("count", query={"$or": [{"tenant_id": "a"}, {"n": 1}]}), UNAUTHORIZED, ""),
    ("distinct-no-query", _c("distinct", key="status"), UNAUTHORIZED, "distinct"),
    ("aggregate-empty", _agg(), UNAUTHORIZED, "aggregate"),
    ("aggregate-group-first", _agg(GROUP, A), UNAUTHORIZED, "$match"),
    ("aggregate-match-other", _agg({"$match": {"status": "open"}}), UNAUTHORIZED, ""),
    ("aggregate-match-$in",
     _agg({"$match": {"tenant_id": {"$in": ["a", "b"]}}}), UNAUTHORIZED, ""),
    ("explain-find-unconfined", {"explain": _c("find", filter={})}, UNAUTHORIZED, ""),
    ("findAndModify-unconfined",
     _c("findAndModify", query={"_id": "a-1"}, update={"$set": {"status": "x"}}),
     UNAUTHORIZED, ""),
    ("findAndModify-remove-unconfined", _c("findAndModify", query={}, remove=True),
     UNAUTHORIZED, ""),
    # --- pipelines reading or writing other collections
    ("lookup-unconfined",
     _agg(A, {"$lookup": {"from": "projects", "localField": "p", "foreignField": "_id",
                          "as": "p"}}), UNAUTHORIZED, "$lookup"),
    ("lookup-pipeline-other-tenant",
     _agg(A, {"$lookup": {"from": "projects", "pipeline": [{"$match": {"tenant_id": "b"}}],
                          "as": "p"}}), UNAUTHORIZED, ""),
    ("lookup-pipeline-confined",
     _agg(A, {"$lookup": {"from": "projects", "pipeline": [{"$match": {"tenant_id": "a"}}],
                          "as": "p"}}), FORWARDED, ""),
    ("lookup-exempt", _agg(A, {"$lookup": {"from": "tenants", "localField": "tenant_id",
                                           "foreignField": "_id", "as": "t"}}),
     FORWARDED, ""),
    ("unionWith-unconfined", _agg(A, {"$unionWith": "projects"}), UNAUTHORIZED, ""),
    ("unionWith-confined",
     _agg(A, {"$unionWith": {"coll": "projects", "pipeline": [A]}}), FORWARDED, ""),
    ("graphLookup-unconfined",
     _agg(A, {"$graphLookup": {"from": "tasks", "startWith": "$p", "connectFromField": "p",
                               "connectToField": "_id", "as": "g"}}), UNAUTHORIZED, ""),
    ("facet-with-unconfined-lookup",
     _agg(A, {"$facet": {"x": [{"$lookup": {"from": "projects", "localField": "p",
                                            "foreignField": "_id", "as": "p"}}]}}),
     UNAUTHORIZED, ""),
    ("out-to-exempt", _agg(A, {"$out": "tenants"}), UNAUTHORIZED, "$out"),
    ("merge-to-exempt", _agg(A, {"$merge": {"into": "tenants"}}), UNAUTHORIZED, "$merge"),
    # $out replaces its whole target collection, other tenants' documents included.
    ("out-to-scoped", _agg(A, {"$out": "tasks_copy"}), UNAUTHORIZED,
     "replaces the whole target collection"),
    ("merge-on-without-tenant", _agg(A, {"$merge": {"into": "tasks_copy"}}), UNAUTHORIZED,
     "'on' must include tenant_id"),
    # Merged documents must provably carry the tenant: a $set of it right before $merge.
    ("merge-without-tenant-set",
     _agg(A, {"$merge": {"into": "tasks_copy", "on": ["tenant_id", "_id"]}}), UNAUTHORIZED,
     "must be preceded by {$set: {tenant_id: <tenant>}}"),
    ("merge-to-scoped",
     _agg(A, {"$set": {"tenant_id": "a"}},
          {"$merge": {"into": "tasks_copy", "on": ["tenant_id", "_id"]}}), FORWARDED, ""),
    # --- writes
    ("insert-with-tenant", _c("insert", documents=[{"tenant_id": "a", "k": "ins"}]), None, ""),
    # Exempt collections are shared reference data: readable by all, written by "*" only.
    ("insert-exempt", _c("insert", "tenants", documents=[{"_id": "new"}]), UNAUTHORIZED,
     "exempt namespace"),
    ("insert-missing-tenant", _c("insert", documents=[{"k": "x"}]), UNAUTHORIZED,
     "document 0 has no tenant_id"),
    ("insert-one-of-batch-missing",
     _c("insert", documents=[{"tenant_id": "a", "k": 1}, {"k": 2}]), UNAUTHORIZED, ""),
    ("insert-two-tenants", _c("insert", documents=[{"tenant_id": "a"}, {"tenant_id": "b"}]),
     UNAUTHORIZED, ""),
    ("insert-tenant-operator", _c("insert", documents=[{"tenant_id": {"$gt": ""}}]),
     UNAUTHORIZED, ""),
    ("update-confined",
     _c("update", updates=[{"q": {"tenant_id": "a", "_id": "a-2"},
                            "u": {"$set": {"status": "done"}}}]), None, ""),
    ("update-replacement-same-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a", "_id": "a-3"},
                            "u": {"tenant_id": "a", "status": "replaced"}}]), None, ""),
    ("upsert-confined",
     _c("update", updates=[{"q": {"tenant_id": "a", "k": "up"}, "u": {"$set": {"v": 1}},
                            "upsert": True}]), None, ""),
    ("update-unconfined",
     _c("update", updates=[{"q": {"_id": "a-2"}, "u": {"$set": {"status": "x"}}}]),
     UNAUTHORIZED, ""),
    ("update-set-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a"}, "u": {"$set": {"tenant_id": "b"}},
                            "multi": True}]), UNAUTHORIZED, "tenant_id"),
    ("update-unset-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a"}, "u": {"$unset": {"tenant_id": ""}}}]),
     UNAUTHORIZED, ""),
    ("update-rename-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a"},
                            "u": {"$rename": {"tenant_id": "old"}}}]), UNAUTHORIZED, ""),
    ("update-replacement-without-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a", "_id": "a-4"}, "u": {"status": "x"}}]),
     UNAUTHORIZED, ""),
    ("update-replacement-other-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a", "_id": "a-4"},
                            "u": {"tenant_id": "b"}}]), UNAUTHORIZED, ""),
    ("update-pipeline-sets-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a"}, "u": [{"$set": {"tenant_id": "b"}}]}]),
     UNAUTHORIZED, ""),
    ("upsert-setOnInsert-other-tenant",
     _c("update", updates=[{"q": {"tenant_id": "a", "k": "z"},
                            "u": {"$setOnInsert": {"tenant_id": "b"}}, "upsert": True}]),
     UNAUTHORIZED, ""),
    ("update-second-statement-unconfined",
     _c("update", updates=[{"q": {"tenant_id": "a"}, "u": {"$set": {"s": 1}}},
                           {"q": {}, "u": {"$set": {"s": 2}}, "multi": True}]),
     UNAUTHORIZED, "q of statement 1 of update"),
    ("delete-confined", _c("delete", deletes=[{"q": {"tenant_id": "a", "_id": "a-0"},
                                               "limit": 1}]), None, ""),
    ("delete-empty-filter", _c("delete", deletes=[{"q": {}, "limit": 0}]), UNAUTHORIZED, ""),
    ("delete-other-field", _c("delete", deletes=[{"q": {"status": "open"}, "limit": 0}]),
     UNAUTHORIZED, ""),
    ("findAndModify-set-tenant",
     _c("findAndModify", query={"tenant_id": "a"}, update={"$set": {"tenant_id": "b"}}),
     UNAUTHORIZED, ""),
    # --- operator commands, unknown commands, cursors
    ("drop-scoped", _c("drop"), UNAUTHORIZED, ""),
    ("createIndexes-scoped",
     _c("createIndexes", indexes=[{"key": {"tenant_id": 1, "x": 1}, "name": "t_x"}]),
     UNAUTHORIZED, ""),
    ("renameCollection", {"renameCollection": f"{DB}.tasks", "to": f"{DB}.stolen"},
     UNAUTHORIZED, ""),
    ("mapReduce", _c("mapReduce", map="function(){}", reduce="function(){}",
                     out={"inline": 1}), UNAUTHORIZED, ""),
    ("unknown-command", _c("frobnicate"), UNAUTHORIZED, ""),
    ("getMore-unknown-cursor", {"getMore": Int64(424242), "collection": "tasks"},
     UNAUTHORIZED, "cursor"),
    ("killCursors-unknown", _c("killCursors", cursors=[Int64(424242)]), UNAUTHORIZED,
     "cursor"),
    ("ping", {"ping": 1}, None, ""),
]


@pytest.fixture(scope="module")
def enforce_proxy(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proc = _proxy(ferretdb, tmp_path_factory.mktemp("enforce"), {"mode": "enforce"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def seeded(direct: MongoClient[Doc]) -> str:
    _seed(direct, DB)
    return DB


@pytest.fixture(scope="module")
def enforce_db(enforce_proxy: ProxyProcess, seeded: str) -> Iterator[Database[Doc]]:
    client: MongoClient[Doc] = MongoClient(enforce_proxy.uri, retryWrites=False)
    yield client[seeded]
    client.close()


def test_the_table_has_sixty_rows_and_covers_both_outcomes() -> None:
    assert len(TABLE) >= 60
    assert len({row[0] for row in TABLE}) == len(TABLE)
    assert sum(row[2] == UNAUTHORIZED for row in TABLE) >= 40


@pytest.mark.parametrize(("command", "expected", "fragment"),
                         [pytest.param(*row[1:], id=row[0]) for row in TABLE])
def test_enforce_table(
    enforce_db: Database[Doc],
    direct: MongoClient[Doc],
    command: Doc,
    expected: Any,
    fragment: str,
) -> None:
    before = _snapshot(direct, DB)
    try:
        reply = enforce_db.command(command)
    except OperationFailure as exc:
        if expected is None:
            raise
        if expected == FORWARDED:
            assert exc.code != UNAUTHORIZED, exc.details
            return
        assert exc.code == expected, exc.details
        assert exc.details is not None
        assert exc.details["codeName"] == "Unauthorized"
        assert fragment in exc.details["errmsg"], exc.details["errmsg"]
        assert _snapshot(direct, DB) == before, "a refused command changed the database"
        return
    assert expected in (None, FORWARDED), f"expected code {expected}, got {reply}"
    if "writeErrors" in reply:
        pytest.fail(f"write errors: {reply['writeErrors']}")


def test_insert_many_as_document_sequence(
    enforce_db: Database[Doc], direct: MongoClient[Doc]
) -> None:
    """pymongo sends insert_many/bulk_write documents as an OP_MSG document sequence:
    the policy reads them there too; nothing of a refused batch is written."""
    coll = enforce_db.seq
    coll.insert_many([{"tenant_id": "a", "i": i} for i in range(3)])
    assert direct[DB].seq.count_documents({}) == 3
    with pytest.raises(OperationFailure) as info:
        coll.insert_many([{"tenant_id": "a", "i": 3}, {"i": 4}])
    assert info.value.code == UNAUTHORIZED
    assert direct[DB].seq.count_documents({}) == 3
    # An ordered bulk write is one command per run of one kind: the insert is confined
    # and lands, the unconfined update is refused and changes nothing.
    with pytest.raises(OperationFailure) as bulk_info:
        coll.bulk_write([InsertOne({"tenant_id": "a"}),
                         UpdateOne({"i": 1}, {"$set": {"x": 1}})])
    assert bulk_info.value.code == UNAUTHORIZED
    assert direct[DB].seq.count_documents({}) == 4
    assert direct[DB].seq.count_documents({"x": 1}) == 0


# ------------------------------------------------------------------ two SCRAM tenants

@pytest.fixture(scope="module")
def scram_proxy(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proc = _proxy(ferretdb, tmp_path_factory.mktemp("scram"),
                  {"mode": "enforce", "users": _users()})
    yield proc
    proc.stop()


def _login(proxy: ProxyProcess, user: str) -> MongoClient[Doc]:
    return MongoClient(proxy.uri, username=user, password=PASSWORDS[user],
                       authMechanism="SCRAM-SHA-256", retryWrites=False)


@pytest.fixture(scope="module")
def tenants(
    scram_proxy: ProxyProcess, direct: MongoClient[Doc]
) -> Iterator[dict[str, Database[Doc]]]:
    db = DB + "_scram"
    _seed(direct, db)
    clients = {user: _login(scram_proxy, user) for user in PASSWORDS}
    yield {TENANT_OF[user]: client[db] for user, client in clients.items()}
    for client in clients.values():
        client.close()


@pytest.mark.parametrize(("me", "other"), [("acme", "globex"), ("globex", "acme")])
def test_each_tenant_reads_only_its_own_documents(
    tenants: dict[str, Database[Doc]], me: str, other: str
) -> None:
    db = tenants[me]
    docs = list(db.tasks.find({"tenant_id": me}, batch_size=2))  # several getMores
    assert len(docs) == 5 and {d["tenant_id"] for d in docs} == {me}
    assert db.tasks.count_documents({"tenant_id": me}) == 5
    assert db.command("count", "tasks", query={"tenant_id": me})["n"] == 5
    assert sorted(db.tasks.distinct("status", {"tenant_id": me})) == ["done", "open"]
    groups = list(db.tasks.aggregate([{"$match": {"tenant_id": me}}, GROUP]))
    assert sum(g["n"] for g in groups) == 5
    for read in (
        lambda: list(db.tasks.find({"tenant_id": other})),
        lambda: list(db.tasks.find({})),
        lambda: db.tasks.count_documents({"tenant_id": other}),
        lambda: db.tasks.distinct("status", {"tenant_id": other}),
        lambda: list(db.tasks.aggregate([{"$match": {"tenant_id": other}}])),
        lambda: list(db.tasks.aggregate([
            {"$match": {"tenant_id": me}},
            {"$lookup": {"from": "projects", "pipeline": [{"$match": {"tenant_id": other}}],
                         "as": "p"}}])),
    ):
        with pytest.raises(OperationFailure) as info:
            read()
        assert info.value.code == UNAUTHORIZED
        assert f'"{me}"' in str(info.value) or "tenant" in str(info.value)
    # A $lookup confined to its own tenant passes the proxy; FerretDB v1.24 has no
    # $lookup, so its answer is FerretDB's own refusal -- proof it was forwarded.
    with pytest.raises(OperationFailure) as lookup:
        list(db.tasks.aggregate([
            {"$match": {"tenant_id": me}},
            {"$lookup": {"from": "projects", "pipeline": [{"$match": {"tenant_id": me}}],
                         "as": "p"}}]))
    assert lookup.value.code != UNAUTHORIZED


@pytest.mark.parametrize(("me", "other"), [("acme", "globex"), ("globex", "acme")])
def test_no_tenant_writes_into_another(
    tenants: dict[str, Database[Doc]], direct: MongoClient[Doc], me: str, other: str
) -> None:
    db = tenants[me]
    before = _snapshot(direct, db.name)
    for write in (
        lambda: db.tasks.insert_one({"tenant_id": other, "k": "intrude"}),
        lambda: db.tasks.insert_many([{"tenant_id": me}, {"tenant_id": other}]),
        lambda: db.tasks.update_one({"tenant_id": other}, {"$set": {"status": "x"}}),
        lambda: db.tasks.update_many({"tenant_id": me}, {"$set": {"tenant_id": other}}),
        lambda: db.tasks.replace_one({"tenant_id": me, "_id": f"{me}-1"},
                                     {"tenant_id": other}),
        lambda: db.tasks.update_one({"tenant_id": other, "k": "u"}, {"$set": {"v": 1}},
                                    upsert=True),
        lambda: db.tasks.delete_many({"tenant_id": other}),
        lambda: db.tasks.find_one_and_delete({"tenant_id": other}),
        lambda: db.tasks.delete_many({}),
    ):
        with pytest.raises((OperationFailure, BulkWriteError)) as info:
            write()
        assert info.value.code == UNAUTHORIZED, info.value.details
    assert _snapshot(direct, db.name) == before
    # Its own writes go through.
    db.tasks.insert_one({"tenant_id": me, "k": "mine"})
    assert direct[db.name].tasks.count_documents({"tenant_id": me, "k": "mine"}) == 1


def test_a_cursor_id_of_one_tenant_is_refused_to_the_other(
    tenants: dict[str, Database[Doc]]
) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    opened = acme.command("find", "tasks", filter={"tenant_id": "acme"}, batchSize=1)
    cursor_id = opened["cursor"]["id"]
    assert cursor_id != 0
    with pytest.raises(OperationFailure) as info:
        globex.command("getMore", cursor_id, collection="tasks")
    assert info.value.code == UNAUTHORIZED
    assert "another tenant" in str(info.value)
    with pytest.raises(OperationFailure) as kill:
        globex.command("killCursors", "tasks", cursors=[cursor_id])
    assert kill.value.code == UNAUTHORIZED
    more = acme.command("getMore", cursor_id, collection="tasks", batchSize=1)
    assert [d["tenant_id"] for d in more["cursor"]["nextBatch"]] == ["acme"]
    acme.command("killCursors", "tasks", cursors=[cursor_id])


def test_superuser_crosses_tenants_and_unauthenticated_is_refused(
    tenants: dict[str, Database[Doc]], scram_proxy: ProxyProcess
) -> None:
    everyone = tenants["*"]
    assert {d["tenant_id"] for d in everyone.tasks.find({})} == {"a", "b", "acme", "globex"}
    audit = [line for line in scram_proxy.log_text().splitlines()
             if "tenancy superuser" in line and '"command": "find"' in line]
    assert audit and '"user": "ops_admin"' in audit[-1]
    assert f'"namespace": "{everyone.name}"' in audit[-1]
    anonymous: MongoClient[Doc] = MongoClient(scram_proxy.uri)
    try:
        with pytest.raises(OperationFailure) as info:
            anonymous[everyone.name].tasks.find_one({"tenant_id": "acme"})
        assert info.value.code == UNAUTHORIZED
        assert "requires authentication" in str(info.value)
    finally:
        anonymous.close()
    wrong: MongoClient[Doc] = MongoClient(scram_proxy.uri, username="acme_app",
                                          password="wrong", authMechanism="SCRAM-SHA-256")
    try:
        with pytest.raises(OperationFailure) as failed:
            wrong.admin.command("ping")
        assert failed.value.code == 18  # AuthenticationFailed
    finally:
        wrong.close()


# ------------------------------------------------------------------------- inject mode

@pytest.fixture(scope="module")
def inject_proxy(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proc = _proxy(ferretdb, tmp_path_factory.mktemp("inject"),
                  {"mode": "inject", "users": _users()})
    yield proc
    proc.stop()


def test_inject_mode_confines_an_application_that_never_names_the_tenant(
    inject_proxy: ProxyProcess, direct: MongoClient[Doc]
) -> None:
    name = DB + "_inject"
    _seed(direct, name)
    acme_client = _login(inject_proxy, "acme_app")
    try:
        db = acme_client[name]
        # Reads: only acme's documents, whatever the filter says (or doesn't).
        assert {d["tenant_id"] for d in db.tasks.find({}, batch_size=2)} == {"acme"}
        assert db.tasks.count_documents({}) == 5
        assert db.tasks.count_documents({"status": "open"}) == 2
        assert sorted(db.tasks.distinct("_id")) == [f"acme-{i}" for i in range(5)]
        assert sum(g["n"] for g in db.tasks.aggregate([GROUP])) == 5
        # Writes: inserted documents carry the tenant, updates and deletes touch only it.
        db.tasks.insert_one({"_id": "new-1", "title": "from the app"})
        db.tasks.insert_many([{"_id": "new-2"}, {"_id": "new-3"}])
        stored = direct[name].tasks.find({"_id": {"$in": ["new-1", "new-2", "new-3"]}})
        assert {d["tenant_id"] for d in stored} == {"acme"}
        assert db.tasks.update_many({}, {"$set": {"touched": True}}).matched_count == 8
        assert direct[name].tasks.count_documents({"touched": True}) == 8
        assert direct[name].tasks.count_documents(
            {"touched": True, "tenant_id": {"$ne": "acme"}}) == 0
        assert db.tasks.delete_many({"status": "done"}).deleted_count == 3
        assert direct[name].tasks.count_documents({"tenant_id": "globex"}) == 5
        assert direct[name].tasks.count_documents({"tenant_id": "acme"}) == 5
        # An explicit other tenant is still refused, not silently rewritten.
        with pytest.raises(OperationFailure) as info:
            db.tasks.find_one({"tenant_id": "globex"})
        assert info.value.code == UNAUTHORIZED
    finally:
        acme_client.close()


# -------------------------------------------------------------------------- audit mode

def _metric(admin_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and 'mode="audit"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_audit_mode_forwards_logs_and_counts(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory,
    direct: MongoClient[Doc],
) -> None:
    name = DB + "_audit"
    _seed(direct, name)
    proc = _proxy(ferretdb, tmp_path_factory.mktemp("audit"), {"mode": "audit"})
    client: MongoClient[Doc] = MongoClient(proc.uri, retryWrites=False, appname="auditor")
    try:
        counter = "mongoproxy_tenancy_violations_total"
        assert _metric(proc.admin_url, counter) == 0
        assert len(list(client[name].tasks.find({}))) == 20  # forwarded: every tenant
        client[name].tasks.insert_one({"k": "no tenant"})
        assert direct[name].tasks.count_documents({"k": "no tenant"}) == 1
        list(client[name].tasks.find({"tenant_id": "a"}))  # confined: not a violation
        assert _metric(proc.admin_url, counter) == 2
        lines = [line for line in proc.log_text().splitlines() if "tenancy violation" in line]
        assert len(lines) == 2
        assert re.search(r'"app_name": "auditor".*"command": "find"', lines[0])
        assert f'"namespace": "{name}.tasks"' in lines[0]
    finally:
        client.close()
        proc.stop()
