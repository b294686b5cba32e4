"""TenantPolicy: a table of commands (allowed / refused with the reason), inject-mode
rewrites, audit mode, and the tenancy configuration."""

from __future__ import annotations

from typing import Any

import bson
import pytest
from pydantic import ValidationError

from proxy.tenancy import (
    DuplicateKeyError,
    TenancyConfig,
    TenantPolicy,
    UserConfig,
    decode_strict,
)
from proxy.tenancy.decode import reuse_if_unique

DB = "acme"
CRED = ("SCRAM-SHA-256$4096:c2FsdHNhbHQ=$" + "A" * 43 + "=:" + "B" * 43 + "=")

ENFORCE = TenantPolicy(TenancyConfig(
    mode="enforce", collections=("*",),
    exempt=("tenants", "system.*", "admin.*", "config.*", "local.*", "shared_*")))


def cmd(name: str, value: Any = "tasks", **kw: Any) -> dict[str, Any]:
    db = kw.pop("db", DB)
    return {name: value, **kw, "$db": db}


def m(t: Any = "a") -> dict[str, Any]:
    return {"$match": {"tenant_id": t}}


def agg(*stages: Any, coll: Any = "tasks", **kw: Any) -> dict[str, Any]:
    return cmd("aggregate", coll, pipeline=list(stages), cursor={}, **kw)


def upd(*stmts: Any) -> dict[str, Any]:
    return cmd("update", updates=list(stmts))


T = {"tenant_id": "a"}
OK = None  # expected reason for allowed commands

