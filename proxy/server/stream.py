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

from proxy.server.limits import MemoryBudget
from proxy.wire import HEADER_SIZE, MAX_MESSAGE_SIZE, WireError, declared_length, parse_header

__all__ = ["ClientStream", "IdleTimeoutError", "StalledMessageError"]

# Bytes a client may have sent beyond the message being read before the proxy stops
# reading its socket (the kernel's buffers then push back on the client): a client that
# streams requests without reading the replies cannot grow the proxy's memory.
READ_HIGH_WATER = 1 << 20


class StalledMessageError(WireError):
    """A message began but did not complete in time: the connection is closed, with no
    reply (the client is not reading or writing as it should)."""


class IdleTimeoutError(WireError):
    """The client sent nothing for the idle timeout: the connection is closed."""


class ClientStream(asyncio.Protocol):
    """Buffers one client's bytes; ``next_message`` returns them message by message."""

    def __init__(
        self, on_connect: Callable[[ClientStream], None], budget: MemoryBudget | None = None
    ) -> None:
        self._on_connect = on_connect
        # Bytes reserved in the budget: the message being received (its declared
        # length) and the unsent replies while the client is not reading.
        self._budget = budget
        self._reserved = 0
        self._out_reserved = 0
        self._budget_wait = False
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
        if len(buffer) >= HEADER_SIZE:
            length = declared_length(buffer)
            if len(buffer) >= length or not HEADER_SIZE <= length <= self._max_size:
                if not first:
                    self._wake()
            elif not (self._reserved or self._budget_wait) and self._budget is not None:
                self._reserve(length)  # a message arriving in pieces is charged
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
        self._release_all()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        if self._budget is not None and self.transport is not None:
            self._out_reserved = self.transport.get_write_buffer_size()
            self._budget.used += self._out_reserved  # charged, never refused: it is sent

    def resume_writing(self) -> None:
        self.paused = False
        if self._out_reserved and self._budget is not None:
            self._budget.release(self._out_reserved)
            self._out_reserved = 0
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- for the serving task -------------------------------------------------------------

    @property
    def peer(self) -> object:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    async def next_message(
        self, max_size: int, timeout_s: float, idle_timeout_s: float | None = None
    ) -> tuple[bytes, int] | None:
        """The next whole message and when its first byte arrived (perf_counter ns), or
        None once the client has closed its end.

        Raises a fatal WireError for a header that cannot be framed (the caller answers
        and closes), for a message not complete within ``timeout_s`` of its first byte,
        or when no byte arrived within ``idle_timeout_s`` (None: wait forever).
        """
        self._max_size = max_size
        buffer = self._buffer
        while True:
            if len(buffer) >= HEADER_SIZE:
                length = declared_length(buffer)
                if length < HEADER_SIZE or length > max_size:
                    parse_header(buffer, max_size)  # raises the WireError that says why
                if len(buffer) >= length:
                    if self._reserved:
                        self._release_message()
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
            if self._reading_paused and not self._budget_wait and self.transport is not None:
                self.transport.resume_reading()
                self._reading_paused = False
            if not buffer:
                if not await self._wait(idle_timeout_s):
                    raise IdleTimeoutError(
                        f"no message within the idle timeout of {idle_timeout_s:g} s",
                        fatal=True)
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

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait while the client is not reading what it was sent (flow control); False
        when it still was not reading after ``timeout_s``."""
        if not self.paused or self.transport is None or self.transport.is_closing():
            return True
        loop = asyncio.get_running_loop()
        waiter = self._drain_waiter = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            return False
        finally:
            self._drain_waiter = None
            if timer is not None:
                timer.cancel()
        return True

    # -- the memory budget ------------------------------------------------------------------

    def _reserve(self, length: int) -> None:
        """Charge the message being received, or stop reading until it fits."""
        assert self._budget is not None and self.transport is not None
        if self._budget.try_reserve(length):
            self._reserved = length
            return
        self._budget_wait = True
        self.transport.pause_reading()
        self._reading_paused = True
        self._budget.wait(self._retry_reserve)

    def _retry_reserve(self) -> bool:
        assert self._budget is not None and self.transport is not None
        if self._eof:
            return True  # gone: stop waiting
        length = declared_length(self._buffer)
        if not self._budget.try_reserve(length):
            return False
        self._reserved = length
        self._budget_wait = False
        self.transport.resume_reading()
        self._reading_paused = False
        return True

    def _release_message(self) -> None:
        assert self._budget is not None
        reserved, self._reserved = self._reserved, 0
        self._budget.release(reserved)

    def _release_all(self) -> None:
        if self._budget is None:
            return
        if self._budget_wait:
            self._budget.forget(self._retry_reserve)
            self._budget_wait = False
        if self._reserved:
            self._release_message()
        if self._out_reserved:
            self._budget.release(self._out_reserved)
            self._out_reserved = 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
