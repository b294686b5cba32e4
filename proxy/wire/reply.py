"""Reading the one field the proxy needs from a reply without decoding the reply.

Replies are forwarded as raw bytes; to pin cursors the proxy only needs ``cursor.id``.
A find reply is ``{cursor: {firstBatch: [...], id, ns}, ok}``: walking the element
headers and jumping over each value by its length finds the id in a few steps, however
large the batch is.
"""

from __future__ import annotations

import struct

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
# Fixed value sizes by BSON element type; variable-size types are handled below.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8,
          0x13: 16, 0x7F: 0, 0xFF: 0}
_LENGTH_PREFIXED_DOCS = frozenset({0x03, 0x04})
_LENGTH_PREFIXED_STRINGS = frozenset({0x02, 0x0D, 0x0E})
_BODY_OFFSET = 4 + 1  # after the header: flagBits, section kind 0


def _find(buf: bytes, start: int, end: int, name: bytes) -> tuple[int, int] | None:
    """(type, value offset) of element ``name`` in the document spanning start..end."""
    pos = start + 4
    while pos < end - 1:
        etype = buf[pos]
        name_end = buf.index(b"\x00", pos + 1, end)
        value = name_end + 1
        if buf[pos + 1:name_end] == name:
            return etype, value
        if etype in _FIXED:
            pos = value + _FIXED[etype]
        elif etype in _LENGTH_PREFIXED_DOCS:
            pos = value + _INT32.unpack_from(buf, value)[0]
        elif etype in _LENGTH_PREFIXED_STRINGS:
            pos = value + 4 + _INT32.unpack_from(buf, value)[0]
        elif etype == 0x05:
            pos = value + 5 + _INT32.unpack_from(buf, value)[0]
        else:  # regex, DBPointer, code-with-scope: never in a cursor reply's path
            return None
    return None


def reply_cursor_id(payload: bytes) -> int | None:
    """``cursor.id`` of an OP_MSG reply given without its 16-byte header, or None.

    Malformed input returns None rather than raising: the reply is forwarded anyway.
    """
    try:
        message = payload
        if len(message) < _BODY_OFFSET + 5 or message[4] != 0:
            return None
        start = _BODY_OFFSET
        end = start + _INT32.unpack_from(message, start)[0]
        found = _find(message, start, end, b"cursor")
        if found is None or found[0] != 0x03:
            return None
        cursor_start = found[1]
        cursor_end = cursor_start + _INT32.unpack_from(message, cursor_start)[0]
        found = _find(message, cursor_start, cursor_end, b"id")
        if found is None:
            return None
        etype, value = found
        if etype == 0x12:
            return int(_INT64.unpack_from(message, value)[0])
        if etype == 0x10:
            return int(_INT32.unpack_from(message, value)[0])
        return None
    except (ValueError, IndexError, struct.error):
        return None
