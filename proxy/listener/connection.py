"""One client connection: read a message, answer it or forward it, write the reply.

This is the only place that touches client sockets. Messages on one connection are
handled in order (drivers never pipeline requests on a connection), so a slow reply
for one client never delays another.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import bson

from proxy.cache.layer import Access
from proxy.classify import NO_CONTEXT, Classification, ClientContext, classify
from proxy.errors import (
    BAD_VALUE,
    COMMAND_NOT_FOUND,
    HOST_UNREACHABLE,
    INTERNAL_ERROR,
    NETWORK_TIMEOUT,
    NOT_PRIMARY_CODES,
    SHUTDOWN_IN_PROGRESS,
    UNAUTHORIZED,
    UNSUPPORTED_OP_QUERY,
    ProxyError,
    error_document,
    network_error_labels,
)
from proxy.identity.handshake import HELLO_COMMANDS, hello_reply, read_client_hello
from proxy.identity.scram import AUTH_COMMANDS, AuthenticatedUser
from proxy.listener.stream import ClientStream, StalledMessageError
from proxy.observe.record import Timer
from proxy.observe.shape import describe
from proxy.pool.connection import UpstreamConnection, UpstreamProtocolError, next_request_id
from proxy.pool.pool import ConnectFailed, UpstreamPool
from proxy.route.cursors import CURSOR_COMMANDS, Address
from proxy.route.readpref import PRIMARY, ReadPreferenceError, from_command
from proxy.route.rules import RouteDecision, decide
from proxy.tenancy.gate import Admission, admit
from proxy.tenancy.policy import SAFE_DATABASE_COMMANDS
from proxy.wire import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_EXHAUST_ALLOWED,
    FLAG_MORE_TO_COME,
    HEADER_SIZE,
    REPLY_FLAG_QUERY_FAILURE,
    DocumentSequence,
    OpCode,
    OpMsg,
    WireError,
    compress,
    decode_body,
    decompress,
    encode_op_msg,
    encode_op_reply,
    pack_header,
    parse_header,
    parse_op_msg,
    parse_op_query,
    reply_cursor,
    reply_error_code,
    with_flags,
)

if TYPE_CHECKING:
    from proxy.app import Proxy

log = logging.getLogger("mongoproxy.connection")

# Flags the upstream must not see: exhaust replies would stream several messages into a
# pooled connection (the client falls back to plain getMore), moreToCome would leave the
# exchange without a reply to wait for (the proxy reads and drops it instead), and the
# checksum would be wrong once any flag changes.
_STRIPPED_FLAGS = FLAG_EXHAUST_ALLOWED | FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME
_REMOVED_OPCODES = {
    OpCode.OP_INSERT: "OP_INSERT",
    OpCode.OP_UPDATE: "OP_UPDATE",
    OpCode.OP_DELETE: "OP_DELETE",
    OpCode.OP_GET_MORE: "OP_GET_MORE",
    OpCode.OP_KILL_CURSORS: "OP_KILL_CURSORS",
}


class ClientConnection:
    """Serves one client socket until it closes or the proxy shuts down."""

    def __init__(
        self,
        proxy: Proxy,
        stream: ClientStream,
        connection_id: int,
    ) -> None:
        self.proxy = proxy
        self.stream = stream
        self.connection_id = connection_id
        self.app_name: str | None = None
        self.context = NO_CONTEXT
        self.auth = proxy.authenticator.session()
        self.identity: AuthenticatedUser | None = None
        self.compressors: list[str] = []
        self.peer = stream.peer
        # True while a request is being handled: shutdown waits for these.
        self.busy = False
        # For GET /connections (proxy.admin.connections): when the connection was
        # accepted, and the command in flight (its name) since when (perf_counter ns).
        self.connected_at = time.monotonic()
        self.in_flight: str | None = None
        self.in_flight_since = 0

    async def serve(self) -> None:
        try:
            while True:
                received = await self._read_message()
                if received is None:
                    return
                message, started_ns = received
                if self.proxy.shutting_down:
                    self._reply_error_to(message, ProxyError(
                        SHUTDOWN_IN_PROGRESS, "mongoproxy is shutting down"))
                    return
                self.busy = True
                self.in_flight_since = started_ns
                try:
                    await self._handle(message, Timer(started_ns))
                finally:
                    self.busy = False
                    self.in_flight = None
                if self.stream.paused:
                    await self.stream.drain()
        except ConnectionError:
            pass  # the client went away; nothing to answer
        except WireError as exc:
            # Only fatal framing errors reach here: answered, then the stream is closed.
            log.info("closing client %s: %s", self.peer, exc.errmsg)
        finally:
            self.stream.close()
            self.proxy.release_cursors(self.connection_id)

    def close(self) -> None:
        """Close the client socket (an idle connection at shutdown)."""
        self.stream.close()

    async def _read_message(self) -> tuple[bytes, int] | None:
        """The next whole message and when its first byte arrived (perf_counter ns), or
        None once the client closed its end."""
        listen = self.proxy.config.listen
        try:
            return await self.stream.next_message(
                listen.max_message_size_bytes, listen.read_timeout_ms / 1000)
        except StalledMessageError:
            raise
        except WireError as exc:  # a header that cannot be framed: say why, then close
            self._write_op_msg(exc.request_id or 0, _wire_error_document(exc))
            await self.stream.drain()
            raise

    async def _handle(self, message: bytes, timer: Timer) -> None:
        timer.mark("read")
        header = parse_header(message)
        op_code, request_id = header.op_code, header.request_id
        compressor: str | None = None
        try:
            if op_code == OpCode.OP_COMPRESSED:
                message, compressor = decompress(
                    message, self.proxy.config.listen.max_message_size_bytes
                )
                op_code = parse_header(message).op_code
            if op_code == OpCode.OP_MSG:
                await self._handle_op_msg(message, compressor, timer)
            elif op_code == OpCode.OP_QUERY:
                self._handle_op_query(message)
            elif op_code in _REMOVED_OPCODES:
                raise WireError(
                    f"opcode {_REMOVED_OPCODES[OpCode(op_code)]} ({op_code}) was removed in "
                    "MongoDB 5.1 and is not supported; use OP_MSG"
                )
            else:
                raise WireError(f"unknown opcode {op_code}")
        except WireError as exc:
            if op_code == OpCode.OP_QUERY:
                self._write_query_failure(request_id, _wire_error_document(exc))
            else:
                self._write_op_msg(request_id, _wire_error_document(exc))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # A bug must cost one error reply, never the client's connection.
            log.exception("internal error handling request %d from client %d",
                          request_id, self.connection_id)
            self._write_op_msg(request_id, ProxyError(
                INTERNAL_ERROR, f"mongoproxy internal error: {type(exc).__name__}: {exc}"
            ).document())

    async def _handle_op_msg(self, message: bytes, compressor: str | None, timer: Timer) -> None:
        msg = parse_op_msg(message)
        command = decode_body(msg)
        timer.mark("decode")
        name = next(iter(command), None)
        if name is None:
            raise WireError("OP_MSG body is an empty document: no command",
                            code=COMMAND_NOT_FOUND[0], code_name=COMMAND_NOT_FOUND[1])
        self.in_flight = name
        if name in HELLO_COMMANDS:
            # Handshakes and heartbeats are not operations: they are neither timed nor logged.
            self._write_op_msg(msg.request_id, self._hello(name, command))
        elif name in AUTH_COMMANDS:
            reply, user = self.auth.handle(command)
            if user is not None:
                self.identity = user
                self._set_context()
            elif not reply.get("ok"):
                log.info("client %d: %s failed: %s", self.connection_id, name,
                         self.auth.last_failure)
            self._write_op_msg(msg.request_id, reply)
            # The payload carries the client's proof: never logged, even with log_values.
            self._record(timer, name, {name: 1, "$db": command.get("$db")}, msg,
                         error_code=reply.get("code"))
        else:
            admission = admit(
                self.proxy.policy, name, command, msg.body, msg.sequences,
                users_configured=len(self.proxy.authenticator) > 0,
                bound_tenant=self.identity.tenant if self.identity else None,
                cursor_tenant=self.proxy.cursors.tenant_of,
            )
            if admission.refused is not None or admission.violation is not None:
                self._tenancy_event(name, command, admission)
            elif admission.superuser and name not in SAFE_DATABASE_COMMANDS:
                self._superuser_event(name, admission)
            if admission.refused is not None:
                error = ProxyError(UNAUTHORIZED, admission.refused)
                self._refuse(timer, name, command, msg, error, None)
                return
            tenant = admission.tenant if admission.tenant is not None else (
                self.identity.tenant if self.identity else None)
            sequences = msg.sequences
            injected = admission.command is not None or admission.sequences is not None
            if injected:
                command, sequences = _with_injected(msg, command, admission)
            classification = classify(command, self.context)
            decision = self._decide(command, classification)
            timer.mark("policy")
            if isinstance(decision, ProxyError):  # an unusable $readPreference
                self._refuse(timer, name, command, msg, decision, None)
                return
            if decision.deny is not None:  # a class that denies the command
                self._refuse(timer, name, command, msg, decision.error(), decision)
                return
            rewritten = _rewrite_for_route(command, decision)
            if rewritten is not None:
                command = rewritten
            if injected or rewritten is not None:
                message = encode_op_msg(msg.request_id, msg.response_to, bson.encode(command),
                                        sequences, msg.flags & ~_STRIPPED_FLAGS)
            elif msg.flags & _STRIPPED_FLAGS:
                message = with_flags(message, msg.flags & ~_STRIPPED_FLAGS)
            access = self._cache_access(command, classification, decision, tenant, sequences,
                                        msg.more_to_come)
            await self._forward(message, msg, command, decision, compressor, timer, tenant,
                                access)

    def _cache_access(
        self,
        command: Mapping[str, Any],
        classification: Classification,
        decision: RouteDecision,
        tenant: Any,
        sequences: tuple[DocumentSequence, ...],
        more_to_come: bool,
    ) -> Access | None:
        """The result cache's part in this command, as it will be forwarded (after
        tenancy and routing), or None without a cache."""
        cache = self.proxy.cache
        if cache is None:
            return None
        access = cache.begin(
            command, classification, decision,
            (self.identity.tenant if self.identity else None, tenant),
            has_sequences=bool(sequences),
            rules=self.proxy.config.cache or cache.config,
        )
        if access is not None and access.is_read and more_to_come:
            return None  # no reply expected: nothing to serve from the cache
        return access

    def _set_context(self) -> None:
        identity = self.identity
        self.context = ClientContext(
            app_name=self.app_name,
            user=identity.username if identity else None,
            tenant=identity.tenant if identity else None,
        )

    def _tenancy_event(self, name: str, command: Mapping[str, Any], admission: Admission) -> None:
        """One structured log line and one metric per refusal or audit violation."""
        mode = "audit" if admission.refused is None else "enforce"
        reason = admission.refused or admission.violation or ""
        target = command.get(name)
        collection = target if isinstance(target, str) else None
        log.warning("tenancy %s: %s", "violation" if mode == "audit" else "rejection",
                    self._tenancy_line(name, admission, reason))
        self.proxy.observer.metrics.tenancy_violation(
            collection or "", _reason_label(reason), mode=mode,
            tenant=self.identity.tenant if self.identity else None,
        )

    def _superuser_event(self, name: str, admission: Admission) -> None:
        """A "*" user's command passes unchecked: one audit line says who ran what where."""
        log.info("tenancy superuser: %s",
                 self._tenancy_line(name, admission, "'*' identity: not checked"))

    def _tenancy_line(self, name: str, admission: Admission, reason: str) -> str:
        return json.dumps({
            "tenant": self.identity.tenant if self.identity else None,
            "user": self.identity.username if self.identity else None,
            "app_name": self.app_name,
            "command": name,
            "namespace": admission.namespace,
            "reason": reason,
            "connection_id": self.connection_id,
        })

    def _refuse(
        self,
        timer: Timer,
        name: str,
        command: Mapping[str, Any],
        msg: OpMsg,
        error: ProxyError,
        decision: RouteDecision | None,
    ) -> None:
        reply = bson.encode(error.document())
        self._write(encode_op_msg(next_request_id(), msg.request_id, reply))
        self._record(timer, name, command, msg, error_code=error.code, decision=decision,
                     reply_bytes=HEADER_SIZE + 5 + len(reply))

    def _decide(
        self, command: Mapping[str, Any], classification: Classification
    ) -> RouteDecision | ProxyError:
        """The routing rules' decision for a command (which may deny it), or the error
        for a ``$readPreference`` that cannot be honoured."""
        try:
            client_preference = (
                from_command(command) if command.get("$readPreference") is not None else None
            )
        except ReadPreferenceError as exc:
            return ProxyError(BAD_VALUE, f"{next(iter(command))}: {exc}")
        return decide(classification, self.proxy.config.routing, client_preference)

    def _handle_op_query(self, message: bytes) -> None:
        query = parse_op_query(message)
        if query.collection.endswith(".$cmd"):
            command = _decode_query(query.query)
            name = next(iter(command), None)
            if name in HELLO_COMMANDS:
                reply = bson.encode(self._hello(str(name), command))
                self._write(encode_op_reply(next_request_id(), query.request_id, [reply]))
                return
        self._write_query_failure(query.request_id, error_document(
            *UNSUPPORTED_OP_QUERY,
            f"OP_QUERY on {query.collection} is only supported for the hello/isMaster "
            "handshake; use OP_MSG",
        ))

    def _hello(self, name: str, command: Mapping[str, Any]) -> dict[str, Any]:
        if "client" in command:  # the connection's first handshake; heartbeats omit it
            hello = read_client_hello(command, self.proxy.config.listen.compressors)
            self.app_name = hello.app_name
            self._set_context()
            self.compressors = hello.compressors
        reply = hello_reply(
            name,
            self.proxy.upstream_limits(),
            self.connection_id,
            self.compressors,
            datetime.datetime.now(datetime.UTC),
        )
        mechanisms = self.auth.supported_mechs(command)
        if mechanisms is not None:
            reply["saslSupportedMechs"] = mechanisms
        speculative = self.auth.speculative(command)
        if speculative is not None:
            reply["speculativeAuthenticate"] = speculative
        return reply

    async def _forward(
        self,
        message: bytes,
        msg: OpMsg,
        command: dict[str, Any],
        decision: RouteDecision,
        compressor: str | None,
        timer: Timer,
        tenant: Any,
        access: Access | None,
    ) -> None:
        name = next(iter(command))
        request_id, more_to_come = msg.request_id, msg.more_to_come
        address: Address | None = None
        error_code: int | None = None
        docs: int | None = None
        reply_bytes = 0
        try:
            if access is not None and access.is_read:
                cached = await access.lookup()
                timer.mark("cache")
                if cached is not None:
                    docs = reply_cursor(cached)[1]
                    reply_bytes = HEADER_SIZE + len(cached)
                    header = pack_header(reply_bytes, next_request_id(), request_id,
                                         OpCode.OP_MSG)
                    self._send_reply(header, cached, compressor)
                    timer.mark("write")
                    return
            try:
                address, conn, header, body = await self._exchange(
                    name, message, request_id, command, decision, timer
                )
            except ProxyError as exc:
                if access is not None:
                    await access.failed()  # a write may have been applied anyway
                error_code = exc.code
                log.warning("%s from client %d failed: %s", name, self.connection_id,
                            exc.errmsg)
                if not more_to_come:
                    self._write_op_msg(request_id, _with_network_labels(exc, command))
                return
            except asyncio.CancelledError:
                # Shutdown gave up waiting for this request: tell the client, then stop.
                error_code = SHUTDOWN_IN_PROGRESS[0]
                if not more_to_come:
                    self._write_op_msg(request_id, _with_network_labels(ProxyError(
                        SHUTDOWN_IN_PROGRESS, "mongoproxy shut down before the reply arrived"
                    ), command))
                raise
            error_code = reply_error_code(body)
            if error_code in NOT_PRIMARY_CODES:
                # SDAM marks such a server Unknown: select again instead of waiting for
                # the next heartbeat.
                self.proxy.topology.mark_failed(address)
            docs = self._bookkeeping(name, command, address, conn, body, tenant)
            reply_bytes = len(header) + len(body)
            if access is not None:
                # Before the client sees the reply: a write's invalidation must precede
                # its acknowledgement (read-your-writes across instances).
                await access.replied(body)
                timer.mark("cache")
            if more_to_come:
                return  # fire-and-forget: the client reads no reply
            self._send_reply(header, body, compressor)
            timer.mark("write")
            if access is not None:
                await access.store()
                timer.mark("cache")
        finally:
            if access is not None:
                access.abandon()  # waiters on this request's flight never hang
            self._record(timer, name, command, msg, address=address, error_code=error_code,
                         docs=docs, reply_bytes=reply_bytes, decision=decision, tenant=tenant,
                         cache=None if access is None else access.result)

    def _send_reply(self, header: bytes, body: bytes, compressor: str | None) -> None:
        """Write a reply, compressed when the client's request was."""
        if compressor is not None and compressor in self.compressors:
            self._write(compress(header + body, compressor,
                                 self.proxy.config.listen.zlib_compression_level))
        else:
            self.stream.writelines((header, body))

    async def _exchange(
        self,
        name: str,
        message: bytes,
        request_id: int,
        command: Mapping[str, Any],
        decision: RouteDecision,
        timer: Timer,
    ) -> tuple[Address, UpstreamConnection, bytes, bytes]:
        """Select a server, send the request on a pooled connection, read the reply.

        Always reads a reply: the moreToCome flag was cleared before forwarding, because
        a pooled connection must never be left with an unread reply (FerretDB answers
        moreToCome messages anyway) and the next request on this client connection
        should see the fire-and-forget write.
        """
        address = await self.proxy.router.server_for(name, command, decision)
        timer.mark("select")
        pool = self.proxy.pools.get(address)
        slots = None if decision.pinned == "cursor" else pool.ordinary_slots
        if slots is not None:
            await _acquire(slots, pool)
        try:
            return await self._exchange_on(pool, address, name, message, request_id, timer)
        finally:
            if slots is not None:
                slots.release()

    async def _exchange_on(
        self,
        pool: UpstreamPool,
        address: Address,
        name: str,
        message: bytes,
        request_id: int,
        timer: Timer,
    ) -> tuple[Address, UpstreamConnection, bytes, bytes]:
        try:
            conn = await pool.checkout()
        except ConnectFailed:
            # Between heartbeats, a refused connect is the first sign the server is down.
            self.proxy.topology.mark_failed(address)
            pool.clear()
            raise
        timer.mark("checkout_wait")
        timeout_ms = self.proxy.config.upstream.socket_timeout_ms
        reusable = False
        try:
            header, body = await conn.exchange(message, request_id, timeout_ms / 1000)
            reusable = True
        except TimeoutError:
            self.proxy.topology.mark_failed(address)
            raise ProxyError(
                NETWORK_TIMEOUT,
                f"no reply from upstream {pool.label} to {name} within {timeout_ms} ms",
            ) from None
        except (OSError, asyncio.IncompleteReadError, UpstreamProtocolError) as exc:
            # The server (or the path to it) failed: its other idle connections are
            # suspect too, as SDAM clears a pool on a network error.
            self.proxy.topology.mark_failed(address)
            pool.clear()
            raise ProxyError(
                HOST_UNREACHABLE,
                f"connection to upstream {pool.label} failed during {name}: {_describe(exc)}",
            ) from None
        finally:
            pool.checkin(conn, reusable)
        timer.mark("upstream")
        return address, conn, header, body

    def _bookkeeping(
        self,
        name: str,
        command: Mapping[str, Any],
        address: Address,
        conn: UpstreamConnection,
        reply: bytes,
        tenant: Any,
    ) -> int | None:
        """Cursor state that later requests are routed by; returns the batch length."""
        if name not in CURSOR_COMMANDS:
            if name == "killCursors":
                for cursor_id in command.get("cursors") or ():
                    if isinstance(cursor_id, int):
                        self.proxy.cursors.remove(cursor_id)
            return None
        cursor_id, docs = reply_cursor(reply)
        if name == "getMore":
            # Exhausted (id 0), or gone on the server (an error reply has no cursor).
            if cursor_id is None or cursor_id == 0:
                self.proxy.cursors.remove(command["getMore"])
        elif cursor_id:
            self.proxy.cursors.add(cursor_id, address, _namespace(name, command),
                                   self.connection_id, conn, tenant)
        return docs

    def _record(
        self,
        timer: Timer,
        name: str,
        command: Mapping[str, Any],
        msg: OpMsg,
        *,
        address: Address | None = None,
        error_code: int | None = None,
        docs: int | None = None,
        reply_bytes: int = 0,
        decision: RouteDecision | None = None,
        tenant: Any = None,
        cache: str | None = None,
    ) -> None:
        """Hand one finished operation to the observer (metrics, digest, slow log)."""
        database = command.get("$db")
        target = command.get("collection" if name == "getMore" else name)
        shape = describe(command, _statement_samples(msg))
        self.proxy.observer.finish(timer.record(
            name,
            database=database if isinstance(database, str) else None,
            collection=target if isinstance(target, str) else None,
            shape_hash=shape.hash,
            shape_text=shape.text,
            app_name=self.app_name,
            tenant=None if tenant is None else str(tenant),
            user=self.identity.username if self.identity else None,
            route_class=None if decision is None else decision.class_name,
            route_rule=None if decision is None else decision.rule_index,
            member=None if address is None else _member_label(address),
            member_role=None if address is None else self.proxy.topology.role_of(address),
            cache=cache,
            docs_returned=docs,
            reply_bytes=reply_bytes,
            error_code=error_code,
            connection_id=self.connection_id,
            raw_command=command,
        ))

    def _write(self, data: bytes) -> None:
        self.stream.write(data)

    def _write_op_msg(self, response_to: int, document: Mapping[str, Any]) -> None:
        self._write(encode_op_msg(next_request_id(), response_to, bson.encode(document)))

    def _write_query_failure(self, response_to: int, document: Mapping[str, Any]) -> None:
        legacy = {"$err": document["errmsg"], **document}
        self._write(encode_op_reply(next_request_id(), response_to, [bson.encode(legacy)],
                                    flags=REPLY_FLAG_QUERY_FAILURE))

    def _reply_error_to(self, message: bytes, error: ProxyError) -> None:
        self._write_op_msg(parse_header(message).request_id, error.document())


