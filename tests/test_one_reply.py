"""One reply per request, whatever the command's types (issue 15, items 3 and 4).

Against the real proxy in front of FerretDB, with tenancy enforcing, routing rules, and
the Redis result cache on, over raw sockets:

* a command whose ``$db`` is not a string gets exactly one reply, InvalidNamespace,
  before anything is forwarded (it used to get a normal reply and then a second,
  InternalError, reply to the same requestID when the operation record failed);
* Hypothesis property: any command document, with every BSON type in every field the
  proxy reads, gets exactly one reply to its requestID (none with moreToCome), never
  InternalError, and the proxy's log has no traceback.

"Exactly one" is checked by a ping sent right after each command: the next reply on the
socket must answer the command, and the one after it the ping (a second reply to the
command would be read in the ping's place).
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
import socket
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import OpCode
from tests.support import FerretDBProcess, ProxyProcess, RedisProcess
from tests.test_bad_input import Reply, connect, op_msg, raw_message, read_reply
from tests.test_routing_integration import example_routing

DB = "one_reply"
_ids = itertools.count(50_000)


@pytest.fixture(scope="module")
def full_proxy(ferretdb: FerretDBProcess, redis_server: RedisProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Every request-path stage on: tenancy (enforce), routing rules, the cache."""
    proc = ProxyProcess(ferretdb.uri, {
        "tenancy": {"mode": "enforce", "collections": [f"{DB}.scoped*"]},
        "routing": example_routing(),
        "cache": {"redis_url": redis_server.url,
                  "rules": [{"match": {"database": DB}, "ttl_s": 30}]},
    }, workdir=tmp_path_factory.mktemp("proxy_one_reply")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sock(full_proxy: ProxyProcess) -> Iterator[socket.socket]:
    s = connect(full_proxy)
    yield s
    s.close()


def _exchange(sock: socket.socket, doc: dict[str, Any], flags: int = 0) -> Reply | None:
    """Send ``doc`` then a ping; return the command's one reply (None with moreToCome),
    after checking the next reply is the ping's."""
    rid, ping_id = next(_ids), next(_ids)
    sock.sendall(op_msg(doc, rid, flags) + op_msg({"ping": 1, "$db": "admin"}, ping_id))
    reply = None
    if not flags & 2:
        reply = read_reply(sock)
        assert reply.response_to == rid, (reply, rid)
    pong = read_reply(sock)
    assert pong.response_to == ping_id, f"a second reply to {rid}: {pong}"
    return reply


def _no_tracebacks(proc: ProxyProcess) -> None:
    log = proc.log_text()
    assert "Traceback" not in log, log[-4000:]
    assert "internal error" not in log.lower(), log[-4000:]


@pytest.mark.parametrize("db", [ObjectId(), 1, None, MinKey(), {"x": 1}, ["a"], True])
def test_non_string_db_gets_one_invalid_namespace_reply(
    full_proxy: ProxyProcess, sock: socket.socket, db: Any
) -> None:
    for _ in range(10):  # it used to fail 3 times in 10
        reply = _exchange(sock, {"find": "c", "filter": {}, "$db": db})
        assert reply is not None
        if db is None:  # no $db: forwarded, and the server answers for itself
            assert reply.doc.get("code") != 1, reply.doc
            continue
        assert reply.doc["ok"] == 0.0 and reply.doc["code"] == 73, reply.doc
        assert reply.doc["codeName"] == "InvalidNamespace"
        assert "$db" in reply.doc["errmsg"], reply.doc
    _no_tracebacks(full_proxy)


def test_corrupt_document_in_a_sequence_is_invalid_bson_not_internal_error(
    full_proxy: ProxyProcess, sock: socket.socket
) -> None:
    """A sequence document whose framing is sound but whose content is not (a string
    claiming 1,000 bytes in a 12-byte document) reaches the tenancy check undecoded: it
    must be answered 22 InvalidBSON, once, with no traceback."""
    corrupt = struct.pack("<i", 12) + b"\x02a\x00" + struct.pack("<i", 1000) + b"\x00"
    section = b"documents\x00" + corrupt
    sequence = b"\x01" + struct.pack("<i", 4 + len(section)) + section
    rid, ping_id = next(_ids), next(_ids)
    body = bson.encode({"insert": "scoped_seq", "$db": DB})
    rest = struct.pack("<I", 0) + b"\x00" + body + sequence
    sock.sendall(raw_message(rid, OpCode.OP_MSG, rest)
                 + op_msg({"ping": 1, "$db": "admin"}, ping_id))
    reply = read_reply(sock)
    assert reply.response_to == rid, reply
    assert reply.doc["ok"] == 0.0 and reply.doc["code"] == 22, reply.doc
    assert reply.doc["codeName"] == "InvalidBSON" and "insert" in reply.doc["errmsg"]
    assert read_reply(sock).response_to == ping_id  # and no second reply
    _no_tracebacks(full_proxy)


@pytest.mark.parametrize(("doc", "code", "field"), [
    ({"find": ObjectId(), "$db": DB}, 73, "collection"),
    ({"getMore": "x", "collection": "c", "$db": DB}, 14, "getMore.getMore"),
    ({"getMore": Int64(1), "collection": 5, "$db": DB}, 14, "getMore.collection"),
    ({"killCursors": "c", "cursors": "x", "$db": DB}, 14, "killCursors.cursors"),
    ({"killCursors": "c", "cursors": [1.5], "$db": DB}, 14, "killCursors.cursors"),
    ({"find": "c", "lsid": 1, "$db": DB}, 14, "find.lsid"),
    ({"find": "c", "lsid": {"id": "x"}, "$db": DB}, 14, "find.lsid.id"),
    ({"find": "c", "txnNumber": "1", "$db": DB}, 14, "find.txnNumber"),
    ({"find": "c", "autocommit": 0, "$db": DB}, 14, "find.autocommit"),
    ({"find": "c", "startTransaction": "y", "$db": DB}, 14, "find.startTransaction"),
    ({"find": "c", "$readPreference": "secondary", "$db": DB}, 14, "$readPreference"),
    ({"find": "c", "maxTimeMS": "5", "$db": DB}, 2, "maxTimeMS"),
])
def test_wrong_types_are_client_errors_naming_the_field(
    sock: socket.socket, doc: dict[str, Any], code: int, field: str
) -> None:
    reply = _exchange(sock, doc)
    assert reply is not None
    assert reply.doc["ok"] == 0.0 and reply.doc["code"] == code, reply.doc
    assert field in reply.doc["errmsg"], reply.doc


# --------------------------------------------------------------------------- property

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**31, 2**31 - 1),
    st.integers(-2**63, 2**63 - 1).map(Int64), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=8).map(Binary),
    st.just(Binary(uuid.uuid4().bytes, 4)), st.builds(ObjectId),
    st.just(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)),
    st.just(Regex("^a", "i")), st.just(Code("function(){}")),
    st.just(Code("x", {"a": 1})), st.just(Timestamp(1, 1)),
    st.just(Decimal128("1.5")), st.just(MinKey()), st.just(MaxKey()),
)
_keys = st.sampled_from(["tenant_id", "a", "$and", "$or", "$text", "$match", "$group",
                         "$out", "$merge", "$lookup", "$in", "$eq", "q", "u", "id", "_id",
                         "mode", "inline", "pipeline", "ns", "$facet", "$search"])
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=6,
)
_NAMES = ["find", "aggregate", "count", "distinct", "insert", "update", "delete",
          "findAndModify", "findandmodify", "getMore", "killCursors", "listCollections",
          "listIndexes", "explain", "ping", "commitTransaction", "abortTransaction",
          "mapReduce", "bulkWrite", "dbStats", "endSessions", "buildInfo"]
