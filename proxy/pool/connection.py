"""One connection from the proxy to an upstream server: send a message, read its reply."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import struct
import time
from typing import Any

import bson

from proxy.pool.auth import (
    AuthenticationError,
    Credentials,
    authentication_failed,
    handshake_and_authenticate,
)
from proxy.wire import (
    HEADER_SIZE,
    OpCode,
    declared_length,
    decode_body,
    encode_op_msg,
    parse_op_msg,
)

_HEADER = struct.Struct("<iiii")
# Request ids of messages the proxy itself originates (handshakes, killCursors, ...).
# Forwarded client messages keep the client's own id: each exchange owns its upstream
# connection, so the reply's responseTo already names the client's request.
_own_request_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_own_request_ids) & 0x7FFFFFFF


class UpstreamProtocolError(Exception):
    """The upstream sent bytes that are not a reply to what we asked."""


class _ReplyReader(asyncio.Protocol):
    """Buffers what an upstream sends and hands the waiting exchange its whole reply.

    One future per exchange, completed from ``data_received`` once the reply's length
    (its first four bytes) has arrived: no per-read coroutines as with a StreamReader.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        # Why the connection is unusable (closed by the server, or a network error).
        self.lost: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if not buffer and len(data) >= HEADER_SIZE and declared_length(data) == len(
            data
        ):
            # The usual case: exactly one whole reply in one read, handed over uncopied.
            self._complete(data)
            return
        buffer += data
        self.deliver()

    def deliver(self) -> None:
        """Complete the waiting exchange if its whole reply is buffered."""
        waiter, buffer = self.waiter, self.buffer
        if waiter is None or waiter.done() or len(buffer) < HEADER_SIZE:
            return
        length = declared_length(buffer)
        if length < HEADER_SIZE:
            waiter.set_exception(UpstreamProtocolError(f"reply length {length} is invalid"))
        elif len(buffer) >= length:
            reply = bytes(buffer[:length])
            del buffer[:length]
            waiter.set_result(reply)

    def _complete(self, reply: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.buffer += reply  # unexpected: the next exchange will see a mismatch
        else:
            waiter.set_result(reply)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost tells the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc if exc is not None else asyncio.IncompleteReadError(
            bytes(self.buffer), None)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.lost)


def _expire(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamConnection:
    """A TCP connection to one upstream server, used by one exchange at a time.

    ``open_cursors`` counts the server cursors opened by a request on this connection
    and not yet exhausted or killed: the server kills a connection's cursors when the
    connection closes, so a pool never reaps a connection while it is nonzero. The
    listener keeps it with :meth:`cursor_opened` / :meth:`cursor_closed`.
    ``last_used`` (``time.monotonic()``) is when it was opened or last returned.
    """

    __slots__ = ("_loop", "_reader", "_transport", "address", "last_used", "open_cursors")

    def __init__(
        self,
        address: tuple[str, int],
        transport: asyncio.Transport,
        reader: _ReplyReader,
    ) -> None:
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._reader = reader
        self.last_used = time.monotonic()
        self.open_cursors = 0

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        timeout_s: float,
        handshake: dict[str, Any],
        credentials: Credentials | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> UpstreamConnection:
        """Connect, run the handshake and authenticate, all within ``timeout_s``.

        With ``credentials`` the handshake carries ``speculativeAuthenticate`` and the
        SCRAM conversation is finished (or started over with ``saslStart`` if the server
        ignored it) before the connection is returned. A failed authentication raises
        ProxyError AuthenticationFailed (18) naming the upstream, never the password.
        With ``tls`` (pymongo's context for the uri's options: proxy.tls.client) the
        connection is TLS, verified against the server's host name unless the context
        says otherwise (tlsAllowInvalidHostnames).
        """
        async with asyncio.timeout(timeout_s):
            transport, reader = await asyncio.get_running_loop().create_connection(
                _ReplyReader, address[0], address[1], ssl=tls,
                server_hostname=address[0] if tls is not None else None)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = cls(address, transport, reader)
            try:
                if credentials is None:
                    await conn.command(handshake, timeout_s)
                else:
                    await conn._handshake_and_authenticate(handshake, credentials, timeout_s)
            except BaseException:
                conn.close()
                raise
        return conn

    async def _handshake_and_authenticate(
        self, handshake: dict[str, Any], credentials: Credentials, timeout_s: float
    ) -> None:
        async def run(command: dict[str, Any]) -> dict[str, Any]:
            return await self.command(command, timeout_s)

        try:
            await handshake_and_authenticate(run, handshake, credentials)
        except AuthenticationError as exc:
            raise authentication_failed(self.address, credentials, exc) from None

    def cursor_opened(self) -> None:
        """A reply on this connection opened a server cursor (``cursor.id`` != 0)."""
        self.open_cursors += 1

    def cursor_closed(self) -> None:
        """A cursor this connection opened was exhausted, killed or found gone."""
        if self.open_cursors > 0:
            self.open_cursors -= 1

    async def command(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run one command originated by the proxy and return the decoded reply."""
        request_id = next_request_id()
        message = encode_op_msg(request_id, 0, bson.encode(command))
        header, body = await self.exchange(message, request_id, timeout_s)
        return decode_body(parse_op_msg(header + body))

    async def exchange(
        self, message: bytes, request_id: int, timeout_s: float
    ) -> tuple[bytes, bytes]:
        """Send a request and read its reply: (16-byte header, rest of the message).

        Raises TimeoutError after ``timeout_s``, the network error (an OSError, or
        IncompleteReadError when the server closed the connection), or
        UpstreamProtocolError for a reply that does not answer the request.
        """
        reader = self._reader
        if reader.lost is not None:
            raise reader.lost
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        reader.waiter = waiter
        self._transport.write(message)
        # One timer handle per exchange (cheaper than an asyncio.timeout scope).
        timer = self._loop.call_later(timeout_s, _expire, waiter)
        try:
            reader.deliver()  # bytes that arrived before the request was sent
            reply = await waiter
        finally:
            timer.cancel()
            reader.waiter = None
        _, _, response_to, op_code = _HEADER.unpack_from(reply)
        if response_to != request_id:
            raise UpstreamProtocolError(
                f"reply responseTo {response_to} (length {len(reply)}) does not match "
                f"request {request_id}"
            )
        if op_code not in (OpCode.OP_MSG, OpCode.OP_REPLY):
            raise UpstreamProtocolError(f"unexpected reply opcode {op_code}")
        return reply[:HEADER_SIZE], reply[HEADER_SIZE:]

    def closed_by_peer(self) -> bool:
        """True once the server closed its end (seen without a read: EOF or an error)."""
        return self._reader.lost is not None or self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()