# (id, command, sequences, bound tenant, expected reason substring or None)
TABLE: list[tuple[str, dict[str, Any], dict[str, Any], str | None, str | None]] = [
    # --- find ------------------------------------------------------------------------
    ("find eq", cmd("find", filter=T), {}, "a", OK),
    ("find $eq", cmd("find", filter={"tenant_id": {"$eq": "a"}}), {}, "a", OK),
    ("find $eq plus ops", cmd("find", filter={"tenant_id": {"$eq": "a", "$ne": "b"}}), {},
     "a", OK),
    ("find $in one", cmd("find", filter={"tenant_id": {"$in": ["a"]}}), {}, "a", OK),
    ("find in $and", cmd("find", filter={"$and": [{"x": 1}, T]}), {}, "a", OK),
    ("find in nested $and", cmd("find", filter={"$and": [{"$and": [T]}]}), {}, "a", OK),
    ("find with $or anded", cmd("find", filter={**T, "$or": [{"x": 1}, {"tenant_id": "b"}]}),
     {}, "a", OK),
    ("find with $nor anded", cmd("find", filter={**T, "$nor": [{"x": 1}]}), {}, "a", OK),
    ("find with $expr anded", cmd("find", filter={**T, "$expr": {"$eq": ["$x", 1]}}), {},
     "a", OK),
    ("find with $text anded", cmd("find", filter={**T, "$text": {"$search": "x"}}), {}, "a",
     OK),
    ("find hint", cmd("find", filter=T, hint={"tenant_id": 1}), {}, "a", OK),
    ("find simple collation", cmd("find", filter=T, collation={"locale": "simple"}), {}, "a",
     OK),
    ("find no bound, one value", cmd("find", filter={"tenant_id": "zz"}), {}, None, OK),
    ("find int tenant no bound", cmd("find", filter={"tenant_id": 7}), {}, None, OK),
    ("find no filter", cmd("find"), {}, "a",
     "tenant_id equality required in filter of find on acme.tasks"),
    ("find empty filter", cmd("find", filter={}), {}, "a", "equality required in filter"),
    ("find other field", cmd("find", filter={"x": 1}), {}, "a", "equality required"),
    ("find tenant in $or only", cmd("find", filter={"$or": [T, {"x": 1}]}), {}, "a",
     "equality required"),
    ("find $ne", cmd("find", filter={"tenant_id": {"$ne": "b"}}), {}, "a",
     "equality required"),
    ("find $in two", cmd("find", filter={"tenant_id": {"$in": ["a", "b"]}}), {}, "a",
     "equality required"),
    ("find $regex", cmd("find", filter={"tenant_id": {"$regex": "^a"}}), {}, "a",
     "equality required"),
    ("find regex value", cmd("find", filter={"tenant_id": bson.Regex("a")}), {}, "a",
     "equality required"),
    ("find array value", cmd("find", filter={"tenant_id": ["a"]}), {}, "a",
     "equality required"),
    ("find null value", cmd("find", filter={"tenant_id": None}), {}, None,
     "equality required"),
    ("find bool value", cmd("find", filter={"tenant_id": True}), {}, None,
     "equality required"),
    ("find embedded doc", cmd("find", filter={"tenant_id": {"x": "a", "$eq": "a"}}), {}, "a",
     "equality required"),
    ("find dotted path", cmd("find", filter={"tenant_id.x": "a"}), {}, "a",
     "equality required"),
    ("find other tenant", cmd("find", filter={"tenant_id": "b"}), {}, "a",
     'filter has tenant_id "b", connection is bound to "a"'),
    ("find two tenants, no bound", cmd("find", filter={"$and": [{"tenant_id": "x"},
                                                             {"tenant_id": "y"}]}),
     {}, None, "one command, one tenant"),
    ("find $where", cmd("find", filter={**T, "$where": "true"}), {}, "a",
     "operator $where is not allowed"),
    ("find $query legacy", cmd("find", filter={"$query": T}), {}, "a",
     "operator $query is not allowed"),
    ("find $and not array", cmd("find", filter={"$and": T}), {}, "a",
     "$and in filter must be a non-empty array"),
    ("find $and scalar element", cmd("find", filter={"$and": [T, 1]}), {}, "a",
     "non-document element"),
    ("find case-insensitive collation",
     cmd("find", filter=T, collation={"locale": "en", "strength": 2}), {}, "a",
     "collation other than"),
    ("find no $db", {"find": "tasks", "filter": T}, {}, "a", "no $db"),
    # --- count / distinct ------------------------------------------------------------
    ("count", cmd("count", query=T), {}, "a", OK),
    ("count no query", cmd("count"), {}, "a",
     "tenant_id equality required in query of count on acme.tasks"),
    ("distinct", cmd("distinct", key="x", query=T), {}, "a", OK),
    ("distinct no query", cmd("distinct", key="x"), {}, "a", "required in query of distinct"),
    # --- aggregate -------------------------------------------------------------------
    ("agg match first", agg(m(), {"$group": {"_id": "$x", "n": {"$sum": 1}}}), {}, "a", OK),
    ("agg facet on confined input",
     agg(m(), {"$facet": {"x": [{"$count": "n"}], "y": [{"$limit": 1}]}}), {}, "a", OK),
    ("agg lookup confined",
     agg(m(), {"$lookup": {"from": "users", "as": "u", "let": {"v": "$v"},
                           "pipeline": [m(), {"$match": {"$expr": {"$eq": ["$v", "$$v"]}}}]}}),
     {}, "a", OK),
    ("agg lookup exempt plain", agg(m(), {"$lookup": {"from": "tenants", "localField": "tenant_id",
                                                    "foreignField": "_id", "as": "t"}}),
     {}, "a", OK),
    ("agg unionWith confined", agg(m(), {"$unionWith": {"coll": "other", "pipeline": [m()]}}),
     {}, "a", OK),
    ("agg graphLookup confined",
     agg(m(), {"$graphLookup": {"from": "tasks", "startWith": "$p", "connectFromField": "p",
                                "connectToField": "_id", "as": "g",
                                "restrictSearchWithMatch": T}}), {}, "a", OK),
    ("agg merge proven",
     agg(m(), {"$set": {"tenant_id": "a"}},
         {"$merge": {"into": "summary", "on": ["tenant_id", "_id"], "whenMatched": "replace"}}),
     {}, "a", OK),
    ("agg no stages", agg(), {}, "a", "pipeline must start with a $match"),
    ("agg match not first", agg({"$limit": 5}, m()), {}, "a", "must start with a $match"),
    ("agg first match unconfined", agg({"$match": {"x": 1}}), {}, "a",
     "tenant_id equality required in first $match of pipeline of aggregate on acme.tasks"),
    ("agg geoNear first", agg({"$geoNear": {"near": [0, 0], "query": T}}), {}, "a",
     "must start with a $match"),
    ("agg lookup plain scoped",
     agg(m(), {"$lookup": {"from": "users", "localField": "tenant_id",
                           "foreignField": "tenant_id", "as": "u"}}), {}, "a",
     "reads a tenant-scoped collection"),
    ("agg lookup unconfined pipeline",
     agg(m(), {"$lookup": {"from": "users", "as": "u", "pipeline": [{"$match": {"x": 1}}]}}),
     {}, "a", "equality required in first $match of pipeline of $lookup"),
    ("agg lookup other tenant",
     agg(m(), {"$lookup": {"from": "users", "as": "u", "pipeline": [m("b")]}}), {}, "a",
     'connection is bound to "a"'),
    ("agg lookup other tenant no bound",
     agg(m("x"), {"$lookup": {"from": "users", "as": "u", "pipeline": [m("y")]}}), {}, None,
     "one command, one tenant"),
    ("agg lookup operator-only", agg(m(), {"$lookup": {"from": "system.users", "as": "u",
                                                     "pipeline": []}}),
     {}, "a", "operator-only"),
    ("agg unionWith string", agg(m(), {"$unionWith": "other"}), {}, "a",
     "reads a tenant-scoped collection"),
    ("agg graphLookup unrestricted",
     agg(m(), {"$graphLookup": {"from": "tasks", "startWith": "$p", "connectFromField": "p",
                                "connectToField": "_id", "as": "g"}}), {}, "a",
     "equality required in restrictSearchWithMatch"),
    ("agg facet with plain lookup",
     agg(m(), {"$facet": {"x": [{"$lookup": {"from": "users", "localField": "a",
                                             "foreignField": "b", "as": "c"}}]}}), {}, "a",
     "reads a tenant-scoped collection"),
    ("agg out", agg(m(), {"$out": "tasks2"}), {}, "a", "$out replaces the whole target"),
    ("agg merge without set",
     agg(m(), {"$merge": {"into": "summary", "on": ["tenant_id", "_id"]}}), {}, "a",
     "must be preceded by"),
    ("agg merge into exempt",
     agg(m(), {"$set": T}, {"$merge": {"into": "tenants", "on": "tenant_id"}}), {}, "a",
     "target must be a tenant-scoped"),
    ("agg merge without on", agg(m(), {"$set": T}, {"$merge": {"into": "summary"}}), {}, "a",
     "'on' must include tenant_id"),
    ("agg merge pipeline whenMatched",
     agg(m(), {"$set": T}, {"$merge": {"into": "s", "on": "tenant_id",
                                       "whenMatched": [{"$set": {"tenant_id": "b"}}]}}),
     {}, "a", "whenMatched must be one of"),
    ("agg merge set field path",
     agg(m(), {"$set": {"tenant_id": "$other"}}, {"$merge": {"into": "s", "on": "tenant_id"}}),
     {}, "a", "must be preceded by"),
    ("agg collStats", agg(m(), {"$collStats": {}}), {}, "a", "stage $collStats"),
    ("agg indexStats", agg(m(), {"$indexStats": {}}), {}, "a", "stage $indexStats"),
    ("agg documents in unionWith",
     agg(m(), {"$unionWith": {"pipeline": [{"$documents": [{"x": 1}]}]}}), {}, "a",
     "collection is not a name"),
    ("agg unknown stage", agg(m(), {"$fancy": {}}), {}, "a", "stage $fancy"),
    ("agg stage two keys", agg(m(), {"$limit": 1, "$skip": 1}), {}, "a",
     "exactly one field"),
    ("agg collation", agg(m(), collation={"locale": "fr", "strength": 1}), {}, "a",
     "collation other than"),
    ("agg db-level currentOp", agg({"$currentOp": {}}, coll=1, db="admin"), {}, "a",
     "operator command"),
    # --- explain ---------------------------------------------------------------------
    ("explain find", cmd("explain", {"find": "tasks", "filter": T}, verbosity="queryPlanner"), {},
     "a", OK),
    ("explain find unconfined", cmd("explain", {"find": "tasks", "filter": {}}), {}, "a",
     "equality required in filter of explain of find on acme.tasks"),
    ("explain aggregate", cmd("explain", {"aggregate": "tasks", "pipeline": [m()],
                                          "cursor": {}}), {}, "a", OK),
    ("explain count unconfined", cmd("explain", {"count": "tasks"}), {}, "a",
     "explain of count"),
    ("explain of createIndexes", cmd("explain", {"createIndexes": "tasks"}), {}, "a",
     "operator command on a tenant-scoped collection"),
    # --- insert ----------------------------------------------------------------------
    ("insert body", cmd("insert", documents=[{"_id": 1, **T}]), {}, "a", OK),
    ("insert sequence", cmd("insert"), {"documents": [{"_id": i, **T} for i in range(3)]},
     "a", OK),
    ("insert missing field", cmd("insert"), {"documents": [T, T, {"_id": 3}]}, "a",
     "insert on acme.tasks: document 2 has no tenant_id"),
    ("insert other tenant", cmd("insert"),
     {"documents": [T, T, T, {"tenant_id": "globex"}]}, "a",
     'insert on acme.tasks: document 3 has tenant_id "globex", connection is bound to "a"'),
    ("insert mixed no bound", cmd("insert", documents=[{"tenant_id": "x"},
                                                      {"tenant_id": "y"}]), {}, None,
     "one command, one tenant"),
    ("insert array tenant", cmd("insert", documents=[{"tenant_id": ["a"]}]), {}, "a",
     "not a single tenant value"),
    ("insert null tenant", cmd("insert", documents=[{"tenant_id": None}]), {}, None,
     "not a single tenant value"),
    ("insert body and sequence", cmd("insert", documents=[T]), {"documents": [T]}, "a",
     "both in the body and as a document sequence"),
    ("insert unexpected sequence", cmd("insert", documents=[T]), {"updates": [T]}, "a",
     "unexpected document sequence 'updates'"),
    # --- update ----------------------------------------------------------------------
    ("update set", upd({"q": T, "u": {"$set": {"x": 1}}}), {}, "a", OK),
    ("update replacement", upd({"q": T, "u": {"x": 1, **T}}), {}, "a", OK),
    ("update upsert", upd({"q": T, "u": {"$inc": {"n": 1}}, "upsert": True}), {}, "a", OK),
    ("update setOnInsert same", upd({"q": T, "u": {"$setOnInsert": T}, "upsert": True}), {},
     "a", OK),
    ("update sequence", cmd("update"), {"updates": [{"q": T, "u": {"$set": {"x": 1}}}]}, "a",
     OK),
    ("update set tenant", upd({"q": T, "u": {"$set": {"tenant_id": "b"}}}), {}, "a",
     "update on acme.tasks: statement 0 modifies tenant_id ($set)"),
    ("update set same tenant", upd({"q": T, "u": {"$set": T}}), {}, "a",
     "modifies tenant_id ($set)"),
    ("update unset", upd({"q": T, "u": {"$unset": {"tenant_id": ""}}}), {}, "a",
     "modifies tenant_id ($unset)"),
    ("update rename from", upd({"q": T, "u": {"$rename": {"tenant_id": "t"}}}), {}, "a",
     "modifies tenant_id ($rename)"),
    ("update rename onto", upd({"q": T, "u": {"$rename": {"x": "tenant_id"}}}), {}, "a",
     "modifies tenant_id ($rename)"),
    ("update below field", upd({"q": T, "u": {"$set": {"tenant_id.x": 1}}}), {}, "a",
     "modifies tenant_id ($set)"),
    ("update positional", upd({"q": T, "u": {"$push": {"tenant_id.$": 1}}}), {}, "a",
     "modifies tenant_id ($push)"),
    ("update setOnInsert other", upd({"q": T, "u": {"$setOnInsert": {"tenant_id": "b"}},
                                      "upsert": True}), {}, "a", 'bound to "a"'),
    ("update replacement other", upd({"q": T, "u": {"tenant_id": "b"}}), {}, "a",
     'statement 0 (replacement) has tenant_id "b"'),
    ("update replacement missing", upd({"q": T, "u": {"x": 1}}), {}, "a",
     "statement 0 (replacement) has no tenant_id"),
    ("update empty replacement", upd({"q": T, "u": {}}), {}, "a", "has no tenant_id"),
    ("update pipeline", upd({"q": T, "u": [{"$set": {"x": 1}}]}), {}, "a",
     "pipeline update"),
    ("update unconfined q", upd({"q": {}, "u": {"$set": {"x": 1}}}), {}, "a",
     "tenant_id equality required in q of statement 0 of update on acme.tasks"),
    ("update second stmt unconfined", upd({"q": T, "u": {"$set": {"x": 1}}},
                                          {"q": {"x": 1}, "u": {"$set": {"x": 1}}}), {}, "a",
     "q of statement 1"),
    ("update unknown op", upd({"q": T, "u": {"$fancy": {"x": 1}}}), {}, "a",
     "update operator $fancy"),
    ("update mixed", upd({"q": T, "u": {"$set": {"x": 1}, "y": 2}}), {}, "a",
     "mixes update operators"),
    ("update unknown stmt key", upd({"q": T, "u": {"$set": {"x": 1}}, "zz": 1}), {}, "a",
     "unknown field 'zz'"),
    ("update collation", upd({"q": T, "u": {"$set": {"x": 1}}, "collation": {"locale": "en"}}),
     {}, "a", "collation other than"),
    # --- delete ----------------------------------------------------------------------
    ("delete", cmd("delete", deletes=[{"q": T, "limit": 0}]), {}, "a", OK),
    ("delete sequence", cmd("delete"), {"deletes": [{"q": T, "limit": 1}]}, "a", OK),
    ("delete unconfined", cmd("delete", deletes=[{"q": {"x": 1}, "limit": 0}]), {}, "a",
     "tenant_id equality required in q of statement 0 of delete on acme.tasks"),
    ("delete other tenant", cmd("delete", deletes=[{"q": {"tenant_id": "b"}, "limit": 0}]),
     {}, "a", 'bound to "a"'),
    # --- findAndModify ---------------------------------------------------------------
    ("fam update", cmd("findAndModify", query=T, update={"$set": {"x": 1}}), {}, "a", OK),
    ("fam lowercase alias", cmd("findandmodify", query=T, remove=True), {}, "a", OK),
    ("fam remove", cmd("findAndModify", query=T, remove=True), {}, "a", OK),
    ("fam upsert replacement", cmd("findAndModify", query=T, update={"x": 1, **T},
                                   upsert=True), {}, "a", OK),
    ("fam unconfined", cmd("findAndModify", query={"x": 1}, remove=True), {}, "a",
     "tenant_id equality required in query of findAndModify on acme.tasks"),
    ("fam modifies tenant", cmd("findAndModify", query=T,
                                update={"$set": {"tenant_id": "b"}}), {}, "a",
     "update modifies tenant_id ($set)"),
    ("fam replacement other", cmd("findAndModify", query=T, update={"tenant_id": "b"}), {},
     "a", 'bound to "a"'),
    ("fam pipeline", cmd("findAndModify", query=T, update=[{"$set": {"x": 1}}]), {}, "a",
     "pipeline update"),
    # --- cursors, namespaces, operator commands --------------------------------------
    ("getMore", cmd("getMore", bson.Int64(5), collection="tasks"), {}, "a", OK),
    ("killCursors", cmd("killCursors", cursors=[bson.Int64(5)]), {}, "a", OK),
    ("ping", cmd("ping", 1), {}, "a", OK),
    ("listCollections", cmd("listCollections", 1), {}, "a", OK),
    ("hello on admin", cmd("hello", 1, db="admin"), {}, "a", OK),
    ("dropDatabase", cmd("dropDatabase", 1), {}, "a", "operator command"),
    ("dbStats", cmd("dbStats", 1), {}, "a", "operator command"),
    ("createIndexes scoped", cmd("createIndexes", indexes=[]), {}, "a",
     "createIndexes on acme.tasks is an operator command"),
    ("listIndexes scoped", cmd("listIndexes"), {}, "a", "operator command"),
    ("drop scoped", cmd("drop"), {}, "a", "operator command"),
    ("mapReduce scoped", cmd("mapReduce", map="f", reduce="g", out={"inline": 1}), {}, "a",
     "operator command"),
    ("unknown command scoped", cmd("frobnicate"), {}, "a", "operator command"),
    ("find exempt", cmd("find", "tenants", filter={}), {}, "a", OK),
    ("find exempt glob", cmd("find", "shared_things", filter={}), {}, "a", OK),
    ("insert exempt", cmd("insert", "tenants", documents=[{"x": 1}]), {}, "a",
     "exempt namespace: only reads"),
    ("find system collection", cmd("find", "system.users", filter={}), {}, "a",
     "operator-only namespace"),
    ("find admin db", cmd("find", "anything", filter={}, db="admin"), {}, "a",
     "operator-only"),
    ("agg exempt lookup into scoped",
     agg({"$lookup": {"from": "tasks", "localField": "x", "foreignField": "y", "as": "z"}},
         coll="tenants"), {}, "a", "reads a tenant-scoped collection"),
    ("agg exempt", agg({"$match": {}}, coll="tenants"), {}, "a", OK),
]


