"""Table and example tests for the sans-IO wire codec (proxy.wire)."""

from __future__ import annotations

import struct

import bson
import crc32c
import pytest
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from pymongo import message as pm_message

from proxy.wire import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_EXHAUST_ALLOWED,
    FLAG_MORE_TO_COME,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    REPLY_FLAG_QUERY_FAILURE,
    DocumentSequence,
    Header,
    OpCode,
    OpMsg,
    WireError,
    decode_body,
    encode_op_msg,
    encode_op_reply,
    parse_header,
    parse_op_msg,
    parse_op_query,
    with_flags,
    with_ids,
)

PING = bson.encode({"ping": 1, "$db": "admin"})


def hdr(length: int, request_id: int, response_to: int, op_code: int) -> bytes:
    return struct.pack("<iiii", length, request_id, response_to, op_code)


def raw_op_msg(rest: bytes, *, request_id: int = 7, op_code: int = 2013) -> bytes:
    """Header + ``rest`` (flags, sections, checksum) with a correct length."""
    return hdr(HEADER_SIZE + len(rest), request_id, 0, op_code) + rest


def flags_b(flags: int) -> bytes:
    return struct.pack("<I", flags)


def kind1(identifier: bytes, payload: bytes, size: int | None = None) -> bytes:
    if size is None:
        size = 4 + len(identifier) + 1 + len(payload)
    return b"\x01" + struct.pack("<i", size) + identifier + b"\x00" + payload


# --------------------------------------------------------------------------- header


def test_parse_header_ok() -> None:
    data = hdr(21, 5, 6, 2013) + b"xxxxx"
    assert parse_header(data) == Header(21, 5, 6, OpCode.OP_MSG)
    assert parse_header(memoryview(data)) == Header(21, 5, 6, 2013)
    assert parse_header(bytearray(data[:16])).length == 21


@pytest.mark.parametrize(
    ("data", "max_size", "needle", "rid"),
    [
        (b"\x00" * 15, MAX_MESSAGE_SIZE, "need 16 bytes, got 15", None),
        (b"", MAX_MESSAGE_SIZE, "got 0", None),
        (
            hdr(7, 99, 0, 2013),
            MAX_MESSAGE_SIZE,
            "message length 7 is invalid: min 16, max 48000000",
            99,
        ),
        (hdr(-1, 3, 0, 2013), MAX_MESSAGE_SIZE, "message length -1 is invalid", 3),
        (hdr(48_000_001, 4, 0, 2013), MAX_MESSAGE_SIZE, "message length 48000001", 4),
        (hdr(1001, 4, 0, 2013), 1000, "max 1000", 4),
    ],
)
def test_parse_header_errors(data: bytes, max_size: int, needle: str, rid: int | None) -> None:
    with pytest.raises(WireError) as info:
        parse_header(data, max_size)
    err = info.value
    assert err.fatal is True
    assert err.code == 17 and err.code_name == "ProtocolError"
    assert needle in err.errmsg
    assert err.request_id == rid


def test_parse_header_boundaries() -> None:
    assert parse_header(hdr(16, 1, 0, 1)).length == 16
    assert parse_header(hdr(MAX_MESSAGE_SIZE, 1, 0, 1)).length == MAX_MESSAGE_SIZE


def test_with_ids() -> None:
    msg = encode_op_msg(1, 2, PING)
    out = with_ids(msg, 1000, 2000)
    assert isinstance(out, bytes)
    assert out[:4] == msg[:4] and out[12:] == msg[12:]
    h = parse_header(out)
    assert (h.request_id, h.response_to) == (1000, 2000)
    assert with_ids(bytearray(msg), 1, 2) == msg
    assert with_ids(memoryview(msg), 1, 2) == msg
    # ids are taken modulo 2**32 and parse back as signed int32
    assert parse_header(with_ids(msg, 2**32 - 1, 2**31)).request_id == -1
    assert parse_header(with_ids(msg, -5, 0)).request_id == -5
    with pytest.raises(WireError):
        with_ids(b"short", 1, 2)


