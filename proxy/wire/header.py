"""The 16-byte standard message header (MsgHeader)."""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from proxy.wire.errors import WireError

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "Header",
    "OpCode",
    "declared_length",
    "pack_header",
    "parse_header",
    "with_ids",
]

HEADER_SIZE = 16
MAX_MESSAGE_SIZE = 48_000_000

_HEADER = struct.Struct("<iiii")
_LENGTH = struct.Struct("<i")
_IDS_UNSIGNED = struct.Struct("<II")
_HEADER_UNSIGNED = struct.Struct("<IIII")
_MASK32 = 0xFFFFFFFF


class OpCode(enum.IntEnum):
    OP_REPLY = 1
    OP_UPDATE = 2001
    OP_INSERT = 2002
    OP_RESERVED = 2003
    OP_QUERY = 2004
    OP_GET_MORE = 2005
    OP_DELETE = 2006
    OP_KILL_CURSORS = 2007
    OP_COMPRESSED = 2012
    OP_MSG = 2013


class Header(NamedTuple):
    """A parsed header.  All fields are signed int32 values, as on the wire."""

    length: int
    request_id: int
    response_to: int
    op_code: int


def parse_header(data: bytes | bytearray | memoryview, max_size: int = MAX_MESSAGE_SIZE) -> Header:
    """Parse the first 16 bytes of ``data`` (extra bytes are ignored).

    Raises a fatal :class:`WireError` if fewer than 16 bytes are given or if the
    declared length is below 16 or above ``max_size``: the stream cannot be re-framed.
    """
    if len(data) < HEADER_SIZE:
        raise WireError(f"message header: need {HEADER_SIZE} bytes, got {len(data)}", fatal=True)
    length, request_id, response_to, op_code = _HEADER.unpack_from(data, 0)
    if length < HEADER_SIZE or length > max_size:
        raise WireError(
            f"message length {length} is invalid: min {HEADER_SIZE}, max {max_size}",
            fatal=True,
            request_id=request_id,
        )
    return Header(length, request_id, response_to, op_code)


def declared_length(data: bytes | bytearray | memoryview) -> int:
    """The messageLength field (the first 4 bytes, at least that many given), unchecked:
    what the socket layer frames a byte stream by before the whole header is there.
    :func:`parse_header` validates it."""
    length: int = _LENGTH.unpack_from(data)[0]
    return length


def pack_header(length: int, request_id: int, response_to: int, op_code: int) -> bytes:
    """Encode a header.  Integers are taken modulo 2**32 (so unsigned ids are accepted)."""
    return _HEADER_UNSIGNED.pack(
        length & _MASK32, request_id & _MASK32, response_to & _MASK32, op_code & _MASK32
    )


def with_ids(message: bytes | bytearray | memoryview, request_id: int, response_to: int) -> bytes:
    """A copy of ``message`` with requestID/responseTo (bytes 4..12) replaced.

    Ids are taken modulo 2**32; nothing else is touched or validated beyond the length.
    """
    if len(message) < HEADER_SIZE:
        raise WireError(f"message header: need {HEADER_SIZE} bytes, got {len(message)}", fatal=True)
    buf = bytearray(message)
    _IDS_UNSIGNED.pack_into(buf, 4, request_id & _MASK32, response_to & _MASK32)
    return bytes(buf)