@pytest.mark.parametrize(
    ("command", "sequences", "bound", "expected"),
    [pytest.param(c, s, b, e, id=i) for i, c, s, b, e in TABLE],
)
def test_enforce_table(
    command: dict[str, Any], sequences: dict[str, Any], bound: str | None,
    expected: str | None,
) -> None:
    verdict = ENFORCE.check(command, sequences, bound, False)
    if expected is None:
        assert verdict.allowed, verdict.reason
        assert verdict.reason is None
        assert verdict.rewritten is None and verdict.rewritten_sequences is None
    else:
        assert not verdict.allowed
        assert verdict.reason is not None and expected in verdict.reason, verdict.reason
    # Audit mode forwards the very same commands and reports the same reason.
    audit = AUDIT.check(command, sequences, bound, False)
    assert audit.allowed
    assert audit.violation == verdict.reason


AUDIT = TenantPolicy(TenancyConfig(
    mode="audit", exempt=("tenants", "system.*", "admin.*", "config.*", "local.*",
                          "shared_*")))


def test_table_size() -> None:
    assert len(TABLE) >= 60
    assert sum(e is None for *_, e in TABLE) >= 20


def test_verdict_details() -> None:
    v = ENFORCE.check(cmd("find", filter=T), {}, "a", False)
    assert (v.namespace, v.tenant) == ("acme.tasks", "a")
    v = ENFORCE.check(cmd("getMore", bson.Int64(1), collection="tasks"), {}, "a", False)
    assert v.allowed and v.needs_cursor_owner_check
    v = ENFORCE.check(cmd("find", filter={}), {}, None, True)
    assert v.allowed and v.superuser
    v = ENFORCE.check(cmd("dropDatabase", 1), {}, None, True)
    assert v.allowed and v.superuser


