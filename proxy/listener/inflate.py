"""OP_COMPRESSED from clients: negotiated compressors only, bounded, large ones off the loop.

A 47 KB zlib message can inflate to 48 MB: done on the event loop it stalls every
client for the time it takes. Here a message is refused before any work when its
compressor was not negotiated in the connection's hello or its declared size is above
the caller's limit (the pre-authentication limit before login); the decompressor stops
at the declared size; and a message declaring more than :data:`OFFLOAD_BYTES` is
decompressed on a small dedicated thread pool (zlib, zstd and snappy release the GIL
while they work), whose size also bounds how many such buffers exist at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from proxy.wire import decompress
from proxy.wire.compression import declared_size

__all__ = ["OFFLOAD_BYTES", "inflate"]

# Below this, decompressing costs less than the hop to a thread (tens of µs).
OFFLOAD_BYTES = 256 * 1024
_WORKERS = 2

_executor: ThreadPoolExecutor | None = None


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
    if declared_size(message) <= OFFLOAD_BYTES:
        return decompress(message, max_size, negotiated)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), decompress, message, max_size, negotiated)
