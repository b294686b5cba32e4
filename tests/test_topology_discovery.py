"""Discovery mode against a replica set: roles, failover, lost members, tag sets, staleness.

FerretDB has no replica sets, so `mockupdb` servers stand in for the members of set
"rs0", the way pymongo's own test suite tests server selection: each mock answers
``hello``/``isMaster`` (both the proxy's SDAM monitor and its pool handshake) with its
current role, the full ``hosts`` list, its ``tags`` and a ``lastWrite.lastWriteDate``,
and answers ``find`` / ``insert`` with a reply that names the member. Every command a
member receives is recorded, so a test can tell which member the proxy chose.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import bson
import pytest
from mockupdb import MockupDB
from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection
from pymongo.errors import (
    ConfigurationError,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
)
from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    _ServerMode,
)
from pymongo.server_type import SERVER_TYPE
from pymongo.topology_description import TopologyDescription

from proxy.config import UpstreamConfig
from proxy.errors import ProxyError
from proxy.route.topology import DiscoveryTopology
from tests.support import ProxyFactory, ProxyProcess

pytestmark = pytest.mark.timeout(90)

SET_NAME = "rs0"
HEARTBEAT_MS = 500
SELECTION_TIMEOUT_MS = 2000
# The primary's election before any failover; a new primary must carry a greater one.
FIRST_ELECTION = bson.ObjectId("7fffffff0000000000000001")
# How far behind the primary each member's lastWriteDate is: "sec-east" is stale
# beyond maxStalenessSeconds=90, "sec-west" is fresh.
LAGS_S = {"primary": 0.0, "sec-east": 300.0, "sec-west": 2.0}


class Member:
    """One mockupdb server playing a replica-set member whose role can be changed."""

    def __init__(self, name: str, primary: bool, tags: dict[str, str], lag_s: float) -> None:
        self.name = name
        self.primary = primary
        self.tags = tags
        self.lag_s = lag_s
        self.election_id = FIRST_ELECTION
        self.hosts: list[str] = []
        self.stopped = False
        self._commands: list[str] = []
        self._lock = threading.Lock()
        self.server = MockupDB(auto_ismaster=False, request_timeout=5)
        # One handler for everything, so nothing is ever left waiting in mockupdb's queue.
        self.server.autoresponds(self._handle)
        self.server.run()

    @property
    def address(self) -> str:
        return str(self.server.address_string)

    def hello(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC)
        doc: dict[str, Any] = {
            "helloOk": True,
            "isWritablePrimary": self.primary,
            "ismaster": self.primary,
            "secondary": not self.primary,
            "setName": SET_NAME,
            "setVersion": 1,
            "hosts": list(self.hosts),
            "me": self.address,
            "tags": dict(self.tags),
            "lastWrite": {"lastWriteDate": now - datetime.timedelta(seconds=self.lag_s)},
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "logicalSessionTimeoutMinutes": 30,
            "localTime": now,
            "connectionId": 1,
        }
        if self.primary:
            doc["electionId"] = self.election_id
        return doc

    def _handle(self, request: Any) -> bool:
        name = str(request.command_name or "")
        if name.lower() in ("hello", "ismaster"):
            return bool(request.replies(self.hello()))
        with self._lock:
            self._commands.append(name)
        if name == "insert":
            if not self.primary:
                return bool(request.replies(
                    ok=0, code=10107, codeName="NotWritablePrimary", errmsg="not primary"
                ))
            return bool(request.replies(n=len(request.doc.get("documents", []))))
        if name == "find":
            namespace = f"{request.doc['$db']}.{request.doc['find']}"
            return bool(request.replies(
                cursor={"id": 0, "firstBatch": [{"who": self.name}], "ns": namespace}
            ))
        return bool(request.replies(ok=1))

    def count(self, command: str) -> int:
        with self._lock:
            return self._commands.count(command)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop()


class ReplicaSet:
    def __init__(self) -> None:
        self.primary = Member("primary", True, {"dc": "east"}, LAGS_S["primary"])
        self.sec_east = Member("sec-east", False, {"dc": "east"}, LAGS_S["sec-east"])
        self.sec_west = Member("sec-west", False, {"dc": "west"}, LAGS_S["sec-west"])
        self.members = [self.primary, self.sec_east, self.sec_west]
        hosts = [m.address for m in self.members]
        for m in self.members:
            m.hosts = hosts
        self.uri = f"mongodb://{','.join(hosts)}/?replicaSet={SET_NAME}"

    def by_address(self, address: tuple[str, int | None]) -> str:
        wanted = f"{address[0]}:{address[1]}"
        return next(m.name for m in self.members if m.address == wanted)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


@pytest.fixture
def rs() -> Iterator[ReplicaSet]:
    replica_set = ReplicaSet()
    try:
        yield replica_set
    finally:
        replica_set.stop()


@pytest.fixture
def rs_proxy(rs: ReplicaSet, proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(rs.uri, {"upstream": {
        "heartbeat_ms": HEARTBEAT_MS,
        "server_selection_timeout_ms": SELECTION_TIMEOUT_MS,
    }})


@pytest.fixture
def client(rs_proxy: ProxyProcess) -> Iterator[MongoClient[dict[str, Any]]]:
    # No driver retries: each operation is exactly one request to the proxy.
    c: MongoClient[dict[str, Any]] = MongoClient(
        rs_proxy.uri,
        serverSelectionTimeoutMS=5000,
        socketTimeoutMS=10_000,
        retryWrites=False,
        retryReads=False,
    )
    try:
        yield c
    finally:
        c.close()


def _coll(client: MongoClient[dict[str, Any]], pref: _ServerMode) -> Collection[dict[str, Any]]:
    return client.db.get_collection("c", read_preference=pref)


def _who(client: MongoClient[dict[str, Any]], pref: _ServerMode) -> str:
    doc = _coll(client, pref).find_one()
    assert doc is not None
    return str(doc["who"])


def _inserts(rs: ReplicaSet) -> dict[str, int]:
    return {m.name: m.count("insert") for m in rs.members}


def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


# --- 1. discovery through the proxy --------------------------------------------------


def test_primary_discovered_and_writes_go_to_it(
    rs: ReplicaSet, client: MongoClient[dict[str, Any]]
) -> None:
    for i in range(5):
        client.db.c.insert_one({"_id": i})
    assert _inserts(rs) == {"primary": 5, "sec-east": 0, "sec-west": 0}
    assert _who(client, Primary()) == "primary"


def test_secondary_reads_go_to_secondaries(
    rs: ReplicaSet, client: MongoClient[dict[str, Any]]
) -> None:
    seen = {_who(client, Secondary()) for _ in range(30)}
    assert seen <= {"sec-east", "sec-west"}
    assert rs.primary.count("find") == 0


def test_tag_set_selects_the_tagged_secondary(client: MongoClient[dict[str, Any]]) -> None:
    west = Secondary(tag_sets=[{"dc": "west"}])
    assert {_who(client, west) for _ in range(20)} == {"sec-west"}
    east = Secondary(tag_sets=[{"dc": "east"}])
    assert {_who(client, east) for _ in range(20)} == {"sec-east"}
    # The first tag set that matches anything wins.
    fallback = Secondary(tag_sets=[{"dc": "north"}, {"dc": "west"}])
    assert {_who(client, fallback) for _ in range(10)} == {"sec-west"}


def test_no_member_matches_tags_is_failed_to_satisfy(
    client: MongoClient[dict[str, Any]],
) -> None:
    with pytest.raises(OperationFailure) as info:
        _who(client, Secondary(tag_sets=[{"dc": "north"}]))
    assert info.value.code == 133, info.value.details


def test_max_staleness_excludes_the_stale_secondary(
    client: MongoClient[dict[str, Any]],
) -> None:
    fresh = Secondary(max_staleness=90)
    assert {_who(client, fresh) for _ in range(20)} == {"sec-west"}


# $readPreference documents a client could send that pymongo's selection refuses.
ODD_READ_PREFERENCES: list[dict[str, Any]] = [
    {"mode": "secondary", "maxStalenessSeconds": 30},  # below 90: mongos says 215
    {"mode": "nearest", "maxStalenessSeconds": 5},
    {"mode": "secondary", "maxStalenessSeconds": -5},  # mongos: BadValue
    {"mode": "secondary", "maxStalenessSeconds": 0},  # mongos: same as absent
    {"mode": "secondary", "tags": []},
    {"mode": "secondary", "maxStalenessSeconds": float("nan")},
]


@pytest.mark.parametrize("doc", ODD_READ_PREFERENCES, ids=repr)
def test_odd_read_preference_is_answered_not_dropped(
    doc: dict[str, Any], client: MongoClient[dict[str, Any]]
) -> None:
    """mongos answers MaxStalenessOutOfRange (215) for maxStalenessSeconds < 90, BadValue
    for malformed values. The proxy must answer every such request (with an error, or a
    reply when the value is harmless), never close the client's connection."""
    command = {"find": "c", "$readPreference": doc}
    try:
        reply = client.db.command(command)
    except OperationFailure as exc:
        assert exc.code in (2, 215), exc.details
    except PyMongoError as exc:
        pytest.fail(f"{doc}: the proxy dropped the connection instead of replying: {exc!r}")
    else:
        assert reply["cursor"]["firstBatch"][0]["who"] in ("sec-east", "sec-west")
    # The connection is still usable.
    assert _who(client, Primary()) == "primary"


