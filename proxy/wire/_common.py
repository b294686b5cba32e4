"""Helpers shared by the message parsers (internal)."""

from __future__ import annotations

import struct

from proxy.wire.errors import WireError
from proxy.wire.header import HEADER_SIZE, Header

_INT32 = struct.Struct("<i")
_HEADER = struct.Struct("<iiii")
MIN_BSON_SIZE = 5


def as_bytes(message: bytes | bytearray | memoryview) -> bytes:
    return message if isinstance(message, bytes) else bytes(message)


def read_int32(data: bytes, offset: int) -> int:
    value: int = _INT32.unpack_from(data, offset)[0]
    return value


def check_message_header(data: bytes, what: str, op_code: int) -> Header:
    """Validate the header of a complete message: size, declared length and opcode."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"{what}: need {HEADER_SIZE} header bytes, got {len(data)}")
    header = Header(*_HEADER.unpack_from(data, 0))
    if header.length != len(data):
        raise WireError(
            f"{what}: header length {header.length} does not match the "
            f"{len(data)} bytes of the message",
            request_id=header.request_id,
        )
    if header.op_code != op_code:
        raise WireError(
            f"{what}: opCode {header.op_code} is not {op_code}",
            request_id=header.request_id,
        )
    return header


def check_document(data: bytes, offset: int, end: int, where: str, request_id: int) -> int:
    """Validate the framing of the BSON document at ``offset`` (must end by ``end``).

    A document whose own length or terminator is wrong is invalid BSON (code 22), as the
    server reports it; the contents are checked later by ``decode_body``.

    Returns the offset just past the document.  Contents are not decoded.
    """
    left = end - offset
    if left < 4:
        raise WireError(
            f"{where} at offset {offset}: BSON document length needs 4 bytes, only {left} left",
            request_id=request_id,
        )
    size = read_int32(data, offset)
    if size < MIN_BSON_SIZE:
        raise WireError(
            f"{where} at offset {offset}: BSON document size {size} is below the "
            f"minimum of {MIN_BSON_SIZE}",
            request_id=request_id,
            code=22,
            code_name="InvalidBSON",
        )
    if size > left:
        raise WireError(
            f"{where} at offset {offset}: BSON document size {size} exceeds the {left} bytes left",
            request_id=request_id,
            code=22,
            code_name="InvalidBSON",
        )
    stop = offset + size
    if data[stop - 1] != 0:
        raise WireError(
            f"{where} at offset {offset}: BSON document of size {size} does not end "
            f"with a 0x00 byte",
            request_id=request_id,
            code=22,
            code_name="InvalidBSON",
        )
    return stop


def read_cstring(
    data: bytes, offset: int, end: int, where: str, request_id: int
) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string; returns it and the offset past the NUL."""
    nul = data.find(b"\x00", offset, end)
    if nul < 0:
        raise WireError(
            f"{where} at offset {offset}: unterminated cstring "
            f"(no 0x00 in the {end - offset} bytes left)",
            request_id=request_id,
        )
    try:
        text = data[offset:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(
            f"{where} at offset {offset}: cstring is not valid UTF-8 ({exc.reason})",
            request_id=request_id,
        ) from None
    return text, nul + 1
