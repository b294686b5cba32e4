"""Routing decisions as pure functions: ``$readPreference`` parsing, read/write
classification and transaction keys (no servers involved)."""

from __future__ import annotations

import uuid
from typing import Any

import bson
import pytest
from bson.binary import Binary, UuidRepresentation
from bson.int64 import Int64
from bson.son import SON
from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    _ServerMode,
)

from proxy.classify import classify
from proxy.route.readpref import PRIMARY, ReadPreferenceError, from_command, read_preference
from proxy.route.router import transaction_key

# --- from_command --------------------------------------------------------------------

VALID: list[tuple[dict[str, Any], _ServerMode]] = [
    ({"find": "c"}, Primary()),
    ({"find": "c", "$readPreference": {"mode": "primary"}}, Primary()),
    ({"find": "c", "$readPreference": {"mode": "primary", "tags": [{}]}}, Primary()),
    ({"find": "c", "$readPreference": {"mode": "primaryPreferred"}}, PrimaryPreferred()),
    ({"find": "c", "$readPreference": {"mode": "secondary"}}, Secondary()),
    ({"find": "c", "$readPreference": {"mode": "secondaryPreferred"}}, SecondaryPreferred()),
    ({"find": "c", "$readPreference": {"mode": "nearest"}}, Nearest()),
    (
        {"find": "c", "$readPreference": {"mode": "secondary", "tags": [{"dc": "west"}]}},
        Secondary(tag_sets=[{"dc": "west"}]),
    ),
    (
        {"find": "c", "$readPreference": {
            "mode": "secondaryPreferred", "tags": [{"dc": "ny", "rack": "1"}, {"dc": "ny"}, {}],
        }},
        SecondaryPreferred(tag_sets=[{"dc": "ny", "rack": "1"}, {"dc": "ny"}, {}]),
    ),
    (
        {"find": "c", "$readPreference": {"mode": "primaryPreferred", "tags": [{"dc": "sf"}]}},
        PrimaryPreferred(tag_sets=[{"dc": "sf"}]),
    ),
    (
        {"find": "c", "$readPreference": {"mode": "nearest", "maxStalenessSeconds": 120}},
        Nearest(max_staleness=120),
    ),
    (
        {"find": "c", "$readPreference": {"mode": "secondary", "maxStalenessSeconds": 90.0}},
        Secondary(max_staleness=90),
    ),
    (
        {"find": "c", "$readPreference": {
            "mode": "secondary", "maxStalenessSeconds": Int64(100)}},
        Secondary(max_staleness=100),
    ),
    (
        {"find": "c", "$readPreference": {
            "mode": "nearest", "tags": [{"dc": "east"}], "maxStalenessSeconds": 150}},
        Nearest(tag_sets=[{"dc": "east"}], max_staleness=150),
    ),
    # Documents as decoded from BSON may be SON rather than dict.
    (
        {"find": "c", "$readPreference": SON([
            ("mode", "secondary"), ("tags", [SON([("dc", "west")])])])},
        Secondary(tag_sets=[{"dc": "west"}]),
    ),
]


@pytest.mark.parametrize(("command", "expected"), VALID, ids=lambda v: repr(v)[:60])
def test_from_command(command: dict[str, Any], expected: _ServerMode) -> None:
    assert from_command(command) == expected
    # The same after a BSON round trip, as the proxy actually sees commands.
    assert from_command(bson.decode(bson.encode(command))) == expected


def test_no_read_preference_is_primary() -> None:
    assert from_command({"find": "c"}) is PRIMARY