# --------------------------------------------------------------------------- CRC-32C


def test_crc32c_known_answer() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283


def test_checksummed_round_trip() -> None:
    msg = encode_op_msg(11, 12, PING, flags=FLAG_CHECKSUM_PRESENT)
    assert len(msg) == parse_header(msg).length == 16 + 4 + 1 + len(PING) + 4
    (crc,) = struct.unpack("<I", msg[-4:])
    assert crc == crc32c.crc32c(msg[:-4])
    parsed = parse_op_msg(msg)
    assert parsed.checksum_present and parsed.body == PING
    assert decode_body(parsed) == {"ping": 1, "$db": "admin"}


def test_with_flags_adds_and_removes_checksum() -> None:
    seq = DocumentSequence("documents", bson.encode({"a": 1}) + bson.encode({"b": 2}))
    plain = encode_op_msg(1, 0, PING, [seq])
    summed = with_flags(plain, FLAG_CHECKSUM_PRESENT | FLAG_EXHAUST_ALLOWED)
    assert summed == encode_op_msg(
        1, 0, PING, [seq], flags=FLAG_CHECKSUM_PRESENT | FLAG_EXHAUST_ALLOWED
    )
    p = parse_op_msg(summed)
    assert p.checksum_present and p.exhaust_allowed and not p.more_to_come
    # recompute on a flag change while keeping the checksum
    more = with_flags(summed, FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME)
    assert parse_op_msg(more).more_to_come
    assert more == encode_op_msg(1, 0, PING, [seq], flags=FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME)
    # strip
    stripped = with_flags(memoryview(more), 0)
    assert stripped == plain
    assert with_flags(bytearray(plain), 0) == plain


# --------------------------------------------------------------------------- OP_MSG


def test_op_msg_layout() -> None:
    seq = DocumentSequence("documents", bson.encode({"a": 1}))
    msg = encode_op_msg(3, 4, PING, [seq], flags=FLAG_EXHAUST_ALLOWED)
    expected_rest = (
        flags_b(FLAG_EXHAUST_ALLOWED) + b"\x00" + PING + kind1(b"documents", seq.payload)
    )
    assert msg == hdr(16 + len(expected_rest), 3, 4, 2013) + expected_rest
    parsed = parse_op_msg(msg)
    assert parsed == OpMsg(3, 4, FLAG_EXHAUST_ALLOWED, PING, (seq,))
    assert parsed.sequences[0].documents() == [bson.encode({"a": 1})]


def test_op_msg_sequence_before_body_and_empty_sequence() -> None:
    docs = [bson.encode({"i": i}) for i in range(3)]
    rest = flags_b(0) + kind1(b"updates", b"".join(docs)) + kind1(b"x", b"") + b"\x00" + PING
    parsed = parse_op_msg(raw_op_msg(rest))
    assert parsed.body == PING
    assert [s.identifier for s in parsed.sequences] == ["updates", "x"]
    assert parsed.sequences[0].documents() == docs
    assert parsed.sequences[1].documents() == []


def test_parse_pymongo_op_msg() -> None:
    cmd = {"insert": "c", "documents": [{"a": 1}, {"b": "x" * 50}], "ordered": True}
    rid, msg, _, _ = pm_message._op_msg(0, cmd, "db", None, DEFAULT_CODEC_OPTIONS)
    parsed = parse_op_msg(msg)
    assert parsed.request_id == rid
    assert decode_body(parsed) == {"insert": "c", "ordered": True, "$db": "db"}
    (seq,) = parsed.sequences
    assert seq.identifier == "documents"
    assert [bson.decode(d) for d in seq.documents()] == [{"a": 1}, {"b": "x" * 50}]