# --- 2. failover ---------------------------------------------------------------------


def test_failover_writes_follow_the_new_primary(
    rs: ReplicaSet, client: MongoClient[dict[str, Any]]
) -> None:
    client.db.c.insert_one({"_id": "before"})
    assert _inserts(rs)["primary"] == 1

    # The primary steps down; sec-west wins an election with a greater electionId.
    rs.primary.primary = False
    rs.sec_west.election_id = bson.ObjectId("7fffffff0000000000000002")
    rs.sec_west.primary = True

    def write_lands_on_new_primary() -> bool:
        before = rs.sec_west.count("insert")
        try:
            client.db.c.insert_one({})
        except NotPrimaryError as exc:  # the old primary answers NotWritablePrimary
            assert isinstance(exc.details, Mapping), exc.details
            assert exc.details.get("code") == 10107, exc.details
            return False
        return rs.sec_west.count("insert") == before + 1

    _eventually(write_lands_on_new_primary, "a write reaches the new primary",
                timeout=10 * HEARTBEAT_MS / 1000)
    # From now on every write goes to the new primary.
    counts = _inserts(rs)
    for _ in range(10):
        client.db.c.insert_one({})
    after = _inserts(rs)
    assert after["sec-west"] == counts["sec-west"] + 10
    assert after["primary"] == counts["primary"]
    assert after["sec-east"] == counts["sec-east"] == 0
    assert _who(client, Primary()) == "sec-west"
    assert {_who(client, Secondary()) for _ in range(20)} <= {"primary", "sec-east"}