def test_off_mode_allows_everything() -> None:
    off = TenantPolicy(TenancyConfig())
    assert off.check(cmd("find", filter={}), {}, "a", False).allowed
    assert off.check(cmd("dropDatabase", 1), {}, "a", False).allowed


def test_malformed_fails_closed() -> None:
    v = ENFORCE.check(cmd("find", filter={"tenant_id": "a", 5: 1}), {}, "a", False)
    assert not v.allowed
    v = ENFORCE.check(cmd("update", updates=[{"q": T, "u": {"$set": {5: 1}}}]), {}, "a", False)
    assert not v.allowed and "cannot be parsed" in (v.reason or "")
    assert not ENFORCE.check({}, {}, "a", False).allowed


def test_scoped_collections_list() -> None:
    p = TenantPolicy(TenancyConfig(mode="enforce", collections=("tasks", "proj_*", "crm.*"),
                                   exempt=("crm.audit",)))
    assert p.is_scoped("acme", "tasks") and p.is_scoped("x", "proj_1")
    assert p.is_scoped("crm", "leads") and not p.is_scoped("crm", "audit")
    assert not p.is_scoped("acme", "logs")
    # an unscoped collection is outside tenancy
    assert p.check(cmd("find", "logs", filter={}), {}, "a", False).allowed
    assert p.check(cmd("insert", "logs", documents=[{}]), {}, "a", False).allowed
    assert not p.check(cmd("find", "proj_9", filter={}), {}, "a", False).allowed
    # exempt wins
    assert p.check(cmd("find", "audit", filter={}, db="crm"), {}, "a", False).allowed