# Statements of update/delete batches sampled for the query shape: enough to see the
# batch's distinct shapes without decoding a large batch.
_SHAPE_SAMPLE = 8


async def _acquire(slots: asyncio.Semaphore, pool: UpstreamPool) -> None:
    """Take one of the pool's slots for cursor-opening requests, within the wait limit."""
    if not slots.locked():
        await slots.acquire()  # a free slot: taken at once, no timeout scope needed
        return
    timeout_ms = pool.config.wait_queue_timeout_ms
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            await slots.acquire()
    except TimeoutError:
        raise ProxyError(
            NETWORK_TIMEOUT,
            f"timed out after {timeout_ms} ms waiting for a connection to upstream "
            f"{pool.label} (pool max_size {pool.config.max_size}, all in use)",
        ) from None


_MEMBER_LABELS: dict[Address, str] = {}


def _member_label(address: Address) -> str:
    """The "host:port" label, formatted once per server (on every operation record)."""
    label = _MEMBER_LABELS.get(address)
    if label is None:
        if len(_MEMBER_LABELS) > 1024:  # servers come and go over a long run
            _MEMBER_LABELS.clear()
        label = _MEMBER_LABELS[address] = f"{address[0]}:{address[1]}"
    return label


def _reason_label(reason: str) -> str:
    """A bounded metric label for a refusal reason: its leading words, no values."""
    head = reason.split(":", 1)[-1].strip()
    return " ".join(word for word in head.split()[:4] if '"' not in word and "'" not in word)


