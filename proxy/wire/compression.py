"""OP_COMPRESSED (opCode 2012): compressor negotiation, compress and decompress."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Sequence

import snappy
import zstandard

from proxy.wire._common import as_bytes, check_message_header
from proxy.wire.errors import WireError
from proxy.wire.header import HEADER_SIZE, MAX_MESSAGE_SIZE, OpCode, pack_header

__all__ = [
    "COMPRESSOR_IDS",
    "SUPPORTED_COMPRESSORS",
    "compress",
    "declared_size",
    "decompress",
    "negotiate",
]

COMPRESSOR_IDS: dict[str, int] = {"noop": 0, "snappy": 1, "zlib": 2, "zstd": 3}
SUPPORTED_COMPRESSORS: tuple[str, ...] = ("zstd", "snappy", "zlib")

_NAMES_BY_ID = {v: k for k, v in COMPRESSOR_IDS.items()}
_COMPRESSED_FIELDS = struct.Struct("<iiB")  # originalOpcode, uncompressedSize, compressorId
_MIN_COMPRESSED = HEADER_SIZE + _COMPRESSED_FIELDS.size
_ZSTD_DEFAULT_LEVEL = 3


def negotiate(client_offer: Sequence[object], enabled: Sequence[str]) -> list[str]:
    """Compressors to announce back: the client's offer, in its order, that are enabled.

    Non-strings, unknown names and duplicates are ignored.
    """
    result: list[str] = []
    for name in client_offer:
        if (
            isinstance(name, str)
            and name in COMPRESSOR_IDS
            and name in enabled
            and name not in result
        ):
            result.append(name)
    return result


def _snappy_declared_length(data: bytes) -> int | None:
    """The varint uncompressed length at the start of a raw snappy block (None if bad)."""
    result = shift = 0
    for i in range(min(5, len(data))):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
    return None


def _decompress_payload(compressor: str, payload: bytes, size: int) -> bytes:
    """Decompress at most ``size + 1`` bytes (so that overflow is detectable)."""
    limit = size + 1
    if compressor == "noop":
        return payload
    if compressor == "zlib":
        dobj = zlib.decompressobj()
        out = dobj.decompress(payload, limit)
        if len(out) <= size:
            if not dobj.eof:
                raise ValueError("truncated zlib stream")
            if dobj.unused_data:
                raise ValueError(f"{len(dobj.unused_data)} bytes after the zlib stream")
        return out
    if compressor == "zstd":
        declared = zstandard.frame_content_size(payload)
        if declared >= 0 and declared != size:
            raise ValueError(f"zstd frame declares a content size of {declared}")
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True)
        chunks: list[bytes] = []
        got = 0
        while got < limit:
            chunk = reader.read(limit - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    # snappy
    declared_len = _snappy_declared_length(payload)
    if declared_len is None:
        raise ValueError("invalid snappy length preamble")
    if declared_len != size:
        raise ValueError(f"snappy block declares an uncompressed length of {declared_len}")
    out_snappy: bytes = snappy.uncompress(payload)
    return out_snappy


def declared_size(message: bytes | bytearray | memoryview) -> int:
    """The uncompressedSize an OP_COMPRESSED message declares (-1 if too short)."""
    if len(message) < _MIN_COMPRESSED:
        return -1
    return int(_COMPRESSED_FIELDS.unpack_from(message, HEADER_SIZE)[1])


def decompress(
    message: bytes | bytearray | memoryview,
    max_size: int = MAX_MESSAGE_SIZE,
    negotiated: Collection[str] | None = None,
) -> tuple[bytes, str]:
    """Unwrap a complete OP_COMPRESSED message (header included).

    Returns the original message (with a rebuilt 16-byte header: same requestID and
    responseTo, originalOpcode, length 16 + uncompressedSize) and the compressor name.
    With ``negotiated``, a compressor other than those (or ``noop``) is refused before
    any work. Every failure is a non-fatal :class:`WireError` code 17.
    """
    data = as_bytes(message)
    header = check_message_header(data, "OP_COMPRESSED", OpCode.OP_COMPRESSED)
    rid = header.request_id
    if len(data) < _MIN_COMPRESSED:
        raise WireError(
            f"OP_COMPRESSED: message of {len(data)} bytes is too short (min {_MIN_COMPRESSED})",
            request_id=rid,
        )
    original_opcode, size, compressor_id = _COMPRESSED_FIELDS.unpack_from(data, HEADER_SIZE)
    if original_opcode == OpCode.OP_COMPRESSED:
        raise WireError(
            f"OP_COMPRESSED originalOpcode at offset {HEADER_SIZE}: nested OP_COMPRESSED",
            request_id=rid,
        )
    if size < 0 or HEADER_SIZE + size > max_size:
        raise WireError(
            f"OP_COMPRESSED uncompressedSize at offset {HEADER_SIZE + 4}: {size} is "
            f"invalid: min 0, max {max_size - HEADER_SIZE}",
            request_id=rid,
        )
    compressor = _NAMES_BY_ID.get(compressor_id)
    if compressor is None:
        raise WireError(
            f"OP_COMPRESSED compressorId at offset {HEADER_SIZE + 8}: unknown "
            f"compressor id {compressor_id}",
            request_id=rid,
        )
    if negotiated is not None and compressor != "noop" and compressor not in negotiated:
        raise WireError(
            f"OP_COMPRESSED compressorId at offset {HEADER_SIZE + 8}: {compressor} was "
            "not negotiated in this connection's hello (compression: "
            f"{sorted(negotiated)})",
            request_id=rid,
        )
    payload = data[_MIN_COMPRESSED:]
    try:
        body = _decompress_payload(compressor, payload, size)
    except Exception as exc:
        raise WireError(
            f"OP_COMPRESSED payload at offset {_MIN_COMPRESSED}: {compressor} "
            f"decompression failed ({type(exc).__name__}: {exc})",
            request_id=rid,
        ) from None
    if len(body) != size:
        got = f"more than {size}" if len(body) > size else str(len(body))
        raise WireError(
            f"OP_COMPRESSED payload at offset {_MIN_COMPRESSED}: {compressor} "
            f"decompressed to {got} bytes, but uncompressedSize is {size}",
            request_id=rid,
        )
    rebuilt = pack_header(HEADER_SIZE + size, rid, header.response_to, original_opcode) + body
    return rebuilt, compressor


def compress(message: bytes | bytearray | memoryview, compressor: str, level: int = -1) -> bytes:
    """Wrap a complete message (header included) into OP_COMPRESSED.

    Keeps requestID/responseTo.  ``level`` is used by zlib (-1 = default) and zstd
    (-1 = default level 3); snappy ignores it.  Raises ValueError for an unknown
    compressor name or a message shorter than a header (programming errors).
    """
    data = as_bytes(message)
    if len(data) < HEADER_SIZE:
        raise ValueError(f"message of {len(data)} bytes has no header")
    compressor_id = COMPRESSOR_IDS.get(compressor)
    if compressor_id is None:
        raise ValueError(f"unknown compressor {compressor!r}")
    _, request_id, response_to, op_code = struct.unpack_from("<iiii", data, 0)
    if op_code == OpCode.OP_COMPRESSED:
        raise ValueError("message is already OP_COMPRESSED")
    body = data[HEADER_SIZE:]
    if compressor == "noop":
        payload = body
    elif compressor == "zlib":
        payload = zlib.compress(body, level)
    elif compressor == "zstd":
        zlevel = _ZSTD_DEFAULT_LEVEL if level == -1 else level
        payload = zstandard.ZstdCompressor(level=zlevel).compress(body)
    else:
        payload = snappy.compress(body)
    return (
        pack_header(_MIN_COMPRESSED + len(payload), request_id, response_to, OpCode.OP_COMPRESSED)
        + _COMPRESSED_FIELDS.pack(op_code, len(body), compressor_id)
        + payload
    )
