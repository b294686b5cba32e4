"""A minimal HTTP/1.1 server for operator endpoints.

Only GET of a few small JSON or text documents (and a POST or two for operator
actions, such as ``/digest/reset``) is needed, so a ~100-line asyncio server beats
pulling in a web framework. Every request is answered and the connection closed.
``GET /`` lists the endpoints (:mod:`proxy.admin.index`).

Hostile input is bounded: a request line or header line longer than
:data:`MAX_LINE_BYTES` or more than :data:`MAX_HEADERS` header lines get 431, a request
not complete within 10 s is closed, never a traceback. With ``admin.token`` set, every
request must carry ``Authorization: Bearer <token>`` (401 otherwise), except the
liveness and readiness probes (:data:`OPEN_PATHS`: load balancers and orchestrators
call them without credentials); without a token the port must stay private
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import hmac
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
MAX_LINE_BYTES = 8192
MAX_HEADERS = 100
# Answered without the token: probes carry no credentials, and say nothing sensitive.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def json_response(status: int, document: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode() + b"\n"


class AdminServer:
    """``routes`` answer GET, ``post_routes`` answer POST (operator actions)."""

    def __init__(
        self,
        routes: dict[str, Handler],
        post_routes: dict[str, Handler] | None = None,
        token: str | None = None,
    ) -> None:
        self.routes = routes
        self.post_routes = post_routes or {}
        if "/" not in routes:
            from proxy.admin.index import index_handler

            routes["/"] = index_handler(self.routes, self.post_routes)
        self.server: asyncio.Server | None = None
        self._token = None if token is None else f"Bearer {token}".encode()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=MAX_LINE_BYTES)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        """Serve on a unix socket (a worker's private endpoint, read by its supervisor)."""
        self.server = await asyncio.start_unix_server(self._serve, path)

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
                too_large = False
                try:
                    request_line, headers = await _read_head(reader)
                except _TooLarge:
                    request_line, headers, too_large = b"", {}, True
                length = int(headers.get(b"content-length", b"0"))
                if too_large:
                    status, ctype, body = json_response(
                        431, {"error": "request line or headers too large"})
                elif self._token is not None and not _open(request_line) and \
                        not hmac.compare_digest(headers.get(b"authorization", b""),
                                                self._token):
                    status, ctype, body = json_response(
                        401, {"error": "missing or wrong bearer token"})
                elif length > MAX_POST_BODY:
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
                                                    f"{' or '.join(allowed)}, not {method[:16]}"})
            return json_response(404, {"error": f"no endpoint {url.path[:200]} "
                                                "(GET / lists them)"})
        try:
            reply = handler(parse_qs(url.query))
            return await reply if inspect.isawaitable(reply) else reply
        except Exception:
            log.exception("admin endpoint %s failed", url.path)
            return json_response(500, {"error": "internal error"})


class _TooLarge(Exception):
    pass


def _open(request_line: bytes) -> bool:
    parts = request_line.split()
    return len(parts) == 3 and urlsplit(parts[1].decode("latin-1")).path in OPEN_PATHS


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    """The request line and the headers the server reads (names lower-cased)."""
    request_line = await _line(reader)
    headers: dict[bytes, bytes] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        if line in (b"\r\n", b"\n", b""):
            return request_line, headers
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in (b"content-length", b"authorization"):
            value = value.strip()
            if name == b"authorization" or value.isdigit():
                headers[name] = value
    raise _TooLarge


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # longer than the reader's limit (asyncio.LimitOverrunError)
        raise _TooLarge from None
