"""``python -m bench.relay UPSTREAM_PORT PORT``: the floor of a proxy in Python.

Two asyncio ``Protocol``s on uvloop that copy bytes between a client and an upstream
connection of its own: no decoding, no pool, nothing recorded. ``python -m bench core``
runs it as the ``relay`` target, so the cost of the interpreter and the event loop alone
is measured in the same run as the proxy (and as HAProxy, the same hop in C). Prints
``ready`` once it listens on 127.0.0.1:PORT.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop

HOST = "127.0.0.1"


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what arrived before the upstream connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _Upstream(self.transport), HOST, self.upstream_port)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        self.upstream.write(b"".join(self.early))

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(upstream_port: int, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(upstream_port), HOST, port)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