def test_pymongo_parses_our_op_msg() -> None:
    body = bson.encode({"ok": 1.0, "n": 3})
    for flags in (0, FLAG_MORE_TO_COME):
        msg = encode_op_msg(5, 6, body, flags=flags)
        reply = pm_message._OpMsg.unpack(msg[16:])
        assert reply.flags == flags
        assert reply.unpack_response()[0] == {"ok": 1.0, "n": 3}


BAD_OP_MSG: list[tuple[str, bytes, str]] = [
    (
        "wrong opcode",
        raw_op_msg(flags_b(0) + b"\x00" + PING, op_code=2004),
        "opCode 2004 is not 2013",
    ),
    ("too short", raw_op_msg(flags_b(0) + b"\x00"), "too short"),
    (
        "length mismatch",
        hdr(999, 7, 0, 2013) + flags_b(0) + b"\x00" + PING,
        "header length 999 does not match",
    ),
    ("unknown required bit", raw_op_msg(flags_b(1 << 2) + b"\x00" + PING), "0x0004"),
    ("unknown required bit 15", raw_op_msg(flags_b(1 << 15) + b"\x00" + PING), "0x8000"),
    (
        "bad section kind",
        raw_op_msg(flags_b(0) + b"\x02" + PING),
        "section 0 at offset 20: invalid section kind 2",
    ),
    (
        "duplicate body",
        raw_op_msg(flags_b(0) + b"\x00" + PING + b"\x00" + PING),
        f"section 1 at offset {21 + len(PING)}: duplicate kind-0",
    ),
    ("missing body", raw_op_msg(flags_b(0) + kind1(b"documents", PING)), "no kind-0"),
    (
        "doc size exceeds",
        raw_op_msg(flags_b(0) + b"\x00" + struct.pack("<i", 900) + PING[4:]),
        f"offset 21: BSON document size 900 exceeds the {len(PING)} bytes left",
    ),
    (
        "doc size too small",
        raw_op_msg(flags_b(0) + b"\x00" + struct.pack("<i", 4) + PING[4:]),
        "offset 21: BSON document size 4 is below the minimum of 5",
    ),
    (
        "doc size negative",
        raw_op_msg(flags_b(0) + b"\x00" + struct.pack("<i", -20) + PING[4:]),
        "size -20 is below",
    ),
    (
        "doc not terminated",
        raw_op_msg(flags_b(0) + b"\x00" + PING[:-1] + b"\x01"),
        "does not end with a 0x00",
    ),
    (
        "trailing bytes",
        raw_op_msg(flags_b(0) + b"\x00" + PING + b"\x01\x00"),
        "document sequence size needs 4 bytes, only 1 left",
    ),
    (
        "trailing junk kind",
        raw_op_msg(flags_b(0) + b"\x00" + PING + b"\x07"),
        "invalid section kind 7",
    ),
    (
        "sequence size exceeds",
        raw_op_msg(flags_b(0) + b"\x00" + PING + kind1(b"d", PING, size=900)),
        f"section 1 at offset {21 + len(PING)}: document sequence size 900 exceeds the "
        f"{4 + 2 + len(PING)} bytes left",
    ),
    (
        "sequence size too small",
        raw_op_msg(flags_b(0) + b"\x00" + PING + kind1(b"d", PING, size=3)),
        "document sequence size 3 is below the minimum of 5",
    ),
    (
        "sequence size field truncated",
        raw_op_msg(flags_b(0) + b"\x00" + PING + b"\x01\x05\x00"),
        "document sequence size needs 4 bytes, only 2 left",
    ),
    (
        "sequence identifier unterminated",
        raw_op_msg(flags_b(0) + b"\x00" + PING + b"\x01" + struct.pack("<i", 7) + b"abc"),
        "unterminated cstring",
    ),
    (
        "sequence identifier not utf-8",
        raw_op_msg(flags_b(0) + b"\x00" + PING + kind1(b"\xff\xfe", b"")),
        "not valid UTF-8",
    ),
    (
        "sequence document overruns sequence",
        raw_op_msg(
            flags_b(0) + b"\x00" + PING + kind1(b"d", PING, size=4 + 2 + len(PING) - 1) + b"\x00"
        ),
        "('d') document at offset",
    ),
    (
        "duplicate sequence identifier",
        raw_op_msg(flags_b(0) + b"\x00" + PING + kind1(b"d", b"") + kind1(b"d", b"")),
        "duplicate document sequence 'd'",
    ),
    (
        "checksum mismatch",
        raw_op_msg(flags_b(FLAG_CHECKSUM_PRESENT) + b"\x00" + PING + b"\x00\x00\x00\x00"),
        f"checksum at offset {21 + len(PING)}: CRC-32C mismatch",
    ),
    (
        "checksum flag but checksum missing",
        raw_op_msg(flags_b(FLAG_CHECKSUM_PRESENT) + b"\x00" + PING),
        "CRC-32C mismatch",  # the last 4 body bytes are taken as the checksum
    ),
]


