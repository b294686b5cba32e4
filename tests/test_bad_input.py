"""Raw-socket tests: the proxy answers malformed client input like a server would.

Every case sends one bad message to a proxy in front of the real FerretDB and checks:

* the reply is an error document ``{ok: 0, code, codeName, errmsg}`` whose
  ``responseTo`` is the bad request's requestID, and whose errmsg says what is wrong;
* the connection is closed only when the byte stream cannot be re-framed, and is
  otherwise still usable (a valid ping on the same socket answers ok: 1);
* a second client, connected before the bad input, keeps working afterwards and the
  proxy process is still alive.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import bson
import crc32c
import pytest
from pymongo import MongoClient

from proxy.wire import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_MORE_TO_COME,
    HEADER_SIZE,
    REPLY_FLAG_QUERY_FAILURE,
    OpCode,
    compress,
    decode_body,
    decompress,
    encode_op_msg,
    pack_header,
    parse_header,
    parse_op_msg,
)
from tests.support import FerretDBProcess, ProxyFactory, ProxyProcess

IO_TIMEOUT_S = 10.0
_ids = itertools.count(1000)

# --------------------------------------------------------------------------- helpers


def next_id() -> int:
    return next(_ids)


@dataclass
class Reply:
    op_code: int
    request_id: int
    response_to: int
    doc: dict[str, Any]
    flags: int = 0  # OP_MSG flagBits or OP_REPLY responseFlags
    compressed_with: str | None = None


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(sock: socket.socket) -> Reply:
    """Read one whole reply (OP_MSG, OP_REPLY or OP_COMPRESSED around either)."""
    header = recv_exact(sock, HEADER_SIZE)
    length, request_id, response_to, op_code = struct.unpack("<iiii", header)
    assert HEADER_SIZE <= length < 64 * 1024 * 1024, f"implausible reply length {length}"
    message = header + recv_exact(sock, length - HEADER_SIZE)
    compressed_with = None
    if op_code == OpCode.OP_COMPRESSED:
        message, compressed_with = decompress(message)
        op_code = parse_header(message).op_code
    if op_code == OpCode.OP_MSG:
        msg = parse_op_msg(message)
        return Reply(op_code, request_id, response_to, decode_body(msg), msg.flags,
                     compressed_with)
    assert op_code == OpCode.OP_REPLY, f"unexpected reply opcode {op_code}"
    flags, _cursor_id, _start, number = struct.unpack_from("<IqiI", message, HEADER_SIZE)
    assert number == 1, f"OP_REPLY with {number} documents"
    doc = bson.decode(message[HEADER_SIZE + 20:])
    return Reply(op_code, request_id, response_to, doc, flags, compressed_with)


def op_msg(doc: dict[str, Any], request_id: int, flags: int = 0) -> bytes:
    return encode_op_msg(request_id, 0, bson.encode(doc), flags=flags)


def raw_message(request_id: int, op_code: int, rest: bytes) -> bytes:
    """A message with an honest length: header + ``rest``."""
    return pack_header(HEADER_SIZE + len(rest), request_id, 0, op_code) + rest


def op_query(collection: str, query: dict[str, Any], request_id: int) -> bytes:
    rest = (
        struct.pack("<i", 0)
        + collection.encode() + b"\x00"
        + struct.pack("<ii", 0, -1)
        + bson.encode(query)
    )
    return raw_message(request_id, OpCode.OP_QUERY, rest)


def connect(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ping(sock: socket.socket) -> Reply:
    rid = next_id()
    sock.sendall(op_msg({"ping": 1, "$db": "admin"}, rid))
    reply = read_reply(sock)
    assert reply.response_to == rid
    return reply


def assert_ping_ok(sock: socket.socket) -> None:
    reply = ping(sock)
    assert reply.doc.get("ok") == 1.0, reply.doc


def assert_error(
    reply: Reply, request_id: int, code: int, code_name: str, *needles: str
) -> None:
    doc = reply.doc
    assert reply.response_to == request_id, (reply, request_id)
    assert doc.get("ok") == 0.0, doc
    assert doc.get("code") == code, doc
    assert doc.get("codeName") == code_name, doc
    errmsg = doc.get("errmsg")
    assert isinstance(errmsg, str) and errmsg, doc
    for needle in needles:
        assert needle.lower() in errmsg.lower(), f"{needle!r} not in errmsg {errmsg!r}"


def assert_closed(sock: socket.socket) -> None:
    """The proxy closes the connection: EOF (or reset) within the timeout."""
    sock.settimeout(IO_TIMEOUT_S)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    except TimeoutError:
        pytest.fail("the proxy did not close the connection")
    assert data == b"", f"expected EOF, got {data!r}"


def assert_open(sock: socket.socket) -> None:
    """Nothing more was sent and the connection is not closed."""
    sock.settimeout(0.3)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return
    finally:
        sock.settimeout(IO_TIMEOUT_S)
    pytest.fail(f"expected an open, quiet connection, got {data!r}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bad_proxy(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy of this module's own, so a crash here cannot hide in another module."""
    proc = ProxyProcess(ferretdb.uri, workdir=tmp_path_factory.mktemp("proxy_bad_input")).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(bad_proxy: ProxyProcess) -> Iterator[socket.socket]:
    sock = connect(bad_proxy)
    yield sock
    sock.close()


