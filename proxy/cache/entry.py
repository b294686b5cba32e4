"""The bytes of a cache entry in Redis, and their checks. Pure (no I/O).

An entry is::

    token (8 bytes) | flags (1 byte) | CRC-32C of payload (4 bytes, LE) | payload

``token`` is the namespace's generation token the reader saw *before* it asked
MongoDB (see ``proxy.cache.store``): the entry answers a lookup only while the
namespace's token is still that one. ``flags`` bit 0: the payload is zstd-compressed.
The payload is the reply body exactly as a client receives it after the 16-byte
header (flagBits 0, one kind-0 section), with the cluster-time fields removed, so a hit
costs a header and, above ``compress_min_bytes``, one decompression.

Whatever Redis returns is checked (length, flags, CRC, decompressed size, the body's own
BSON length) before it is sent: a corrupt or foreign value is a miss, never a reply.
"""

from __future__ import annotations

import struct

import zstandard
from crc32c import crc32c

__all__ = ["TOKEN_BYTES", "CorruptEntry", "decode_entry", "encode_entry"]

TOKEN_BYTES = 8
_PREFIX = struct.Struct("<8sBI")
_ZSTD = 0x01
_KNOWN_FLAGS = _ZSTD
_INT32 = struct.Struct("<i")
_BODY_HEAD = b"\x00\x00\x00\x00\x00"  # flagBits 0, section kind 0

# One compressor/decompressor per process: both are safe to reuse sequentially and the
# event loop runs one call at a time.
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()


class CorruptEntry(ValueError):
    """Redis returned a value that is not an entry this proxy wrote."""


def encode_entry(token: bytes, body: bytes, compress_min_bytes: int) -> bytes:
    if len(token) != TOKEN_BYTES:
        raise ValueError("a generation token is 8 bytes")
    flags = 0
    payload = body
    if len(body) >= compress_min_bytes:
        packed = _compressor.compress(body)
        if len(packed) < len(body):
            payload, flags = packed, _ZSTD
    return _PREFIX.pack(token, flags, crc32c(payload)) + payload


def decode_entry(value: bytes, max_body_bytes: int) -> tuple[bytes, bytes]:
    """(token, reply body) of an entry; CorruptEntry when the value does not check out."""
    if len(value) < _PREFIX.size + len(_BODY_HEAD) + 5:
        raise CorruptEntry("shorter than an entry")
    token, flags, crc = _PREFIX.unpack_from(value)
    payload = value[_PREFIX.size:]
    if flags & ~_KNOWN_FLAGS:
        raise CorruptEntry(f"unknown flags {flags:#x}")
    if crc32c(payload) != crc:
        raise CorruptEntry("CRC-32C mismatch")
    if flags & _ZSTD:
        try:
            # A frame that declares its size is decompressed to that size: check it first.
            if zstandard.frame_content_size(payload) > max_body_bytes:
                raise CorruptEntry("decompresses beyond max_entry_bytes")
            body = _decompressor.decompress(payload, max_output_size=max_body_bytes)
        except zstandard.ZstdError as exc:
            raise CorruptEntry(f"zstd: {exc}") from None
    else:
        body = payload
    if (
        len(body) < len(_BODY_HEAD) + 5
        or body[:5] != _BODY_HEAD
        or _INT32.unpack_from(body, 5)[0] + 5 != len(body)
        or body[-1] != 0
    ):
        raise CorruptEntry("not an OP_MSG reply body")
    return token, body
