"""The parsed request and the pure stages of the pipeline, in process (no sockets).

* ``proxy.commands``: one vocabulary, consistent with itself;
* ``proxy.request.Request``: every field the proxy decides by, read once and
  type-checked (table tests: each wrong type is one client error naming the field);
* ``proxy.pipeline.rewrite``: what is changed before forwarding (table tests);
* Hypothesis: for any command document (every BSON type in every field the proxy
  reads), parsing and every decider (tenancy admission, classification, the routing
  decision, the rewrite, the cache's part, the operation's shape) either succeed or
  raise the one client error family (``ProxyError``), never anything else.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import bson
import pytest
from bson import Code, Int64, MinKey, ObjectId
from bson.binary import Binary
from hypothesis import given, settings

from proxy import commands
from proxy.cache.config import CacheConfig
from proxy.cache.key import entry_digest
from proxy.cache.layer import ResultCache
from proxy.classify import ClientContext, classify
from proxy.config import parse_config
from proxy.errors import ProxyError
from proxy.observe.shape import describe
from proxy.pipeline.rewrite import forwarded_message, with_route
from proxy.request import STRIPPED_FLAGS, Request, bson_type_name, request_from_op_msg
from proxy.route.readpref import ReadPreferenceError, from_command, read_preference
from proxy.route.rules import RouteDecision, decide
from proxy.tenancy import TenantPolicy
from proxy.tenancy.gate import admit
from proxy.wire import FLAG_CHECKSUM_PRESENT, FLAG_MORE_TO_COME, encode_op_msg, parse_op_msg
from tests.test_one_reply import _commands
from tests.test_routing_integration import example_routing

SESSION = Binary(uuid.uuid4().bytes, 4)


def parse(doc: dict[str, Any], flags: int = 0) -> Request:
    message = encode_op_msg(7, 0, bson.encode(doc), flags=flags)
    return request_from_op_msg(message, parse_op_msg(message), None)


# --------------------------------------------------------------------------- vocabulary


def test_aliases_map_to_canonical_names_of_the_vocabulary() -> None:
    known = (commands.READ_COMMANDS | commands.WRITE_COMMANDS | commands.ADMIN_COMMANDS
             | commands.COLLECTION_COMMANDS)
    for alias, name in commands.ALIASES.items():
        assert commands.canonical(alias) == name
        assert name in known, name
    assert commands.canonical("find") == "find"


def test_classes_are_consistent() -> None:
    assert not commands.READ_COMMANDS & commands.WRITE_COMMANDS
    assert commands.USER_ADMIN_COMMANDS <= commands.WRITE_COMMANDS & commands.ADMIN_COMMANDS
    assert commands.FILTERED_READS <= commands.READ_COMMANDS
    assert commands.COLLECTION_COMMANDS | {"getMore"} >= commands.CONTINUATIONS
    assert commands.HELLO_COMMANDS <= commands.SAFE_DATABASE_COMMANDS
    assert not commands.NEVER_DENIED & commands.WRITE_COMMANDS


# --------------------------------------------------------------------------- Request


def test_fields_are_read_once() -> None:
    request = parse({"findandmodify": "c", "query": {}, "$db": "app",
                     "lsid": {"id": SESSION}, "txnNumber": Int64(3), "autocommit": False,
                     "startTransaction": True, "maxTimeMS": 50,
                     "$readPreference": {"mode": "primary"}}, FLAG_CHECKSUM_PRESENT)
    assert (request.raw_name, request.name) == ("findandmodify", "findAndModify")
    assert (request.db, request.collection) == ("app", "c")
    assert request.transaction_key == (bytes(SESSION), 3)
    assert request.in_transaction and request.start_transaction
    assert request.max_time_ms == 50
    assert request.read_preference == {"mode": "primary"}
    assert request.forward_flags == 0 and not request.more_to_come
    assert request.namespace == "app.c"


def test_cursor_fields() -> None:
    get_more = parse({"getMore": Int64(42), "collection": "c", "$db": "app"})
    assert (get_more.cursor_ids, get_more.collection) == ((42,), "c")
    kill = parse({"killCursors": "c", "cursors": [Int64(1), Int64(2)], "$db": "app"})
    assert kill.cursor_ids == (1, 2)
    listing = parse({"listCollections": 1, "$db": "app"}, FLAG_MORE_TO_COME)
    assert listing.namespace == "app.$cmd.listCollections" and listing.more_to_come
    assert parse({"aggregate": 1, "pipeline": [], "$db": "app"}).collection is None


@pytest.mark.parametrize(("doc", "code", "needle"), [
    ({"find": "c", "$db": ObjectId()}, 73, "$db must be a string, not objectId"),
    ({"find": "c", "$db": Code("x")}, 73, "not javascript"),
    ({"find": MinKey(), "$db": "a"}, 73, "invalid type minKey"),
    ({"insert": Code("c"), "$db": "a"}, 73, "invalid type javascript"),
    ({"getMore": 1.5, "collection": "c", "$db": "a"}, 14, "'getMore.getMore'"),
    ({"getMore": True, "collection": "c", "$db": "a"}, 14, "'bool'"),
    ({"killCursors": "c", "cursors": [True], "$db": "a"}, 14, "'killCursors.cursors'"),
    ({"find": "c", "lsid": {"id": 5}, "$db": "a"}, 14, "'find.lsid.id'"),
    ({"find": "c", "txnNumber": 1.0, "$db": "a"}, 14, "'find.txnNumber'"),
    ({"find": "c", "autocommit": "false", "$db": "a"}, 14, "'find.autocommit'"),
    ({"find": "c", "$readPreference": [], "$db": "a"}, 14, "'find.$readPreference'"),
    ({"find": "c", "maxTimeMS": None, "$db": "a"}, None, ""),
    ({"find": "c", "maxTimeMS": True, "$db": "a"}, 2, "maxTimeMS must be a number"),
])
def test_wrong_types_are_one_client_error(doc: dict[str, Any], code: int | None,
                                         needle: str) -> None:
    if code is None:
        assert parse(doc).max_time_ms is None
        return
    with pytest.raises(ProxyError) as caught:
        parse(doc)
    assert caught.value.code == code, caught.value.errmsg
    assert needle in caught.value.errmsg


def test_bson_type_names_are_the_servers() -> None:
    assert [bson_type_name(v) for v in (1, Int64(1), 1.0, "s", True, None, [], {},
                                        ObjectId(), Code("x"), MinKey())] == [
        "int", "long", "double", "string", "bool", "null", "array", "object",
        "objectId", "javascript", "minKey"]


# --------------------------------------------------------------------------- rewrite


def _decision(**fields: Any) -> RouteDecision:
    base = decide(classify({"find": "c", "$db": "a"}), parse_config(
        {"upstream": {"uri": "mongodb://h:1/"}}).routing, None)
    return dataclasses.replace(base, **fields)


@pytest.mark.parametrize(("decision", "command", "expected"), [
    ({}, {"find": "c"}, None),
    ({"max_time_ms": 5}, {"find": "c"}, {"find": "c", "maxTimeMS": 5}),
    ({"read_preference": read_preference("secondary")}, {"find": "c"},
     {"find": "c", "$readPreference": {"mode": "secondary"}}),
    ({"read_preference": read_preference("secondary")},
     {"find": "c", "$readPreference": {"mode": "secondary"}}, None),
    ({"read_preference": read_preference("secondary"), "pinned": "cursor"},
     {"getMore": 1}, None),
])
def test_with_route(decision: dict[str, Any], command: dict[str, Any],
                    expected: dict[str, Any] | None) -> None:
    original = dict(command)
    assert with_route(command, _decision(**decision)) == expected
    assert command == original  # the client's document is never changed in place


def test_forwarded_message_clears_only_the_stripped_flags() -> None:
    request = parse({"insert": "c", "$db": "a"}, FLAG_MORE_TO_COME | FLAG_CHECKSUM_PRESENT)
    sent = parse_op_msg(forwarded_message(request, request.command, (), False))
    assert sent.flags & STRIPPED_FLAGS == 0 and sent.body == request.msg.body
    plain = parse({"insert": "c", "$db": "a"})
    assert forwarded_message(plain, plain.command, (), False) is plain.message
    changed = parse_op_msg(forwarded_message(plain, {"insert": "d", "$db": "a"}, (), True))
    assert bson.decode(changed.body) == {"insert": "d", "$db": "a"}


# --------------------------------------------------------------------------- property

CONFIG = parse_config({
    "upstream": {"uri": "mongodb://127.0.0.1:1/"},
    "routing": example_routing(),
    "tenancy": {"mode": "enforce", "collections": ["one_reply.scoped*"]},
})
INJECT = TenantPolicy(CONFIG.tenancy.model_copy(update={"mode": "inject"}))
ENFORCE = TenantPolicy(CONFIG.tenancy)
CACHE = ResultCache(CacheConfig.model_validate(
    {"redis_url": "redis://127.0.0.1:1/0",  # begin() never talks to Redis
     "rules": [{"match": {"database": "one_reply"}, "ttl_s": 30}]}))
CONTEXT = ClientContext(app_name="app", user="u", tenant="acme")


def _stages(request: Request) -> None:
    """Every pure stage the pipeline runs on a request, as the pipeline runs them."""
    for policy, bound in ((ENFORCE, None), (INJECT, "acme")):
        admission = admit(policy, request.raw_name, request.command, request.msg.body,
                          request.sequences, bound_tenant=bound,
                          cursor_tenant=lambda _id: (True, "acme"))
        command = admission.command or request.command
        name = request.raw_name
        classification = classify(command, CONTEXT, name)
        # The deciders given the parsed name decide as they did reading the document.
        assert classification == classify(command, CONTEXT)
        try:
            preference = None if request.read_preference is None else from_command(command)
        except ReadPreferenceError:
            continue  # answered as BadValue by the pipeline
        decision = decide(classification, CONFIG.routing, preference)
        command = with_route(command, decision) or command
        tenants = (bound, admission.tenant)
        access = CACHE.begin(command, classification, decision, tenants,
                             has_sequences=False, rules=CACHE.config, name=name)
        if access is not None and access.digest:
            assert access.digest == entry_digest(
                command, decision.read_preference.document, tenants)
        assert describe(command, None, name) == describe(command, None)
    for policy in (ENFORCE, INJECT):
        assert policy.check(request.command, {}, "acme", False, request.raw_name) == \
            policy.check(request.command, {}, "acme", False)


@settings(max_examples=int(os.environ.get("REQUEST_EXAMPLES", "1500")), deadline=None,
          derandomize=os.environ.get("REQUEST_RANDOM") is None)
@given(doc=_commands())
def test_any_command_parses_or_is_one_client_error_and_every_stage_holds(
    doc: dict[str, Any]
) -> None:
    try:
        request = parse(doc)
    except ProxyError:
        return
    _stages(request)
