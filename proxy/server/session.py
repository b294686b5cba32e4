"""One client connection's loop: read a message, run the pipeline, write its reply.

This is the only place that touches client sockets (through
:class:`~proxy.server.stream.ClientStream`). Messages on one connection are handled in
order (drivers never pipeline requests on a connection), so a slow reply for one client
never delays another. Each connection has its limits (message size, idle, login and
write timeouts, the pre-login message rate: :class:`~proxy.server.session_limits.SessionLimits`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from proxy.config import Config
from proxy.errors import SHUTDOWN_IN_PROGRESS, ProxyError
from proxy.pipeline import Pipeline, Reply
from proxy.pipeline.reply import error_message
from proxy.server.session_limits import SessionLimits
from proxy.server.stream import ClientStream, IdleTimeoutError, StalledMessageError
from proxy.wire import WireError, parse_header

__all__ = ["ClientSession", "Live"]

log = logging.getLogger("mongoproxy.connection")


class Live(Protocol):
    """What a session reads of the running proxy per request."""

    config: Config
    shutting_down: bool


class ClientSession:
    """Serves one client socket until it closes or the proxy shuts down."""

    __slots__ = ("busy", "limits", "live", "pipeline", "session", "stream")

    def __init__(self, live: Live, pipeline: Pipeline, stream: ClientStream,
                 connection_id: int) -> None:
        self.live = live
        self.pipeline = pipeline
        self.stream = stream
        self.session = pipeline.session(connection_id, stream.peer)
        self.limits = SessionLimits(live.config.listen, pipeline.users_configured)
        # True while a request is being handled: shutdown waits for these.
        self.busy = False

    @property
    def connection_id(self) -> int:
        return self.session.connection_id

    async def serve(self) -> None:
        stream, pipeline, session, live = self.stream, self.pipeline, self.session, self.live
        try:
            while True:
                received = await self._read_message()
                if received is None:
                    return
                # One snapshot per request, taken when it has arrived (a reload while the
                # connection was idle applies to its next request).
                config = live.config
                message, started_ns = received
                if live.shutting_down:
                    stream.write(error_message(parse_header(message).request_id, ProxyError(
                        SHUTDOWN_IN_PROGRESS, "mongoproxy is shutting down")))
                    return
                self.busy = True
                session.in_flight_since = started_ns
                try:
                    reply = await pipeline.handle_message(message, started_ns, session,
                                                          config)
                    try:
                        self._send(reply)
                    finally:
                        if reply.access is None:  # nothing to await after the write
                            pipeline.written(reply, session)
                        else:
                            await pipeline.finish(reply, session)
                except asyncio.CancelledError:
                    interrupted = session.interrupted
                    if interrupted is not None:
                        session.interrupted = None
                        self._send(interrupted)
                        pipeline.record(interrupted, session)
                    raise
                finally:
                    self.busy = False
                if stream.paused and not await stream.drain(self.limits.write_timeout_s):
                    log.info("closing client %s: %s", session.peer,
                             self.limits.write_timeout_text)
                    return
        except ConnectionError:
            pass  # the client went away; nothing to answer
        except WireError as exc:
            # Only fatal framing errors reach here: answered, then the stream is closed.
            log.info("closing client %s: %s", session.peer, exc.errmsg)
        finally:
            stream.close()
            pipeline.departed(session)

    def _send(self, reply: Reply) -> None:
        parts = reply.parts
        if len(parts) == 1:
            self.stream.write(parts[0])
        elif parts:
            self.stream.writelines(parts)

    def close(self) -> None:
        """Close the client socket (an idle connection at shutdown)."""
        self.stream.close()

    async def _read_message(self) -> tuple[bytes, int] | None:
        """The next whole message and when its first byte arrived (perf_counter ns), or
        None once the client closed its end."""
        limits, session = self.limits, self.session
        identity = session.identity
        if session.login_requested:
            limits.login_started()
        try:
            received = await self.stream.next_message(
                limits.max_size(identity), limits.read_timeout_s, limits.wait_s(identity))
            if limits.paced(identity):
                await limits.pace()
            return received
        except IdleTimeoutError as exc:
            raise limits.timed_out(identity, exc) from None
        except StalledMessageError:
            raise
        except WireError as exc:  # a header that cannot be framed: say why, then close
            self.stream.write(error_message(exc.request_id or 0, exc))
            await self.stream.drain(limits.write_timeout_s)
            raise
