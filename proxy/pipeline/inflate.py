"""OP_COMPRESSED from clients: negotiated compressors only, bounded, large ones off the loop.

A 47 KB zlib message can inflate to 48 MB: done on the event loop it stalls every
client for the time it takes. Here a message is refused before any work when its
compressor was not negotiated in the connection's hello or its declared size is above
the caller's limit (the pre-authentication limit before login); the decompressor stops
at the declared size; and a message declaring more than :data:`OFFLOAD_BYTES` is
decompressed on a dedicated thread (zlib, zstd and snappy release the GIL while they
work), one message at a time, which also bounds how many such buffers exist at once.
That thread is kept busy at most half the time: after each large message the next
waits as long as it took (the GIL and the cores are shared with the event loop), so
compressed floods cost their senders time, not the other clients.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from proxy.wire import COMPRESSOR_IDS, HEADER_SIZE, decompress
from proxy.wire.compression import declared_size

__all__ = ["OFFLOAD_BYTES", "inflate"]

# Below this, decompressing costs less than the hop to a thread (tens of µs).
OFFLOAD_BYTES = 256 * 1024
_WORKERS = 1
_ID_OFFSET = HEADER_SIZE + 8  # compressorId: after originalOpcode and uncompressedSize
_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}

_executor: ThreadPoolExecutor | None = None
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary())


def _compressor(message: bytes) -> str | None:
    return _NAMES.get(message[_ID_OFFSET]) if len(message) > _ID_OFFSET else None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="inflate")
    return _executor


async def inflate(
    message: bytes, max_size: int, negotiated: Collection[str]
) -> tuple[bytes, str]:
    """:func:`proxy.wire.decompress`, refusing compressors the client did not negotiate,
    off the event loop for large payloads. Raises the same non-fatal WireErrors."""
    if declared_size(message) <= OFFLOAD_BYTES or _compressor(message) not in negotiated:
        return decompress(message, max_size, negotiated)  # cheap, or refused at once
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns[loop] = asyncio.Lock()
    async with turn:
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(_pool(), decompress, message, max_size,
                                              negotiated)
        finally:
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # shutdown does not wait for it
                await asyncio.sleep(time.perf_counter() - started)  # duty cycle <= 50 %
