"""Command-class routing (``proxy.route.rules``, ``proxy.explain.route``): the shipped
example config, decisions as tables, name-matching syntax, validation errors naming key
paths, deny, maxTimeMS caps, and explain-route output against a hand-built topology.
All pure: no servers."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any

import bson
import pytest
import yaml
from bson.binary import Binary, UuidRepresentation
from bson.int64 import Int64
from pydantic import BaseModel, ValidationError
from pymongo.asynchronous.settings import TopologySettings
from pymongo.hello import Hello
from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    _ServerMode,
)
from pymongo.server_description import ServerDescription
from pymongo.topology_description import TOPOLOGY_TYPE, TopologyDescription

from proxy.classify import ClientContext, classify
from proxy.config import Config, _format_errors, parse_config
from proxy.explain.route import ExplainError, explain_route
from proxy.route.readpref import from_command
from proxy.route.rules import (
    CURSOR_CLASS,
    NEVER_DENIED,
    NamePattern,
    RouteDecision,
    RoutingConfig,
    decide,
)

EXAMPLE_FILE = Path(__file__).resolve().parent.parent / "config" / "routing.yaml"
EXAMPLE_DOC: dict[str, Any] = yaml.safe_load(EXAMPLE_FILE.read_text(encoding="utf-8"))
EXAMPLE = RoutingConfig.model_validate(EXAMPLE_DOC["routing"])
LSID = {"id": Binary.from_uuid(uuid.UUID(int=9), UuidRepresentation.STANDARD)}


def _route(
    command: dict[str, Any],
    app_name: str | None = None,
    routing: RoutingConfig = EXAMPLE,
    **context: str,
) -> RouteDecision:
    """Route a command exactly as the proxy will: decoded from BSON, driver's
    ``$readPreference`` parsed by ``from_command`` (None when absent)."""
    doc: dict[str, Any] = bson.decode(bson.encode({**command, "$db": command.get("$db", "app")}))
    client = from_command(doc) if "$readPreference" in doc else None
    return decide(classify(doc, ClientContext(app_name=app_name, **context)), routing, client)


# --- the shipped example -------------------------------------------------------------

def test_example_file_is_a_complete_proxy_config() -> None:
    if "routing" in Config.model_fields:  # once the lead mounts it
        config = parse_config(EXAMPLE_DOC)
        assert config.routing == EXAMPLE  # type: ignore[attr-defined]
    else:
        rest = {k: v for k, v in EXAMPLE_DOC.items() if k != "routing"}
        parse_config(rest)
    assert list(EXAMPLE.classes) == ["auth", "dashboard", "report", "search", "blocked"]
    assert len(EXAMPLE.rules) == 5


REPORT_SECONDARY = Secondary(tag_sets=[{"use": "analytics"}])
DASHBOARD = SecondaryPreferred(max_staleness=90)

# (id, command, app_name, class, rule index, read preference, max_time_ms)
EXAMPLE_TABLE: list[tuple[str, dict[str, Any], str | None, str, int | None,
                          _ServerMode, int | None]] = [
    ("find-users", {"find": "users", "filter": {"name": "ana"}}, None,
     "auth", 0, Primary(), None),
    ("count-users", {"count": "users", "query": {}}, None, "auth", 0, Primary(), None),
    ("find-users-client-asks-secondary", {"find": "users", "$readPreference": {
        "mode": "secondary"}}, None, "auth", 0, Primary(), None),
    ("distinct-users-not-rule-0", {"distinct": "users", "key": "a"}, None,
     "default", None, Primary(), None),
    ("explain-find-users", {"explain": {"find": "users", "filter": {}}}, None,
     "auth", 0, Primary(), None),
    ("comment-report", {"find": "tasks", "comment": {"class": "report"}}, None,
     "report", 1, REPORT_SECONDARY, 60000),
    ("comment-report-superset", {"aggregate": "t", "pipeline": [], "cursor": {},
                                 "comment": {"class": "report", "by": "ana"}}, None,
     "report", 1, REPORT_SECONDARY, 60000),
    ("comment-report-string-no", {"find": "tasks", "comment": "report"}, None,
     "default", None, Primary(), None),
    ("comment-other-class", {"find": "tasks", "comment": {"class": "dash"}}, None,
     "default", None, Primary(), None),
    ("comment-report-short-maxtime-kept", {"find": "t", "comment": {"class": "report"},
                                           "maxTimeMS": 5000}, None,
     "report", 1, REPORT_SECONDARY, None),
    ("comment-report-long-maxtime-capped", {"find": "t", "comment": {"class": "report"},
                                            "maxTimeMS": 600000}, None,
     "report", 1, REPORT_SECONDARY, 60000),
    ("dashboard-projects", {"aggregate": "projects", "pipeline": [
        {"$match": {"open": True}}, {"$group": {"_id": "$owner"}}], "cursor": {}}, None,
     "dashboard", 2, DASHBOARD, None),
    ("dashboard-portfolios", {"aggregate": "portfolios", "pipeline": [
        {"$group": {"_id": 1}}], "cursor": {}}, None, "dashboard", 2, DASHBOARD, None),
    ("dashboard-no-group", {"aggregate": "projects", "pipeline": [{"$match": {}}],
                            "cursor": {}}, None, "default", None, Primary(), None),
    ("dashboard-other-collection", {"aggregate": "tasks", "pipeline": [{"$group": {}}],
                                    "cursor": {}}, None, "default", None, Primary(), None),
    ("dashboard-group-in-facet-only", {"aggregate": "projects", "pipeline": [
        {"$facet": {"a": [{"$group": {"_id": 1}}]}}], "cursor": {}}, None,
     "default", None, Primary(), None),
    ("dashboard-client-primary-overridden", {"aggregate": "projects", "pipeline": [
        {"$group": {"_id": 1}}], "cursor": {}, "$readPreference": {"mode": "primary"}}, None,
     "dashboard", 2, DASHBOARD, None),
    ("dashboard-with-out-is-write", {"aggregate": "projects", "pipeline": [
        {"$group": {"_id": 1}}, {"$out": "summary"}], "cursor": {}}, None,
     "dashboard", 2, Primary(), None),
    ("text-find", {"find": "docs", "filter": {"$text": {"$search": "gantt"}}}, None,
     "search", 3, Nearest(), None),
    ("text-aggregate", {"aggregate": "docs", "pipeline": [{"$match": {
        "$text": {"$search": "x"}}}], "cursor": {}}, None, "search", 3, Nearest(), None),
    ("search-stage", {"aggregate": "docs", "pipeline": [{"$search": {}}], "cursor": {}},
     None, "search", 3, Nearest(), None),
    ("text-users-rule-0-first", {"find": "users", "filter": {"$text": {"$search": "a"}}},
     None, "auth", 0, Primary(), None),
    ("billing-export-find", {"find": "invoices", "filter": {}}, "billing-export",
     "report", 4, REPORT_SECONDARY, 60000),
    ("billing-export-insert-primary", {"insert": "invoices", "documents": [{}]},
     "billing-export", "report", 4, Primary(), 60000),
    ("billing-export-ping-primary", {"ping": 1}, "billing-export",
     "report", 4, Primary(), 60000),
    ("other-app", {"find": "invoices", "filter": {}}, "billing", "default", None,
     Primary(), None),
    ("default-overrides-client", {"find": "tasks", "$readPreference": {
        "mode": "secondaryPreferred"}}, None, "default", None, Primary(), None),
    ("insert-default", {"insert": "tasks", "documents": [{}]}, None,
     "default", None, Primary(), None),
    ("update-with-report-comment", {"update": "t", "updates": [], "comment": {
        "class": "report"}}, None, "report", 1, Primary(), 60000),
    ("mapreduce-inline-report", {"mapReduce": "t", "map": "f", "reduce": "g",
                                 "out": {"inline": 1}}, "billing-export",
     "report", 4, REPORT_SECONDARY, 60000),
    ("mapreduce-out-report-primary", {"mapReduce": "t", "map": "f", "reduce": "g",
                                      "out": "res"}, "billing-export",
     "report", 4, Primary(), 60000),
    ("explain-aggregate-out-primary", {"explain": {"aggregate": "t", "pipeline": [
        {"$out": "x"}], "cursor": {}}}, "billing-export", "report", 4, Primary(), 60000),
]


@pytest.mark.parametrize(
    ("command", "app_name", "cls", "rule", "read_pref", "max_time"),
    [row[1:] for row in EXAMPLE_TABLE], ids=[row[0] for row in EXAMPLE_TABLE])
def test_example_routing_table(
    command: dict[str, Any], app_name: str | None, cls: str, rule: int | None,
    read_pref: _ServerMode, max_time: int | None,
) -> None:
    d = _route(command, app_name)
    assert (d.class_name, d.rule_index) == (cls, rule)
    assert d.read_preference == read_pref
    assert (d.read_preference.mode, d.read_preference.tag_sets) == (
        read_pref.mode, read_pref.tag_sets)
    assert d.max_time_ms == max_time
    assert d.deny is None and d.pinned is None
    if rule is not None:
        assert d.rule_text == EXAMPLE.rules[rule].text()


def test_rule_text_is_compact_yaml() -> None:
    assert [r.text() for r in EXAMPLE.rules] == [
        "{match: {command: [find, count], collection: users}, class: auth}",
        "{match: {comment: {class: report}}, class: report}",
        "{match: {command: aggregate, collection: projects|portfolios, has_stage: $group},"
        " class: dashboard}",
        "{match: {text_search: true}, class: search}",
        "{match: {app_name: billing-export}, class: report}",
    ]


def test_cursor_continuations_skip_rules_and_are_pinned() -> None:
    for command in (
        {"getMore": Int64(5), "collection": "users"},
        {"killCursors": "users", "cursors": [Int64(5)]},
        {"getMore": Int64(5), "collection": "t", "comment": {"class": "report"}},
    ):
        d = _route(command, "billing-export")
        assert d.pinned == "cursor"
        assert (d.class_name, d.rule_index, d.deny, d.max_time_ms) == (
            CURSOR_CLASS, None, None, None)
        assert d.read_preference == Primary()  # for a cursor the proxy does not know


def test_transactions_match_rules_but_are_pinned_to_the_primary() -> None:
    txn = {"lsid": LSID, "txnNumber": Int64(1), "autocommit": False}
    d = _route({"find": "t", "comment": {"class": "report"}, **txn, "$readPreference": {
        "mode": "primary"}})
    assert (d.class_name, d.rule_index, d.pinned) == ("report", 1, "transaction")
    assert d.read_preference == Primary()
    assert d.max_time_ms == 60000
    d = _route({"insert": "users", "documents": [{}], **txn})
    assert (d.class_name, d.pinned, d.read_preference) == ("default", "transaction", Primary())


# --- honor / override ----------------------------------------------------------------

def _routing(doc: dict[str, Any]) -> RoutingConfig:
    return RoutingConfig.model_validate(doc)


def test_builtin_default_honours_the_client() -> None:
    routing = RoutingConfig()
    assert _route({"find": "t"}, routing=routing).read_preference == Primary()
    d = _route({"find": "t", "$readPreference": {"mode": "nearest", "tags": [{"dc": "a"}]}},
               routing=routing)
    assert d.read_preference == Nearest(tag_sets=[{"dc": "a"}])
    assert (d.class_name, d.rule_index, d.rule_text) == ("default", None, None)
    # Writes and unknown commands: primary whatever the client says.
    for command in ({"insert": "t", "documents": []}, {"validate": "t"}):
        d = _route({**command, "$readPreference": {"mode": "secondary"}}, routing=routing)
        assert d.read_preference == Primary()


@pytest.mark.parametrize(("spec", "client", "expected"), [
    ({"read_preference": "secondary"}, None, Secondary()),
    ({"read_preference": "secondary"}, {"mode": "nearest"}, Secondary()),
    ({"read_preference": "secondary", "client_read_preference": "override"},
     {"mode": "nearest"}, Secondary()),
    ({"read_preference": "secondary", "client_read_preference": "honor"},
     {"mode": "nearest"}, Nearest()),
    ({"read_preference": "secondary", "client_read_preference": "honor"}, None, Secondary()),
    ({"read_preference": "secondaryPreferred", "client_read_preference": "honor"},
     {"mode": "primary"}, Primary()),
    ({}, {"mode": "primaryPreferred"}, PrimaryPreferred()),
    ({}, None, Primary()),
    ({"client_read_preference": "honor", "max_time_ms": 10}, {"mode": "nearest"}, Nearest()),
])
def test_client_read_preference(
    spec: dict[str, Any], client: dict[str, Any] | None, expected: _ServerMode
) -> None:
    routing = _routing({"classes": {"c": spec}, "rules": [{"match": {}, "class": "c"}]})
    command: dict[str, Any] = {"find": "t"}
    if client is not None:
        command["$readPreference"] = client
    d = _route(command, routing=routing)
    assert d.read_preference == expected
    assert d.class_name == "c"
    assert d.max_time_ms == spec.get("max_time_ms")


# --- maxTimeMS -----------------------------------------------------------------------

@pytest.mark.parametrize(("command_max_time", "applied"), [
    (None, 1000),   # injected
    (0, 1000),      # 0 means "no limit": capped
    (5000, 1000),   # larger: capped
    (1000, None),   # equal: left alone
    (10, None),     # smaller: left alone
    (Int64(99999), 1000),
    ("soon", 1000),  # not a number: replaced by the cap
])
def test_max_time_ms_caps_and_injects(command_max_time: Any, applied: int | None) -> None:
    routing = _routing({"default": {"max_time_ms": 1000}})
    for command in ({"find": "t"}, {"insert": "t", "documents": []},
                    {"aggregate": "t", "pipeline": [{"$out": "x"}], "cursor": {}}):
        doc = dict(command)
        if command_max_time is not None:
            doc["maxTimeMS"] = command_max_time
        assert _route(doc, routing=routing).max_time_ms == applied


def test_max_time_ms_not_applied_to_cursor_continuations() -> None:
    routing = _routing({"default": {"max_time_ms": 1000}})
    assert _route({"getMore": Int64(1), "collection": "t"}, routing=routing).max_time_ms is None


# --- deny ----------------------------------------------------------------------------

DENY = _routing({
    "classes": {"blocked": {"deny": "exports are disabled during business hours"},
                "fine": {"read_preference": "secondary"}},
    "rules": [
        {"match": {"app_name": "billing-export"}, "class": "blocked"},
        {"match": {"command": "dropDatabase|drop"}, "class": "blocked"},
        {"match": {}, "class": "fine"},
    ],
})


@pytest.mark.parametrize(("command", "app_name", "denied"), [
    ({"find": "invoices"}, "billing-export", True),
    ({"insert": "invoices", "documents": [{}]}, "billing-export", True),
    ({"aggregate": "t", "pipeline": [], "cursor": {}}, "billing-export", True),
    ({"find": "invoices"}, "web", False),
    ({"drop": "invoices"}, "web", True),
    ({"dropDatabase": 1}, None, True),
    ({"explain": {"find": "t"}}, "billing-export", True),
    # connection housekeeping is never refused, so the client can connect and clean up
    ({"hello": 1}, "billing-export", False),
    ({"isMaster": 1}, "billing-export", False),
    ({"saslStart": 1, "mechanism": "SCRAM-SHA-256"}, "billing-export", False),
    ({"ping": 1}, "billing-export", False),
    ({"endSessions": [LSID]}, "billing-export", False),
    ({"abortTransaction": 1, "lsid": LSID, "txnNumber": Int64(1), "autocommit": False},
     "billing-export", False),
    ({"getMore": Int64(1), "collection": "invoices"}, "billing-export", False),
    ({"killCursors": "invoices", "cursors": []}, "billing-export", False),
])
def test_deny(command: dict[str, Any], app_name: str | None, denied: bool) -> None:
    d = _route(command, app_name, routing=DENY)
    if not denied:
        assert d.deny is None
        return
    assert d.class_name == "blocked"
    assert d.deny == "exports are disabled during business hours"
    error = d.error()
    assert (error.code, error.code_name) == (13, "Unauthorized")
    doc = error.document()
    assert doc["ok"] == 0.0 and doc["code"] == 13 and doc["codeName"] == "Unauthorized"
    assert "exports are disabled during business hours" in doc["errmsg"]
    assert f"rule {d.rule_index}" in doc["errmsg"] and "'blocked'" in doc["errmsg"]


def test_never_denied_covers_the_handshake() -> None:
    assert {"hello", "isMaster", "saslStart", "saslContinue", "ping", "endSessions"} <= (
        NEVER_DENIED)


def test_default_class_may_deny_everything_else() -> None:
    routing = _routing({"default": {"deny": "not allowed"}, "classes": {"ok": {}},
                        "rules": [{"match": {"database": "public"}, "class": "ok"}]})
    assert _route({"find": "t", "$db": "public"}, routing=routing).deny is None
    d = _route({"find": "t", "$db": "secret"}, routing=routing)
    assert d.deny == "not allowed"
    assert "the default class" in d.error().errmsg


# --- name-matching syntax ------------------------------------------------------------

NAMES: list[tuple[str | list[str], str | None, bool]] = [
    ("users", "users", True),
    ("users", "Users", False),          # case-sensitive
    ("users", "users2", False),         # exact, not a prefix
    ("users", None, False),             # absent never matches
    ("*", None, False),
    ("*", "", True),
    ("*", "anything.at.all", True),
    ("projects|portfolios", "projects", True),
    ("projects|portfolios", "portfolios", True),
    ("projects|portfolios", "projects|portfolios", False),
    ("projects|portfolios", "project", False),
    ("report_*", "report_2024", True),
    ("report_*", "report_", True),
    ("report_*", "reports_2024", False),
    ("report_*", "xreport_1", False),   # globs match the whole name
    ("t?", "t1", True),
    ("t?", "t12", False),
    ("t[ab]", "ta", True),
    ("t[ab]", "tc", False),
    ("t[!ab]", "tc", True),
    ("users|report_*", "report_x", True),
    ("users|report_*", "users", True),
    ("/^audit_\\d+$/", "audit_12", True),
    ("/^audit_\\d+$/", "audit_x", False),
    ("/audit/", "old_audit_log", True),  # regex: unanchored search
    ("/a|b/", "xbx", True),              # | inside a regex is regex alternation
    (["find", "count"], "count", True),
    (["find", "count"], "distinct", False),
    (["find", "/^list/"], "listIndexes", True),
    (["a|b", "c*"], "b", True),
    (["a|b", "c*"], "cd", True),
    ("/", "/", True),                    # a lone slash is a name, not a regex
    ("/x/", "y/", False),                # ... but /x/ is a regex for "x"
    ("/x/", "axb", True),
    ("$group", "$group", True),          # $ is not special
    ("a.b", "a.b", True),
    ("a.b", "axb", False),               # . is not special outside a regex
]


@pytest.mark.parametrize(("pattern", "value", "expected"),
                         NAMES,
                         ids=lambda v: repr(v))
def test_name_patterns(pattern: str | list[str], value: str | None, expected: bool) -> None:
    assert NamePattern(pattern)(value) is expected


def test_has_stage_matches_any_stage() -> None:
    pattern = NamePattern("$group|$bucket*")
    assert pattern.any_of(frozenset({"$match", "$bucketAuto"}))
    assert not pattern.any_of(frozenset({"$match"}))
    assert not pattern.any_of(frozenset())
    assert NamePattern("$group").any_of(frozenset({"$group", "$sort"}))


@pytest.mark.parametrize(("field", "value", "command", "context", "expected"), [
    ("database", "app|crm", {"find": "t", "$db": "crm"}, {}, True),
    ("database", "app|crm", {"find": "t", "$db": "hr"}, {}, False),
    ("database", "tenant_*", {"insert": "t", "$db": "tenant_42"}, {}, True),
    ("collection", "*", {"listCollections": 1}, {}, False),
    ("collection", "/^sys/", {"find": "system.views"}, {}, True),
    ("user", "svc-*", {"find": "t"}, {"user": "svc-report"}, True),
    ("user", "svc-*", {"find": "t"}, {}, False),
    ("tenant", "acme", {"find": "t"}, {"tenant": "acme"}, True),
    ("tenant", "acme", {"find": "t"}, {"tenant": "acme2"}, False),
    ("app_name", "*", {"find": "t"}, {}, False),
    ("app_name", "*", {"find": "t"}, {"app_name": "x"}, True),
    ("comment", "nightly", {"find": "t", "comment": "nightly"}, {}, True),
    ("comment", "nightly", {"find": "t", "comment": "nightly run"}, {}, False),
    ("comment", "nightly", {"find": "t", "comment": {"nightly": 1}}, {}, False),
    ("comment", {"class": "report"}, {"find": "t", "comment": "report"}, {}, False),
    ("comment", {"class": "report", "n": 1}, {"find": "t", "comment": {
        "class": "report", "n": Int64(1)}}, {}, True),
    ("comment", {"class": "report", "n": 1}, {"find": "t", "comment": {
        "class": "report"}}, {}, False),
    ("comment", {}, {"find": "t", "comment": {"a": 1}}, {}, True),
    ("comment", {}, {"find": "t"}, {}, False),
    ("text_search", False, {"find": "t", "filter": {"$text": {}}}, {}, False),
    ("text_search", False, {"find": "t"}, {}, True),
    ("has_stage", "$lookup", {"aggregate": "t", "pipeline": [{"$lookup": {}}],
                              "cursor": {}}, {}, True),
    ("has_stage", "$lookup", {"find": "t"}, {}, False),
    ("command", "list*", {"listIndexes": "t"}, {}, True),
    ("command", "/^(find|count)$/", {"count": "t"}, {}, True),
])
def test_match_fields(
    field: str, value: Any, command: dict[str, Any], context: dict[str, str], expected: bool
) -> None:
    routing = _routing({"classes": {"hit": {}}, "rules": [
        {"match": {field: value}, "class": "hit"}]})
    assert (_route(command, routing=routing, **context).class_name == "hit") is expected


def test_all_match_keys_must_fit_and_first_rule_wins() -> None:
    routing = _routing({"classes": {"a": {}, "b": {}, "c": {}}, "rules": [
        {"match": {"command": "find", "collection": "x", "database": "d1"}, "class": "a"},
        {"match": {"collection": "x"}, "class": "b"},
        {"match": {"collection": "x"}, "class": "c"},
    ]})
    assert _route({"find": "x", "$db": "d1"}, routing=routing).rule_index == 0
    assert _route({"find": "x", "$db": "d2"}, routing=routing).rule_index == 1
    assert _route({"count": "x", "$db": "d1"}, routing=routing).rule_index == 1
    assert _route({"count": "y"}, routing=routing).class_name == "default"


def test_rules_indexed_by_command_keep_their_order() -> None:
    routing = _routing({"classes": {"a": {}, "b": {}, "c": {}}, "rules": [
        {"match": {"app_name": "x"}, "class": "a"},
        {"match": {"command": ["find", "count"]}, "class": "b"},
        {"match": {"command": "fi*"}, "class": "c"},
        {"match": {}, "class": "a"},
    ]})
    assert _route({"find": "t"}, "x", routing=routing).rule_index == 0
    assert _route({"find": "t"}, routing=routing).rule_index == 1
    assert _route({"count": "t"}, routing=routing).rule_index == 1
    assert _route({"findAndModify": "t"}, routing=routing).rule_index == 2
    assert _route({"distinct": "t"}, routing=routing).rule_index == 3


# --- validation errors ---------------------------------------------------------------

class _Mounted(BaseModel):
    """RoutingConfig mounted the way the lead will mount it (Config.routing)."""

    routing: RoutingConfig = RoutingConfig()


def _errors(routing: Any) -> str:
    with pytest.raises(ValidationError) as info:
        _Mounted.model_validate({"routing": routing})
    return _format_errors(info.value)


CLASSES = {
    "primary": {"read_preference": "primary"},
    "reports": {"read_preference": "secondary"},
    "nope": {"deny": "no"},
}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-class", {"classes": CLASSES, "rules": [
        {"match": {}, "class": "primary"}, {"match": {}, "class": "dashbord"}]},
     "routing.rules.1.class: unknown class 'dashbord' (classes: primary, reports, nope)"),
    ("unknown-class-no-classes", {"rules": [{"match": {}, "class": "x"}]},
     "routing.rules.0.class: unknown class 'x' (classes: none defined)"),
    ("bad-regex", {"classes": CLASSES, "rules": [
        {"match": {"collection": "/([a-z/"}, "class": "primary"}]},
     "routing.rules.0.match.collection: Value error, invalid regular expression /([a-z/"),
    ("bad-regex-in-list", {"classes": CLASSES, "rules": [
        {"match": {"command": ["find", "/*x/"]}, "class": "primary"}]},
     "routing.rules.0.match.command: Value error, invalid regular expression /*x/"),
    ("regex-flag-not-at-start", {"classes": CLASSES, "rules": [
        {"match": {"app_name": "/^(?i)x$/"}, "class": "primary"}]},
     "routing.rules.0.match.app_name: Value error, invalid regular expression /^(?i)x$/: "
     "global flags not at the start"),
    ("empty-alternative", {"classes": CLASSES, "rules": [
        {"match": {"collection": "a||b"}, "class": "primary"}]},
     "routing.rules.0.match.collection: Value error, empty alternative in 'a||b'"),
    ("empty-list", {"classes": CLASSES, "rules": [
        {"match": {"user": []}, "class": "primary"}]},
     "routing.rules.0.match.user: Value error, an empty list matches nothing"),
    ("write-rule-to-secondary", {"classes": CLASSES, "rules": [
        {"match": {"command": ["insert", "update"]}, "class": "reports"}]},
     "routing.rules.0.class: this rule matches only writes (insert, update) but class "
     "'reports' reads from secondary: writes always go to the primary"),
    ("write-rule-alternatives-to-secondary", {"classes": CLASSES, "rules": [
        {"match": {}, "class": "primary"},
        {"match": {"command": "drop|dropDatabase", "database": "x"}, "class": "reports"}]},
     "routing.rules.1.class: this rule matches only writes (drop, dropDatabase)"),
    ("staleness-below-90", {"classes": {"dashboard": {
        "read_preference": "secondaryPreferred", "max_staleness_s": 30}}},
     "routing.classes.dashboard.max_staleness_s: maxStalenessSeconds must be at least 90 "
     "(MongoDB's minimum), got 30"),
    ("staleness-with-primary", {"classes": {"c": {
        "read_preference": "primary", "max_staleness_s": 90}}},
     "routing.classes.c: invalid read preference: "),
    ("tags-with-primary", {"classes": {"c": {
        "read_preference": "primary", "tags": [{"a": "b"}]}}},
     "routing.classes.c: invalid read preference: "),
    ("tags-without-mode", {"classes": {"c": {"tags": [{"a": "b"}]}}},
     "routing.classes.c.tags: needs read_preference"),
    ("override-without-mode", {"classes": {"c": {"client_read_preference": "override"}}},
     "routing.classes.c.client_read_preference: override needs read_preference"),
    ("deny-with-options", {"default": {"deny": "x", "read_preference": "nearest",
                                       "max_time_ms": 5}},
     "routing.default: a deny class takes no other option (remove: max_time_ms, "
     "read_preference)"),
    ("deny-empty", {"default": {"deny": ""}}, "routing.default.deny: String should have at "
     "least 1 character"),
    ("unknown-mode", {"default": {"read_preference": "secondaryOnly"}},
     "routing.default.read_preference: Input should be 'primary', 'primaryPreferred'"),
    ("unknown-key", {"classes": {"c": {"readPreference": "secondary"}}},
     "routing.classes.c.readPreference: Extra inputs are not permitted"),
    ("unknown-match-key", {"classes": CLASSES, "rules": [
        {"match": {"collections": "x"}, "class": "primary"}]},
     "routing.rules.0.match.collections: Extra inputs are not permitted"),
    ("missing-class", {"rules": [{"match": {}}]}, "routing.rules.0.class: Field required"),
    ("max-time-zero", {"default": {"max_time_ms": 0}},
     "routing.default.max_time_ms: Input should be greater than 0"),
    ("text-search-not-bool", {"classes": CLASSES, "rules": [
        {"match": {"text_search": "maybe"}, "class": "primary"}]},
     "routing.rules.0.match.text_search: Input should be a valid boolean"),
    ("class-named-default", {"classes": {"default": {}}},
     "routing.classes.default: invalid class name 'default'"),
    ("class-name-chars", {"classes": {"my class": {}}},
     "routing.classes.my class: invalid class name 'my class'"),
    ("tag-value-not-string", {"classes": {"c": {"read_preference": "secondary",
                                                "tags": [{"use": ["a"]}]}}},
     "routing.classes.c.tags.0.use: Input should be a valid string"),
]


@pytest.mark.parametrize(("routing", "message"), [(r, m) for _, r, m in INVALID],
                         ids=[i for i, _, _ in INVALID])
def test_invalid_routing_names_the_key_path(routing: dict[str, Any], message: str) -> None:
    assert message in _errors(routing)


def test_every_error_is_reported_at_once() -> None:
    text = _errors({"classes": CLASSES, "rules": [
        {"match": {}, "class": "a"}, {"match": {}, "class": "b"},
        {"match": {"command": "delete"}, "class": "reports"}]})
    assert "routing.rules.0.class" in text and "routing.rules.1.class" in text
    assert "routing.rules.2.class" in text


@pytest.mark.parametrize("rule", [
    {"match": {"command": ["insert", "update"]}, "class": "primary"},  # primary: fine
    {"match": {"command": ["insert", "update"]}, "class": "nope"},     # deny: fine
    {"match": {"command": "insert*"}, "class": "reports"},   # glob: not provably writes
    {"match": {"command": ["insert", "find"]}, "class": "reports"},    # mixed: fine
    {"match": {"command": "aggregate"}, "class": "reports"},  # may or may not write
])
def test_rules_that_are_not_write_only_are_accepted(rule: dict[str, Any]) -> None:
    RoutingConfig.model_validate({"classes": CLASSES, "rules": [rule]})


def test_write_rule_to_honouring_class_is_accepted() -> None:
    RoutingConfig.model_validate({"classes": {"h": {"max_time_ms": 5}}, "rules": [
        {"match": {"command": "insert"}, "class": "h"}]})


def test_staleness_of_exactly_90_is_accepted() -> None:
    routing = RoutingConfig.model_validate({"classes": {"d": {
        "read_preference": "secondaryPreferred", "max_staleness_s": 90}}})
    assert routing.classes["d"].selector() == SecondaryPreferred(max_staleness=90)


def test_configs_compare_by_value_and_are_frozen() -> None:
    again = RoutingConfig.model_validate(EXAMPLE.model_dump(by_alias=True))
    assert again == EXAMPLE
    assert again != RoutingConfig()
    with pytest.raises(ValidationError):
        EXAMPLE.default = EXAMPLE.default


# --- explain-route -------------------------------------------------------------------

P, A, B = ("127.0.0.1", 27018), ("127.0.0.1", 27019), ("127.0.0.1", 27020)
NOW = datetime.datetime(2024, 1, 1)


def _member(
    address: tuple[str, int], role: str, tags: dict[str, str], rtt: float, lag_s: int = 0
) -> ServerDescription:
    hello = {
        "ok": 1.0, "setName": "rs0", "hosts": [f"{h}:{p}" for h, p in (P, A, B)],
        "me": f"{address[0]}:{address[1]}", "isWritablePrimary": role == "primary",
        "secondary": role == "secondary", "tags": tags, "maxWireVersion": 21,
        "minWireVersion": 0,
        "lastWrite": {"lastWriteDate": NOW - datetime.timedelta(seconds=lag_s)},
    }
    return ServerDescription(address, Hello(hello), rtt)


def _topology(servers: dict[Any, ServerDescription]) -> TopologyDescription:
    """Built as proxy.route.topology.DeclaredTopology builds its descriptions."""
    settings = TopologySettings(seeds=[P, A, B], replica_set_name="rs0",
                                local_threshold_ms=15, heartbeat_frequency=10)
    has_primary = any(sd.server_type_name == "RSPrimary" for sd in servers.values())
    kind = TOPOLOGY_TYPE.ReplicaSetWithPrimary if has_primary else (
        TOPOLOGY_TYPE.ReplicaSetNoPrimary)
    return TopologyDescription(kind, dict(servers.items()), "rs0", None, None, settings)


HEALTHY = _topology({
    P: _member(P, "primary", {}, 0.001),
    A: _member(A, "secondary", {"use": "analytics"}, 0.002),
    B: _member(B, "secondary", {}, 0.003),
})
# The analytics secondary down, the other secondary ten minutes behind.
DEGRADED = _topology({
    P: _member(P, "primary", {}, 0.001),
    A: ServerDescription(A),
    B: _member(B, "secondary", {}, 0.003, lag_s=600),
})
DASHBOARD_JSON = ('{"aggregate": "projects", "pipeline": [{"$group": {"_id": "$owner"}}], '
                  '"cursor": {}, "$db": "app"}')


def test_explain_route_full_output() -> None:
    out = explain_route(EXAMPLE, '{"find": "tasks", "filter": {}, "comment": {"class": '
                        '"report"}, "$db": "app"}', None, HEALTHY)
    assert out == (
        "command:          find on app.tasks (read)\n"
        "features:         comment {\"class\": \"report\"}\n"
        "class:            report\n"
        "rule:             #1 {match: {comment: {class: report}}, class: report}\n"
        "read preference:  {mode: secondary, tags: [{\"use\": \"analytics\"}]} "
        "(class 'report')\n"
        "maxTimeMS:        set to 60000 (class cap)\n"
        "member:           127.0.0.1:27019 (RSSecondary, rtt 2.0 ms, "
        "tags {\"use\": \"analytics\"})\n"
    )


def _line(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key!r} line in:\n{out}")


@pytest.mark.parametrize(("command", "app_name", "topology", "expected"), [
    ('{"find": "users", "filter": {"_id": {"$oid": "65a000000000000000000000"}}, '
     '"$db": "app"}', None, HEALTHY,
     {"class": "auth", "rule": "#0 {match: {command: [find, count], collection: users}, "
      "class: auth}", "read preference": "{mode: primary} (class 'auth')",
      "member": "127.0.0.1:27018 (RSPrimary, rtt 1.0 ms)"}),
    (DASHBOARD_JSON, None, HEALTHY,
     {"class": "dashboard", "member": "one of 127.0.0.1:27019 (RSSecondary, rtt 2.0 ms, tags "
      "{\"use\": \"analytics\"}), 127.0.0.1:27020 (RSSecondary, rtt 3.0 ms) (at random, within "
      "the latency window)"}),
    # secondaryPreferred with maxStalenessSeconds: the lagging secondary is skipped and
    # the analytics one is down, so the primary takes it.
    (DASHBOARD_JSON, None, DEGRADED,
     {"class": "dashboard", "read preference": "{mode: secondaryPreferred, "
      "maxStalenessSeconds: 90} (class 'dashboard')",
      "member": "127.0.0.1:27018 (RSPrimary, rtt 1.0 ms)"}),
    ('{"find": "invoices", "filter": {}, "$db": "app"}', "billing-export", DEGRADED,
     {"class": "report", "rule": "#4 {match: {app_name: billing-export}, class: report}",
      "member": "none: no member is suitable for {mode: secondary, tags: "
      "[{\"use\": \"analytics\"}]}; topology: ReplicaSetWithPrimary [127.0.0.1:27018 "
      "RSPrimary, 127.0.0.1:27019 Unknown, 127.0.0.1:27020 RSSecondary]"}),
    ('{"insert": "invoices", "documents": [{}], "$db": "app"}', "billing-export", HEALTHY,
     {"class": "report", "command": "insert on app.invoices (write)",
      "read preference": "{mode: primary} (writes always go to the primary)",
      "member": "127.0.0.1:27018 (RSPrimary, rtt 1.0 ms)"}),
    ('{"find": "tasks", "$db": "app", "$readPreference": {"mode": "nearest"}}', None, HEALTHY,
     {"class": "default", "rule": "none matched (routing.default)",
      "read preference": "{mode: primary} (class 'default'; the client's {mode: nearest} "
      "is overridden)"}),
    ('{"getMore": {"$numberLong": "42"}, "collection": "tasks", "$db": "app"}', None,
     HEALTHY, {"class": "(cursor)", "command": "getMore on app.tasks (cursor continuation)",
               "member": "the server that opened the cursor"}),
    ('{"explain": {"find": "docs", "filter": {"$text": {"$search": "gantt"}}}, '
     '"verbosity": "queryPlanner", "$db": "app"}', None, None,
     {"class": "search", "command": "explain of find on app.docs (read)",
      "features": "text search", "read preference": "{mode: nearest} (class 'search')"}),
])
def test_explain_route_lines(
    command: str, app_name: str | None, topology: TopologyDescription | None,
    expected: dict[str, str],
) -> None:
    out = explain_route(EXAMPLE, command, app_name, topology)
    for key, value in expected.items():
        assert _line(out, key) == value
    if topology is None:
        assert "member:" not in out


def test_explain_route_deny_and_honor() -> None:
    routing = RoutingConfig.model_validate({
        "classes": {"blocked": {"deny": "exports are disabled during business hours"},
                    "h": {"read_preference": "secondary", "client_read_preference": "honor"}},
        "rules": [{"match": {"app_name": "billing-export"}, "class": "blocked"},
                  {"match": {}, "class": "h"}]})
    out = explain_route(routing, '{"find": "x", "$db": "app"}', "billing-export", HEALTHY)
    assert _line(out, "refused") == (
        "code 13 Unauthorized: mongoproxy refused this command (routing class 'blocked', "
        "rule 0): exports are disabled during business hours")
    assert "member:" not in out
    out = explain_route(routing, '{"find": "x", "$db": "app", "$readPreference": '
                        '{"mode": "primaryPreferred"}}', None, HEALTHY)
    assert _line(out, "read preference") == (
        "{mode: primaryPreferred} (the client's $readPreference, honoured)")
    assert _line(out, "member") == "127.0.0.1:27018 (RSPrimary, rtt 1.0 ms)"


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not valid (Extended) JSON"),
    ("[1, 2]", "must be a non-empty JSON object"),
    ("{}", "must be a non-empty JSON object"),
    ('{"find": "t", "$readPreference": {"mode": "bogus"}}', "$readPreference: unknown read"),
    # Parsed as the pipeline parses a client's command: its client errors, word for word.
    ('{"find": 5, "$db": "a"}', "the proxy refuses it: code 73 InvalidNamespace: find: "
                                "collection name has invalid type int"),
    ('{"getMore": "x", "collection": "c", "$db": "a"}',
     "code 14 TypeMismatch: BSON field 'getMore.getMore' is the wrong type 'string'"),
    ('{"find": "t", "$db": "a", "maxTimeMS": "1"}',
     "code 2 BadValue: find: maxTimeMS must be a number, not string"),
])
def test_explain_route_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ExplainError, match=message.replace("$", r"\$").replace("(", r"\(")
                       .replace(")", r"\)")):
        explain_route(EXAMPLE, text, None, None)


def test_explain_route_with_declared_roles_ignores_staleness() -> None:
    """Declared members report no lastWrite: like DeclaredTopology, explain-route drops
    maxStalenessSeconds instead of failing inside pymongo's staleness estimate."""
    def declared(address: tuple[str, int], role: str) -> ServerDescription:
        return ServerDescription(address, Hello({
            "ok": 1.0, "setName": "rs0", "hosts": [f"{h}:{p}" for h, p in (P, A)],
            "me": f"{address[0]}:{address[1]}", "isWritablePrimary": role == "primary",
            "secondary": role == "secondary", "maxWireVersion": 21}), 0.001)

    topology = _topology({P: declared(P, "primary"), A: declared(A, "secondary")})
    out = explain_route(EXAMPLE, DASHBOARD_JSON, None, topology)
    assert _line(out, "member") == (
        "127.0.0.1:27019 (RSSecondary, rtt 1.0 ms) (maxStalenessSeconds not applied: the "
        "members report no lastWrite)")