def _with_injected(
    msg: OpMsg, command: dict[str, Any], admission: Admission
) -> tuple[dict[str, Any], tuple[DocumentSequence, ...]]:
    """Inject mode: the command body and document sequences with the tenant added."""
    replaced = admission.sequences or {}
    sequences = tuple(
        DocumentSequence(seq.identifier,
                         b"".join(bson.encode(d) for d in replaced[seq.identifier]))
        if seq.identifier in replaced else seq
        for seq in msg.sequences
    )
    return (admission.command if admission.command is not None else command), sequences


def _rewrite_for_route(
    command: dict[str, Any], decision: RouteDecision
) -> dict[str, Any] | None:
    """The command as the route needs it forwarded, or None when it needs no change.

    A class may cap or inject ``maxTimeMS``; and when it sends a read to a non-primary
    member, the ``$readPreference`` must say so, or a replica-set secondary refuses the
    read (NotPrimaryNoSecondaryOk).
    """
    changes: dict[str, Any] = {}
    if decision.max_time_ms is not None:
        changes["maxTimeMS"] = decision.max_time_ms
    if decision.pinned is None and decision.read_preference.mode != PRIMARY.mode:
        wanted = decision.read_preference.document
        if command.get("$readPreference") != wanted:
            changes["$readPreference"] = wanted
    if not changes:
        return None
    return {**command, **changes}