# --- inject mode ----------------------------------------------------------------------

INJECT = TenantPolicy(TenancyConfig(mode="inject"))

INJECT_TABLE: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any] | None,
                         dict[str, Any] | None]] = [
    ("find no filter", cmd("find"), {}, cmd("find", filter=T), None),
    ("find other fields", cmd("find", filter={"x": 1, "y": 2}), {},
     cmd("find", filter={**T, "x": 1, "y": 2}), None),
    ("find field with other op", cmd("find", filter={"tenant_id": {"$ne": "b"}}), {},
     cmd("find", filter={"$and": [T, {"tenant_id": {"$ne": "b"}}]}), None),
    ("find already confined", cmd("find", filter=T), {}, None, None),
    ("count", cmd("count", query={"x": 1}), {}, cmd("count", query={**T, "x": 1}), None),
    ("aggregate", agg({"$group": {"_id": 1}}), {},
     agg(m(), {"$group": {"_id": 1}}), None),
    ("aggregate match first", agg({"$match": {"x": 1}}), {}, agg({"$match": {**T, "x": 1}}),
     None),
    ("aggregate lookup plain",
     agg({"$lookup": {"from": "u", "localField": "a", "foreignField": "b", "as": "c"}}), {},
     agg(m(), {"$lookup": {"from": "u", "localField": "a", "foreignField": "b", "as": "c",
                           "pipeline": [m()]}}), None),
    ("aggregate unionWith string", agg(m(), {"$unionWith": "u"}), {},
     agg(m(), {"$unionWith": {"coll": "u", "pipeline": [m()]}}), None),
    ("aggregate lookup pipeline",
     agg(m(), {"$lookup": {"from": "u", "as": "c", "pipeline": [{"$limit": 1}]}}), {},
     agg(m(), {"$lookup": {"from": "u", "as": "c", "pipeline": [m(), {"$limit": 1}]}}), None),
    ("aggregate facet lookup",
     agg(m(), {"$facet": {"f": [{"$unionWith": "u"}]}}), {},
     agg(m(), {"$facet": {"f": [{"$unionWith": {"coll": "u", "pipeline": [m()]}}]}}), None),
    ("aggregate graphLookup",
     agg(m(), {"$graphLookup": {"from": "u", "as": "g", "restrictSearchWithMatch": {"x": 1}}}),
     {}, agg(m(), {"$graphLookup": {"from": "u", "as": "g",
                                    "restrictSearchWithMatch": {**T, "x": 1}}}), None),
    ("aggregate merge",
     agg({"$merge": {"into": "s", "on": ["tenant_id", "_id"]}}), {},
     agg(m(), {"$set": {"tenant_id": {"$literal": "a"}}},
         {"$merge": {"into": "s", "on": ["tenant_id", "_id"]}}), None),
    ("insert body", cmd("insert", documents=[{"_id": 1}, {"_id": 2, **T}]), {},
     cmd("insert", documents=[{"_id": 1, **T}, {"_id": 2, **T}]), None),
    ("insert sequence", cmd("insert"), {"documents": [{"_id": 1}]}, None,
     {"documents": [{"_id": 1, **T}]}),
    ("update", upd({"q": {"x": 1}, "u": {"$set": {"y": 1}}, "upsert": True}), {},
     upd({"q": {**T, "x": 1}, "u": {"$set": {"y": 1}}, "upsert": True}), None),
    ("update replacement", upd({"q": {}, "u": {"y": 1}}), {},
     upd({"q": T, "u": {"y": 1, **T}}), None),
    ("update sequence", cmd("update"), {"updates": [{"q": {}, "u": {"$inc": {"n": 1}}}]},
     None, {"updates": [{"q": T, "u": {"$inc": {"n": 1}}}]}),
    ("delete", cmd("delete", deletes=[{"q": {}, "limit": 0}]), {},
     cmd("delete", deletes=[{"q": T, "limit": 0}]), None),
    ("findAndModify", cmd("findAndModify", query={"x": 1}, update={"y": 2}), {},
     cmd("findAndModify", query={**T, "x": 1}, update={"y": 2, **T}), None),
    ("explain find", cmd("explain", {"find": "tasks"}), {},
     cmd("explain", {"find": "tasks", "filter": T}), None),
]