@pytest.fixture
def bystander(bad_proxy: ProxyProcess) -> Iterator[socket.socket]:
    """A second client, connected and working before the bad input, checked after it."""
    sock = connect(bad_proxy)
    assert_ping_ok(sock)
    yield sock
    try:
        assert_ping_ok(sock)
        mc: MongoClient[dict[str, Any]]
        with MongoClient(bad_proxy.uri, serverSelectionTimeoutMS=5000,
                         socketTimeoutMS=10000) as mc:
            assert mc.admin.command("ping")["ok"] == 1.0
        assert bad_proxy.running, f"proxy exited; log {bad_proxy.log_path}"
    finally:
        sock.close()


# --------------------------------------------------------------------------- framing


def test_length_below_header_size(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(struct.pack("<iiii", 10, rid, 0, OpCode.OP_MSG))
    reply = read_reply(client)
    assert_error(reply, rid, 17, "ProtocolError", "length 10")
    assert_closed(client)


def test_negative_length(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(struct.pack("<iiii", -5, rid, 0, OpCode.OP_MSG))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "length -5")
    assert_closed(client)


def test_length_above_max_message_size(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(struct.pack("<iiii", 48_000_001, rid, 0, OpCode.OP_MSG) + b"\x00" * 64)
    reply = read_reply(client)
    assert_error(reply, rid, 17, "ProtocolError", "48000001")
    assert_closed(client)


def test_truncated_message_then_client_close(
    bad_proxy: ProxyProcess, bystander: socket.socket
) -> None:
    for _ in range(3):
        sock = connect(bad_proxy)
        # Declares 200 bytes, sends only the header and a few body bytes, then leaves.
        sock.sendall(struct.pack("<iiii", 200, next_id(), 0, OpCode.OP_MSG) + b"\x00\x00")
        sock.close()
    time.sleep(0.2)
    assert bad_proxy.running


def test_header_only_then_half_close(client: socket.socket, bystander: socket.socket) -> None:
    client.sendall(struct.pack("<iiii", 100, next_id(), 0, OpCode.OP_MSG))
    client.shutdown(socket.SHUT_WR)
    # Nothing can be answered for an incomplete message: the proxy just closes.
    assert_closed(client)


# --------------------------------------------------------------------------- OP_MSG sections


_PING_BODY = bson.encode({"ping": 1, "$db": "admin"})


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        pytest.param(
            b"\x00" + _PING_BODY + b"\x01" + struct.pack("<i", 500) + b"documents\x00",
            "exceeds",
            id="sequence-size-past-end",
        ),
        pytest.param(b"\x07" + _PING_BODY, "section kind 7", id="bad-section-kind"),
        pytest.param(
            b"\x01" + struct.pack("<i", 4 + 10 + len(_PING_BODY)) + b"documents\x00" + _PING_BODY,
            "kind-0",
            id="missing-kind-0",
        ),
        pytest.param(b"\x00" + _PING_BODY + b"\x00" + _PING_BODY, "duplicate", id="two-bodies"),
    ],
)
def test_malformed_sections(
    client: socket.socket, bystander: socket.socket, sections: bytes, needle: str
) -> None:
    rid = next_id()
    client.sendall(raw_message(rid, OpCode.OP_MSG, struct.pack("<I", 0) + sections))
    assert_error(read_reply(client), rid, 17, "ProtocolError", needle)
    assert_ping_ok(client)


