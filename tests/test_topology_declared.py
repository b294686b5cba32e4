"""Declared roles (``upstream.members``) against two real, independent FerretDB servers.

FerretDB does not replicate, so each member has its own data: a marker document written
directly into each one tells which server answered a read. That makes routing directly
observable:

1. reads honour the driver's ``$readPreference`` (mode and tag sets), unsatisfiable
   preferences fail promptly with FailedToSatisfyReadPreference (133), and writes land
   only on the declared primary;
2. a stopped secondary is routed around (secondaryPreferred) or reported (secondary), and
   used again once it is back;
3. cursors stay on the server that opened them (getMore, killCursors, and the cleanup of
   a departed client's cursors);
4. 2,000 client connections share a pool of 20 upstream connections per member;
5. the primary killed mid-traffic gives prompt errors, never a hang, and traffic
   recovers after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import bson
import pytest
from pymongo import ReadPreference
from pymongo.collection import Collection
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_preferences import Secondary, _ServerMode

from proxy.wire import HEADER_SIZE, decode_body, encode_op_msg, parse_op_msg
from tests.support import FerretDBFactory, FerretDBProcess, ProxyFactory, ProxyProcess
from tests.support.clients import direct_client as direct
from tests.support.clients import strict_client as mongo

Doc = dict[str, Any]

HEARTBEAT_MS = 500
SELECTION_TIMEOUT_MS = 2000
# Slack on top of server_selection_timeout_ms for "fails promptly" (one heartbeat, the
# round trip and a busy 2-core machine).
PROMPT_SLACK_S = 2.0
# A bound on hanging, not a performance assertion.
HANG_BOUND_S = 10.0
CURSOR_NOT_FOUND = 43
FAILED_TO_SATISFY_READ_PREFERENCE = 133
# What a client may see while a member is down: HostUnreachable, NetworkTimeout,
# FailedToSatisfyReadPreference.
OUTAGE_CODES = {6, 89, FAILED_TO_SATISFY_READ_PREFERENCE}

_request_ids = itertools.count(70_000)


# --------------------------------------------------------------------------- helpers


@dataclass
class Members:
    primary: FerretDBProcess
    secondary: FerretDBProcess


def declared_config(members: Members, **upstream: Any) -> dict[str, Any]:
    """Extra proxy config: declared roles instead of the fixture's ``upstream.uri``.

    ``deep_merge`` replaces ``uri`` by ``None`` (YAML ``null``), which the config accepts
    when ``members`` is given, so only the declared members are used.
    """
    return {
        "upstream": {
            "uri": None,
            "members": [
                {"host": members.primary.address, "role": "primary"},
                {
                    "host": members.secondary.address,
                    "role": "secondary",
                    "tags": {"use": "analytics"},
                },
            ],
            "heartbeat_ms": HEARTBEAT_MS,
            "server_selection_timeout_ms": SELECTION_TIMEOUT_MS,
            **upstream,
        }
    }


def start_proxy(
    proxy_factory: ProxyFactory, members: Members, **upstream: Any
) -> ProxyProcess:
    proxy = proxy_factory(members.primary.uri, declared_config(members, **upstream))
    assert proxy.config["upstream"]["uri"] is None
    return proxy


def write_markers(members: Members, db_name: str) -> None:
    for who, fdb in (("primary", members.primary), ("secondary", members.secondary)):
        with direct(fdb) as client:
            client.drop_database(db_name)
            client[db_name]["routing"].insert_one({"_id": "marker", "who": who})


def marker(coll: Collection[Doc], read_preference: _ServerMode) -> str:
    """Which member answered a find with ``read_preference``."""
    doc = coll.with_options(read_preference=read_preference).find_one({"_id": "marker"})
    assert doc is not None, "the marker document is missing"
    who: str = doc["who"]
    return who


def code_of(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, OperationFailure) else None


def log_tail(proxy: ProxyProcess, lines: int = 40) -> str:
    return f"--- {proxy.log_path} (tail) ---\n" + "\n".join(
        proxy.log_text().splitlines()[-lines:]
    )


def direct_get_more(fdb: FerretDBProcess, db_name: str, coll: str, cursor_id: int) -> Doc:
    """getMore on ``fdb`` itself: FerretDB's cursors are global to its process."""
    with direct(fdb) as client:
        reply: Doc = client[db_name].command(
            {"getMore": bson.Int64(cursor_id), "collection": coll, "batchSize": 1}
        )
        return reply