@pytest.mark.parametrize(
    ("command", "sequences", "body", "seqs"),
    [pytest.param(c, s, b, q, id=i) for i, c, s, b, q in INJECT_TABLE],
)
def test_inject_table(
    command: dict[str, Any], sequences: dict[str, Any], body: dict[str, Any] | None,
    seqs: dict[str, Any] | None,
) -> None:
    original = bson.decode(bson.encode(command))
    verdict = INJECT.check(command, sequences, "a", False)
    assert verdict.allowed, verdict.reason
    assert verdict.tenant == "a"
    assert verdict.rewritten == body
    if body is not None:
        assert next(iter(verdict.rewritten or {})) == next(iter(body))  # command name first
    assert verdict.rewritten_sequences == seqs
    assert command == original  # the client's command is never mutated
    # The rewrite is accepted by enforce mode with the same bound tenant.
    out = verdict.rewritten or command
    assert ENFORCE.check(out, verdict.rewritten_sequences or sequences, "a", False).allowed


@pytest.mark.parametrize(("command", "sequences", "expected"), [
    (cmd("find", filter={"tenant_id": "b"}), {}, 'bound to "a"'),
    (cmd("insert", documents=[{"tenant_id": "b"}]), {}, 'bound to "a"'),
    (upd({"q": {}, "u": {"$set": {"tenant_id": "a"}}}), {}, "modifies tenant_id"),
    (upd({"q": {}, "u": [{"$set": {"x": 1}}]}), {}, "pipeline update"),
    (agg(m(), {"$out": "x"}), {}, "$out"),
    (agg(m(), {"$merge": {"into": "s"}}), {}, "'on' must include"),
    (agg(m(), {"$collStats": {}}), {}, "$collStats"),
    (cmd("createIndexes", indexes=[]), {}, "operator command"),
])
def test_inject_still_refuses(command: dict[str, Any], sequences: dict[str, Any],
                              expected: str) -> None:
    verdict = INJECT.check(command, sequences, "a", False)
    assert not verdict.allowed and expected in (verdict.reason or ""), verdict.reason


