"""Hypothesis properties: round trips, and parsers only ever raise WireError."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import bson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_EXHAUST_ALLOWED,
    FLAG_MORE_TO_COME,
    DocumentSequence,
    OpMsg,
    WireError,
    compress,
    decode_body,
    decompress,
    encode_op_msg,
    parse_header,
    parse_op_msg,
    parse_op_query,
    with_flags,
)

INT32 = st.integers(-(2**31), 2**31 - 1)
NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")
KEYS = st.text(NO_NUL, max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | INT32
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
    | st.binary(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
DOCS = st.dictionaries(KEYS, VALUES, max_size=6)
RAW_DOCS = DOCS.map(bson.encode)
IDENTIFIERS = st.text(NO_NUL, min_size=1, max_size=12)
ALLOWED_FLAGS = st.sets(
    st.sampled_from(
        [FLAG_CHECKSUM_PRESENT, FLAG_MORE_TO_COME, FLAG_EXHAUST_ALLOWED, 1 << 20, 1 << 31]
    )
).map(sum)


@st.composite
def sequences(draw: st.DrawFn) -> tuple[DocumentSequence, ...]:
    idents = draw(st.lists(IDENTIFIERS, unique=True, max_size=3))
    return tuple(
        DocumentSequence(i, b"".join(draw(st.lists(RAW_DOCS, max_size=3)))) for i in idents
    )


@settings(max_examples=150, deadline=None)
@given(
    request_id=INT32,
    response_to=INT32,
    doc=DOCS,
    seqs=sequences(),
    flags=ALLOWED_FLAGS,
)
def test_op_msg_round_trip(
    request_id: int,
    response_to: int,
    doc: dict[str, Any],
    seqs: tuple[DocumentSequence, ...],
    flags: int,
) -> None:
    body = bson.encode(doc)
    msg = encode_op_msg(request_id, response_to, body, seqs, flags)
    assert parse_header(msg).length == len(msg)
    parsed = parse_op_msg(msg)
    assert parsed == OpMsg(request_id, response_to, flags, body, seqs)
    assert decode_body(parsed) == bson.decode(body)
    for original, got in zip(seqs, parsed.sequences, strict=True):
        assert b"".join(got.documents()) == original.payload
    # re-flagging never breaks the message and is idempotent
    toggled = flags ^ FLAG_CHECKSUM_PRESENT
    reflagged = with_flags(msg, toggled)
    assert parse_op_msg(reflagged) == OpMsg(request_id, response_to, toggled, body, seqs)
    assert with_flags(reflagged, flags) == msg


def _valid_messages() -> st.SearchStrategy[bytes]:
    op_msg = st.builds(
        lambda rid, doc, seqs, flags: encode_op_msg(rid, 0, bson.encode(doc), seqs, flags),
        INT32,
        DOCS,
        sequences(),
        ALLOWED_FLAGS,
    )

    def op_query(doc: dict[str, Any], fields: dict[str, Any] | None) -> bytes:
        rest = b"\x00" * 4 + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson.encode(doc)
        if fields is not None:
            rest += bson.encode(fields)
        return struct.pack("<iiii", 16 + len(rest), 1, 0, 2004) + rest

    query = st.builds(op_query, DOCS, st.none() | DOCS)
    compressed = st.builds(compress, op_msg, st.sampled_from(["noop", "zlib", "zstd", "snappy"]))
    return op_msg | query | compressed


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_valid_messages()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[pos:]
    if draw(st.booleans()) and len(data) >= 4:
        # keep the header length consistent so that the deeper checks are reached
        struct.pack_into("<i", data, 0, len(data))
    return bytes(data)


def _only_wire_errors(data: bytes) -> None:
    for fn in (parse_header, parse_op_msg, parse_op_query, decompress):
        with contextlib.suppress(WireError):
            fn(data)
    try:
        msg = parse_op_msg(data)
    except WireError:
        return
    try:
        decode_body(msg)
    except WireError as exc:
        assert exc.code == 22
    for seq in msg.sequences:
        seq.documents()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_only_raise_wire_error(data: bytes) -> None:
    _only_wire_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    _only_wire_errors(data)
    # and with a plausible header in front
    for op_code in (2004, 2012, 2013):
        framed = struct.pack("<iiii", 16 + len(data), 1, 0, op_code) + data
        _only_wire_errors(framed)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=5, max_size=200))
def test_decode_body_only_raises_wire_error(body: bytes) -> None:
    try:
        decode_body(OpMsg(1, 0, 0, body, ()))
    except WireError as exc:
        assert (exc.code, exc.code_name) == (22, "InvalidBSON")