def assert_cursor_alive(fdb: FerretDBProcess, db_name: str, coll: str, cursor_id: int) -> None:
    reply = direct_get_more(fdb, db_name, coll, cursor_id)
    assert len(reply["cursor"]["nextBatch"]) == 1, reply


def cursor_gone(fdb: FerretDBProcess, db_name: str, coll: str, cursor_id: int) -> bool:
    try:
        direct_get_more(fdb, db_name, coll, cursor_id)
    except OperationFailure as exc:
        assert exc.code == CURSOR_NOT_FOUND, exc.details
        return True
    return False


@pytest.fixture
def members(ferretdb_factory: FerretDBFactory) -> Members:
    return Members(primary=ferretdb_factory(), secondary=ferretdb_factory())


# --------------------------------------------------------------------------- 1. routing


def test_reads_follow_read_preference_and_writes_go_to_primary(
    members: Members, proxy_factory: ProxyFactory, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy(proxy_factory, members)
    with mongo(proxy.uri) as client:
        coll = client[db_name]["routing"]
        for _ in range(5):  # not a lucky random choice
            assert marker(coll, ReadPreference.SECONDARY) == "secondary"
            assert marker(coll, ReadPreference.PRIMARY) == "primary"
            assert marker(coll, ReadPreference.SECONDARY_PREFERRED) == "secondary"
            assert marker(coll, ReadPreference.PRIMARY_PREFERRED) == "primary"
            assert marker(coll, Secondary(tag_sets=[{"use": "analytics"}])) == "secondary"
            assert marker(coll, Secondary(tag_sets=[{"use": "nope"}, {}])) == "secondary"
            assert marker(coll, ReadPreference.NEAREST) in {"primary", "secondary"}
        # Other read commands honour it too.
        on_secondary = coll.with_options(read_preference=ReadPreference.SECONDARY)
        assert [d["who"] for d in on_secondary.aggregate([{"$match": {}}])] == ["secondary"]
        assert on_secondary.count_documents({"who": "secondary"}) == 1
        assert on_secondary.distinct("who") == ["secondary"]

        # No member has the tag: FailedToSatisfyReadPreference, within the selection timeout.
        started = time.monotonic()
        with pytest.raises(OperationFailure) as info:
            marker(coll, Secondary(tag_sets=[{"use": "nope"}]))
        elapsed = time.monotonic() - started
        assert info.value.code == FAILED_TO_SATISFY_READ_PREFERENCE, info.value.details
        assert elapsed < SELECTION_TIMEOUT_MS / 1000 + PROMPT_SLACK_S, elapsed

        # Writes go to the primary, whatever read preference the collection carries.
        writes = coll.with_options(read_preference=ReadPreference.SECONDARY)
        for fdb in (members.primary, members.secondary):
            with direct(fdb) as d:
                d[db_name]["routing"].insert_many(
                    [{"_id": "to-update", "x": 0}, {"_id": "to-delete"}]
                )
        assert writes.insert_one({"_id": "inserted"}).inserted_id == "inserted"
        assert writes.insert_many([{"_id": "many-1"}, {"_id": "many-2"}]).inserted_ids
        assert writes.update_one({"_id": "to-update"}, {"$set": {"x": 1}}).modified_count == 1
        assert writes.delete_one({"_id": "to-delete"}).deleted_count == 1
        found = writes.find_one_and_update({"_id": "inserted"}, {"$set": {"f": 1}})
        assert found == {"_id": "inserted"}
        # A raw write command carrying $readPreference: secondary still goes to the primary.
        reply = client[db_name].command(
            "insert", "routing", documents=[{"_id": "raw"}],
            read_preference=ReadPreference.SECONDARY,
        )
        assert reply["n"] == 1, reply

    with direct(members.primary) as d:
        docs = {doc["_id"]: doc for doc in d[db_name]["routing"].find()}
        assert docs == {
            "marker": {"_id": "marker", "who": "primary"},
            "to-update": {"_id": "to-update", "x": 1},
            "inserted": {"_id": "inserted", "f": 1},
            "many-1": {"_id": "many-1"},
            "many-2": {"_id": "many-2"},
            "raw": {"_id": "raw"},
        }
    with direct(members.secondary) as d:
        docs = {doc["_id"]: doc for doc in d[db_name]["routing"].find()}
        assert docs == {
            "marker": {"_id": "marker", "who": "secondary"},
            "to-update": {"_id": "to-update", "x": 0},
            "to-delete": {"_id": "to-delete"},
        }


# --------------------------------------------------------------------------- 2. member down


def test_stopped_secondary_is_routed_around_then_used_again(
    members: Members, proxy_factory: ProxyFactory, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy(proxy_factory, members)
    with mongo(proxy.uri) as client:
        coll = client[db_name]["routing"]
        assert marker(coll, ReadPreference.SECONDARY) == "secondary"
        assert marker(coll, ReadPreference.SECONDARY_PREFERRED) == "secondary"

        members.secondary.stop()
        # Two heartbeats and some slack: the monitor has seen the secondary down by then,
        # so no read is sent to it any more (the client does not retry reads).
        time.sleep(2 * HEARTBEAT_MS / 1000 + 1.0)
        for _ in range(10):
            assert marker(coll, ReadPreference.SECONDARY_PREFERRED) == "primary", log_tail(proxy)
        assert marker(coll, ReadPreference.PRIMARY) == "primary"

        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(OperationFailure) as info:
                marker(coll, ReadPreference.SECONDARY)
            elapsed = time.monotonic() - started
            assert info.value.code == FAILED_TO_SATISFY_READ_PREFERENCE, info.value.details
            assert elapsed < SELECTION_TIMEOUT_MS / 1000 + PROMPT_SLACK_S, elapsed

        members.secondary.start()
        restarted = time.monotonic()
        last: BaseException | None = None
        while True:
            try:
                assert marker(coll, ReadPreference.SECONDARY) == "secondary"
                break
            except OperationFailure as exc:
                last = exc
            assert time.monotonic() - restarted < HANG_BOUND_S, (
                f"SECONDARY reads still fail {HANG_BOUND_S}s after the restart: {last!r}\n"
                + log_tail(proxy)
            )
            time.sleep(0.2)
        # Once it is back, it stays usable: no stale pooled connection fails a read.
        for _ in range(10):
            assert marker(coll, ReadPreference.SECONDARY) == "secondary"
            assert marker(coll, ReadPreference.SECONDARY_PREFERRED) == "secondary"


# --------------------------------------------------------------------------- 3. cursors


def test_cursor_continuations_stay_on_the_secondary(
    members: Members, proxy_factory: ProxyFactory, db_name: str
) -> None:
    write_markers(members, db_name)
    with direct(members.secondary) as d:
        d[db_name]["only_on_secondary"].insert_many(
            [{"_id": i, "pad": "x" * 20} for i in range(10_000)]
        )
    proxy = start_proxy(proxy_factory, members)
    with mongo(proxy.uri) as client:
        coll = client[db_name].get_collection(
            "only_on_secondary", read_preference=ReadPreference.SECONDARY
        )
        # 100 getMores: each one must reach the secondary, or the primary answers
        # CursorNotFound (it has neither the cursor nor the collection).
        ids = [doc["_id"] for doc in coll.find().sort("_id", 1).batch_size(100)]
        assert ids == list(range(10_000))

        # pymongo's own cursor: close() sends killCursors, which must reach the secondary.
        cursor = coll.find().batch_size(10)
        assert next(cursor)["_id"] is not None
        cursor_id = cursor.cursor_id
        assert cursor_id, "the cursor should still be open on the server"
        assert_cursor_alive(members.secondary, db_name, "only_on_secondary", cursor_id)
        cursor.close()
        assert cursor_gone(members.secondary, db_name, "only_on_secondary", cursor_id), (
            "killCursors through the proxy did not kill the cursor on the secondary\n"
            + log_tail(proxy)
        )

        # The same with raw commands.
        reply = client[db_name].command(
            "find", "only_on_secondary", batchSize=10, read_preference=ReadPreference.SECONDARY
        )
        cursor_id = int(reply["cursor"]["id"])
        assert cursor_id and len(reply["cursor"]["firstBatch"]) == 10
        assert_cursor_alive(members.secondary, db_name, "only_on_secondary", cursor_id)
        killed = client[db_name].command(
            "killCursors", "only_on_secondary", cursors=[bson.Int64(cursor_id)]
        )
        assert killed["cursorsKilled"] == [cursor_id], killed
        assert cursor_gone(members.secondary, db_name, "only_on_secondary", cursor_id)


def restart_until_cursor_ids(
    fdb: FerretDBProcess, db_name: str, coll: str, *, below_2_31: bool
) -> None:
    """Restart ``fdb`` until its cursor ids fall on the wanted side of 2**31.

    FerretDB numbers cursors upwards from a random 32-bit start, so about half of its
    processes hand out ids below 2**31. Such an id fits a BSON int32, and a killCursors
    that sends it as int32 is rejected (``cursors`` must hold longs, as on MongoDB): both
    cases are covered deterministically rather than by the luck of the draw.
    """
    for _ in range(40):
        with direct(fdb) as client:
            reply = client[db_name].command("find", coll, batchSize=1)
            probe = int(reply["cursor"]["id"])
            client[db_name].command("killCursors", coll, cursors=[bson.Int64(probe)])
        # Leave room for the cursors the test opens after the probe.
        if (probe + 100 < 2**31) if below_2_31 else (probe >= 2**31):
            return
        fdb.restart()
    pytest.fail(f"FerretDB never handed out cursor ids {'<' if below_2_31 else '>='} 2**31")


@pytest.mark.parametrize("below_2_31", [True, False], ids=["id<2**31", "id>=2**31"])
def test_departed_clients_cursors_are_killed_on_their_server(
    members: Members, proxy_factory: ProxyFactory, db_name: str, below_2_31: bool
) -> None:
    write_markers(members, db_name)
    with direct(members.secondary) as d:
        d[db_name]["only_on_secondary"].insert_many([{"_id": i} for i in range(500)])
    restart_until_cursor_ids(
        members.secondary, db_name, "only_on_secondary", below_2_31=below_2_31
    )
    proxy = start_proxy(proxy_factory, members)

    # A raw socket (no sessions, no driver clean-up on close): only the proxy can kill
    # the cursor when the client goes away.
    with socket.create_connection((proxy.host, proxy.port), timeout=HANG_BOUND_S) as sock:
        hello = raw_command(sock, {"hello": 1, "$db": "admin"})
        assert hello["ok"] == 1.0, hello
        reply = raw_command(sock, {
            "find": "only_on_secondary",
            "batchSize": 10,
            "$readPreference": {"mode": "secondary"},
            "$db": db_name,
        })
        assert reply["ok"] == 1.0, reply
        cursor_id = int(reply["cursor"]["id"])
        assert cursor_id and len(reply["cursor"]["firstBatch"]) == 10
        assert (cursor_id < 2**31) == below_2_31, cursor_id
        assert_cursor_alive(members.secondary, db_name, "only_on_secondary", cursor_id)

    deadline = time.monotonic() + 5.0
    while not cursor_gone(members.secondary, db_name, "only_on_secondary", cursor_id):
        assert time.monotonic() < deadline, (
            f"cursor {cursor_id} of a disconnected client still open on the secondary "
            "after 5 s\n" + log_tail(proxy)
        )
        time.sleep(0.1)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_command(sock: socket.socket, command: Doc) -> Doc:
    rid = next(_request_ids)
    sock.sendall(encode_op_msg(rid, 0, bson.encode(command)))
    header = recv_exact(sock, HEADER_SIZE)
    length, _, response_to, _ = struct.unpack("<iiii", header)
    assert response_to == rid
    return decode_body(parse_op_msg(header + recv_exact(sock, length - HEADER_SIZE)))


# --------------------------------------------------------------------------- 4. many clients

CLIENTS = 2000
POOL_MAX = 20
# Besides its pool, the proxy holds exactly one connection per declared member for
# health checks (DeclaredTopology._monitor keeps one UpstreamConnection open per member
# and reopens it only after a failure). No other connection is opened to a member.
MONITOR_CONNECTIONS = 1
ALLOWED_PER_MEMBER = POOL_MAX + MONITOR_CONNECTIONS


def upstream_connections(pid: int, ports: Iterable[int]) -> dict[int, int]:
    """ESTABLISHED TCP connections owned by process ``pid`` to each of ``ports``.

    Sockets are matched by inode: /proc/PID/fd gives the process's socket inodes,
    /proc/PID/net/tcp* every TCP socket of the network namespace with its inode.
    """
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    counts = dict.fromkeys(ports, 0)
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and remote_port in counts and fields[9] in inodes:
                counts[remote_port] += 1
    return counts


class ConnectionSampler(threading.Thread):
    """Samples the proxy's upstream connections until stopped; keeps the maxima."""

    def __init__(self, pid: int, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.ports = ports
        self.maxima = dict.fromkeys(ports, 0)
        self.samples = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for port, n in upstream_connections(self.pid, self.ports).items():
                    self.maxima[port] = max(self.maxima[port], n)
                self.samples += 1
                self._stop_event.wait(0.02)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for 2,000 client sockets here and in the proxy, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * CLIENTS + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def async_command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: Doc
) -> Doc:
    rid = next(_request_ids)
    writer.write(encode_op_msg(rid, 0, bson.encode(command)))
    await writer.drain()
    header = await reader.readexactly(HEADER_SIZE)
    length, _, response_to, _ = struct.unpack("<iiii", header)
    body = await reader.readexactly(length - HEADER_SIZE)
    assert response_to == rid
    return decode_body(parse_op_msg(header + body))


async def test_2000_clients_share_20_upstream_connections_per_member(
    members: Members, proxy_factory: ProxyFactory, db_name: str, many_fds: None
) -> None:
    write_markers(members, db_name)
    # The waits for a pooled connection are long under this load by design: the point
    # here is multiplexing, not latency, so the wait-queue bound is generous.
    proxy = start_proxy(
        proxy_factory, members,
        pool={"max_size": POOL_MAX, "wait_queue_timeout_ms": 60_000},
    )
    ports = [members.primary.port, members.secondary.port]
    baseline = upstream_connections(proxy.pid, ports)
    # The monitor connections exist: the counting method sees the proxy's sockets.
    assert all(n >= MONITOR_CONNECTIONS for n in baseline.values()), baseline

    errors: list[str] = []
    ops_done = 0
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            streams.append((reader, writer))
            reply = await async_command(reader, writer, {"hello": 1, "$db": "admin"})
            assert reply["ok"] == 1.0, reply
        except Exception as exc:
            errors.append(f"client {i} connect: {exc!r}")

    async def work(i: int) -> None:
        nonlocal ops_done
        reader, writer = streams[i]
        _id = f"client-{i}"
        try:
            reply = await async_command(reader, writer, {
                "insert": "many", "documents": [{"_id": _id, "i": i}], "$db": db_name,
            })
            assert reply.get("ok") == 1.0 and reply.get("n") == 1, reply
            reply = await async_command(reader, writer, {
                "find": "many", "filter": {"_id": _id}, "$db": db_name,
            })
            assert reply.get("ok") == 1.0, reply
            assert reply["cursor"]["firstBatch"] == [{"_id": _id, "i": i}], reply
            reply = await async_command(reader, writer, {
                "find": "routing", "filter": {"_id": "marker"},
                "$readPreference": {"mode": "secondary"}, "$db": db_name,
            })
            assert reply.get("ok") == 1.0, reply
            assert reply["cursor"]["firstBatch"][0]["who"] == "secondary", reply
            ops_done += 3
        except Exception as exc:
            errors.append(f"client {i}: {exc!r}")

    sampler = ConnectionSampler(proxy.pid, ports)
    sampler.start()
    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(connect(i) for i in range(CLIENTS))), 60)
        assert errors == [], f"{len(errors)} connects failed, e.g. {errors[:5]}"
        assert len(streams) == CLIENTS
        # All 2,000 are open at once; now every one of them works concurrently.
        await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(CLIENTS))), 90)
    finally:
        sampler.stop()
        for _, writer in streams:
            writer.close()
    elapsed = time.monotonic() - started

    assert sampler.error is None, repr(sampler.error)
    assert errors == [], f"{len(errors)} clients failed, e.g. {errors[:5]}\n{log_tail(proxy)}"
    assert ops_done == 3 * CLIENTS
    assert sampler.samples >= 5, sampler.samples
    for port, most in sampler.maxima.items():
        assert most <= ALLOWED_PER_MEMBER, (
            f"the proxy held {most} connections to 127.0.0.1:{port} "
            f"(pool max_size {POOL_MAX} + {MONITOR_CONNECTIONS} monitor)"
        )
        # The load really went through pooled connections (not only the monitor's).
        assert most > MONITOR_CONNECTIONS, sampler.maxima
    with direct(members.primary) as d:
        assert d[db_name]["many"].count_documents({}) == CLIENTS
    with direct(members.secondary) as d:
        assert d[db_name]["many"].count_documents({}) == 0
    assert elapsed < 90, f"took {elapsed:.1f}s"


