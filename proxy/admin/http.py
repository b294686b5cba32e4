"""A minimal HTTP/1.1 server for operator endpoints.

Only GET of a few small JSON or text documents (and a POST or two for operator
actions, such as ``/digest/reset``) is needed, so a ~100-line asyncio server beats
pulling in a web framework. Every request is answered and the connection closed.
``GET /`` lists the endpoints (:mod:`proxy.admin.index`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("mongoproxy.admin")

# A handler gets the query parameters and returns (status, content type, body), or an
# awaitable of it (e.g. /readyz, which may run a round trip upstream).
Reply = tuple[int, str, bytes]
Handler = Callable[[dict[str, list[str]]], Reply | Awaitable[Reply]]
# A POST body is read (so closing never resets the connection) and ignored, up to this.
MAX_POST_BODY = 65_536


def json_response(status: int, document: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode() + b"\n"


class AdminServer:
    """``routes`` answer GET, ``post_routes`` answer POST (operator actions)."""

    def __init__(
        self, routes: dict[str, Handler], post_routes: dict[str, Handler] | None = None
    ) -> None:
        self.routes = routes
        self.post_routes = post_routes or {}
        if "/" not in routes:
            from proxy.admin.index import index_handler

            routes["/"] = index_handler(self.routes, self.post_routes)
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and value.strip().isdigit():
                        length = int(value)
                if length > MAX_POST_BODY:
                    status, ctype, body = json_response(
                        413, {"error": f"request body over {MAX_POST_BODY} bytes"})
                else:
                    if length:
                        await reader.readexactly(length)  # unused; read: close() is clean
                    status, ctype, body = await self._dispatch(request_line.decode("latin-1"))
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request_line: str) -> Reply:
        parts = request_line.split()
        if len(parts) != 3:
            return json_response(400, {"error": "malformed request line"})
        method, target, _ = parts
        url = urlsplit(target)
        routes = {"GET": self.routes, "POST": self.post_routes}.get(method)
        handler = None if routes is None else routes.get(url.path)
        if handler is None:
            allowed = [m for m, r in (("GET", self.routes), ("POST", self.post_routes))
                       if url.path in r]
            if allowed:
                return json_response(405, {"error": f"{url.path} takes "
                                                    f"{' or '.join(allowed)}, not {method}"})
            return json_response(404, {"error": f"no endpoint {url.path} (GET / lists them)"})
        try:
            reply = handler(parse_qs(url.query))
            return await reply if inspect.isawaitable(reply) else reply
        except Exception:
            log.exception("admin endpoint %s failed", url.path)
            return json_response(500, {"error": "internal error"})