def test_unknown_required_flag_bit(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    rest = struct.pack("<I", 1 << 5) + b"\x00" + _PING_BODY
    client.sendall(raw_message(rid, OpCode.OP_MSG, rest))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "flag")
    assert_ping_ok(client)


# --------------------------------------------------------------------------- BSON


def test_body_garbage_without_trailing_nul(
    client: socket.socket, bystander: socket.socket
) -> None:
    # The body's length says 20 and 20 bytes follow, but they are not BSON.
    body = struct.pack("<i", 20) + b"\xde\xad\xbe\xef" * 4
    assert len(body) == 20
    rid = next_id()
    client.sendall(raw_message(rid, OpCode.OP_MSG, struct.pack("<I", 0) + b"\x00" + body))
    assert_error(read_reply(client), rid, 22, "InvalidBSON", "BSON")
    assert_ping_ok(client)


def test_body_document_size_past_end(client: socket.socket, bystander: socket.socket) -> None:
    # The body document claims 400 bytes; the message (honest length) holds far fewer.
    rid = next_id()
    sections = b"\x00" + struct.pack("<i", 400) + _PING_BODY[4:]
    client.sendall(raw_message(rid, OpCode.OP_MSG, struct.pack("<I", 0) + sections))
    assert_error(read_reply(client), rid, 22, "InvalidBSON", "exceeds")
    assert_ping_ok(client)


def test_body_corrupt_element_type(client: socket.socket, bystander: socket.socket) -> None:
    good = bytearray(bson.encode({"ping": 1, "$db": "admin"}))
    assert good[4] == 0x10  # int32 "ping"
    good[4] = 0x55  # no such BSON type
    rid = next_id()
    client.sendall(raw_message(rid, OpCode.OP_MSG, struct.pack("<I", 0) + b"\x00" + bytes(good)))
    assert_error(read_reply(client), rid, 22, "InvalidBSON", "invalid BSON")
    assert_ping_ok(client)


def test_body_string_length_lies(client: socket.socket, bystander: socket.socket) -> None:
    good = bytearray(bson.encode({"find": "c", "$db": "test"}))
    # "find": string element; its int32 length sits after type byte + "find\0".
    struct.pack_into("<i", good, 4 + 1 + 5, 1000)
    rid = next_id()
    client.sendall(raw_message(rid, OpCode.OP_MSG, struct.pack("<I", 0) + b"\x00" + bytes(good)))
    assert_error(read_reply(client), rid, 22, "InvalidBSON")
    assert_ping_ok(client)


