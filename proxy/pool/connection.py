"""One connection from the proxy to an upstream server: send a message, read its reply."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from typing import Any

import bson

from proxy.wire import HEADER_SIZE, OpCode, decode_body, encode_op_msg, parse_op_msg

_HEADER = struct.Struct("<iiii")
# Request ids of messages the proxy itself originates (handshakes, killCursors, ...).
# Forwarded client messages keep the client's own id: each exchange owns its upstream
# connection, so the reply's responseTo already names the client's request.
_own_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_own_request_ids) & 0x7FFFFFFF


class UpstreamProtocolError(Exception):
    """The upstream sent bytes that are not a reply to what we asked."""


class UpstreamConnection:
    """A TCP connection to one upstream server, used by one exchange at a time."""

    __slots__ = ("_reader", "_writer", "address")

    def __init__(
        self,
        address: tuple[str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(
        cls, address: tuple[str, int], timeout_s: float, handshake: dict[str, Any]
    ) -> UpstreamConnection:
        """Connect and run the handshake, all within ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(address[0], address[1])
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = cls(address, reader, writer)
            try:
                await conn.command(handshake, timeout_s)
            except BaseException:
                conn.close()
                raise
        return conn

    async def command(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run one command originated by the proxy and return the decoded reply."""
        request_id = next_request_id()
        message = encode_op_msg(request_id, 0, bson.encode(command))
        header, body = await self.exchange(message, request_id, timeout_s)
        return decode_body(parse_op_msg(header + body))

    def send(self, message: bytes) -> None:
        self._writer.write(message)

    async def drain(self) -> None:
        await self._writer.drain()

    async def exchange(
        self, message: bytes, request_id: int, timeout_s: float
    ) -> tuple[bytes, bytes]:
        """Send a request and read its reply: (16-byte header, rest of the message)."""
        self._writer.write(message)
        async with asyncio.timeout(timeout_s):
            header = await self._reader.readexactly(HEADER_SIZE)
            length, _, response_to, op_code = _HEADER.unpack(header)
            if response_to != request_id or length < HEADER_SIZE:
                raise UpstreamProtocolError(
                    f"reply responseTo {response_to} (length {length}) does not match "
                    f"request {request_id}"
                )
            if op_code not in (OpCode.OP_MSG, OpCode.OP_REPLY):
                raise UpstreamProtocolError(f"unexpected reply opcode {op_code}")
            body = await self._reader.readexactly(length - HEADER_SIZE)
        return header, body

    def closed_by_peer(self) -> bool:
        """True once the server closed its end (seen without a read: EOF or an error)."""
        return (
            self._reader.at_eof()
            or self._reader.exception() is not None
            or self._writer.transport.is_closing()
        )

    def close(self) -> None:
        self._writer.close()
