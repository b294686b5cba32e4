"""The client socket as an asyncio Protocol: whole messages in, bytes out.

A StreamReader costs two ``readexactly`` coroutines (header, then body) and a timeout
scope per message; here ``data_received`` frames messages as they arrive and the serving
task awaits at most one future per message. A timer runs only while a message is
partly received (an idle client may wait forever; a stalled one may not).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import cast

from proxy.wire import HEADER_SIZE, MAX_MESSAGE_SIZE, WireError, declared_length, parse_header

__all__ = ["ClientStream", "StalledMessageError"]

# Bytes a client may have sent beyond the message being read before the proxy stops
# reading its socket (the kernel's buffers then push back on the client): a client that
# streams requests without reading the replies cannot grow the proxy's memory.
READ_HIGH_WATER = 1 << 20


class StalledMessageError(WireError):
    """A message began but did not complete in time: the connection is closed, with no
    reply (the client is not reading or writing as it should)."""


class ClientStream(asyncio.Protocol):
    """Buffers one client's bytes; ``next_message`` returns them message by message."""

    def __init__(self, on_connect: Callable[[ClientStream], None]) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # perf_counter_ns when the first byte of the buffered message arrived.
        self._started_ns = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._reading_paused = False
        self._max_size = MAX_MESSAGE_SIZE  # as next_message was last told
        self.paused = False  # the transport's buffer is full: the client is not reading
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        first = not buffer
        if first:
            self._started_ns = time.perf_counter_ns()
        buffer += data
        # Wake the request task only for what it can act on: a message's first bytes
        # (to set its deadline), a whole message, or a header to refuse. The pieces of a
        # large message in between just accumulate.
        if first:
            self._wake()
        elif len(buffer) >= HEADER_SIZE:
            length = declared_length(buffer)
            if len(buffer) >= length or not HEADER_SIZE <= length <= self._max_size:
                self._wake()
            if len(buffer) - max(length, 0) > READ_HIGH_WATER and not self._reading_paused:
                assert self.transport is not None
                self.transport.pause_reading()  # resumed when more bytes are needed
                self._reading_paused = True

    def eof_received(self) -> bool:
        # Keep our half open: a request sent just before the client's FIN is answered.
        self._eof = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- for the serving task -------------------------------------------------------------

    @property
    def peer(self) -> object:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    async def next_message(self, max_size: int, timeout_s: float) -> tuple[bytes, int] | None:
        """The next whole message and when its first byte arrived (perf_counter ns), or
        None once the client has closed its end.

        Raises a fatal WireError for a header that cannot be framed (the caller answers
        and closes) or for a message not complete within ``timeout_s`` of its first byte.
        """
        self._max_size = max_size
        buffer = self._buffer
        while True:
            if len(buffer) >= HEADER_SIZE:
                length = declared_length(buffer)
                if length < HEADER_SIZE or length > max_size:
                    parse_header(buffer, max_size)  # raises the WireError that says why
                if len(buffer) >= length:
                    started_ns = self._started_ns
                    if len(buffer) == length:
                        message = bytes(buffer)
                        buffer.clear()
                    else:
                        message = bytes(buffer[:length])
                        del buffer[:length]
                        self._started_ns = time.perf_counter_ns()  # the next one's bytes
                    return message, started_ns
            if self._eof:
                return None  # a clean end, or a client gone mid-message: nothing to answer
            if self._reading_paused and self.transport is not None:
                self.transport.resume_reading()
                self._reading_paused = False
            if not buffer:
                await self._wait(None)  # an idle client may stay as long as it likes
                continue
            # One deadline per message, from its first byte: trickling bytes (one every
            # few seconds) does not extend it.
            remaining = timeout_s - (time.perf_counter_ns() - self._started_ns) / 1e9
            if remaining <= 0 or not await self._wait(remaining):
                raise StalledMessageError(
                    f"message of {self._length_text()} bytes not received within "
                    f"{timeout_s:g} s", fatal=True
                )

    async def _wait(self, timeout_s: float | None) -> bool:
        """Wait for more bytes (or the end); False when ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            return False
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return True

    def _length_text(self) -> int | str:
        if len(self._buffer) < 4:
            return "unknown"
        return declared_length(self._buffer)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(parts)

    async def drain(self) -> None:
        """Wait while the client is not reading what it was sent (flow control)."""
        if not self.paused or self.transport is None or self.transport.is_closing():
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