_FIELDS = ["$db", "collection", "cursors", "lsid", "txnNumber", "autocommit",
           "startTransaction", "$readPreference", "maxTimeMS", "comment", "filter",
           "query", "pipeline", "documents", "updates", "deletes", "out", "nsInfo",
           "explain", "readConcern", "collation", "update", "remove", "key"]


@st.composite
def _commands(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(_NAMES))
    value = draw(st.one_of(st.sampled_from(["scoped_c", "plain", "scoped_c.x"]), _values))
    doc: dict[str, Any] = {name: value, "$db": DB}
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=4, unique=True)):
        doc[field] = draw(_values)
    return doc


@settings(max_examples=int(os.environ.get("ONE_REPLY_EXAMPLES", "250")), deadline=None,
          derandomize=os.environ.get("ONE_REPLY_RANDOM") is None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(doc=_commands(), more_to_come=st.booleans())
def test_any_command_gets_exactly_one_reply_never_internal_error(
    full_proxy: ProxyProcess, doc: dict[str, Any], more_to_come: bool
) -> None:
    if "$db" in doc and not isinstance(doc["$db"], str):
        doc["$db"] = doc["$db"] if doc["$db"] is not None else DB
    if doc.get("$db") in ("admin", "config", "local"):
        doc["$db"] = DB
    with connect(full_proxy) as sock:  # one per example: a failure cannot cascade
        reply = _exchange(sock, doc, 2 if more_to_come else 0)
    if reply is not None:
        assert reply.doc.get("code") != 1, (doc, reply.doc)
        assert reply.doc.get("codeName") != "InternalError", (doc, reply.doc)


def test_the_log_has_no_traceback_after_the_property(full_proxy: ProxyProcess) -> None:
    log = full_proxy.log_text()
    assert not re.search(r"Traceback|InternalError|internal error", log), log[-4000:]


def test_bson_encoding_of_the_property_strategy_roundtrips() -> None:
    """The generated documents are valid BSON (so every case reaches the proxy)."""
    doc = {"find": "c", "x": [MinKey(), Code("x", {"a": 1}), Binary(b"\x01", 4)]}
    assert bson.decode(bson.encode(doc))["find"] == "c"
