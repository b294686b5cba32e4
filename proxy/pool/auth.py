"""Authenticating the proxy's own upstream connections: SCRAM-SHA-256, SCRAM-SHA-1 (for
older servers) and MONGODB-X509 (the TLS client certificate is the identity).

Clients of the proxy never authenticate to the upstream: every pooled connection is
authenticated once, when it is opened, as the user named in ``upstream.uri``
(``mongodb://user:pass@host/?authSource=admin&authMechanism=SCRAM-SHA-256``).

The SASL conversation is MongoDB's:

* the handshake ``hello`` carries ``speculativeAuthenticate: {saslStart: 1, mechanism,
  payload: client-first, db}``; a server that supports it answers with the server-first
  message (and a ``conversationId``) in the same reply, saving one round trip;
* otherwise ``saslStart {mechanism, payload: client-first, autoAuthorize: 1,
  options: {skipEmptyExchange: true}}`` on the authSource database;
* then ``saslContinue {conversationId, payload: client-final}``, whose reply carries the
  server-final message. The server's signature in it is verified (by ``scramp``), so a
  server that does not know the password cannot pass itself off as the upstream;
* a server that ignored ``skipEmptyExchange`` gets one more, empty ``saslContinue``.

SCRAM-SHA-1 is the same conversation with MongoDB's password digest,
``md5("user:mongo:password")`` in hex, as the SCRAM password (no SASLprep, as the drivers).
MONGODB-X509 is one ``authenticate {mechanism: "MONGODB-X509"}`` on ``$external``, sent
speculatively in the handshake ``hello`` too; the user name is optional (the server takes
the certificate's subject) and the connection must be TLS with a client certificate
(``tlsCertificateKeyFile``).

Message building and the SCRAM state are pure (no I/O) and unit-tested on their own;
:func:`authenticate` runs the conversation over any ``command`` coroutine.

The password is never logged or put in an error message: ``Credentials`` leaves it out
of its ``repr`` and every error names the upstream, the user and the authSource only.
Usernames and passwords are SASLprep'd by ``scramp`` (RFC 4013), as SCRAM-SHA-256
requires.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from hashlib import md5
from typing import Any

from bson.binary import Binary
from pymongo.uri_parser import parse_uri
from scramp import ScramClient, ScramException

from proxy.errors import AUTHENTICATION_FAILED, ProxyError

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_1 = "SCRAM-SHA-1"
MONGODB_X509 = "MONGODB-X509"
SUPPORTED_MECHANISMS = frozenset({SCRAM_SHA_256, SCRAM_SHA_1, MONGODB_X509})
DEFAULT_AUTH_SOURCE = "admin"
EXTERNAL = "$external"

Command = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who the proxy authenticates as upstream. The password is kept out of ``repr``."""

    username: str
    password: str = field(repr=False)
    source: str = DEFAULT_AUTH_SOURCE
    mechanism: str = SCRAM_SHA_256

    @classmethod
    def from_uri(cls, uri: str | None) -> Credentials | None:
        """The credentials in a connection string, or None when it names no user.

        ``authSource`` defaults to the database in the uri's path, else ``admin`` (the
        connection-string spec; ``$external`` for MONGODB-X509); ``authMechanism``
        defaults to SCRAM-SHA-256. Raises ValueError for a SCRAM user without a password
        or an unsupported mechanism (config validation reports it under ``upstream.uri``).
        """
        if uri is None:
            return None
        parsed = parse_uri(uri)
        username = parsed.get("username")
        options = parsed["options"]
        mechanism = options.get("authMechanism") or SCRAM_SHA_256
        if mechanism not in SUPPORTED_MECHANISMS:
            raise ValueError(
                f"authMechanism {mechanism} is not supported for the upstream; use one of "
                f"{', '.join(sorted(SUPPORTED_MECHANISMS))}"
            )
        if mechanism == MONGODB_X509:
            # pymongo's parser has already refused a password or another authSource.
            return cls(str(username or ""), "", EXTERNAL, MONGODB_X509)
        if not username:
            return None
        password = parsed.get("password")
        if not password:
            raise ValueError(f"user {username!r} has no password ({mechanism} needs one)")
        source = options.get("authSource") or parsed.get("database") or DEFAULT_AUTH_SOURCE
        return cls(str(username), str(password), str(source), str(mechanism))