def _statement_samples(msg: OpMsg) -> dict[str, list[dict[str, Any]]] | None:
    samples = {}
    for sequence in msg.sequences:
        if sequence.identifier in ("updates", "deletes"):
            docs = sequence.documents()[:_SHAPE_SAMPLE]
            samples[sequence.identifier] = [bson.decode(doc) for doc in docs]
    return samples or None


def _namespace(name: str, command: Mapping[str, Any]) -> str:
    target = command.get(name)
    if name == "listCollections" or not isinstance(target, str):
        target = f"$cmd.{name}"
    return f"{command.get('$db', 'admin')}.{target}"


def _wire_error_document(exc: WireError) -> dict[str, Any]:
    return error_document(exc.code, exc.code_name, exc.errmsg)


def _with_network_labels(exc: ProxyError, command: Mapping[str, Any]) -> dict[str, Any]:
    return error_document(exc.code, exc.code_name, exc.errmsg,
                          [*exc.labels, *network_error_labels(command)])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _decode_query(raw: bytes) -> dict[str, Any]:
    try:
        return bson.decode(raw)
    except Exception as exc:  # bson raises several types for corrupt input
        raise WireError(f"OP_QUERY query document is invalid BSON: {exc}", code=22,
                        code_name="InvalidBSON") from None