# --------------------------------------------------------------------------- 5. member killed

TRAFFIC_THREADS = 4
# Short upstream bounds, as in test_upstream_failure.py.
FAILURE_POOL = {"connect_timeout_ms": 1000, "wait_queue_timeout_ms": 2000}


@dataclass(frozen=True)
class Op:
    thread: int
    kind: str
    started: float
    ended: float
    ok: bool
    error: BaseException | None = None
    doc_id: str = ""


def test_primary_killed_mid_traffic_prompt_errors_then_recovery(
    members: Members, proxy_factory: ProxyFactory, db_name: str
) -> None:
    write_markers(members, db_name)
    proxy = start_proxy(
        proxy_factory, members, pool=FAILURE_POOL, socket_timeout_ms=5000
    )
    ops: list[Op] = []
    lock = threading.Lock()
    stop = threading.Event()

    def traffic(n: int) -> None:
        with mongo(proxy.uri) as client:
            coll = client[db_name]["traffic"]
            for k in itertools.count():
                if stop.is_set():
                    return
                doc_id = f"t{n}-{k}"
                for kind in ("insert", "find"):
                    t0 = time.monotonic()
                    try:
                        if kind == "insert":
                            coll.insert_one({"_id": doc_id, "n": n})
                        else:
                            coll.find_one({"n": n})
                        op = Op(n, kind, t0, time.monotonic(), True, doc_id=doc_id)
                    except PyMongoError as exc:
                        op = Op(n, kind, t0, time.monotonic(), False, exc, doc_id)
                    with lock:
                        ops.append(op)
                time.sleep(0.01)

    def snapshot() -> list[Op]:
        with lock:
            return list(ops)

    threads = [
        threading.Thread(target=traffic, args=(n,), daemon=True)
        for n in range(TRAFFIC_THREADS)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        kill_begun = time.monotonic()
        members.primary.kill()
        killed = time.monotonic()

        # Reads that do not need the primary keep working meanwhile.
        with mongo(proxy.uri) as reader:
            coll = reader[db_name]["routing"]
            time.sleep(2 * HEARTBEAT_MS / 1000 + 0.5)
            for _ in range(5):
                assert marker(coll, ReadPreference.SECONDARY) == "secondary"
                assert marker(coll, ReadPreference.PRIMARY_PREFERRED) == "secondary"
        time.sleep(max(0.0, killed + 5.0 - time.monotonic()))

        restart_begun = time.monotonic()
        members.primary.start()
        restarted = time.monotonic()
        # Recovered: every thread's last three insert+find pairs succeeded.
        while True:
            current = snapshot()
            recovered = all(
                len(mine) >= 6 and all(op.ok for op in mine[-6:]) and mine[-6].started > restarted
                for mine in ([op for op in current if op.thread == n]
                             for n in range(TRAFFIC_THREADS))
            )
            if recovered or time.monotonic() - restarted > HANG_BOUND_S:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=HANG_BOUND_S + 20)
    assert not any(t.is_alive() for t in threads), "a traffic thread hangs"

    all_ops = snapshot()
    failures = [op for op in all_ops if not op.ok]
    summary = (
        f"{len(all_ops)} ops, {len(failures)} failed; codes "
        f"{sorted({code_of(op.error) for op in failures if op.error}, key=str)}; "
        f"slowest {max(op.ended - op.started for op in all_ops):.2f}s\n{log_tail(proxy)}"
    )
    assert not [op for op in all_ops if op.ended < kill_begun and not op.ok], summary
    # No hang: every operation finished (succeeded or failed) within the bound.
    assert all(op.ended - op.started <= HANG_BOUND_S for op in all_ops), summary
    # Failures are the proxy's own error replies, with the codes for a server that is down.
    for op in failures:
        assert isinstance(op.error, OperationFailure), f"{op.error!r}\n{summary}"
        assert op.error.code in OUTAGE_CODES, f"{op.error.details}\n{summary}"
    # While the primary was down no write succeeded (none went to the secondary).
    down_inserts = [
        op for op in all_ops
        if op.kind == "insert" and op.started > killed and op.ended < restart_begun
    ]
    assert down_inserts, summary
    assert not [op for op in down_inserts if op.ok], summary
    # Recovery within the bound, for every thread.
    for n in range(TRAFFIC_THREADS):
        mine = [op for op in all_ops if op.thread == n]
        ok_after = [op for op in mine if op.started > restarted and op.ok]
        assert ok_after, f"thread {n} never succeeded after the restart\n{summary}"
        assert ok_after[0].ended - restarted <= HANG_BOUND_S, summary
        assert all(op.ok for op in mine[-6:]), f"thread {n} did not recover\n{summary}"

    acknowledged = {op.doc_id for op in all_ops if op.kind == "insert" and op.ok and op.doc_id}
    with direct(members.primary) as d:
        stored = {doc["_id"] for doc in d[db_name]["traffic"].find({}, {"_id": 1})}
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    with direct(members.secondary) as d:
        assert d[db_name]["traffic"].count_documents({}) == 0
