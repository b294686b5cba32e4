"""Legacy OP_QUERY (opCode 2004) parsing and OP_REPLY (opCode 1) encoding.

Modern drivers only use these for the initial handshake (``isMaster``/``hello`` on
``admin.$cmd``); everything else is OP_MSG.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.wire._common import (
    as_bytes,
    check_document,
    check_message_header,
    read_cstring,
    read_int32,
)
from proxy.wire.errors import WireError
from proxy.wire.header import HEADER_SIZE, OpCode, pack_header

__all__ = ["REPLY_FLAG_QUERY_FAILURE", "OpQuery", "encode_op_reply", "parse_op_query"]

REPLY_FLAG_QUERY_FAILURE = 1 << 1

_REPLY_FIELDS = struct.Struct("<IqiI")  # responseFlags, cursorID, startingFrom, numberReturned


@dataclass(frozen=True, slots=True)
class OpQuery:
    request_id: int
    flags: int
    collection: str  # fullCollectionName, e.g. "admin.$cmd"
    number_to_skip: int
    number_to_return: int
    query: bytes
    return_fields: bytes | None


def parse_op_query(message: bytes | bytearray | memoryview) -> OpQuery:
    """Structurally validate and split a complete OP_QUERY (header included).

    Documents are not decoded.  Only raises :class:`WireError` (code 17, non-fatal).
    """
    data = as_bytes(message)
    header = check_message_header(data, "OP_QUERY", OpCode.OP_QUERY)
    rid = header.request_id
    end = len(data)
    offset = HEADER_SIZE
    if end - offset < 4:
        raise WireError(
            f"OP_QUERY flags at offset {offset}: need 4 bytes, only {end - offset} left",
            request_id=rid,
        )
    flags = read_int32(data, offset)
    offset += 4
    collection, offset = read_cstring(data, offset, end, "OP_QUERY fullCollectionName", rid)
    if end - offset < 8:
        raise WireError(
            f"OP_QUERY numberToSkip/numberToReturn at offset {offset}: need 8 bytes, "
            f"only {end - offset} left",
            request_id=rid,
        )
    number_to_skip = read_int32(data, offset)
    number_to_return = read_int32(data, offset + 4)
    offset += 8
    stop = check_document(data, offset, end, "OP_QUERY query", rid)
    query = data[offset:stop]
    offset = stop
    return_fields: bytes | None = None
    if offset < end:
        stop = check_document(data, offset, end, "OP_QUERY returnFieldsSelector", rid)
        return_fields = data[offset:stop]
        offset = stop
        if offset < end:
            raise WireError(
                f"OP_QUERY at offset {offset}: {end - offset} trailing bytes after "
                f"returnFieldsSelector",
                request_id=rid,
            )
    return OpQuery(rid, flags, collection, number_to_skip, number_to_return, query, return_fields)


def encode_op_reply(
    request_id: int,
    response_to: int,
    documents: Sequence[bytes],
    *,
    flags: int = 0,
    cursor_id: int = 0,
    starting_from: int = 0,
) -> bytes:
    """Encode an OP_REPLY carrying raw BSON ``documents`` (not checked)."""
    docs = b"".join(documents)
    length = HEADER_SIZE + _REPLY_FIELDS.size + len(docs)
    return (
        pack_header(length, request_id, response_to, OpCode.OP_REPLY)
        + _REPLY_FIELDS.pack(flags & 0xFFFFFFFF, cursor_id, starting_from, len(documents))
        + docs
    )
