"""A minimal HTTP/1.1 server for operator endpoints.

Only GET of a few small JSON or text documents is needed, so a ~50-line asyncio server
beats pulling in a web framework. Every request is answered and the connection closed.

Hostile input is bounded: a request line or header line longer than
:data:`MAX_LINE_BYTES`, more than :data:`MAX_HEADERS` header lines, or a request not
complete within 10 s gets an error status (or, for the timeout, is closed), never a
traceback. With ``admin.token`` set, every request must carry ``Authorization: Bearer
<token>`` (401 otherwise), except the liveness and readiness probes (``/healthz``,
``/readyz``: load balancers and orchestrators call them without credentials); without
a token the port must stay private (docs/security.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("mongoproxy.admin")

# A handler gets the query parameters and returns (status, content type, body).
Handler = Callable[[dict[str, list[str]]], tuple[int, str, bytes]]

MAX_LINE_BYTES = 8192
MAX_HEADERS = 100
# Answered without the token: probes carry no credentials, and say nothing sensitive.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def json_response(status: int, document: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(document).encode() + b"\n"


class _TooLarge(Exception):
    pass


class AdminServer:
    def __init__(self, routes: dict[str, Handler], token: str | None = None) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self._token = None if token is None else f"Bearer {token}".encode()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=MAX_LINE_BYTES)

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
            try:
                async with asyncio.timeout(10):
                    request_line, authorization = await _read_request(reader)
            except _TooLarge:
                response = json_response(431, {"error": "request line or headers too large"})
            else:
                if self._token is not None and not _open(request_line) \
                        and not hmac.compare_digest(authorization, self._token):
                    response = json_response(401, {"error": "missing or wrong bearer token"})
                else:
                    response = self._dispatch(request_line.decode("latin-1"))
            status, ctype, body = response
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

    def _dispatch(self, request_line: str) -> tuple[int, str, bytes]:
        parts = request_line.split()
        if len(parts) != 3:
            return json_response(400, {"error": "malformed request line"})
        method, target, _ = parts
        if method != "GET":
            return json_response(405, {"error": f"method {method[:16]} not allowed"})
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return json_response(404, {"error": f"no endpoint {url.path[:200]}"})
        try:
            return handler(parse_qs(url.query))
        except Exception:
            log.exception("admin endpoint %s failed", url.path)
            return json_response(500, {"error": "internal error"})


def _open(request_line: bytes) -> bool:
    parts = request_line.split()
    return len(parts) == 3 and urlsplit(parts[1].decode("latin-1")).path in OPEN_PATHS


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The request line and the Authorization header's value (b"" if absent)."""
    request_line = await _line(reader)
    authorization = b""
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        if line in (b"\r\n", b"\n", b""):
            return request_line, authorization
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            authorization = value.strip()
    raise _TooLarge


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # the line is longer than the reader's limit
        raise _TooLarge from None