class ScramConversation:
    """The client side of one SCRAM exchange (sans-IO, wraps ``scramp.ScramClient``)."""

    def __init__(self, credentials: Credentials, nonce: str | None = None) -> None:
        self.credentials = credentials
        password = credentials.password
        if credentials.mechanism == SCRAM_SHA_1:
            # MongoDB's SCRAM-SHA-1 password is the legacy MONGODB-CR digest.
            password = md5(f"{credentials.username}:mongo:{password}".encode()).hexdigest()
        try:
            self._client = ScramClient(
                [credentials.mechanism], credentials.username, password, c_nonce=nonce,
            )
        except ScramException as exc:  # e.g. a password SASLprep prohibits
            raise AuthenticationError(f"invalid credentials: {exc}") from None

    def client_first(self) -> bytes:
        first: str = self._client.get_client_first()
        return first.encode()

    def client_final(self, server_first: bytes) -> bytes:
        """Answer the server-first message (salt, iterations, combined nonce)."""
        try:
            self._client.set_server_first(server_first.decode())
            final: str = self._client.get_client_final()
            return final.encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthenticationError(f"bad server-first message: {exc}") from None

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server's signature; raises AuthenticationError if it is wrong."""
        try:
            self._client.set_server_final(server_final.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthenticationError(f"server signature not verified: {exc}") from None


class AuthenticationError(Exception):
    """The SASL conversation failed; the message never contains the password."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def speculative_authenticate(credentials: Credentials, client_first: bytes) -> dict[str, Any]:
    """The ``speculativeAuthenticate`` field of the handshake ``hello``."""
    return {
        "saslStart": 1,
        "mechanism": credentials.mechanism,
        "payload": Binary(client_first),
        "options": {"skipEmptyExchange": True},
        "db": credentials.source,
    }


def sasl_start(credentials: Credentials, client_first: bytes) -> dict[str, Any]:
    return {
        "saslStart": 1,
        "mechanism": credentials.mechanism,
        "payload": Binary(client_first),
        "autoAuthorize": 1,
        "options": {"skipEmptyExchange": True},
        "$db": credentials.source,
    }


def sasl_continue(credentials: Credentials, conversation_id: Any, payload: bytes) -> dict[str, Any]:
    return {
        "saslContinue": 1,
        "conversationId": conversation_id,
        "payload": Binary(payload),
        "$db": credentials.source,
    }


def with_speculative_auth(
    handshake: Mapping[str, Any], credentials: Credentials, client_first: bytes
) -> dict[str, Any]:
    """A copy of the handshake ``hello`` that also starts the SASL conversation."""
    return {**handshake, "speculativeAuthenticate": speculative_authenticate(
        credentials, client_first)}


def x509_authenticate(credentials: Credentials, *, speculative: bool = False) -> dict[str, Any]:
    """The MONGODB-X509 ``authenticate`` command (or the hello's speculative form)."""
    command: dict[str, Any] = {"authenticate": 1, "mechanism": MONGODB_X509}
    if credentials.username:
        command["user"] = credentials.username
    command["db" if speculative else "$db"] = EXTERNAL
    return command


async def handshake_and_authenticate(
    command: Command, handshake: Mapping[str, Any], credentials: Credentials
) -> dict[str, Any]:
    """Send the handshake ``hello`` with ``speculativeAuthenticate`` and finish the
    authentication; returns the hello reply. Raises AuthenticationError."""
    if credentials.mechanism == MONGODB_X509:
        reply = await command({**handshake, "speculativeAuthenticate": x509_authenticate(
            credentials, speculative=True)})
        if not isinstance(reply.get("speculativeAuthenticate"), dict):
            _checked(await command(x509_authenticate(credentials)), "authenticate",
                     needs_payload=False)
        return reply
    conversation = ScramConversation(credentials)
    reply = await command(
        with_speculative_auth(handshake, credentials, conversation.client_first()))
    speculative = reply.get("speculativeAuthenticate")
    await authenticate(
        command, credentials,
        conversation if isinstance(speculative, dict) else None,
        speculative if isinstance(speculative, dict) else None,
    )
    return reply


def _checked(
    reply: Mapping[str, Any], step: str, *, has_ok: bool = True, needs_payload: bool = True
) -> Mapping[str, Any]:
    if has_ok and reply.get("ok") != 1:
        code = reply.get("code")
        errmsg = reply.get("errmsg") or "no error message"
        raise AuthenticationError(
            f"{step} failed: {errmsg}" + (f" (code {code})" if code is not None else ""),
            code if isinstance(code, int) else None,
        )
    if needs_payload and not isinstance(reply.get("payload"), bytes):
        raise AuthenticationError(f"{step} reply has no payload")
    return reply


async def authenticate(
    command: Command,
    credentials: Credentials,
    conversation: ScramConversation | None = None,
    speculative_reply: Mapping[str, Any] | None = None,
) -> None:
    """Run the SASL conversation over ``command`` (one request, one decoded reply).

    ``conversation`` and ``speculative_reply`` continue a conversation the handshake
    started (the ``speculativeAuthenticate`` document of the hello reply); without a
    speculative reply a fresh ``saslStart`` is sent. Raises AuthenticationError.
    """
    if speculative_reply is not None and conversation is not None:
        # The hello reply's speculativeAuthenticate document has no ``ok`` of its own.
        reply = _checked(speculative_reply, "speculative saslStart", has_ok=False)
    else:
        conversation = ScramConversation(credentials)
        reply = _checked(
            await command(sasl_start(credentials, conversation.client_first())), "saslStart"
        )
    conversation_id = reply.get("conversationId")
    client_final = conversation.client_final(reply["payload"])
    reply = _checked(
        await command(sasl_continue(credentials, conversation_id, client_final)),
        "saslContinue",
    )
    conversation.verify_server_final(reply["payload"])
    if not reply.get("done"):
        # A server that does not implement skipEmptyExchange wants one empty round.
        reply = _checked(
            await command(sasl_continue(credentials, conversation_id, b"")), "saslContinue",
            needs_payload=False,
        )
        if not reply.get("done"):
            raise AuthenticationError("server did not finish the SASL conversation")


def authentication_failed(
    address: tuple[str, int], credentials: Credentials, exc: AuthenticationError
) -> ProxyError:
    """The error a client sees: names the upstream and user, never the password."""
    return ProxyError(
        AUTHENTICATION_FAILED,
        f"mongoproxy could not authenticate to upstream {address[0]}:{address[1]} as user "
        f"{credentials.username!r} ({credentials.mechanism}, authSource "
        f"{credentials.source!r}): {exc}; check the credentials in upstream.uri",
    )