# --- 3. members disappear ------------------------------------------------------------


def test_lost_secondaries(rs: ReplicaSet, rs_proxy: ProxyProcess) -> None:
    c: MongoClient[dict[str, Any]] = MongoClient(
        rs_proxy.uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=10_000
    )
    try:
        assert _who(c, SecondaryPreferred()) in ("sec-east", "sec-west")

        rs.sec_west.stop()
        time.sleep(3 * HEARTBEAT_MS / 1000)  # the monitor has seen sec-west go
        assert {_who(c, SecondaryPreferred()) for _ in range(20)} == {"sec-east"}
        assert {_who(c, Secondary()) for _ in range(10)} == {"sec-east"}

        rs.sec_east.stop()
        time.sleep(3 * HEARTBEAT_MS / 1000)
        assert {_who(c, SecondaryPreferred()) for _ in range(10)} == {"primary"}

        started = time.monotonic()
        with pytest.raises(OperationFailure) as info:
            _who(c, Secondary())
        assert info.value.code == 133, info.value.details
        assert info.value.details is not None
        assert info.value.details.get("codeName") == "FailedToSatisfyReadPreference"
        # The proxy waited server_selection_timeout_ms for a secondary, not much more.
        assert SELECTION_TIMEOUT_MS / 1000 - 0.1 <= time.monotonic() - started < 8

        # Writes are unaffected.
        c.db.c.insert_one({})
        assert rs.primary.count("insert") == 1
    finally:
        c.close()