@pytest.mark.parametrize("doc", [
    pytest.param(None, id="null"),  # key present but null: treated like absent, below
    pytest.param("secondary", id="string"),
    pytest.param(["secondary"], id="array"),
    pytest.param({}, id="no-mode"),
    pytest.param({"mode": 2}, id="numeric-mode"),
    pytest.param({"mode": "Secondary"}, id="wrong-case"),
    pytest.param({"mode": "bogus"}, id="unknown-mode"),
    pytest.param({"mode": "secondary", "tags": {"dc": "east"}}, id="tags-not-array"),
    pytest.param({"mode": "secondary", "tags": ["east"]}, id="tag-set-not-doc"),
    pytest.param({"mode": "secondary", "tags": [{"dc": "e"}, 1]}, id="mixed-tag-sets"),
    pytest.param({"mode": "secondary", "maxStalenessSeconds": "90"}, id="staleness-string"),
    pytest.param({"mode": "secondary", "maxStalenessSeconds": True}, id="staleness-bool"),
    pytest.param({"mode": "secondary", "maxStalenessSeconds": None}, id="staleness-null"),
    pytest.param({"mode": "secondary", "maxStalenessSeconds": -5}, id="staleness-negative"),
    pytest.param({"mode": "primary", "tags": [{"dc": "east"}]}, id="primary-with-tags"),
    pytest.param({"mode": "primary", "maxStalenessSeconds": 90}, id="primary-with-staleness"),
])
def test_invalid_read_preference(doc: Any) -> None:
    command = {"find": "c", "$readPreference": doc}
    if doc is None:
        assert from_command(command) == Primary()
        return
    with pytest.raises(ReadPreferenceError):
        from_command(command)


@pytest.mark.parametrize("doc", [
    pytest.param({"mode": "secondary", "maxStalenessSeconds": 0}, id="staleness-zero"),
    pytest.param({"mode": "secondary", "tags": []}, id="empty-tags-array"),
    pytest.param({"mode": "nearest", "maxStalenessSeconds": 1e300}, id="staleness-huge"),
    pytest.param({"mode": "nearest", "maxStalenessSeconds": float("nan")}, id="staleness-nan"),
    pytest.param({"mode": "nearest", "maxStalenessSeconds": float("inf")}, id="staleness-inf"),
    pytest.param({"mode": "secondary", "tags": [{"dc": 1}]}, id="tag-value-int"),
])
def test_odd_read_preference_is_parsed_or_refused_cleanly(doc: dict[str, Any]) -> None:
    """Values a driver would not send but a client could: from_command must either give a
    read preference or raise ReadPreferenceError (which the router answers as BadValue),
    never another exception (which escapes the router and drops the client connection)."""
    try:
        result = from_command({"find": "c", "$readPreference": doc})
    except ReadPreferenceError:
        return
    assert isinstance(result, _ServerMode)


def test_read_preference_helper() -> None:
    assert read_preference("nearest", [{"a": "b"}], 95) == Nearest([{"a": "b"}], 95)
    with pytest.raises(ReadPreferenceError, match="unknown read preference mode"):
        read_preference("secondaryOnly")


# --- is_read -------------------------------------------------------------------------

IS_READ: list[tuple[dict[str, Any], bool]] = [
    ({"find": "c", "filter": {}}, True),
    ({"aggregate": "c", "pipeline": [{"$match": {}}], "cursor": {}}, True),
    ({"aggregate": 1, "pipeline": [{"$currentOp": {}}], "cursor": {}}, True),
    ({"aggregate": "c", "pipeline": [{"$match": {}}, {"$out": "d"}], "cursor": {}}, False),
    ({"aggregate": "c", "pipeline": [{"$merge": {"into": "d"}}], "cursor": {}}, False),
    ({"count": "c"}, True),
    ({"distinct": "c", "key": "a"}, True),
    ({"listCollections": 1}, True),
    ({"listIndexes": "c"}, True),
    ({"listDatabases": 1}, True),
    ({"dbStats": 1}, True),
    ({"collStats": "c"}, True),
    ({"explain": {"find": "c"}, "verbosity": "queryPlanner"}, True),
    ({"explain": {"aggregate": "c", "pipeline": [], "cursor": {}}}, True),
    ({"explain": {"aggregate": "c", "pipeline": [{"$out": "d"}], "cursor": {}}}, False),
    ({"explain": {"update": "c", "updates": []}}, False),
    ({"explain": {"findAndModify": "c", "query": {}}}, False),
    ({"explain": {"explain": {"find": "c"}}}, False),
    ({"explain": {}}, False),
    ({"explain": "find"}, False),
    ({"insert": "c", "documents": []}, False),
    ({"update": "c", "updates": []}, False),
    ({"delete": "c", "deletes": []}, False),
    ({"findAndModify": "c", "query": {}}, False),
    ({"create": "c"}, False),
    ({"drop": "c"}, False),
    ({"createIndexes": "c", "indexes": []}, False),
    ({"getMore": Int64(1), "collection": "c"}, False),
    ({"killCursors": "c", "cursors": []}, False),
    ({"commitTransaction": 1}, False),
    ({"ping": 1}, False),
    ({"mapReduce": "c", "map": "", "reduce": "", "out": {"inline": 1}}, True),  # inline: a read
    ({"mapReduce": "c", "map": "", "reduce": "", "out": "d"}, False),
    ({"Find": "c"}, False),  # command names are case-sensitive
]


