"""OP_COMPRESSED: negotiation, round trips, pymongo interop and bomb guards."""

from __future__ import annotations

import struct
import zlib

import bson
import pytest
import snappy
import zstandard
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo import compression_support as pm_compression
from pymongo import message as pm_message

from proxy.wire import (
    COMPRESSOR_IDS,
    SUPPORTED_COMPRESSORS,
    OpCode,
    WireError,
    compress,
    decode_body,
    decompress,
    encode_op_msg,
    negotiate,
    parse_header,
    parse_op_msg,
)

ALL = ("noop", "snappy", "zlib", "zstd")


def op_compressed(
    payload: bytes, size: int, compressor_id: int, *, original: int = 2013, rid: int = 9
) -> bytes:
    rest = struct.pack("<iiB", original, size, compressor_id) + payload
    return struct.pack("<iiii", 16 + len(rest), rid, 3, 2012) + rest


def test_constants() -> None:
    assert COMPRESSOR_IDS == {"noop": 0, "snappy": 1, "zlib": 2, "zstd": 3}
    assert SUPPORTED_COMPRESSORS == ("zstd", "snappy", "zlib")


@pytest.mark.parametrize(
    ("offer", "enabled", "expected"),
    [
        (["snappy", "zlib", "zstd"], SUPPORTED_COMPRESSORS, ["snappy", "zlib", "zstd"]),
        (["zlib", "zstd"], ["zstd"], ["zstd"]),
        ([1, None, "lz4", "zlib", {"a": 1}, "zlib"], SUPPORTED_COMPRESSORS, ["zlib"]),
        (["zstd"], [], []),
        ([], SUPPORTED_COMPRESSORS, []),
        (("noop", "zlib"), ["noop", "zlib"], ["noop", "zlib"]),
        (["bogus"], ["bogus"], []),
    ],
)
def test_negotiate(offer: list[object], enabled: list[str], expected: list[str]) -> None:
    assert negotiate(offer, enabled) == expected


@pytest.mark.parametrize("compressor", ALL)
def test_round_trip(compressor: str) -> None:
    msg = encode_op_msg(1234, 56, bson.encode({"find": "c", "filter": {"x": "y" * 500}}))
    wrapped = compress(msg, compressor)
    h = parse_header(wrapped)
    assert (h.length, h.request_id, h.response_to, h.op_code) == (
        len(wrapped),
        1234,
        56,
        OpCode.OP_COMPRESSED,
    )
    orig_op, size, cid = struct.unpack_from("<iiB", wrapped, 16)
    assert (orig_op, size, cid) == (2013, len(msg) - 16, COMPRESSOR_IDS[compressor])
    out, name = decompress(memoryview(wrapped))
    assert (out, name) == (msg, compressor)
    if compressor != "noop":
        assert len(wrapped) < len(msg)


@pytest.mark.parametrize("level", [-1, 0, 1, 9])
def test_levels(level: int) -> None:
    msg = encode_op_msg(1, 0, bson.encode({"a": "b" * 300}))
    for compressor in ("zlib", "zstd"):
        assert decompress(compress(msg, compressor, level))[0] == msg


def test_compress_rejects_programming_errors() -> None:
    msg = encode_op_msg(1, 0, bson.encode({}))
    with pytest.raises(ValueError, match="unknown compressor"):
        compress(msg, "lz4")
    with pytest.raises(ValueError):
        compress(b"short", "zlib")
    with pytest.raises(ValueError, match="already OP_COMPRESSED"):
        compress(compress(msg, "zlib"), "zlib")


@pytest.mark.parametrize(
    "ctx", [pm_compression.ZlibContext(-1), pm_compression.SnappyContext()], ids=["zlib", "snappy"]
)
def test_decompress_pymongo_messages(ctx: pm_compression.ZlibContext) -> None:
    cmd = {"insert": "c", "documents": [{"i": i, "s": "x" * 40} for i in range(20)]}
    rid, wrapped, _, _ = pm_message._op_msg(0, cmd, "db", None, DEFAULT_CODEC_OPTIONS, ctx=ctx)
    out, name = decompress(wrapped)
    assert name == ("zlib" if ctx.compressor_id == 2 else "snappy")
    parsed = parse_op_msg(out)
    assert parsed.request_id == rid
    assert decode_body(parsed) == {"insert": "c", "$db": "db"}
    assert len(parsed.sequences[0].documents()) == 20


@pytest.mark.parametrize("compressor", ["zlib", "snappy"])
def test_pymongo_decompresses_ours(compressor: str) -> None:
    msg = encode_op_msg(1, 2, bson.encode({"ok": 1.0, "s": "z" * 300}))
    wrapped = compress(msg, compressor)
    body = pm_compression.decompress(wrapped[25:], COMPRESSOR_IDS[compressor], 48_000_000)
    assert bytes(body) == msg[16:]


def test_zstd_matches_reference_library() -> None:
    msg = encode_op_msg(1, 2, bson.encode({"ok": 1.0, "s": "z" * 300}))
    wrapped = compress(msg, "zstd")
    assert zstandard.ZstdDecompressor().decompress(wrapped[25:]) == msg[16:]