def test_member_lost_between_heartbeats_is_avoided_at_once(
    rs: ReplicaSet, proxy_factory: ProxyFactory
) -> None:
    """A member that stops between two heartbeats: the proxy's first failed attempt to
    reach it must take it out of selection, so the driver's one retry of the read
    (HostUnreachable is a retryable read error) goes to a live member. The heartbeat is
    long so that only the proxy's own failure handling can explain success."""
    proxy = proxy_factory(rs.uri, {"upstream": {
        "heartbeat_ms": 30_000,
        "server_selection_timeout_ms": SELECTION_TIMEOUT_MS,
    }})
    c: MongoClient[dict[str, Any]] = MongoClient(
        proxy.uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=10_000
    )
    try:
        warm = {_who(c, Secondary()) for _ in range(30)}
        assert warm <= {"sec-east", "sec-west"}
        rs.sec_west.stop()
        time.sleep(0.3)  # the proxy's idle connections to sec-west have seen EOF
        failures: list[str] = []
        seen: set[str] = set()
        for _ in range(20):
            try:
                seen.add(_who(c, SecondaryPreferred()))
            except PyMongoError as exc:
                failures.append(repr(exc))
        assert failures == [], failures
        assert seen == {"sec-east"}
    finally:
        c.close()


# --- 4. selection is pymongo's: the proxy's DiscoveryTopology vs a plain client ------

# Read preference -> the members pymongo selects, for the fixture's tags and lags.
SELECTION_TABLE: list[tuple[_ServerMode, set[str]]] = [
    (Primary(), {"primary"}),
    (PrimaryPreferred(), {"primary"}),
    (PrimaryPreferred(tag_sets=[{"dc": "west"}]), {"primary"}),
    (Secondary(), {"sec-east", "sec-west"}),
    (SecondaryPreferred(), {"sec-east", "sec-west"}),
    (Nearest(), {"primary", "sec-east", "sec-west"}),
    (Secondary(max_staleness=90), {"sec-west"}),
    (Secondary(max_staleness=400), {"sec-east", "sec-west"}),
    (SecondaryPreferred(max_staleness=90), {"sec-west"}),
    (Nearest(max_staleness=90), {"primary", "sec-west"}),
    (Secondary(tag_sets=[{"dc": "east"}]), {"sec-east"}),
    (Secondary(tag_sets=[{"dc": "west"}]), {"sec-west"}),
    (Secondary(tag_sets=[{"dc": "north"}]), set()),
    (Secondary(tag_sets=[{"dc": "north"}, {"dc": "west"}]), {"sec-west"}),
    (Secondary(tag_sets=[{"dc": "north"}, {}]), {"sec-east", "sec-west"}),
    (Secondary(tag_sets=[{"dc": "east"}], max_staleness=90), set()),
    (SecondaryPreferred(tag_sets=[{"dc": "east"}], max_staleness=90), {"primary"}),
    (SecondaryPreferred(tag_sets=[{"dc": "north"}]), {"primary"}),
    (Nearest(tag_sets=[{"dc": "east"}]), {"primary", "sec-east"}),
    (Nearest(tag_sets=[{"dc": "west"}], max_staleness=90), {"sec-west"}),
]

