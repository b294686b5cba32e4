"""OP_MSG (opCode 2013): parse, encode and re-flag."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bson
import crc32c

from proxy.wire._common import (
    as_bytes,
    check_document,
    check_message_header,
    read_cstring,
    read_int32,
)
from proxy.wire.errors import WireError
from proxy.wire.header import HEADER_SIZE, OpCode, pack_header

__all__ = [
    "FLAG_CHECKSUM_PRESENT",
    "FLAG_EXHAUST_ALLOWED",
    "FLAG_MORE_TO_COME",
    "DocumentSequence",
    "OpMsg",
    "decode_body",
    "encode_op_msg",
    "parse_op_msg",
    "with_flags",
]

FLAG_CHECKSUM_PRESENT = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16

# Bits 0-15 are "required": a receiver must reject any it does not know.
_REQUIRED_MASK = 0xFFFF
_KNOWN_REQUIRED = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME
_UINT32 = struct.Struct("<I")
_FLAGS_OFFSET = HEADER_SIZE
_SECTIONS_OFFSET = HEADER_SIZE + 4
_MIN_OP_MSG = _SECTIONS_OFFSET + 1 + 5  # flags + kind byte + smallest BSON document


@dataclass(frozen=True, slots=True)
class DocumentSequence:
    """A kind-1 section: an identifier and concatenated raw BSON documents."""

    identifier: str
    payload: bytes

    def documents(self, limit: int | None = None) -> list[bytes]:
        """Split ``payload`` into raw BSON documents (framing is checked, contents are
        not); with ``limit``, only the first ``limit`` of them (the rest is not read)."""
        data = self.payload
        end = len(data)
        docs: list[bytes] = []
        offset = 0
        while offset < end and (limit is None or len(docs) < limit):
            stop = check_document(
                data, offset, end, f"document sequence {self.identifier!r} payload", 0
            )
            docs.append(data[offset:stop])
            offset = stop
        return docs


@dataclass(frozen=True, slots=True)
class OpMsg:
    request_id: int
    response_to: int
    flags: int
    body: bytes
    sequences: tuple[DocumentSequence, ...]

    @property
    def more_to_come(self) -> bool:
        return bool(self.flags & FLAG_MORE_TO_COME)

    @property
    def exhaust_allowed(self) -> bool:
        return bool(self.flags & FLAG_EXHAUST_ALLOWED)

    @property
    def checksum_present(self) -> bool:
        return bool(self.flags & FLAG_CHECKSUM_PRESENT)


def parse_op_msg(message: bytes | bytearray | memoryview) -> OpMsg:
    """Structurally validate and split a complete OP_MSG (header included).

    BSON contents are not decoded (see :func:`decode_body`).  Only raises
    :class:`WireError` (code 17, non-fatal: the message was already framed).
    """
    data = as_bytes(message)
    header = check_message_header(data, "OP_MSG", OpCode.OP_MSG)
    rid = header.request_id
    total = len(data)
    if total < _MIN_OP_MSG:
        raise WireError(
            f"OP_MSG: message of {total} bytes is too short (min {_MIN_OP_MSG})",
            request_id=rid,
        )
    flags: int = _UINT32.unpack_from(data, _FLAGS_OFFSET)[0]
    unknown = flags & _REQUIRED_MASK & ~_KNOWN_REQUIRED
    if unknown:
        raise WireError(
            f"OP_MSG flagBits at offset {_FLAGS_OFFSET}: unknown required flag bits "
            f"0x{unknown:04x} set (flagBits 0x{flags:08x})",
            request_id=rid,
        )
    end = total
    if flags & FLAG_CHECKSUM_PRESENT:
        end = total - 4
        if end < _MIN_OP_MSG:
            raise WireError(
                f"OP_MSG: message of {total} bytes is too short to hold sections and a checksum",
                request_id=rid,
            )
        expected: int = _UINT32.unpack_from(data, end)[0]
        actual = crc32c.crc32c(data[:end])
        if actual != expected:
            raise WireError(
                f"OP_MSG checksum at offset {end}: CRC-32C mismatch "
                f"(message says 0x{expected:08x}, computed 0x{actual:08x})",
                request_id=rid,
            )

    body: bytes | None = None
    sequences: list[DocumentSequence] = []
    seen: set[str] = set()
    offset = _SECTIONS_OFFSET
    index = 0
    while offset < end:
        kind = data[offset]
        where = f"OP_MSG section {index}"
        if kind == 0:
            if body is not None:
                raise WireError(
                    f"{where} at offset {offset}: duplicate kind-0 (body) section",
                    request_id=rid,
                )
            start = offset + 1
            stop = check_document(data, start, end, f"{where} body", rid)
            body = data[start:stop]
            offset = stop
        elif kind == 1:
            left = end - offset - 1
            if left < 4:
                raise WireError(
                    f"{where} at offset {offset}: document sequence size needs 4 bytes, "
                    f"only {left} left",
                    request_id=rid,
                )
            size = read_int32(data, offset + 1)
            if size > left:
                raise WireError(
                    f"{where} at offset {offset}: document sequence size {size} exceeds "
                    f"the {left} bytes left",
                    request_id=rid,
                )
            if size < 5:
                raise WireError(
                    f"{where} at offset {offset}: document sequence size {size} is below "
                    f"the minimum of 5",
                    request_id=rid,
                )
            start = offset + 5
            stop = offset + 1 + size
            identifier, pos = read_cstring(data, start, stop, f"{where} identifier", rid)
            if identifier in seen:
                raise WireError(
                    f"{where} at offset {offset}: duplicate document sequence {identifier!r}",
                    request_id=rid,
                )
            seen.add(identifier)
            payload_start = pos
            while pos < stop:
                pos = check_document(data, pos, stop, f"{where} ({identifier!r}) document", rid)
            sequences.append(DocumentSequence(identifier, data[payload_start:stop]))
            offset = stop
        else:
            raise WireError(
                f"{where} at offset {offset}: invalid section kind {kind} (expected 0 or 1)",
                request_id=rid,
            )
        index += 1
    if body is None:
        raise WireError(
            f"OP_MSG: no kind-0 (body) section among {index} section(s)", request_id=rid
        )
    return OpMsg(rid, header.response_to, flags, body, tuple(sequences))


def decode_body(msg: OpMsg) -> dict[str, Any]:
    """Decode the body with ``bson``; any failure becomes WireError 22 InvalidBSON."""
    try:
        doc: dict[str, Any] = bson.decode(msg.body)
    except Exception as exc:
        raise WireError(
            f"OP_MSG body: invalid BSON ({type(exc).__name__}: {exc})",
            code=22,
            code_name="InvalidBSON",
            request_id=msg.request_id,
        ) from None
    return doc


def encode_op_msg(
    request_id: int,
    response_to: int,
    body: bytes,
    sequences: Sequence[DocumentSequence] = (),
    flags: int = 0,
) -> bytes:
    """Encode an OP_MSG.  Appends a CRC-32C if ``flags`` has FLAG_CHECKSUM_PRESENT.

    ``body`` and sequence payloads must already be raw BSON; they are not checked.
    Ids and flags are taken modulo 2**32.
    """
    parts: list[bytes] = [_UINT32.pack(flags & 0xFFFFFFFF), b"\x00", body]
    for seq in sequences:
        ident = seq.identifier.encode("utf-8")
        parts.append(b"\x01")
        parts.append(_UINT32.pack(4 + len(ident) + 1 + len(seq.payload)))
        parts.append(ident)
        parts.append(b"\x00")
        parts.append(seq.payload)
    rest = b"".join(parts)
    checksum = bool(flags & FLAG_CHECKSUM_PRESENT)
    length = HEADER_SIZE + len(rest) + (4 if checksum else 0)
    out = pack_header(length, request_id, response_to, OpCode.OP_MSG) + rest
    if checksum:
        out += _UINT32.pack(crc32c.crc32c(out))
    return out


def with_flags(message: bytes | bytearray | memoryview, flags: int) -> bytes:
    """An already-valid OP_MSG with its flagBits replaced by ``flags``.

    The checksum is stripped, or appended/recomputed, to match the new flags, and the
    header length is fixed.  Only the header, flags and checksum are looked at.
    """
    data = as_bytes(message)
    if len(data) < _MIN_OP_MSG:
        raise WireError(f"OP_MSG: message of {len(data)} bytes is too short to re-flag")
    old: int = _UINT32.unpack_from(data, _FLAGS_OFFSET)[0]
    end = len(data) - 4 if old & FLAG_CHECKSUM_PRESENT else len(data)
    checksum = bool(flags & FLAG_CHECKSUM_PRESENT)
    buf = bytearray(data[:end])
    length = end + (4 if checksum else 0)
    _UINT32.pack_into(buf, 0, length)
    _UINT32.pack_into(buf, _FLAGS_OFFSET, flags & 0xFFFFFFFF)
    if checksum:
        buf += _UINT32.pack(crc32c.crc32c(buf))
    return bytes(buf)