def test_inject_without_bound_tenant_is_enforce() -> None:
    v = INJECT.check(cmd("find", filter={"x": 1}), {}, None, False)
    assert not v.allowed and "equality required" in (v.reason or "")
    assert INJECT.check(cmd("find", filter={"tenant_id": "q"}), {}, None, False).allowed
    v = INJECT.check(cmd("find", filter={}), {}, "a", True)  # superuser: untouched
    assert v.allowed and v.rewritten is None and v.superuser


# --- strict decoding --------------------------------------------------------------------

def _raw(*pairs: tuple[str, Any]) -> bytes:
    return b"".join(bson.encode({k: v})[4:-1] for k, v in pairs)


def _doc(body: bytes) -> bytes:
    return (len(body) + 5).to_bytes(4, "little") + body + b"\x00"


def test_decode_strict_refuses_duplicates() -> None:
    ok = _doc(_raw(("find", "tasks"), ("filter", {"tenant_id": "a"})))
    assert decode_strict(ok) == {"find": "tasks", "filter": {"tenant_id": "a"}}
    dup_top = _doc(_raw(("find", "tasks"), ("filter", {}), ("filter", {"tenant_id": "a"})))
    with pytest.raises(DuplicateKeyError):
        decode_strict(dup_top)
    nested = _doc(_raw(("tenant_id", "a"), ("tenant_id", "b")))
    with pytest.raises(DuplicateKeyError):
        decode_strict(_doc(_raw(("find", "tasks")) + b"\x03filter\x00" + nested))



