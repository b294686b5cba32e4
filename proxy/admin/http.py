"""A minimal HTTP/1.1 server for operator endpoints.

Only GET of a few small JSON or text documents is needed, so a ~50-line asyncio server
beats pulling in a web framework. Every request is answered and the connection closed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("mongoproxy.admin")

# A handler gets the query parameters and returns (status, content type, body).
Handler = Callable[[dict[str, list[str]]], tuple[int, str, bytes]]
# An endpoint that must wait for something (the worker supervisor asks its workers).
AsyncHandler = Callable[[dict[str, list[str]]], Awaitable[tuple[int, str, bytes]]]


def json_response(status: int, document: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode() + b"\n"


class AdminServer:
    def __init__(self, routes: Mapping[str, Handler | AsyncHandler]) -> None:
        self.routes: dict[str, Handler | AsyncHandler] = dict(routes)
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def start_unix(self, path: str) -> None:
        """Serve on a unix socket (a worker's private endpoint, read by its supervisor)."""
        self.server = await asyncio.start_unix_server(self._serve, path)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """Where it serves, for the log: ``http://HOST:PORT`` or ``unix:PATH``."""
        assert self.server is not None
        name = self.server.sockets[0].getsockname()
        return f"unix:{name}" if isinstance(name, str) else f"http://{name[0]}:{name[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            status, ctype, body = await self._dispatch(request_line.decode("latin-1"))
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request_line: str) -> tuple[int, str, bytes]:
        parts = request_line.split()
        if len(parts) != 3:
            return json_response(400, {"error": "malformed request line"})
        method, target, _ = parts
        if method != "GET":
            return json_response(405, {"error": f"method {method} not allowed"})
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return json_response(404, {"error": f"no endpoint {url.path}"})
        try:
            reply = handler(parse_qs(url.query))
            return await reply if inspect.isawaitable(reply) else reply
        except Exception:
            log.exception("admin endpoint %s failed", url.path)
            return json_response(500, {"error": "internal error"})