# A document whose own length prefix or terminator is wrong is invalid BSON (code 22);
# every other structural fault is a protocol error (code 17).
INVALID_BSON_CASES = {
    name: (22, "InvalidBSON")
    for name in (
        "doc size exceeds", "doc size too small", "doc size negative", "doc not terminated",
        "sequence document overruns sequence", "query overruns", "bad fields doc",
    )
}


@pytest.mark.parametrize(("name", "data", "needle"), BAD_OP_MSG, ids=[c[0] for c in BAD_OP_MSG])
def test_parse_op_msg_errors(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(WireError) as info:
        parse_op_msg(data)
    err = info.value
    expected = INVALID_BSON_CASES.get(name, (17, "ProtocolError"))
    assert (err.code, err.code_name, err.fatal) == (*expected, False)
    assert needle.lower() in err.errmsg.lower(), err.errmsg
    if len(data) >= 8:
        assert err.request_id == struct.unpack_from("<i", data, 4)[0]


def test_checksum_flag_but_no_room_is_wire_error() -> None:
    data = raw_op_msg(flags_b(FLAG_CHECKSUM_PRESENT) + b"\x00" + bson.encode({}))
    with pytest.raises(WireError, match="too short to hold sections and a checksum"):
        parse_op_msg(data)


def test_optional_flag_bits_ignored() -> None:
    flags = FLAG_EXHAUST_ALLOWED | (1 << 20) | (1 << 31)
    parsed = parse_op_msg(raw_op_msg(flags_b(flags) + b"\x00" + PING))
    assert parsed.flags == flags and parsed.exhaust_allowed


@pytest.mark.parametrize(
    "body",
    [
        PING[:-2] + b"\x07\x00",  # unknown element type
        struct.pack("<i", 13)
        + b"\x02a\x00"
        + struct.pack("<i", 100)
        + b"x\x00\x00",  # string overrun
        struct.pack("<i", 12) + b"\x02a\x00\x02\x00\x00\x00\xff\x00\x00",  # invalid UTF-8 string
        struct.pack("<i", 6) + b"\x00\x00",  # terminator before the end
    ],
)
def test_decode_body_invalid_bson(body: bytes) -> None:
    msg = OpMsg(42, 0, 0, body, ())
    with pytest.raises(WireError) as info:
        decode_body(msg)
    err = info.value
    assert (err.code, err.code_name, err.fatal, err.request_id) == (22, "InvalidBSON", False, 42)
    assert "OP_MSG body" in err.errmsg


def test_document_sequence_documents_malformed() -> None:
    with pytest.raises(WireError):
        DocumentSequence("d", PING + b"\x01").documents()


# --------------------------------------------------------------------------- OP_QUERY / OP_REPLY


def build_op_query(
    collection: bytes,
    query: bytes,
    fields: bytes | None = None,
    *,
    flags: int = 4,
    skip: int = 0,
    limit: int = -1,
    request_id: int = 77,
) -> bytes:
    rest = struct.pack("<i", flags) + collection + b"\x00" + struct.pack("<ii", skip, limit) + query
    if fields is not None:
        rest += fields
    return hdr(16 + len(rest), request_id, 0, 2004) + rest


def test_parse_op_query() -> None:
    q = bson.encode({"isMaster": 1, "client": {"driver": {"name": "x"}}})
    parsed = parse_op_query(build_op_query(b"admin.$cmd", q, skip=3, limit=-1))
    assert parsed.request_id == 77
    assert parsed.flags == 4
    assert parsed.collection == "admin.$cmd"
    assert (parsed.number_to_skip, parsed.number_to_return) == (3, -1)
    assert parsed.query == q and parsed.return_fields is None


def test_parse_op_query_with_return_fields() -> None:
    q = bson.encode({"find": 1})
    f = bson.encode({"a": 1, "_id": 0})
    parsed = parse_op_query(bytearray(build_op_query(b"db.c\xc3\xa9", q, f)))
    assert parsed.collection == "db.cé"
    assert parsed.return_fields == f


BAD_OP_QUERY: list[tuple[str, bytes, str]] = [
    ("wrong opcode", raw_op_msg(flags_b(0) + b"\x00" + PING), "opCode 2013 is not 2004"),
    ("no flags", hdr(18, 1, 0, 2004) + b"\x00\x00", "flags at offset 16: need 4 bytes"),
    ("unterminated name", hdr(28, 1, 0, 2004) + b"\x00" * 4 + b"admin.$c", "unterminated cstring"),
    ("bad utf-8 name", build_op_query(b"\xff", PING), "not valid UTF-8"),
    (
        "no skip/return",
        hdr(16 + 4 + 2 + 4, 1, 0, 2004) + b"\x00" * 4 + b"a\x00" + b"\x00" * 4,
        "numberToSkip/numberToReturn at offset 22: need 8 bytes, only 4 left",
    ),
    ("missing query", build_op_query(b"a.b", b""), "query at offset 32: BSON document length"),
    ("query overruns", build_op_query(b"a.b", PING[:-3]), "exceeds the"),
    (
        "bad fields doc",
        build_op_query(b"a.b", PING, b"\x05\x00\x00\x00\x01"),
        "returnFieldsSelector",
    ),
    ("trailing bytes", build_op_query(b"a.b", PING, PING + b"zz"), "2 trailing bytes"),
]


@pytest.mark.parametrize(("name", "data", "needle"), BAD_OP_QUERY, ids=[c[0] for c in BAD_OP_QUERY])
def test_parse_op_query_errors(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(WireError) as info:
        parse_op_query(data)
    err = info.value
    assert (err.code, err.fatal) == (INVALID_BSON_CASES.get(name, (17, ""))[0], False)
    assert needle in err.errmsg, err.errmsg


def test_encode_op_reply_layout() -> None:
    d1 = bson.encode({"ismaster": True, "ok": 1.0})
    d2 = bson.encode({"x": 1})
    out = encode_op_reply(
        10, 77, [d1, d2], flags=REPLY_FLAG_QUERY_FAILURE, cursor_id=2**40, starting_from=5
    )
    length = 16 + 4 + 8 + 4 + 4 + len(d1) + len(d2)
    expected = (
        struct.pack("<iiii", length, 10, 77, 1)
        + struct.pack("<i", 2)
        + struct.pack("<q", 2**40)
        + struct.pack("<i", 5)
        + struct.pack("<i", 2)
        + d1
        + d2
    )
    assert out == expected
    assert parse_header(out) == Header(length, 10, 77, OpCode.OP_REPLY)


def test_encode_op_reply_defaults() -> None:
    d = bson.encode({"ok": 1.0})
    out = encode_op_reply(1, 2, [d])
    assert out[16:36] == struct.pack("<iqii", 0, 0, 0, 1)
    assert out[36:] == d