# --------------------------------------------------------------------------- errors

PAYLOAD = bytes(range(256)) * 4
BAD: list[tuple[str, bytes, str]] = [
    ("unknown compressor id", op_compressed(PAYLOAD, len(PAYLOAD), 4), "unknown compressor id 4"),
    ("compressor id 255", op_compressed(PAYLOAD, len(PAYLOAD), 255), "offset 24"),
    ("negative size", op_compressed(PAYLOAD, -1, 0), "uncompressedSize at offset 20: -1"),
    ("oversized", op_compressed(PAYLOAD, 48_000_000, 2), "48000000 is invalid"),
    ("nested", op_compressed(PAYLOAD, len(PAYLOAD), 0, original=2012), "nested OP_COMPRESSED"),
    ("noop size mismatch", op_compressed(PAYLOAD, 10, 0), "uncompressedSize is 10"),
    ("zlib garbage", op_compressed(PAYLOAD, 1024, 2), "zlib decompression failed"),
    (
        "zlib truncated",
        op_compressed(zlib.compress(PAYLOAD)[:-6], 1024, 2),
        "zlib decompression failed",
    ),
    ("zlib trailing", op_compressed(zlib.compress(PAYLOAD) + b"x", 1024, 2), "after the zlib"),
    ("zlib size too big", op_compressed(zlib.compress(PAYLOAD), 2000, 2), "decompressed to 1024"),
    ("zlib size too small", op_compressed(zlib.compress(PAYLOAD), 100, 2), "more than 100"),
    ("zstd garbage", op_compressed(PAYLOAD, 1024, 3), "zstd decompression failed"),
    (
        "zstd declared size mismatch",
        op_compressed(zstandard.ZstdCompressor().compress(PAYLOAD), 1000, 3),
        "content size of 1024",
    ),
    (
        "zstd no content size, too small",
        op_compressed(zstandard.ZstdCompressor(write_content_size=False).compress(PAYLOAD), 100, 3),
        "more than 100",
    ),
    (
        "zstd truncated",
        op_compressed(zstandard.ZstdCompressor().compress(PAYLOAD)[:-3], 1024, 3),
        "zstd",
    ),
    ("snappy garbage", op_compressed(b"\xff\xff\xff\xff\xff\xff", 1024, 1), "snappy"),
    ("snappy declared mismatch", op_compressed(snappy.compress(PAYLOAD), 1000, 1), "1024"),
    ("snappy corrupt body", op_compressed(snappy.compress(PAYLOAD)[:-10], 1024, 1), "snappy"),
    ("too short", struct.pack("<iiii", 20, 9, 0, 2012) + b"\x00" * 4, "too short"),
    ("wrong opcode", encode_op_msg(9, 0, bson.encode({})), "is not 2012"),
]


@pytest.mark.parametrize(("name", "data", "needle"), BAD, ids=[b[0] for b in BAD])
def test_decompress_errors(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decompress(data)
    err = info.value
    assert (err.code, err.code_name, err.fatal, err.request_id) == (17, "ProtocolError", False, 9)
    assert needle in err.errmsg, err.errmsg


def test_max_size_parameter() -> None:
    msg = encode_op_msg(1, 0, bson.encode({"a": "b" * 100}))
    wrapped = compress(msg, "zlib")
    assert decompress(wrapped, max_size=len(msg))[0] == msg
    with pytest.raises(WireError, match="invalid"):
        decompress(wrapped, max_size=len(msg) - 1)


# --------------------------------------------------------------------------- bombs

BOMB = b"\x00" * 20_000_000


@pytest.mark.parametrize(
    ("name", "payload", "cid"),
    [
        ("zlib", zlib.compress(BOMB, 9), 2),
        ("zstd", zstandard.ZstdCompressor().compress(BOMB), 3),
        (
            "zstd-no-content-size",
            zstandard.ZstdCompressor(write_content_size=False).compress(BOMB),
            3,
        ),
        ("snappy", snappy.compress(BOMB), 1),
    ],
)
def test_bomb_guard(name: str, payload: bytes, cid: int) -> None:
    import tracemalloc

    wrapped = op_compressed(payload, 100, cid)
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decompress(wrapped)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{name}: decompression allocated {peak} bytes"


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=3000) | st.text(max_size=2000).map(lambda s: s.encode() * 3),
    compressor=st.sampled_from(ALL),
    request_id=st.integers(-(2**31), 2**31 - 1),
    response_to=st.integers(-(2**31), 2**31 - 1),
    op_code=st.sampled_from([1, 2004, 2013]),
)
def test_round_trip_property(
    payload: bytes, compressor: str, request_id: int, response_to: int, op_code: int
) -> None:
    msg = struct.pack("<iiii", 16 + len(payload), request_id, response_to, op_code) + payload
    wrapped = compress(msg, compressor)
    assert decompress(wrapped) == (msg, compressor)
