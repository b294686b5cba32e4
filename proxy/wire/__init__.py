"""Sans-IO MongoDB wire-protocol codec.

Everything here is a pure function over ``bytes`` (h11 style): no sockets, no clocks,
no event loop.  The I/O layer frames messages with :func:`parse_header`, unwraps
OP_COMPRESSED with :func:`decompress`, parses OP_MSG / OP_QUERY, and encodes replies
with :func:`encode_op_msg` / :func:`encode_op_reply`.  Every decoding failure is a
:class:`WireError` carrying the MongoDB error code to reply with and whether the
connection must be closed (``fatal``).
"""

from proxy.wire.compression import (
    COMPRESSOR_IDS,
    SUPPORTED_COMPRESSORS,
    compress,
    decompress,
    negotiate,
)
from proxy.wire.errors import WireError
from proxy.wire.header import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Header,
    OpCode,
    declared_length,
    pack_header,
    parse_header,
    with_ids,
)
from proxy.wire.op_msg import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_EXHAUST_ALLOWED,
    FLAG_MORE_TO_COME,
    DocumentSequence,
    OpMsg,
    decode_body,
    encode_op_msg,
    parse_op_msg,
    with_flags,
)
from proxy.wire.op_query import (
    REPLY_FLAG_QUERY_FAILURE,
    OpQuery,
    encode_op_reply,
    parse_op_query,
)
from proxy.wire.reply import reply_cursor, reply_error_code

__all__ = [
    "COMPRESSOR_IDS",
    "FLAG_CHECKSUM_PRESENT",
    "FLAG_EXHAUST_ALLOWED",
    "FLAG_MORE_TO_COME",
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "REPLY_FLAG_QUERY_FAILURE",
    "SUPPORTED_COMPRESSORS",
    "DocumentSequence",
    "Header",
    "OpCode",
    "OpMsg",
    "OpQuery",
    "WireError",
    "compress",
    "declared_length",
    "decode_body",
    "decompress",
    "encode_op_msg",
    "encode_op_reply",
    "negotiate",
    "pack_header",
    "parse_header",
    "parse_op_msg",
    "parse_op_query",
    "reply_cursor",
    "reply_error_code",
    "with_flags",
    "with_ids",
]