def test_reuse_if_unique_keeps_the_plain_decoding_only_without_repeats() -> None:
    ok = _doc(_raw(("find", "tasks"), ("filter", {"tenant_id": "a"})))
    plain = bson.decode(ok)
    assert reuse_if_unique(plain, ok) is plain
    nested = _doc(_raw(("tenant_id", "a"), ("tenant_id", "b")))
    dup = _doc(_raw(("find", "tasks")) + b"\x03filter\x00" + nested)
    assert bson.decode(dup) == {"find": "tasks", "filter": {"tenant_id": "b"}}  # last wins
    with pytest.raises(DuplicateKeyError):
        reuse_if_unique(bson.decode(dup), dup)
    # A deprecated type that does not survive a round trip (undefined decodes as None):
    # the bytes differ, the strict decoding decides, and there is no repeat to refuse.
    undefined = _doc(_raw(("find", "tasks")) + b"\x06x\x00")
    assert reuse_if_unique(bson.decode(undefined), undefined) == {"find": "tasks", "x": None}


@pytest.mark.parametrize("name", ["find", "insert", "update"])
def test_admit_refuses_a_repeated_key_in_body_or_sequence(name: str) -> None:
    from proxy.tenancy.gate import admit
    from proxy.wire import DocumentSequence

    repeated = _doc(_raw(("tenant_id", "a"), ("tenant_id", "b")))
    if name == "find":
        body = _doc(_raw(("find", "tasks"), ("$db", DB)) + b"\x03filter\x00" + repeated)
        sequences: list[DocumentSequence] = []
    else:
        body = _doc(_raw((name, "tasks"), ("$db", DB)))
        sequences = [DocumentSequence("documents" if name == "insert" else "updates",
                                      repeated if name == "insert" else _doc(
                                          b"\x03q\x00" + repeated
                                          + _raw(("u", {"$set": {"x": 1}})))[:])]
    admission = admit(ENFORCE, name, bson.decode(body), body, sequences,
                      bound_tenant=None,
                      cursor_tenant=lambda _id: (False, None))
    assert admission.refused is not None and "duplicate key" in admission.refused


# --- configuration --------------------------------------------------------------------

def test_config_defaults_and_users() -> None:
    c = TenancyConfig.model_validate({
        "mode": "enforce",
        "users": [{"username": "acme_app", "password_sha256": CRED, "tenant": "acme"},
                  {"username": "ops", "password_sha256": CRED, "tenant": "*"}],
    })
    assert c.field == "tenant_id" and c.collections == ("*",)
    assert "tenants" in c.exempt
    assert c.users[1].is_superuser and not c.users[0].is_superuser
    assert c.user("acme_app") is c.users[0] and c.user("nobody") is None
    assert TenancyConfig().mode == "off"


@pytest.mark.parametrize(("data", "loc", "msg"), [
    ({"users": [{"username": "u", "password_sha256": "hunter2", "tenant": "a"}]},
     ("users", 0, "password_sha256"), "stored SCRAM-SHA-256 credential"),
    ({"users": [{"username": "u", "password_sha256": CRED.replace("4096", "100"),
                 "tenant": "a"}]}, ("users", 0, "password_sha256"), "at least 4096"),
    ({"users": [{"username": "u", "password_sha256": CRED.replace("A" * 43 + "=", "QUFB"),
                 "tenant": "a"}]}, ("users", 0, "password_sha256"), "32 bytes"),
    ({"users": [{"username": "u", "password_sha256": "SCRAM-SHA-1$4096:c2FsdA==$a:b",
                 "tenant": "a"}]}, ("users", 0, "password_sha256"), "stored"),
    ({"users": [{"username": "u", "password_sha256": CRED, "tenant": ""}]},
     ("users", 0, "tenant"), "at least 1"),
    ({"users": [{"username": "u", "password": "x", "password_sha256": CRED, "tenant": "a"}]},
     ("users", 0, "password"), "Extra inputs"),
    ({"field": "org.tenant"}, ("field",), "top-level field"),
    ({"field": "$t"}, ("field",), "top-level field"),
    ({"mode": "strict"}, ("mode",), "Input should be"),
    ({"collections": ["[abc"]}, ("collections",), "unclosed"),
    ({"exempt": [""]}, ("exempt",), "empty pattern"),
    ({"users": [{"username": "u", "password_sha256": CRED, "tenant": "a"},
                {"username": "u", "password_sha256": CRED, "tenant": "b"}]},
     (), "listed twice"),
])
def test_config_errors_name_key_path(data: dict[str, Any], loc: tuple[Any, ...],
                                     msg: str) -> None:
    with pytest.raises(ValidationError) as info:
        TenancyConfig.model_validate(data)
    errors = info.value.errors()
    assert any(tuple(e["loc"]) == loc and msg in e["msg"] for e in errors), errors


def test_config_frozen() -> None:
    c = TenancyConfig()
    with pytest.raises(ValidationError):
        c.mode = "enforce"
    assert UserConfig(username="u", password_sha256=CRED, tenant="a").tenant == "a"

