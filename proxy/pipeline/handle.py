"""The request pipeline: one message in, one :class:`Reply` out; no sockets.

``Pipeline.handle_message`` unwraps compression (negotiated compressors only, bounded,
large messages off the loop: ``proxy.pipeline.inflate``), dispatches on the opcode and
parses the :class:`~proxy.request.Request` once; ``Pipeline.handle`` runs the stages on
it, each a value in and a value out: the handshake and authentication (throttled:
``proxy.identity.throttle``) the proxy answers itself, what a connection may do before
login (``proxy.identity.preauth``), tenancy admission (``proxy.tenancy.gate.admit``), classification
(``proxy.classify.classify``), the routing decision (``proxy.route.rules.decide``),
the rewrite (``proxy.pipeline.rewrite``), the cache's part and the upstream exchange
(``proxy.cache.upstream.CachedUpstream`` around ``proxy.upstream.roundtrip.Roundtrip``).
Every refusal or failure is a :class:`~proxy.errors.ProxyError` answered in one way.
After the reply is written, ``Pipeline.finish`` stores a cache miss and records the
operation; nothing there can produce a second reply.

``snapshot`` is the configuration, read once per request (a reload swaps the object,
so a request sees the old rules or the new ones, never a mix).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import bson

from proxy.cache.upstream import CachedUpstream
from proxy.classify import classify
from proxy.commands import AUTH_COMMANDS, HELLO_COMMANDS, SAFE_DATABASE_COMMANDS
from proxy.config import Config
from proxy.errors import (
    BAD_VALUE,
    INTERNAL_ERROR,
    INVALID_BSON,
    SHUTDOWN_IN_PROGRESS,
    UNAUTHORIZED,
    UNSUPPORTED_OP_QUERY,
    ProxyError,
)
from proxy.identity.handshake import hello_reply, read_client_hello
from proxy.identity.preauth import message_limit, preauth_decision, preauth_reply, refusal
from proxy.identity.scram import ClientAuthenticator
from proxy.identity.throttle import AuthThrottle, authenticate
from proxy.observe.hub import Observer
from proxy.observe.record import Timer
from proxy.observe.shape import describe
from proxy.pipeline.audit import superuser_event, tenancy_event
from proxy.pipeline.inflate import inflate
from proxy.pipeline.placed import Placement
from proxy.pipeline.reply import NO_PARTS, Reply, error_message, message_for, query_failure
from proxy.pipeline.rewrite import forwarded_message, with_injected, with_route
from proxy.pipeline.session import Session
from proxy.placement.route import TRANSACTION_ENDS
from proxy.pool.connection import next_request_id
from proxy.request import Request, request_from_op_msg
from proxy.route.readpref import ReadPreferenceError, from_command
from proxy.route.rules import RouteDecision, decide
from proxy.tenancy import TenantPolicy
from proxy.tenancy.gate import admit
from proxy.upstream.roundtrip import Exchanged, Roundtrip
from proxy.wire import (
    OpCode,
    OpMsg,
    WireError,
    compress,
    encode_op_reply,
    parse_header,
    parse_op_msg,
    parse_op_query,
    reply_cursor,
)

__all__ = ["Pipeline"]

log = logging.getLogger("mongoproxy.connection")

_REMOVED_OPCODES = {
    OpCode.OP_INSERT: "OP_INSERT",
    OpCode.OP_UPDATE: "OP_UPDATE",
    OpCode.OP_DELETE: "OP_DELETE",
    OpCode.OP_GET_MORE: "OP_GET_MORE",
    OpCode.OP_KILL_CURSORS: "OP_KILL_CURSORS",
}
# Statements of update/delete batches sampled for the query shape: enough to see the
# batch's distinct shapes without decoding a large batch.
_SHAPE_SAMPLE = 8


class CursorLookup(Protocol):
    """Cursors opened in another process (proxy.worker_siblings)."""

    async def resolve(self, cursor_ids: Sequence[int]) -> None: ...


class Pipeline:
    """The stages of a request, wired once to the proxy's shared parts."""

    def __init__(
        self,
        *,
        roundtrip: Roundtrip,
        cached: CachedUpstream | None,
        policy: TenantPolicy,
        authenticator: ClientAuthenticator,
        throttle: AuthThrottle,
        observer: Observer,
    ) -> None:
        self.roundtrip = roundtrip
        self.cached = cached
        self.policy = policy
        self.authenticator = authenticator
        self.throttle = throttle
        self.observer = observer
        # With users configured, a connection must log in before anything else.
        self.users_configured = len(authenticator) > 0
        self._cursor_tenant = roundtrip.cursors.tenant_of  # bound once, not per request
        # listen.workers > 1: learns the cursors another worker opened (worker_siblings).
        self.siblings: CursorLookup | None = None
        # Tenant placement (proxy.placement; set by the wiring when configured).
        self.placement: Placement | None = None

    def session(self, connection_id: int, peer: object) -> Session:
        return Session(connection_id, peer, self.authenticator.session())

    # -- framing and dispatch -----------------------------------------------------------

    async def handle_message(self, message: bytes, started_ns: int, session: Session,
                             snapshot: Config) -> Reply:
        """The reply to one framed message (see the module docstring)."""
        timer = Timer(started_ns)
        timer.mark("read")
        header = parse_header(message)
        op_code, request_id = header.op_code, header.request_id
        msg: OpMsg | None = None
        try:
            compressor: str | None = None
            if op_code == OpCode.OP_COMPRESSED:
                listen = snapshot.listen
                message, compressor = await inflate(message, message_limit(
                    listen.max_message_size_bytes, listen.max_preauth_message_bytes,
                    before_login=self.users_configured and session.identity is None,
                ), session.compressors)
                op_code = parse_header(message).op_code
            if op_code == OpCode.OP_MSG:
                msg = parse_op_msg(message)
                request = request_from_op_msg(message, msg, compressor)
                timer.mark("decode")
                session.in_flight = request.raw_name  # for GET /connections
                reply = await self.handle(request, session, snapshot, timer)
                if request.more_to_come:
                    reply.parts = NO_PARTS  # the client reads no reply, even to an error
                return reply
            if op_code == OpCode.OP_QUERY:
                return self._op_query(message, session, snapshot)
            if op_code in _REMOVED_OPCODES:
                raise WireError(
                    f"opcode {_REMOVED_OPCODES[OpCode(op_code)]} ({op_code}) was removed "
                    "in MongoDB 5.1 and is not supported; use OP_MSG")
            raise WireError(f"unknown opcode {op_code}")
        except ProxyError as exc:  # malformed or ill-typed: one precise client error
            if op_code == OpCode.OP_QUERY:
                return Reply((query_failure(request_id, exc),))
            if msg is not None and msg.more_to_come:
                return Reply(NO_PARTS)  # the client reads no reply, even to an error
            return Reply((error_message(request_id, exc),))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # A bug must cost one error reply, never the client's connection.
            log.exception("internal error handling request %d from client %d",
                          request_id, session.connection_id)
            if msg is not None and msg.more_to_come:
                return Reply(NO_PARTS)
            return Reply((error_message(request_id, ProxyError(
                INTERNAL_ERROR, f"mongoproxy internal error: {type(exc).__name__}: {exc}"
            )),))

    def _op_query(self, message: bytes, session: Session, snapshot: Config) -> Reply:
        query = parse_op_query(message)
        if query.collection.endswith(".$cmd"):
            try:
                command = bson.decode(query.query)
            except Exception as exc:  # bson raises several types for corrupt input
                raise WireError(f"OP_QUERY query document is invalid BSON: {exc}",
                                code=INVALID_BSON[0], code_name=INVALID_BSON[1]) from None
            name = next(iter(command), None)  # OP_QUERY is only ever a handshake
            if isinstance(name, str) and name in HELLO_COMMANDS:
                reply = bson.encode(self._hello(name, command, session, snapshot))
                return Reply((encode_op_reply(next_request_id(), query.request_id, [reply]),))
        raise ProxyError(
            UNSUPPORTED_OP_QUERY,
            f"OP_QUERY on {query.collection} is only supported for the hello/isMaster "
            "handshake; use OP_MSG")

    # -- one command ----------------------------------------------------------------------

    async def handle(self, request: Request, session: Session, snapshot: Config,
                     timer: Timer) -> Reply:
        name = request.raw_name
        command = request.command
        if name in HELLO_COMMANDS:
            # Handshakes and heartbeats are not operations: neither timed nor logged.
            return Reply((message_for(request.request_id,
                                      self._hello(name, command, session, snapshot)),))
        if name in AUTH_COMMANDS:
            return await self._authenticate(request, session, timer)
        if session.identity is None and self.users_configured:
            return self._before_login(request, session, timer)
        placement = self.placement
        if self.siblings is not None and request.cursor_ids and (
                placement is None or not placement.owns_cursor(request.cursor_ids[0])):
            await self.siblings.resolve(request.cursor_ids)  # before tenancy reads them
        admission = admit(
            self.policy, name, command, request.msg.body, request.sequences,
            bound_tenant=session.tenant,
            cursor_tenant=self._cursor_tenant,
            placement=placement is not None,
        )
        if admission.refused is not None or admission.violation is not None:
            tenancy_event(self.observer.metrics, session, name, request.collection, admission,
                          snapshot.observability.log_values)
        elif admission.superuser and name not in SAFE_DATABASE_COMMANDS:
            superuser_event(session, name, admission)
        if admission.refused is not None:
            return self._refuse(request, timer, ProxyError(UNAUTHORIZED, admission.refused))
        tenant = admission.tenant if admission.tenant is not None else session.tenant
        sequences = request.sequences
        injected = admission.command is not None or admission.sequences is not None
        if injected:
            command, sequences = with_injected(request, admission)
        classification = classify(command, session.context, name)
        try:
            client_preference = (
                None if request.read_preference is None else from_command(command))
        except ReadPreferenceError as exc:
            timer.mark("policy")
            return self._refuse(request, timer, ProxyError(BAD_VALUE, f"{name}: {exc}"))
        decision = decide(classification, snapshot.routing, client_preference)
        timer.mark("policy")
        if decision.deny is not None:  # a class that denies the command
            return self._refuse(request, timer, decision.error(), decision)
        rewritten = with_route(command, decision)
        if rewritten is not None:
            command = rewritten
        message = forwarded_message(request, command, sequences,
                                    injected or rewritten is not None)
        reply = Reply(NO_PARTS, timer, name, command, request)
        reply.decision = decision
        reply.tenant = tenant
        roundtrip = self.roundtrip
        placed = None
        if placement is not None:
            placed = placement.place(request, admission, session.tenant, snapshot)
            if placed.roundtrip is None:  # every cluster, or refused
                return await placement.elsewhere(placed, request, command, message,
                                                 session, reply, snapshot)
            roundtrip = placed.roundtrip
            reply.cluster = placed.cluster
        cached = self.cached
        if cached is not None:
            reply.access = cached.begin(request, command, classification, decision,
                                        (session.tenant, tenant), bool(sequences),
                                        snapshot.cache)
        if placed is not None and placed.key is not None and (
                classification.is_write or name in TRANSACTION_ENDS):
            assert placement is not None
            return await placement.write(placed, request, command, sequences, message,
                                         roundtrip, self._forward, session, reply, snapshot)
        return await self._forward(request, message, roundtrip, session, reply, snapshot)

    async def _forward(self, request: Request, message: bytes, roundtrip: Roundtrip,
                       session: Session, reply: Reply, snapshot: Config) -> Reply:
        access = reply.access
        timer = reply.timer
        decision = reply.decision
        assert decision is not None
        try:
            if access is None:
                done = await roundtrip.exchange(request, message, decision, timer,
                                                session.connection_id)
            else:
                assert self.cached is not None
                done = await self.cached.forward(request, message, decision, access, timer,
                                                 session.connection_id, roundtrip)
        except ProxyError as exc:
            if access is not None:
                access.abandon()
            reply.error_code = exc.code
            log.warning("%s from client %d failed: %s", reply.name, session.connection_id,
                        exc.errmsg)
            if not request.more_to_come:
                reply.parts = (error_message(request.request_id, exc, request.command,
                                             roundtrip.retryable_writes()),)
            return reply
        except asyncio.CancelledError:
            # Shutdown gave up waiting for this request: the session loop tells the client.
            if access is not None:
                access.abandon()
            reply.error_code = SHUTDOWN_IN_PROGRESS[0]
            if not request.more_to_come:
                reply.parts = (error_message(request.request_id, ProxyError(
                    SHUTDOWN_IN_PROGRESS, "mongoproxy shut down before the reply arrived"
                ), request.command, roundtrip.retryable_writes()),)
            session.interrupted = reply
            raise
        except BaseException:
            if access is not None:
                access.abandon()
            raise
        reply.address = done.address
        if done.conn is None:  # served from the cache
            reply.docs = reply_cursor(done.body)[1]
        else:
            reply.error_code = done.error_code
            reply.docs = roundtrip.bookkeeping(request, done, session.connection_id,
                                               reply.tenant)
        reply.body = done.body
        reply.reply_bytes = len(done.header) + len(done.body)
        if not request.more_to_come:  # else fire-and-forget: the client reads no reply
            reply.parts = self._reply_parts(done, request, session, snapshot)
        return reply

    @staticmethod
    def _reply_parts(done: Exchanged, request: Request, session: Session,
                     snapshot: Config) -> tuple[bytes, ...]:
        """The reply as written, compressed when the client's request was."""
        compressor = request.compressor
        if compressor is not None and compressor in session.compressors:
            return (compress(done.header + done.body, compressor,
                             snapshot.listen.zlib_compression_level),)
        return done.header, done.body

    def _refuse(self, request: Request, timer: Timer, error: ProxyError,
                decision: RouteDecision | None = None) -> Reply:
        data = error_message(request.request_id, error)
        reply = Reply((data,), timer, request.raw_name, request.command, request)
        reply.error_code = error.code
        reply.decision = decision
        reply.reply_bytes = len(data)
        return reply

    def _before_login(self, request: Request, session: Session, timer: Timer) -> Reply:
        """Users are configured and the connection has not logged in: an allowlisted
        command is answered here, anything else refused; nothing is forwarded."""
        name = request.raw_name
        session.login_requested = True  # the login timeout runs from here
        if preauth_decision(name, users_configured=True, authenticated=False) == "local":
            document = preauth_reply(name, self.roundtrip.limits().max_wire_version)
            return Reply((message_for(request.request_id, document),))
        error = ProxyError(UNAUTHORIZED, refusal(name))
        data = error_message(request.request_id, error)
        # Recorded by name only: an unauthenticated client's values are not kept.
        reply = Reply((data,), timer, name, {name: 1}, request)
        reply.error_code = error.code
        reply.reply_bytes = len(data)
        return reply

    async def _authenticate(self, request: Request, session: Session, timer: Timer
                            ) -> Reply:
        name = request.raw_name
        session.login_requested = True
        # Throttled per peer and user; each failure logged with the peer's address.
        document, user = await authenticate(session.auth, self.throttle, session.peer,
                                            request.command, name)
        if user is not None:
            session.identity = user
            session.set_context()
        # The payload carries the client's proof: never logged, even with log_values.
        reply = Reply((message_for(request.request_id, document),), timer, name,
                      {name: 1, "$db": request.db})
        reply.db = request.db
        code = document.get("code")
        reply.error_code = code if isinstance(code, int) else None
        return reply

    def _hello(self, name: str, command: Mapping[str, Any], session: Session,
               snapshot: Config) -> dict[str, Any]:
        if "client" in command:  # the connection's first handshake; heartbeats omit it
            hello = read_client_hello(command, snapshot.listen.compressors)
            session.app_name = hello.app_name
            session.set_context()
            session.compressors = hello.compressors
        reply = hello_reply(
            name,
            self.roundtrip.limits(),
            session.connection_id,
            session.compressors,
            datetime.datetime.now(datetime.UTC),
        )
        mechanisms = session.auth.supported_mechs(command)
        if mechanisms is not None:
            reply["saslSupportedMechs"] = mechanisms
        speculative = session.auth.speculative(command)
        if speculative is not None:
            reply["speculativeAuthenticate"] = speculative
        return reply

    # -- after the reply is out -----------------------------------------------------------

    def written(self, reply: Reply, session: Session) -> None:
        """The reply was written (and it has no cache part): record the operation.
        Never raises and never answers: the request has had its one reply."""
        timer = reply.timer
        if timer is None:
            return
        if reply.parts:
            timer.mark("write")
        self.record(reply, session)

    async def finish(self, reply: Reply, session: Session) -> None:
        """The reply was written: store a cache miss, then record the operation (see
        :meth:`written`); for replies with a cache part."""
        access = reply.access
        timer = reply.timer
        if access is None or timer is None or self.cached is None:
            self.written(reply, session)
            return
        if reply.parts:
            timer.mark("write")
        try:
            await self.cached.after_reply(access)
        except Exception as exc:
            log.error("cache store after %s failed: %s: %s", reply.name,
                      type(exc).__name__, exc)
        timer.mark("cache")
        self.record(reply, session)

    def record(self, reply: Reply, session: Session) -> None:
        """Hand one finished operation to the observer (metrics, digest, slow log)."""
        timer = reply.timer
        if timer is None:
            return
        try:
            self._record(reply, session, timer)
        except Exception as exc:  # the observer's bug must not touch the client
            log.error("could not record %s from client %d: %s: %s", reply.name,
                      session.connection_id, type(exc).__name__, exc)

    def _record(self, reply: Reply, session: Session, timer: Timer) -> None:
        command = reply.command or {}
        name = reply.name
        # The name as parsed (Request.raw_name), not read from the document again.
        shape = describe(command, _statement_samples(reply.request_sequences),
                         name if command else None)
        decision = reply.decision
        address = reply.address
        access = reply.access
        self.observer.finish(timer.record(
            name,
            database=reply.db,
            collection=reply.collection,
            shape_hash=shape.hash,
            shape_text=shape.text,
            app_name=session.app_name,
            tenant=None if reply.tenant is None else str(reply.tenant),
            user=session.user,
            route_class=None if decision is None else decision.class_name,
            route_rule=None if decision is None else decision.rule_index,
            member=None if address is None else _member_label(address),
            member_role=None if address is None else self._role_of(reply, address),
            cache=None if access is None else access.result,
            docs_returned=reply.docs,
            reply_bytes=reply.reply_bytes,
            error_code=reply.error_code,
            connection_id=session.connection_id,
            raw_command=command,
        ))

    def _role_of(self, reply: Reply, address: tuple[str, int]) -> str:
        placement = self.placement
        if placement is None or reply.cluster is None:
            return self.roundtrip.role_of(address)
        return placement.roundtrip_of(reply.cluster).role_of(address)

    def departed(self, session: Session) -> None:
        """The client connection closed: its cursors are killed on their servers."""
        if self.placement is not None:
            self.placement.departed(session.connection_id)
        else:
            self.roundtrip.release_cursors(session.connection_id)


_MEMBER_LABELS: dict[tuple[str, int], str] = {}


def _member_label(address: tuple[str, int]) -> str:
    """The "host:port" label, formatted once per server (on every operation record)."""
    label = _MEMBER_LABELS.get(address)
    if label is None:
        if len(_MEMBER_LABELS) > 1024:  # servers come and go over a long run
            _MEMBER_LABELS.clear()
        label = _MEMBER_LABELS[address] = f"{address[0]}:{address[1]}"
    return label


def _statement_samples(sequences: Any) -> dict[str, list[dict[str, Any]]] | None:
    samples = {}
    for sequence in sequences:
        if sequence.identifier in ("updates", "deletes"):
            docs = sequence.documents(_SHAPE_SAMPLE)  # not the whole batch
            samples[sequence.identifier] = [bson.decode(doc) for doc in docs]
    return samples or None
