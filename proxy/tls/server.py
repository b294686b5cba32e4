"""The listener's TLS (``listen.tls``): its SSLContext, certificate reload, and a listener
that looks at each client's first byte before deciding how to serve it.

Accepting is done here rather than by ``loop.create_server(ssl=...)`` for three reasons:

* reload: every connection is handed the context current at its accept
  (``connect_accepted_socket(ssl=...)``), so new certificates apply to new handshakes
  while open connections keep theirs;
* a client that does not speak TLS (its first byte is not 0x16, a TLS handshake record)
  is recognised as such: refused with one MongoDB-style error reply and one log line,
  or, with ``allow_plaintext``, served in plaintext;
* a failed handshake (wrong CA, no client certificate, expired certificate) is logged
  once, as one line naming the client, never as a traceback.

Each client's handshake runs in its own task: a slow or failing client delays no other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import bson
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.errors import error_document
from proxy.wire import HEADER_SIZE, OpCode, declared_length, encode_op_msg
from proxy.wire.op_query import encode_op_reply

if TYPE_CHECKING:
    from proxy.tls.config import ListenTLSConfig

__all__ = ["ServerTLS", "TLSListener", "TLSMetrics", "build_server_context",
           "describe_tls_error"]

log = logging.getLogger("mongoproxy.tls")

TLS_HANDSHAKE_RECORD = 0x16
# How often the certificate files are checked for changes.
POLL_INTERVAL_S = 1.0
# A plaintext client's first message is read (to answer it) up to this size.
_MAX_REFUSED_MESSAGE = 64 * 1024
_TLS_REQUIRED = (141, "SSLHandshakeFailed")
_VERIFY_MODES = {
    "none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED,
}
# OpenSSL's reasons for the usual failures, in an operator's words.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        "the client sent no certificate (listen.tls.client_certificates: required)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the proxy's certificate "
                              "(unknown CA: give the client the CA of listen.tls.cert_file)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected the proxy's certificate",
    "UNSUPPORTED_PROTOCOL": "the client's TLS version is below listen.tls.min_version",
    "WRONG_VERSION_NUMBER": "not a TLS client",
}
_VERSIONS = {"TLS1.2": ssl.TLSVersion.TLSv1_2, "TLS1.3": ssl.TLSVersion.TLSv1_3}


def build_server_context(config: ListenTLSConfig) -> ssl.SSLContext:
    """A new server context from the files named in ``config`` (read now)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.min_version]
    # As mongod: no TLS compression (CRIME) and no renegotiation.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    check_readable(config.cert_file, config.key_file, config.ca_file)
    context.load_cert_chain(config.cert_file, config.key_file)
    if config.ca_file is not None:
        context.load_verify_locations(cafile=config.ca_file)
    context.verify_mode = _VERIFY_MODES[config.client_certificates]
    return context


def check_readable(*paths: str | None) -> None:
    """OSError naming the file (``load_cert_chain``'s own error does not name it)."""
    for path in paths:
        if path is not None:
            with open(path, "rb"):
                pass


def describe_tls_error(exc: BaseException) -> str:
    """One line saying what did not load, without a traceback."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"cannot read {exc.filename}: {exc.strerror}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.args[-1]
        return f"certificate or key does not load ({reason}: {exc.args[-1]})"
    return str(exc)


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int] | None, ...]:
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class ServerTLS:
    """The listener's current SSLContext, rebuilt when its files change or on SIGHUP.

    A rebuild that fails (a missing file, a key that does not match its certificate)
    keeps the current context and logs why; connections already open are never touched.
    """

    def __init__(self, config: ListenTLSConfig) -> None:
        self.config = config
        self._files = tuple(p for p in (config.cert_file, config.key_file, config.ca_file)
                            if p is not None)
        self._seen = _stamp(self._files)
        self.context = build_server_context(config)
        self.reloads = 0
        self.failed_reloads = 0
        self._watch: asyncio.Task[None] | None = None

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Load the files again; False (and the old context kept) if they do not load.
        ``trigger`` (SIGHUP, file change) is named in the log line."""
        self._seen = _stamp(self._files)
        try:
            context = build_server_context(self.config)
        except (OSError, ValueError) as exc:
            self.failed_reloads += 1
            log.error("TLS certificate reload (%s) failed, keeping the current certificate: "
                      "%s", trigger, describe_tls_error(exc))
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificate reloaded (%s) from %s", trigger, self.config.cert_file)
        return True

    def start_watching(self) -> None:
        self._watch = asyncio.create_task(self._poll(), name="tls certificate watch")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            stamp = _stamp(self._files)
            # A file mid-replacement (missing) is not reloaded: the next poll sees it.
            if stamp != self._seen and None not in stamp:
                self.reload("file change")


