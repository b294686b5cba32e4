"""Reading the one field the proxy needs from a reply without decoding the reply.

Replies are forwarded as raw bytes; to pin cursors the proxy only needs ``cursor.id``
(and, for the operation record, the batch length and an error reply's code).
A find reply is ``{cursor: {firstBatch: [...], id, ns}, ok}``: walking the element
headers and jumping over each value by its length finds the id in a few steps, however
large the batch is.
"""

from __future__ import annotations

import struct

import bson

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
# Fixed value sizes by BSON element type; variable-size types are handled below.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8,
          0x13: 16, 0x7F: 0, 0xFF: 0}
_LENGTH_PREFIXED_DOCS = frozenset({0x03, 0x04})
_LENGTH_PREFIXED_STRINGS = frozenset({0x02, 0x0D, 0x0E})
_BODY_OFFSET = 4 + 1  # after the header: flagBits, section kind 0


def _value_end(buf: bytes, etype: int, value: int) -> int | None:
    """Offset just past the value of type ``etype`` starting at ``value``; None for the
    types a cursor reply never has on the walked path (regex, DBPointer, code with
    scope), which the walk does not need to skip."""
    if etype in _FIXED:
        return value + _FIXED[etype]
    if etype in _LENGTH_PREFIXED_DOCS:
        return value + int(_INT32.unpack_from(buf, value)[0])
    if etype in _LENGTH_PREFIXED_STRINGS:
        return value + 4 + int(_INT32.unpack_from(buf, value)[0])
    if etype == 0x05:  # binary: length, subtype, bytes
        return value + 5 + int(_INT32.unpack_from(buf, value)[0])
    return None


def _find(buf: bytes, start: int, end: int, name: bytes) -> tuple[int, int] | None:
    """(type, value offset) of element ``name`` in the document spanning start..end."""
    pos = start + 4
    while pos < end - 1:
        etype = buf[pos]
        name_end = buf.index(b"\x00", pos + 1, end)
        value = name_end + 1
        if buf[pos + 1:name_end] == name:
            return etype, value
        skipped = _value_end(buf, etype, value)
        if skipped is None:
            return None
        pos = skipped
    return None


def _count_elements(buf: bytes, start: int) -> int | None:
    """Number of elements of the array (document) at ``start``, by walking headers."""
    end = start + _INT32.unpack_from(buf, start)[0]
    count = 0
    pos = start + 4
    while pos < end - 1:
        etype = buf[pos]
        value = buf.index(b"\x00", pos + 1, end) + 1
        if etype == 0x03:  # a batch is documents: skip one without a call (hot loop)
            pos = value + _INT32.unpack_from(buf, value)[0]
        else:
            skipped = _value_end(buf, etype, value)
            if skipped is None:
                return None
            pos = skipped
        count += 1
    return count


def reply_cursor(payload: bytes) -> tuple[int | None, int | None]:
    """(``cursor.id``, documents in its first/next batch) of an OP_MSG reply given
    without its 16-byte header; None for what the reply does not have.

    Malformed input gives (None, None) rather than raising: the reply is forwarded anyway.
    """
    try:
        if len(payload) < _BODY_OFFSET + 5 or payload[4] != 0:
            return None, None
        start = _BODY_OFFSET
        end = start + _INT32.unpack_from(payload, start)[0]
        found = _find(payload, start, end, b"cursor")
        if found is None or found[0] != 0x03:
            return None, None
        cursor_start = found[1]
        cursor_end = cursor_start + _INT32.unpack_from(payload, cursor_start)[0]
        cursor_id: int | None = None
        batch: int | None = None
        pos = cursor_start + 4
        while pos < cursor_end - 1:
            etype = payload[pos]
            name_end = payload.index(b"\x00", pos + 1, cursor_end)
            name = payload[pos + 1:name_end]
            value = name_end + 1
            if name == b"id" and etype in (0x10, 0x12):
                fmt = _INT64 if etype == 0x12 else _INT32
                cursor_id = int(fmt.unpack_from(payload, value)[0])
            elif name in (b"firstBatch", b"nextBatch") and etype == 0x04:
                batch = _count_elements(payload, value)
            skipped = _value_end(payload, etype, value)
            if skipped is None:
                break
            pos = skipped
        return cursor_id, batch
    except (ValueError, IndexError, struct.error):
        return None, None


_CODE_ELEMENT = b"\x10code\x00"
# Error replies are small; larger replies are results and are never decoded here.
_MAX_ERROR_REPLY = 4096


def reply_error_code(payload: bytes) -> int | None:
    """The ``code`` of an ``ok: 0`` OP_MSG reply given without its header, else None.

    Only short replies that contain an int32 ``code`` element are decoded, so an
    ordinary result costs one bounded byte search.
    """
    if len(payload) > _MAX_ERROR_REPLY or _CODE_ELEMENT not in payload:
        return None
    try:
        doc = bson.decode(payload[_BODY_OFFSET:])
    except Exception:  # a checksum or another section: not worth decoding further
        return None
    code = doc.get("code")
    if doc.get("ok") or not isinstance(code, int):
        return None
    return code
