"""Command classification (``proxy.classify``): a pure function, tested as a table of
commands as drivers send them (decoded from BSON, as the proxy sees them)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import bson
import pytest
from bson.binary import Binary, UuidRepresentation
from bson.int64 import Int64
from bson.son import SON

from proxy.classify import (
    READ_COMMANDS,
    Classification,
    ClientContext,
    classify,
)

LSID = {"id": Binary.from_uuid(uuid.UUID(int=7), UuidRepresentation.STANDARD)}
TXN = {"lsid": LSID, "txnNumber": Int64(3), "autocommit": False}
CTX = ClientContext(app_name="svc", user="ana", tenant="acme")


def _cmd(doc: dict[str, Any], db: str = "app") -> dict[str, Any]:
    """The command as the proxy decodes it: with ``$db``, after a BSON round trip."""
    decoded: dict[str, Any] = bson.decode(bson.encode({**doc, "$db": db}))
    return decoded


# (command, expected fields). Fields not named take these defaults:
DEFAULTS: dict[str, Any] = {
    "database": "app", "is_write": False, "is_read": True, "is_cursor_continuation": False,
    "in_transaction": False, "is_admin": False, "explain": False, "stages": frozenset(),
    "text_search": False, "comment": None, "max_time_ms": None,
}
W = {"is_write": True, "is_read": False}      # a write
OTHER = {"is_read": False}                    # neither read nor write: primary
ADMIN = {"is_read": False, "is_admin": True, "collection": None}

TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # --- reads -----------------------------------------------------------------------
    ("find", {"find": "tasks", "filter": {"done": False}, "limit": 10},
     {"command": "find", "collection": "tasks"}),
    ("find-maxtime", {"find": "tasks", "filter": {}, "maxTimeMS": 500},
     {"command": "find", "collection": "tasks", "max_time_ms": 500}),
    ("find-maxtime-int64", {"find": "t", "maxTimeMS": Int64(70)},
     {"command": "find", "collection": "t", "max_time_ms": 70}),
    ("find-maxtime-double", {"find": "t", "maxTimeMS": 70.0},
     {"command": "find", "collection": "t", "max_time_ms": 70}),
    ("find-maxtime-negative", {"find": "t", "maxTimeMS": -1},
     {"command": "find", "collection": "t", "max_time_ms": None}),
    ("find-text", {"find": "docs", "filter": {"$text": {"$search": "gantt"}}},
     {"command": "find", "collection": "docs", "text_search": True}),
    ("find-text-in-and", {"find": "docs", "filter": {"$and": [{"a": 1},
                                                              {"$text": {"$search": "x"}}]}},
     {"command": "find", "collection": "docs", "text_search": True}),
    ("find-text-nested-field", {"find": "docs", "filter": {"a": {"$text": 1}}},
     {"command": "find", "collection": "docs", "text_search": False}),
    ("find-comment-string", {"find": "t", "comment": "nightly"},
     {"command": "find", "collection": "t", "comment": "nightly"}),
    ("find-comment-doc", {"find": "t", "comment": {"class": "report", "by": "ana"}},
     {"command": "find", "collection": "t", "comment": {"class": "report", "by": "ana"}}),
    ("find-comment-int-ignored", {"find": "t", "comment": 5},
     {"command": "find", "collection": "t", "comment": None}),
    ("count", {"count": "users", "query": {"active": True}},
     {"command": "count", "collection": "users"}),
    ("count-text", {"count": "docs", "query": {"$text": {"$search": "x"}}},
     {"command": "count", "collection": "docs", "text_search": True}),
    ("distinct", {"distinct": "tasks", "key": "owner", "query": {}},
     {"command": "distinct", "collection": "tasks"}),
    ("aggregate-group", {"aggregate": "projects", "pipeline": [
        {"$match": {"open": True}}, {"$group": {"_id": "$owner", "n": {"$sum": 1}}}],
        "cursor": {}},
     {"command": "aggregate", "collection": "projects", "stages": {"$match", "$group"}}),
    ("aggregate-facet-lookup", {"aggregate": "p", "pipeline": [
        {"$lookup": {"from": "q", "localField": "a", "foreignField": "b", "as": "c"}},
        {"$facet": {"x": [{"$group": {"_id": 1}}], "y": [{"$count": "n"}]}}], "cursor": {}},
     {"command": "aggregate", "collection": "p", "stages": {"$lookup", "$facet"}}),
    ("aggregate-db-level", {"aggregate": 1, "pipeline": [{"$currentOp": {}}], "cursor": {}},
     {"command": "aggregate", "collection": None, "database": "admin",
      "stages": {"$currentOp"}}),
    ("aggregate-first-match-text", {"aggregate": "docs", "pipeline": [
        {"$match": {"$text": {"$search": "x"}}}, {"$sort": {"s": 1}}], "cursor": {}},
     {"command": "aggregate", "collection": "docs", "text_search": True,
      "stages": {"$match", "$sort"}}),
    ("aggregate-later-match-text-not-search", {"aggregate": "docs", "pipeline": [
        {"$sort": {"s": 1}}, {"$match": {"$text": {"$search": "x"}}}], "cursor": {}},
     {"command": "aggregate", "collection": "docs", "text_search": False,
      "stages": {"$match", "$sort"}}),
    ("aggregate-search-stage", {"aggregate": "docs", "pipeline": [
        {"$search": {"text": {"query": "x", "path": "t"}}}, {"$limit": 5}], "cursor": {}},
     {"command": "aggregate", "collection": "docs", "text_search": True,
      "stages": {"$search", "$limit"}}),
    ("aggregate-searchMeta", {"aggregate": "docs", "pipeline": [{"$searchMeta": {}}],
                              "cursor": {}},
     {"command": "aggregate", "collection": "docs", "text_search": True,
      "stages": {"$searchMeta"}}),
    ("listCollections", {"listCollections": 1, "filter": {}, "nameOnly": True},
     {"command": "listCollections", "collection": None}),
    ("listIndexes", {"listIndexes": "tasks"}, {"command": "listIndexes", "collection": "tasks"}),
    ("listDatabases", {"listDatabases": 1, "nameOnly": True},
     {"command": "listDatabases", "collection": None, "database": "admin"}),
    ("dbStats", {"dbStats": 1}, {"command": "dbStats", "collection": None}),
    ("dbstats-alias", {"dbstats": 1}, {"command": "dbStats", "collection": None}),
    ("collStats", {"collStats": "tasks"}, {"command": "collStats", "collection": "tasks"}),
    ("mapReduce-inline", {"mapReduce": "t", "map": "f", "reduce": "g", "out": {"inline": 1}},
     {"command": "mapReduce", "collection": "t"}),
    ("mapreduce-alias-inline", {"mapreduce": "t", "map": "f", "reduce": "g",
                                "out": {"inline": 1.0}},
     {"command": "mapReduce", "collection": "t"}),
    # --- writes ----------------------------------------------------------------------
    ("insert", {"insert": "tasks", "documents": [{"a": 1}], "ordered": True},
     {"command": "insert", "collection": "tasks", **W}),
    ("update", {"update": "tasks", "updates": [{"q": {}, "u": {"$set": {"a": 1}}}]},
     {"command": "update", "collection": "tasks", **W}),
    ("delete", {"delete": "tasks", "deletes": [{"q": {}, "limit": 1}]},
     {"command": "delete", "collection": "tasks", **W}),
    ("findAndModify", {"findAndModify": "tasks", "query": {"a": 1}, "remove": True},
     {"command": "findAndModify", "collection": "tasks", **W}),
    ("findandmodify-alias", {"findandmodify": "tasks", "query": {}, "update": {"a": 2}},
     {"command": "findAndModify", "collection": "tasks", **W}),
    ("bulkWrite-one-ns", {"bulkWrite": 1, "ops": [{"insert": 0, "document": {}}],
                          "nsInfo": [{"ns": "app.tasks"}]},
     {"command": "bulkWrite", "database": "app", "collection": "tasks", **W}),
    ("bulkWrite-two-ns", {"bulkWrite": 1, "ops": [], "nsInfo": [{"ns": "a.x"}, {"ns": "a.y"}]},
     {"command": "bulkWrite", "database": "admin", "collection": None, **W}),
    ("create", {"create": "logs", "capped": True, "size": 4096},
     {"command": "create", "collection": "logs", **W}),
    ("create-view", {"create": "v", "viewOn": "tasks", "pipeline": []},
     {"command": "create", "collection": "v", **W}),
    ("drop", {"drop": "logs"}, {"command": "drop", "collection": "logs", **W}),
    ("dropDatabase", {"dropDatabase": 1}, {"command": "dropDatabase", "collection": None, **W}),
    ("createIndexes", {"createIndexes": "t", "indexes": [{"key": {"a": 1}, "name": "a_1"}]},
     {"command": "createIndexes", "collection": "t", **W}),
    ("dropIndexes", {"dropIndexes": "t", "index": "a_1"},
     {"command": "dropIndexes", "collection": "t", **W}),
    ("deleteIndexes-alias", {"deleteIndexes": "t", "index": "*"},
     {"command": "dropIndexes", "collection": "t", **W}),
    ("renameCollection", {"renameCollection": "app.old", "to": "app.new"},
     {"command": "renameCollection", "database": "app", "collection": "old", **W}),
    ("collMod", {"collMod": "t", "validator": {}}, {"command": "collMod", "collection": "t", **W}),
    ("createUser", {"createUser": "bob", "pwd": "x", "roles": []},
     {"command": "createUser", "collection": None, "is_admin": True, **W}),
    ("aggregate-out", {"aggregate": "t", "pipeline": [{"$match": {}}, {"$out": "t2"}],
                       "cursor": {}},
     {"command": "aggregate", "collection": "t", "stages": {"$match", "$out"}, **W}),
    ("aggregate-merge", {"aggregate": "t", "pipeline": [{"$merge": {"into": "t2"}}],
                         "cursor": {}},
     {"command": "aggregate", "collection": "t", "stages": {"$merge"}, **W}),
    ("aggregate-merge-in-facet", {"aggregate": "t", "pipeline": [
        {"$facet": {"a": [{"$match": {}}], "b": [{"$merge": {"into": "t2"}}]}}], "cursor": {}},
     {"command": "aggregate", "collection": "t", "stages": {"$facet"}, **W}),
    ("aggregate-out-in-lookup", {"aggregate": "t", "pipeline": [
        {"$lookup": {"from": "u", "pipeline": [{"$out": "z"}], "as": "x"}}], "cursor": {}},
     {"command": "aggregate", "collection": "t", "stages": {"$lookup"}, **W}),
    ("aggregate-out-in-unionWith", {"aggregate": "t", "pipeline": [
        {"$unionWith": {"coll": "u", "pipeline": [{"$merge": "z"}]}}], "cursor": {}},
     {"command": "aggregate", "collection": "t", "stages": {"$unionWith"}, **W}),
    ("mapReduce-out-collection", {"mapReduce": "t", "map": "f", "reduce": "g", "out": "res"},
     {"command": "mapReduce", "collection": "t", **W}),
    ("mapReduce-out-merge", {"mapReduce": "t", "map": "f", "reduce": "g",
                             "out": {"merge": "res", "db": "other"}},
     {"command": "mapReduce", "collection": "t", **W}),
    ("mapReduce-inline-zero", {"mapReduce": "t", "map": "f", "reduce": "g",
                               "out": {"inline": 0}},
     {"command": "mapReduce", "collection": "t", **W}),
    ("mapReduce-no-out", {"mapReduce": "t", "map": "f", "reduce": "g"},
     {"command": "mapReduce", "collection": "t", **W}),
    # --- cursors ---------------------------------------------------------------------
    ("getMore", {"getMore": Int64(12345), "collection": "tasks", "batchSize": 100},
     {"command": "getMore", "collection": "tasks", "is_read": False,
      "is_cursor_continuation": True}),
    ("killCursors", {"killCursors": "tasks", "cursors": [Int64(12345)]},
     {"command": "killCursors", "collection": "tasks", "is_read": False,
      "is_cursor_continuation": True}),
    # --- transactions ----------------------------------------------------------------
    ("txn-find", {"find": "t", "filter": {}, **TXN, "startTransaction": True},
     {"command": "find", "collection": "t", "in_transaction": True}),
    ("txn-insert", {"insert": "t", "documents": [{}], **TXN},
     {"command": "insert", "collection": "t", "in_transaction": True, **W}),
    ("txn-commit", {"commitTransaction": 1, **TXN},
     {"command": "commitTransaction", "database": "admin", "collection": None,
      "in_transaction": True, **OTHER}),
    ("retryable-write-not-txn", {"insert": "t", "documents": [{}], "lsid": LSID,
                                 "txnNumber": Int64(1)},
     {"command": "insert", "collection": "t", "in_transaction": False, **W}),
    ("autocommit-true-not-txn", {"find": "t", "autocommit": True},
     {"command": "find", "collection": "t", "in_transaction": False}),
    # --- explain ---------------------------------------------------------------------
    ("explain-find", {"explain": {"find": "t", "filter": {"a": 1}}, "verbosity": "queryPlanner"},
     {"command": "find", "collection": "t", "explain": True}),
    ("explain-find-text", {"explain": {"find": "t", "filter": {"$text": {"$search": "a"}}}},
     {"command": "find", "collection": "t", "explain": True, "text_search": True}),
    ("explain-aggregate-out", {"explain": {"aggregate": "t", "pipeline": [{"$out": "z"}],
                                           "cursor": {}}},
     {"command": "aggregate", "collection": "t", "explain": True, "stages": {"$out"}, **W}),
    ("explain-aggregate-group", {"explain": {"aggregate": "t", "pipeline": [{"$group": {}}],
                                             "cursor": {}}},
     {"command": "aggregate", "collection": "t", "explain": True, "stages": {"$group"}}),
    ("explain-update", {"explain": {"update": "t", "updates": []}},
     {"command": "update", "collection": "t", "explain": True, **W}),
    ("explain-outer-comment-and-maxtime", {"explain": {"count": "t"}, "comment": "why",
                                           "maxTimeMS": 9},
     {"command": "count", "collection": "t", "explain": True, "comment": "why",
      "max_time_ms": 9}),
    ("explain-of-explain", {"explain": {"explain": {"find": "t"}}},
     {"command": "explain", "collection": None, **OTHER}),
    ("explain-empty", {"explain": {}}, {"command": "explain", "collection": None, **OTHER}),
    ("explain-not-doc", {"explain": "find"}, {"command": "explain", "collection": None, **OTHER}),
    # --- handshake, auth, admin ------------------------------------------------------
    ("hello", {"hello": 1, "client": {"application": {"name": "x"}}},
     {"command": "hello", "database": "admin", **ADMIN}),
    ("isMaster", {"isMaster": 1}, {"command": "isMaster", "database": "admin", **ADMIN}),
    ("ismaster-alias", {"ismaster": 1}, {"command": "isMaster", "database": "admin", **ADMIN}),
    ("saslStart", {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"x"},
     {"command": "saslStart", "database": "admin", **ADMIN}),
    ("saslContinue", {"saslContinue": 1, "conversationId": 1, "payload": b""},
     {"command": "saslContinue", "database": "admin", **ADMIN}),
    ("ping", {"ping": 1}, {"command": "ping", "database": "admin", **ADMIN}),
    ("endSessions", {"endSessions": [LSID]},
     {"command": "endSessions", "database": "admin", **ADMIN}),
    ("buildInfo", {"buildInfo": 1}, {"command": "buildInfo", "database": "admin", **ADMIN}),
    ("getParameter-string-value", {"getParameter": "*"},
     {"command": "getParameter", "database": "admin", **ADMIN}),
    ("serverStatus", {"serverStatus": 1},
     {"command": "serverStatus", "database": "admin", **ADMIN}),
    # --- unknown ---------------------------------------------------------------------
    ("wrong-case-is-unknown", {"Find": "t"}, {"command": "Find", "collection": None, **OTHER}),
    ("validate", {"validate": "t"}, {"command": "validate", "collection": "t", **OTHER}),
]

ADMIN_DB = {"hello", "isMaster", "ismaster", "saslStart", "saslContinue", "ping",
            "endSessions", "buildInfo", "getParameter", "serverStatus", "listDatabases",
            "commitTransaction", "bulkWrite"}


@pytest.mark.parametrize(("command", "expected"), [(c, e) for _, c, e in TABLE],
                         ids=[i for i, _, _ in TABLE])
def test_classification_table(command: dict[str, Any], expected: dict[str, Any]) -> None:
    first = next(iter(command))
    db = "admin" if first in ADMIN_DB or command.get("aggregate") == 1 else "app"
    c = classify(_cmd(command, db), CTX)
    want = {**DEFAULTS, **expected}
    if "stages" in expected:
        want["stages"] = frozenset(expected["stages"])
    got = {key: getattr(c, key) for key in want}
    assert got == want
    assert (c.app_name, c.user, c.tenant) == ("svc", "ana", "acme")


def test_table_is_large_and_covers_every_read_command() -> None:
    assert len(TABLE) >= 40
    named = {classify(_cmd(c)).command for _, c, _ in TABLE}
    assert READ_COMMANDS - {"dataSize", "geoSearch"} <= named


def test_classification_is_frozen_and_slotted() -> None:
    c = classify({"find": "t", "$db": "a"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.command = "insert"  # type: ignore[misc]
    assert not hasattr(c, "__dict__")
    ctx = ClientContext(app_name="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.app_name = "y"  # type: ignore[misc]


def test_no_context_means_unknown_identity() -> None:
    c = classify({"find": "t", "$db": "a"})
    assert (c.app_name, c.user, c.tenant) == (None, None, None)


def test_son_and_missing_db() -> None:
    c = classify(SON([("find", "t"), ("filter", SON([("$text", {"$search": "x"})]))]))
    assert (c.command, c.database, c.collection, c.text_search) == ("find", None, "t", True)


def test_empty_command_is_unknown() -> None:
    c = classify({}, CTX)
    assert c == Classification("", None, None, app_name="svc", user="ana", tenant="acme")
    assert not c.is_read and not c.is_write


@pytest.mark.parametrize("pipeline", [
    "not-a-list", [1, "x", None, {}], [{"$facet": "x"}], [{"$facet": {"a": "b"}}],
    [{"$lookup": "x"}], [{"$lookup": {"pipeline": "x"}}],
])
def test_malformed_pipelines_do_not_raise(pipeline: Any) -> None:
    c = classify({"aggregate": "t", "pipeline": pipeline, "cursor": {}, "$db": "a"})
    assert c.command == "aggregate" and not c.is_write


@pytest.mark.parametrize("command", [
    {"find": 5}, {"find": "t", "filter": "x"}, {"count": "t", "query": [1]},
    {"getMore": 1, "collection": 5}, {"renameCollection": "nodot", "to": "x"},
    {"bulkWrite": 1, "nsInfo": "x"}, {"bulkWrite": 1, "nsInfo": [{"ns": 5}]},
    {"find": "t", "$db": 7}, {"mapReduce": "t", "out": {"inline": "yes"}},
    {"find": "t", "maxTimeMS": "5"}, {"find": "t", "maxTimeMS": True},
    {"find": "t", "maxTimeMS": 1.5},
])
def test_odd_values_are_classified_without_raising(command: dict[str, Any]) -> None:
    c = classify(command)
    assert c.command == next(iter(command))
    assert c.max_time_ms is None