class TLSListener:
    """Accepts clients on ``host:port`` and hands each, once its TLS handshake is done,
    to ``protocol_factory``'s protocol (as ``create_server`` would)."""

    def __init__(
        self, protocol_factory: Callable[[], asyncio.Protocol], tls: ServerTLS,
        sock: socket.socket,
    ) -> None:
        self._factory = protocol_factory
        self.tls = tls
        self._sock = sock
        self.sockets = [sock]
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(tls.config.max_pending_handshakes)
        # Counters for tests and metrics: failed handshakes, refused plaintext clients.
        self.handshake_failures = 0
        self.plaintext_refused = 0

    @classmethod
    async def start(
        cls, protocol_factory: Callable[[], asyncio.Protocol], tls: ServerTLS,
        host: str, port: int, backlog: int = 4096,
    ) -> TLSListener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::" and the like
        sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        listener = cls(protocol_factory, tls, sock)
        listener._accepting = asyncio.create_task(listener._accept_loop(), name="tls accept")
        return listener

    def close(self) -> None:
        """Stop accepting; handshakes in progress are abandoned."""
        if self._accepting is not None:
            self._accepting.cancel()
        for task in self._pending:
            task.cancel()
        self._sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots
        while True:
            await slots.acquire()  # released when the client's handshake is over
            try:
                client, peer = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: wait, do not spin
                slots.release()
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._admit(client, peer))
            self._pending.add(task)
            task.add_done_callback(self._admitted)

    def _admitted(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._slots.release()

    async def _admit(self, client: socket.socket, peer: Any) -> None:
        config = self.tls.config
        timeout_s = config.handshake_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        try:
            client.setblocking(False)  # _peek must never block the loop
            async with asyncio.timeout(timeout_s):
                first = await _peek(loop, client)
            if not first:
                client.close()  # gone before saying anything (a port probe)
                return
            if first[0] != TLS_HANDSHAKE_RECORD:
                if not config.allow_plaintext:
                    self.plaintext_refused += 1
                    log.warning("refused a plaintext connection from %s: listen.tls requires "
                                "TLS (the client must connect with tls=true)", _peer(peer))
                    await _refuse_plaintext(loop, client, timeout_s)
                    return
                await loop.connect_accepted_socket(self._factory, client)
                return
            await loop.connect_accepted_socket(
                self._factory, client, ssl=self.tls.context,
                ssl_handshake_timeout=timeout_s)
        except asyncio.CancelledError:
            client.close()
            raise
        except (OSError, TimeoutError, EOFError) as exc:
            # ssl.SSLError is an OSError: a wrong CA, a missing client certificate...
            self.handshake_failures += 1
            log.warning("TLS handshake with %s failed: %s", _peer(peer), _handshake_reason(exc))
            client.close()


async def _peek(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes:
    """The client's first byte, left in the socket for whoever reads it next."""
    while True:
        try:
            return client.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        ready = loop.create_future()
        # Level-triggered: the reader may fire again before this task resumes.
        loop.add_reader(client.fileno(), _set_ready, ready)
        try:
            await ready
        finally:
            loop.remove_reader(client.fileno())


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _refuse_plaintext(
    loop: asyncio.AbstractEventLoop, client: socket.socket, timeout_s: float
) -> None:
    """Answer the plaintext client's first message with an error saying TLS is required
    (so the driver shows it), then close."""
    try:
        async with asyncio.timeout(timeout_s):
            message = b""
            while len(message) < HEADER_SIZE or len(message) < declared_length(message):
                chunk = await loop.sock_recv(client, _MAX_REFUSED_MESSAGE)
                if not chunk:
                    return
                message += chunk
                if len(message) >= HEADER_SIZE and not (
                        HEADER_SIZE <= declared_length(message) <= _MAX_REFUSED_MESSAGE):
                    return
            reply = _tls_required_reply(message)
            if reply is not None:
                await loop.sock_sendall(client, reply)
    except (OSError, TimeoutError):
        pass
    finally:
        client.close()


def _tls_required_reply(message: bytes) -> bytes | None:
    request_id = int.from_bytes(message[4:8], "little", signed=True)
    op_code = int.from_bytes(message[12:16], "little", signed=True)
    doc = bson.encode(error_document(
        *_TLS_REQUIRED, "mongoproxy: this listener requires TLS; connect with tls=true"))
    if op_code == OpCode.OP_MSG:
        return encode_op_msg(0, request_id, doc)
    if op_code == OpCode.OP_QUERY:
        return encode_op_reply(0, request_id, [doc])
    return None


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"client certificate not accepted: {exc.verify_message} "
                "(verified against listen.tls.ca_file)")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        return _REASONS.get(reason, reason)
    if isinstance(exc, TimeoutError):
        return "not completed in time"
    return f"{type(exc).__name__}: {exc}"


class TLSMetrics(Collector):
    """The listener's TLS counters on the proxy's Prometheus registry."""

    def __init__(self, tls: ServerTLS, listener: TLSListener) -> None:
        self.tls = tls
        self.listener = listener

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "mongoproxy_tls_handshake_failures",
            "Client TLS handshakes that failed or timed out (each logged once)",
            value=self.listener.handshake_failures)
        yield CounterMetricFamily(
            "mongoproxy_tls_plaintext_refused",
            "Plaintext clients refused by a TLS listener (allow_plaintext: false)",
            value=self.listener.plaintext_refused)
        reloads = CounterMetricFamily(
            "mongoproxy_tls_certificate_reloads",
            "Reloads of the listener's certificate files, by result", labels=["result"])
        reloads.add_metric(["ok"], self.tls.reloads)
        reloads.add_metric(["failed"], self.tls.failed_reloads)
        yield reloads
