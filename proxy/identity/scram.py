"""Clients authenticating to the proxy: the server side of MongoDB's SCRAM-SHA-256.

Sans-IO: nothing here reads or writes a socket. The listener hands over decoded command
documents and writes back the reply documents it gets; the SCRAM arithmetic is
``scramp``'s (``ScramMechanism("SCRAM-SHA-256").make_server(auth_fn)``), fed with the
stored credentials of :mod:`proxy.identity.credentials`.

The conversation is MongoDB's (the upstream side is :mod:`proxy.pool.auth`)::

    saslStart {mechanism: "SCRAM-SHA-256", payload: client-first,
               options: {skipEmptyExchange: true}, $db}
        -> {conversationId: 1, done: false, payload: server-first, ok: 1}
    saslContinue {conversationId: 1, payload: client-final}
        -> {conversationId: 1, done: true, payload: server-final ("v=..."), ok: 1}
    (without skipEmptyExchange the reply above says done: false and the client sends)
    saslContinue {conversationId: 1, payload: ""}
        -> {conversationId: 1, done: true, payload: "", ok: 1}

or, speculatively, inside the handshake: ``hello {..., speculativeAuthenticate:
{saslStart: 1, mechanism, payload: client-first, db}}`` gets ``speculativeAuthenticate:
{conversationId, done: false, payload: server-first}`` in the hello reply, and the
client goes on with ``saslContinue``. A speculative attempt that cannot start (another
mechanism, a malformed message) is simply left out of the hello reply, as MongoDB does;
the client then authenticates explicitly and gets the error there.

Decisions:

* **Nothing reveals whether a user exists.** Every failure that involves credentials
  (unknown user, wrong password, forged or replayed proof, another mechanism, a
  malformed SCRAM message) answers exactly ``{ok: 0, code: 18, codeName:
  "AuthenticationFailed", errmsg: "Authentication failed."}``. An unknown user even gets
  a normal server-first message (a *decoy*: a salt derived from the user name with a
  key only this proxy knows, the iteration count of the real users), so the exchange
  fails at the same step and in the same time as a wrong password. For the same reason
  ``saslSupportedMechs: "<db>.<user>"`` in hello is answered ``["SCRAM-SHA-256"]`` for
  every user name (MongoDB omits the field for unknown users).
  The reason of a failure is kept in :attr:`ClientAuthSession.last_failure` for the
  proxy's own log; it never contains a password, a proof or a key.
* **Protocol misuse is not a credential failure**: ``saslContinue`` with no conversation
  in progress (including a replay after the conversation finished) or with another
  ``conversationId`` answers code 17 ``ProtocolError`` with a message saying so, as
  MongoDB does; the conversation in progress, if any, is abandoned.
* **authSource**: proxy users are proxy-wide. Any ``$db`` is accepted (pymongo uses the
  connection string's database, else ``admin``) and recorded in
  :attr:`AuthenticatedUser.source`, for logs only.
* **One identity per connection, fixed once established.** Authenticating again as the
  same user succeeds and changes nothing; authenticating as *another* user on an
  authenticated connection is refused (code 18, saying why), even with the right
  password: the connection's cursors and tenant binding belong to the first identity
  (MongoDB itself deprecated several users per connection in 5.0). A failed attempt
  leaves an established identity in place. ``logout`` on an authenticated connection is
  refused (code 20 ``IllegalOperation``); on an unauthenticated one it is a no-op.
* The ``authenticate`` command (MONGODB-X509, MONGODB-CR) fails with code 18.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from bson.binary import Binary
from scramp import ScramException, ScramMechanism
from scramp.utils import saslprep

from proxy.errors import AUTHENTICATION_FAILED, PROTOCOL_ERROR, error_document
from proxy.identity.credentials import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_BYTES,
    KEY_BYTES,
    MECHANISM,
    StoredCredential,
    parse,
)

SCRAM_SHA_256 = MECHANISM
SUPPORTED_MECHANISMS: tuple[str, ...] = (SCRAM_SHA_256,)
DEFAULT_SOURCE = "admin"
#: The commands :meth:`ClientAuthSession.handle` answers.
ILLEGAL_OPERATION = (20, "IllegalOperation")
#: The one message every credential failure gets.
FAILED = "Authentication failed."


class UserLike(Protocol):
    """A configured proxy user (``proxy.tenancy``'s ``UserConfig`` fits)."""

    @property
    def username(self) -> str: ...

    @property
    def password_sha256(self) -> str: ...

    @property
    def tenant(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """Who a connection authenticated as, and the tenant it is bound to."""

    username: str
    tenant: str
    #: The database the client authenticated on (``$db`` / ``db``); informational.
    source: str = DEFAULT_SOURCE
    mechanism: str = SCRAM_SHA_256

    @property
    def all_tenants(self) -> bool:
        """The ``"*"`` identity: may cross tenants (operators), audited by the policy."""
        return self.tenant == "*"


class ScramFailure(Exception):
    """A SCRAM step failed; ``str(exc)`` is the reason for the log, never for the client."""


class Stage(enum.Enum):
    CLIENT_FIRST = "waiting for client-first"
    CLIENT_FINAL = "waiting for client-final"
    EMPTY = "waiting for the final empty saslContinue"
    DONE = "done"
    FAILED = "failed"


AuthFn = Callable[[str], StoredCredential]


class ScramServerConversation:
    """One SCRAM-SHA-256 exchange, server side (sans-IO; wraps ``scramp.ScramServer``).

    ``lookup`` maps the (SASLprep'd) user name of the client-first message to the
    credential to check against; it must answer for unknown users too (a decoy), so that
    they fail like a wrong password. Each step returns the server's payload and whether
    the conversation is done; any failure raises ScramFailure and ends the conversation.
    """

    def __init__(
        self,
        lookup: AuthFn,
        conversation_id: int = 1,
        source: str = DEFAULT_SOURCE,
        skip_empty_exchange: bool = True,
        s_nonce: str | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.source = source
        self.skip_empty_exchange = skip_empty_exchange
        self.username: str | None = None
        self.stage = Stage.CLIENT_FIRST
        self._lookup = lookup

        def auth_fn(username: str) -> tuple[bytes, bytes, bytes, int]:
            self.username = username
            return lookup(username).auth_info()

        self._server: Any = ScramMechanism(SCRAM_SHA_256).make_server(
            auth_fn, s_nonce=s_nonce
        )

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def server_first(self, client_first: bytes) -> bytes:
        """Take ``n,,n=user,r=nonce``; answer ``r=nonce+server,s=salt,i=iterations``."""
        self._expect(Stage.CLIENT_FIRST)
        text = self._text(client_first, "client-first")
        if not text.startswith("n,"):
            # "y,," / "p=...": channel binding; the proxy offers no -PLUS mechanism.
            self._fail("client-first requests channel binding (gs2 header is not 'n,,')")
        try:
            self._server.set_client_first(text)
            first: str = self._server.get_server_first()
        except ScramException as exc:
            self._fail(f"client-first rejected: {exc}")
        self.stage = Stage.CLIENT_FINAL
        return first.encode()

    def server_final(self, client_final: bytes) -> tuple[bytes, bool]:
        """Verify the client's proof; answer ``v=ServerSignature`` and whether done."""
        self._expect(Stage.CLIENT_FINAL)
        text = self._text(client_final, "client-final")
        try:
            self._server.set_client_final(text)
            final: str = self._server.get_server_final()
        except ScramException as exc:
            self._fail(f"client-final rejected: {exc}")
        self.stage = Stage.DONE if self.skip_empty_exchange else Stage.EMPTY
        return final.encode(), self.done

    def finish(self, payload: bytes) -> None:
        """The extra, empty ``saslContinue`` of a client that did not skip it."""
        self._expect(Stage.EMPTY)
        if payload:
            self._fail("the last saslContinue must have an empty payload")
        self.stage = Stage.DONE

    def step(self, payload: bytes) -> tuple[bytes, bool]:
        """Whichever step comes next: ``(server payload, done)``."""
        if self.stage is Stage.CLIENT_FIRST:
            return self.server_first(payload), False
        if self.stage is Stage.CLIENT_FINAL:
            return self.server_final(payload)
        self.finish(payload)
        return b"", True

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            self._fail(f"out of order: the conversation is {self.stage.value}")

    def _text(self, payload: bytes, what: str) -> str:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not UTF-8")

    def _fail(self, reason: str) -> NoReturn:
        self.stage = Stage.FAILED
        raise ScramFailure(reason)


@dataclass(frozen=True, slots=True)
class _Entry:
    username: str
    tenant: str
    credential: StoredCredential


class ClientAuthenticator:
    """The proxy's users (immutable; rebuild it when the configuration changes).

    Validates every stored credential up front: raises ValueError naming the user for
    a malformed credential, an empty or SASLprep-invalid user name, a duplicate user.
    Per-connection state lives in the :class:`ClientAuthSession` from :meth:`session`.
    """

    def __init__(self, users: Sequence[UserLike], *, decoy_key: bytes | None = None) -> None:
        entries: dict[str, _Entry] = {}
        for user in users:
            name = user.username
            try:
                key = saslprep(name)
            except ScramException as exc:
                raise ValueError(f"user {name!r}: the user name is not valid: {exc}") from None
            if not key:
                raise ValueError("a user name must not be empty")
            if key in entries:
                raise ValueError(f"user {name!r} is configured twice")
            try:
                credential = parse(user.password_sha256)
            except ValueError as exc:
                raise ValueError(f"user {name!r}: password_sha256: {exc}") from None
            entries[key] = _Entry(name, user.tenant, credential)
        self._users = entries
        counts = Counter(e.credential.iterations for e in entries.values())
        self._decoy_iterations = (
            counts.most_common(1)[0][0] if counts else DEFAULT_ITERATIONS
        )
        # Stable across restarts for an unchanged user list (so a decoy's salt does not
        # change when a real user's would not), and unknowable without the stored keys.
        if decoy_key is None:
            digest = hashlib.sha256(b"mongoproxy decoy salt")
            for key in sorted(entries):
                digest.update(str(entries[key].credential).encode())
            decoy_key = digest.digest() if entries else secrets.token_bytes(32)
        self._decoy_key = decoy_key

    def __len__(self) -> int:
        return len(self._users)

    @property
    def usernames(self) -> list[str]:
        return [e.username for e in self._users.values()]

    def session(self) -> ClientAuthSession:
        """Fresh per-connection state (create one per client connection)."""
        return ClientAuthSession(self)

    def supported_mechs(self, hello: Mapping[str, Any]) -> list[str] | None:
        """The ``saslSupportedMechs`` field of the hello reply, or None to leave it out.

        Answered for any ``"<db>.<user>"`` (known user or not: see the module docstring).
        """
        value = hello.get("saslSupportedMechs")
        if not isinstance(value, str):
            return None
        db, dot, user = value.partition(".")
        if not (db and dot and user):
            return None
        return list(SUPPORTED_MECHANISMS)

    def credential(self, username: str) -> StoredCredential:
        """The credential to check ``username`` against: its own, or a decoy."""
        entry = self._users.get(username)
        if entry is not None:
            return entry.credential
        salt = hmac.new(self._decoy_key, username.encode(), hashlib.sha256).digest()
        return StoredCredential(
            self._decoy_iterations,
            salt[:DEFAULT_SALT_BYTES],
            secrets.token_bytes(KEY_BYTES),  # no proof can match a random StoredKey
            secrets.token_bytes(KEY_BYTES),
        )

    def identity(self, username: str, source: str) -> AuthenticatedUser | None:
        entry = self._users.get(username)
        if entry is None:
            return None
        return AuthenticatedUser(entry.username, entry.tenant, source)


class ClientAuthSession:
    """One client connection's authentication state.

    :meth:`handle` answers ``saslStart``/``saslContinue``/``authenticate``/``logout``;
    :meth:`speculative` and :meth:`supported_mechs` give the two authentication fields
    of the hello reply. :attr:`user` is the established identity (None until then).
    """

    def __init__(self, authenticator: ClientAuthenticator, *, s_nonce: str | None = None) -> None:
        """``s_nonce`` pins the server's nonce: for test vectors only (random otherwise)."""
        self.authenticator = authenticator
        self.user: AuthenticatedUser | None = None
        #: Why the last attempt failed, for the proxy's log (never sent to the client).
        self.last_failure: str | None = None
        self._conversation: ScramServerConversation | None = None
        # The conversation of the latest attempt (for the throttle's user key).
        self._attempt: ScramServerConversation | None = None
        self._next_id = 1
        self._s_nonce = s_nonce

    @property
    def in_progress(self) -> bool:
        return self._conversation is not None

    @property
    def pending_user(self) -> str | None:
        """The user name of the conversation in progress (None if none, or not yet)."""
        return None if self._conversation is None else self._conversation.username

    @property
    def failed_user(self) -> str | None:
        """The user name the latest attempt tried, if it got that far."""
        return None if self._attempt is None else self._attempt.username

    def abandon(self) -> None:
        """Drop the conversation in progress (a locked-out attempt)."""
        self._conversation = None

    def supported_mechs(self, hello: Mapping[str, Any]) -> list[str] | None:
        return self.authenticator.supported_mechs(hello)

    def speculative(self, hello: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ``speculativeAuthenticate`` field of the hello reply, or None to omit it."""
        spec = hello.get("speculativeAuthenticate")
        if not isinstance(spec, Mapping) or "saslStart" not in spec:
            return None  # absent, or e.g. {authenticate: 1, mechanism: MONGODB-X509}
        try:
            reply = self._start(spec, spec.get("db"))
        except _Refused as exc:
            self.last_failure = f"speculative saslStart: {exc.reason}"
            return None
        del reply["ok"]
        return reply

    def handle(
        self, command: Mapping[str, Any], name: str | None = None
    ) -> tuple[dict[str, Any], AuthenticatedUser | None]:
        """Answer one auth command; the user is set when this reply completes a login.
        ``name``: the command's name as parsed (``Request.raw_name``); None reads it."""
        if name is None:
            name = next(iter(command), None)
        try:
            if name == "saslStart":
                return self._start(command, command.get("$db"), name), None
            if name == "saslContinue":
                return self._continue(command)
            if name == "authenticate":
                self._conversation = None
                raise _Refused(
                    f"authenticate command (mechanism {command.get('mechanism')!r}) "
                    "is not supported"
                )
            if name == "logout":
                return self._logout(), None
        except _Refused as exc:
            self.last_failure = f"{name}: {exc.reason}"
            return exc.document(), None
        raise ValueError(f"{name!r} is not an authentication command")

    # -- steps ------------------------------------------------------------------

    def _start(self, command: Mapping[str, Any], source: Any,
               name: str | None = None) -> dict[str, Any]:
        self._conversation = None  # a new saslStart abandons any conversation in progress
        mechanism = command.get("mechanism")
        if mechanism != SCRAM_SHA_256:
            raise _Refused(f"mechanism {mechanism!r} is not supported (only {SCRAM_SHA_256})")
        payload = _payload(command, name)
        options = command.get("options")
        skip = isinstance(options, Mapping) and options.get("skipEmptyExchange") is True
        conversation = ScramServerConversation(
            self.authenticator.credential,
            conversation_id=self._next_id,
            source=source if isinstance(source, str) and source else DEFAULT_SOURCE,
            skip_empty_exchange=skip,
            s_nonce=self._s_nonce,
        )
        self._next_id += 1
        self._attempt = conversation
        try:
            server_first = conversation.server_first(payload)
        except ScramFailure as exc:
            raise _Refused(_with_user(str(exc), conversation)) from None
        self._conversation = conversation
        return _reply(conversation.conversation_id, False, server_first)

    def _continue(
        self, command: Mapping[str, Any]
    ) -> tuple[dict[str, Any], AuthenticatedUser | None]:
        conversation, self._conversation = self._conversation, None
        if conversation is None:
            raise _Refused(
                "saslContinue: no SASL conversation in progress on this connection "
                "(send saslStart first; a finished or failed conversation cannot continue)",
                PROTOCOL_ERROR,
            )
        given = command.get("conversationId")
        if isinstance(given, bool) or given != conversation.conversation_id:
            raise _Refused(
                f"saslContinue: conversationId {given!r} does not match the conversation "
                f"in progress ({conversation.conversation_id}); the conversation is "
                "abandoned",
                PROTOCOL_ERROR,
            )
        self._attempt = conversation
        payload = _payload(command, "saslContinue")
        try:
            server_payload, done = conversation.step(payload)
        except ScramFailure as exc:
            raise _Refused(_with_user(str(exc), conversation)) from None
        if not done:
            self._conversation = conversation
            return _reply(conversation.conversation_id, False, server_payload), None
        user = self._establish(conversation)
        return _reply(conversation.conversation_id, True, server_payload), user

    def _establish(self, conversation: ScramServerConversation) -> AuthenticatedUser:
        username = conversation.username or ""
        user = self.authenticator.identity(username, conversation.source)
        if user is None:  # a decoy cannot be passed; never bind a connection to it anyway
            raise _Refused(_with_user("no such user", conversation))
        if self.user is not None and self.user.username != user.username:
            raise _Refused(
                f"switching identity from {self.user.username!r} to {user.username!r}",
                errmsg=(
                    f"Authentication failed: this connection is already authenticated as "
                    f"{self.user.username!r}; a connection's identity cannot change. Open "
                    f"a new connection to authenticate as {user.username!r}."
                ),
            )
        if self.user is None:
            self.user = user
        self.last_failure = None
        return self.user

    def _logout(self) -> dict[str, Any]:
        self._conversation = None
        if self.user is None:
            return {"ok": 1.0}
        raise _Refused(
            "logout on an authenticated connection",
            ILLEGAL_OPERATION,
            errmsg=(
                f"logout is not supported by mongoproxy: this connection stays "
                f"authenticated as {self.user.username!r}; close it instead"
            ),
        )


class _Refused(Exception):
    def __init__(
        self,
        reason: str,
        code: tuple[int, str] = AUTHENTICATION_FAILED,
        errmsg: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        # Credential failures all read the same; protocol errors say what is wrong.
        self.errmsg = errmsg or (FAILED if code == AUTHENTICATION_FAILED else reason)

    def document(self) -> dict[str, Any]:
        return error_document(*self.code, self.errmsg)


def _reply(conversation_id: int, done: bool, payload: bytes) -> dict[str, Any]:
    return {
        "conversationId": conversation_id,
        "done": done,
        "payload": Binary(payload),
        "ok": 1.0,
    }


def _payload(command: Mapping[str, Any], name: str | None) -> bytes:
    """The SASL payload: BinData, or a base64 string (MongoDB accepts both). ``name``
    for messages: the request's parsed name; None for the hello's speculative document
    (a document of its own)."""
    if name is None:
        name = next(iter(command), "speculativeAuthenticate")
    payload = command.get("payload")
    if isinstance(payload, bytes):
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return base64.b64decode(payload.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            reason = f"{name}: the payload string is not valid base64"
            raise _Refused(reason, errmsg=f"Authentication failed: {reason}") from None
    reason = (
        f"{name}: payload must be BinData (or a base64 string), not "
        f"{'missing' if payload is None else type(payload).__name__}"
    )
    raise _Refused(reason, errmsg=f"Authentication failed: {reason}")


def _with_user(reason: str, conversation: ScramServerConversation) -> str:
    if conversation.username is None:
        return reason
    return f"user {conversation.username!r} on {conversation.source!r}: {reason}"