def test_empty_body_document(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(encode_op_msg(rid, 0, bson.encode({})))
    assert_error(read_reply(client), rid, 59, "CommandNotFound", "empty")
    assert_ping_ok(client)


# --------------------------------------------------------------------------- checksum


def test_checksum_wrong_crc(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    good = op_msg({"ping": 1, "$db": "admin"}, rid, flags=FLAG_CHECKSUM_PRESENT)
    (crc,) = struct.unpack_from("<I", good, len(good) - 4)
    bad = good[:-4] + struct.pack("<I", crc ^ 0xFFFFFFFF)
    client.sendall(bad)
    assert_error(read_reply(client), rid, 17, "ProtocolError", "checksum")
    assert_ping_ok(client)


def test_checksum_correct_crc(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    message = op_msg({"ping": 1, "$db": "admin"}, rid, flags=FLAG_CHECKSUM_PRESENT)
    assert struct.unpack_from("<I", message, len(message) - 4)[0] == crc32c.crc32c(message[:-4])
    client.sendall(message)
    reply = read_reply(client)
    assert reply.response_to == rid
    assert reply.doc.get("ok") == 1.0, reply.doc
    assert_ping_ok(client)


# --------------------------------------------------------------------------- opcodes


def test_unknown_opcode(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(raw_message(rid, 9999, b"\x00" * 24))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "9999")
    assert_ping_ok(client)


@pytest.mark.parametrize(
    ("op_code", "name"),
    [
        (OpCode.OP_UPDATE, "OP_UPDATE"),
        (OpCode.OP_INSERT, "OP_INSERT"),
        (OpCode.OP_GET_MORE, "OP_GET_MORE"),
        (OpCode.OP_DELETE, "OP_DELETE"),
        (OpCode.OP_KILL_CURSORS, "OP_KILL_CURSORS"),
    ],
)
def test_removed_opcode(
    client: socket.socket, bystander: socket.socket, op_code: int, name: str
) -> None:
    rid = next_id()
    rest = struct.pack("<i", 0) + b"test.coll\x00" + bson.encode({"_id": 1, "x": 1})
    client.sendall(raw_message(rid, op_code, rest))
    reply = read_reply(client)
    assert_error(reply, rid, reply.doc.get("code", -1), str(reply.doc.get("codeName")), name)
    assert reply.doc["code"] != 0
    assert_ping_ok(client)


# --------------------------------------------------------------------------- OP_QUERY


def test_op_query_ismaster_handshake(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(op_query("admin.$cmd", {"isMaster": 1}, rid))
    reply = read_reply(client)
    assert reply.op_code == OpCode.OP_REPLY
    assert reply.response_to == rid
    assert not reply.flags & REPLY_FLAG_QUERY_FAILURE
    assert reply.doc["ok"] == 1.0
    assert reply.doc["ismaster"] is True
    assert reply.doc["msg"] == "isdbgrid"
    assert reply.doc["maxWireVersion"] >= 6
    assert_ping_ok(client)


def test_op_query_hello_handshake(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    client.sendall(op_query("admin.$cmd", {"hello": 1, "client": {"driver": {
        "name": "raw", "version": "0"}}}, rid))
    reply = read_reply(client)
    assert reply.op_code == OpCode.OP_REPLY
    assert reply.response_to == rid
    assert not reply.flags & REPLY_FLAG_QUERY_FAILURE
    assert reply.doc["ok"] == 1.0
    # `hello` is answered with isWritablePrimary (mongos does the same); isMaster above
    # gets the legacy `ismaster` field.
    assert reply.doc["isWritablePrimary"] is True
    assert reply.doc["msg"] == "isdbgrid"
    assert_ping_ok(client)


@pytest.mark.parametrize(
    ("collection", "query"),
    [
        pytest.param("admin.$cmd", {"find": "coll"}, id="find-on-admin.$cmd"),
        pytest.param("admin.$cmd", {"ping": 1}, id="ping-on-admin.$cmd"),
        pytest.param("test.coll", {"x": 1}, id="query-on-test.coll"),
    ],
)
def test_op_query_non_handshake(
    client: socket.socket, bystander: socket.socket, collection: str, query: dict[str, Any]
) -> None:
    rid = next_id()
    client.sendall(op_query(collection, query, rid))
    reply = read_reply(client)
    assert reply.op_code == OpCode.OP_REPLY
    assert reply.response_to == rid
    assert reply.flags & REPLY_FLAG_QUERY_FAILURE
    err = reply.doc.get("$err")
    assert isinstance(err, str) and "OP_QUERY" in err, reply.doc
    assert reply.doc.get("code") == 352, reply.doc
    assert_ping_ok(client)


def test_op_query_truncated_query_document(
    client: socket.socket, bystander: socket.socket
) -> None:
    rid = next_id()
    rest = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + b"\x30\x00"
    client.sendall(raw_message(rid, OpCode.OP_QUERY, rest))
    reply = read_reply(client)
    assert reply.response_to == rid
    assert reply.doc.get("ok") == 0.0
    assert reply.doc.get("code") == 17, reply.doc
    assert_ping_ok(client)


# --------------------------------------------------------------------------- OP_COMPRESSED


def negotiate(sock: socket.socket, compressors: list[str]) -> None:
    """The handshake that lets the client send OP_COMPRESSED with ``compressors``."""
    rid = next_id()
    sock.sendall(op_msg({"hello": 1, "client": {"driver": {"name": "raw", "version": "0"}},
                         "compression": compressors, "$db": "admin"}, rid))
    hello = read_reply(sock)
    assert hello.response_to == rid
    assert hello.doc.get("compression") == compressors, hello.doc


def test_compressed_corrupt_zlib(client: socket.socket, bystander: socket.socket) -> None:
    negotiate(client, ["zlib"])
    rid = next_id()
    inner = op_msg({"ping": 1, "$db": "admin"}, rid)
    body_len = len(inner) - HEADER_SIZE
    rest = struct.pack("<iiB", OpCode.OP_MSG, body_len, 2) + b"\x78\x9c this is not deflate"
    client.sendall(raw_message(rid, OpCode.OP_COMPRESSED, rest))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "zlib")
    assert_ping_ok(client)


def test_compressed_size_mismatch(client: socket.socket, bystander: socket.socket) -> None:
    negotiate(client, ["zlib"])
    rid = next_id()
    inner = op_msg({"ping": 1, "$db": "admin"}, rid)
    payload = zlib.compress(inner[HEADER_SIZE:])
    rest = struct.pack("<iiB", OpCode.OP_MSG, len(inner) - HEADER_SIZE + 7, 2) + payload
    client.sendall(raw_message(rid, OpCode.OP_COMPRESSED, rest))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "uncompressedSize")
    assert_ping_ok(client)


def test_compressed_unknown_compressor(client: socket.socket, bystander: socket.socket) -> None:
    rid = next_id()
    inner = op_msg({"ping": 1, "$db": "admin"}, rid)
    rest = struct.pack("<iiB", OpCode.OP_MSG, len(inner) - HEADER_SIZE, 42) + inner[HEADER_SIZE:]
    client.sendall(raw_message(rid, OpCode.OP_COMPRESSED, rest))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "compressor")
    assert_ping_ok(client)


def test_compressed_without_negotiation_is_refused(
    client: socket.socket, bystander: socket.socket
) -> None:
    """A compressor the client did not negotiate in its hello is refused before any
    decompression work (a compression bomb costs the proxy nothing)."""
    rid = next_id()
    client.sendall(compress(op_msg({"ping": 1, "$db": "admin"}, rid), "zlib"))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "not negotiated")
    negotiate(client, ["snappy"])
    rid = next_id()
    client.sendall(compress(op_msg({"ping": 1, "$db": "admin"}, rid), "zlib"))
    assert_error(read_reply(client), rid, 17, "ProtocolError", "zlib was not negotiated")
    assert_ping_ok(client)


def test_compressed_zlib_after_negotiation_replies_compressed(
    client: socket.socket, bystander: socket.socket
) -> None:
    negotiate(client, ["zlib"])
    rid = next_id()
    client.sendall(compress(op_msg({"ping": 1, "$db": "admin"}, rid), "zlib"))
    reply = read_reply(client)
    assert reply.response_to == rid
    assert reply.doc.get("ok") == 1.0, reply.doc
    assert reply.compressed_with == "zlib"


# --------------------------------------------------------------------------- moreToCome


def test_more_to_come_insert_gets_no_reply(
    client: socket.socket, bystander: socket.socket, ferretdb: FerretDBProcess, db_name: str
) -> None:
    mc: MongoClient[dict[str, Any]]
    with MongoClient(ferretdb.uri, directConnection=True, serverSelectionTimeoutMS=5000) as mc:
        mc.drop_database(db_name)
        insert_rid = next_id()
        client.sendall(op_msg(
            {"insert": "c", "documents": [{"_id": 1, "v": "fire-and-forget"}],
             "writeConcern": {"w": 0}, "$db": db_name},
            insert_rid, flags=FLAG_MORE_TO_COME,
        ))
        # No reply to the insert: the first thing read answers the ping.
        assert_open(client)
        ping_rid = next_id()
        client.sendall(op_msg({"ping": 1, "$db": "admin"}, ping_rid))
        reply = read_reply(client)
        assert reply.response_to == ping_rid, (
            f"first reply answers {reply.response_to}, not the ping {ping_rid} "
            f"(insert was {insert_rid})"
        )
        assert reply.doc.get("ok") == 1.0
        deadline = time.monotonic() + 5
        found = None
        while time.monotonic() < deadline:
            found = mc[db_name]["c"].find_one({"_id": 1})
            if found is not None:
                break
            time.sleep(0.05)
        assert found == {"_id": 1, "v": "fire-and-forget"}
        mc.drop_database(db_name)


def test_more_to_come_with_invalid_bson_keeps_stream_in_sync(
    client: socket.socket, bystander: socket.socket
) -> None:
    # Whatever the proxy does about a broken fire-and-forget message, the next request's
    # reply must still be matched to that request.
    good = bytearray(bson.encode({"insert": "c", "documents": [], "$db": "test"}))
    good[4] = 0x55
    client.sendall(raw_message(next_id(), OpCode.OP_MSG,
                               struct.pack("<I", FLAG_MORE_TO_COME) + b"\x00" + bytes(good)))
    rid = next_id()
    client.sendall(op_msg({"ping": 1, "$db": "admin"}, rid))
    first = read_reply(client)
    if first.response_to != rid:  # an error answer to the bad message is tolerated
        assert first.doc.get("ok") == 0.0
        first = read_reply(client)
    assert first.response_to == rid
    assert first.doc.get("ok") == 1.0


# --------------------------------------------------------------------------- slow client


def test_incomplete_message_times_out(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    """A message that starts but never completes is bounded by listen.read_timeout_ms."""
    proxy = proxy_factory(ferretdb.uri, {"listen": {"read_timeout_ms": 500}})
    other = connect(proxy)
    assert_ping_ok(other)
    with connect(proxy) as sock:
        sock.sendall(struct.pack("<iiii", 100, next_id(), 0, OpCode.OP_MSG) + b"\x00" * 10)
        start = time.monotonic()
        sock.settimeout(IO_TIMEOUT_S)
        try:
            while sock.recv(4096):
                pass  # an error reply before closing is fine
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("an incomplete message held the connection open")
        assert time.monotonic() - start < 5
    assert_ping_ok(other)
    other.close()


@pytest.mark.parametrize("first", [5, 40], ids=["inside-the-header", "inside-the-body"])
def test_trickled_message_is_bounded_from_its_first_byte(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, first: int
) -> None:
    """A client that sends one more byte every 0.2 s never completes its message: the
    read_timeout_ms counts from the message's first byte, so trickling cannot extend
    it (a slow-loris client holds its connection for at most that long)."""
    proxy = proxy_factory(ferretdb.uri, {"listen": {"read_timeout_ms": 600}})
    message = struct.pack("<iiii", 1000, next_id(), 0, OpCode.OP_MSG) + b"\x00" * 984
    with connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(message[:first])
        closed = False
        for byte in message[first:first + 40]:
            time.sleep(0.2)
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        if not closed:
            sock.settimeout(IO_TIMEOUT_S)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"the proxy kept a trickling client for {elapsed:.1f} s"
    other = connect(proxy)
    assert_ping_ok(other)
    other.close()


def test_a_client_that_never_reads_replies_is_pushed_back(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory
) -> None:
    """A client streaming requests without reading a single reply: once the replies fill
    the proxy's write buffer the proxy stops taking requests, and once ~1 MiB of them
    waits unread it stops reading the socket, so the client's sends block (TCP pushes
    back) instead of the proxy's memory growing. Other clients keep being served."""
    proxy = proxy_factory(ferretdb.uri)
    hello = op_msg({"hello": 1, "$db": "admin"}, next_id())
    burst = hello * 1000  # ~60 KB of requests the proxy answers itself
    sent = 0
    blocked = False
    with connect(proxy) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sock.sendall(burst)
            except TimeoutError:
                blocked = True
                break
            sent += len(burst)
        other = connect(proxy)
        assert_ping_ok(other)
        other.close()
    assert blocked, f"the proxy kept accepting requests: {sent / 1e6:.0f} MB in 10 s"
    assert sent < 64e6, f"{sent / 1e6:.0f} MB accepted before the proxy pushed back"