# Both sides get a latency window wide enough that round-trip noise on a busy machine
# cannot make them disagree.
LOCAL_THRESHOLD_MS = 10_000


def _settled(description: TopologyDescription) -> bool:
    types = sorted(sd.server_type for sd in description.server_descriptions().values())
    return types == sorted([SERVER_TYPE.RSPrimary, SERVER_TYPE.RSSecondary,
                            SERVER_TYPE.RSSecondary])


async def _wait_settled(describe: Callable[[], TopologyDescription]) -> None:
    deadline = time.monotonic() + 10
    while not _settled(describe()):
        assert time.monotonic() < deadline, f"topology never settled: {describe()}"
        await asyncio.sleep(0.05)


async def test_selection_matches_pymongo(rs: ReplicaSet) -> None:
    topology = DiscoveryTopology(UpstreamConfig(
        uri=rs.uri,
        heartbeat_ms=HEARTBEAT_MS,
        server_selection_timeout_ms=SELECTION_TIMEOUT_MS,
        local_threshold_ms=LOCAL_THRESHOLD_MS,
    ))
    reference: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        rs.uri,
        heartbeatFrequencyMS=HEARTBEAT_MS,
        localThresholdMS=LOCAL_THRESHOLD_MS,
        serverSelectionTimeoutMS=SELECTION_TIMEOUT_MS,
    )
    await topology.start()
    try:
        await reference.aconnect()
        await _wait_settled(topology.description)
        await _wait_settled(lambda: reference.topology_description)

        for pref, expected in SELECTION_TABLE:
            ours = {rs.by_address(sd.address) for sd in topology.candidates(pref)}
            theirs = {
                rs.by_address(sd.address)
                for sd in reference.topology_description.apply_selector(pref)
            }
            assert ours == theirs, f"{pref!r}: proxy {ours} != pymongo {theirs}"
            assert ours == expected, f"{pref!r}: {ours} != expected {expected}"

        # Both refuse maxStalenessSeconds below pymongo's minimum; the proxy answers it
        # as mongos does, with MaxStalenessOutOfRange (215).
        for small in (30, 89):
            with pytest.raises(ConfigurationError):
                reference.topology_description.apply_selector(Secondary(max_staleness=small))
            with pytest.raises(ProxyError) as refused:
                topology.candidates(Secondary(max_staleness=small))
            assert refused.value.code == 215

        # The proxy's select() picks within the candidates.
        for pref, expected in SELECTION_TABLE:
            if expected:
                picked = {rs.by_address(await topology.select(pref)) for _ in range(10)}
                assert picked <= expected, f"{pref!r}: picked {picked}"
    finally:
        await reference.close()
        await topology.close()


async def test_selection_follows_a_lost_member(rs: ReplicaSet) -> None:
    topology = DiscoveryTopology(UpstreamConfig(
        uri=rs.uri, heartbeat_ms=HEARTBEAT_MS, server_selection_timeout_ms=1000,
        local_threshold_ms=LOCAL_THRESHOLD_MS,
    ))
    await topology.start()
    try:
        await _wait_settled(topology.description)
        rs.sec_west.stop()
        deadline = time.monotonic() + 10
        while {rs.by_address(sd.address) for sd in topology.candidates(Secondary())} != {
            "sec-east"
        }:
            assert time.monotonic() < deadline, topology.summary()
            await asyncio.sleep(0.05)
        # The fresh secondary is gone and the remaining one is stale.
        assert topology.candidates(Secondary(max_staleness=90)) == []
        primary = topology.candidates(SecondaryPreferred(max_staleness=90))
        assert [rs.by_address(sd.address) for sd in primary] == ["primary"]
    finally:
        await topology.close()