@pytest.mark.parametrize(("command", "expected"), IS_READ, ids=lambda v: repr(v)[:50])
def test_is_read(command: dict[str, Any], expected: bool) -> None:
    assert classify(command).is_read is expected


# --- transaction_key -----------------------------------------------------------------

SESSION = uuid.UUID("6b2c0f9e-3a5d-4c1b-9a8e-0d1f2e3c4b5a")
LSID = {"id": Binary.from_uuid(SESSION, UuidRepresentation.STANDARD)}
SESSION_BYTES = SESSION.bytes


def _decoded(command: dict[str, Any]) -> dict[str, Any]:
    """The command as the proxy sees it: decoded from BSON with default options."""
    doc: dict[str, Any] = bson.decode(bson.encode(command))
    return doc


TRANSACTION_KEYS: list[tuple[dict[str, Any], tuple[bytes, int] | None]] = [
    ({"insert": "c", "lsid": LSID, "txnNumber": Int64(1), "autocommit": False,
      "startTransaction": True}, (SESSION_BYTES, 1)),
    ({"find": "c", "lsid": LSID, "txnNumber": Int64(1), "autocommit": False},
     (SESSION_BYTES, 1)),
    ({"commitTransaction": 1, "lsid": LSID, "txnNumber": Int64(7), "autocommit": False},
     (SESSION_BYTES, 7)),
    ({"insert": "c", "lsid": LSID, "txnNumber": Int64(1)}, None),  # retryable write
    ({"insert": "c", "lsid": LSID, "txnNumber": Int64(1), "autocommit": True}, None),
    ({"find": "c", "lsid": LSID}, None),
    ({"find": "c"}, None),
    ({"find": "c", "lsid": LSID, "autocommit": False}, None),  # no txnNumber
    ({"find": "c", "txnNumber": Int64(1), "autocommit": False}, None),  # no lsid
    ({"find": "c", "lsid": "not-a-doc", "txnNumber": Int64(1), "autocommit": False}, None),
    ({"find": "c", "lsid": {"id": "str"}, "txnNumber": Int64(1), "autocommit": False}, None),
    ({"find": "c", "lsid": LSID, "txnNumber": "1", "autocommit": False}, None),
    ({"find": "c", "lsid": LSID, "txnNumber": Int64(1), "autocommit": 0}, None),
]


@pytest.mark.parametrize(("command", "expected"), TRANSACTION_KEYS,
                         ids=lambda v: repr(v)[:60])
def test_transaction_key(command: dict[str, Any], expected: tuple[bytes, int] | None) -> None:
    assert transaction_key(_decoded(command)) == expected
    key = transaction_key(_decoded(command))
    if key is not None:
        assert type(key[0]) is bytes  # hashable and comparable regardless of Binary subtype
        hash(key)


def test_transaction_keys_distinguish_sessions_and_transactions() -> None:
    other = {"id": Binary.from_uuid(uuid.uuid4(), UuidRepresentation.STANDARD)}
    base = {"find": "c", "autocommit": False}
    keys = {
        transaction_key(_decoded({**base, "lsid": lsid, "txnNumber": Int64(n)}))
        for lsid in (LSID, other)
        for n in (1, 2)
    }
    assert len(keys) == 4
    assert None not in keys
