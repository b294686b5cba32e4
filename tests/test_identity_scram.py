"""Clients authenticating to the proxy with SCRAM-SHA-256 (the server side).

Unit tests drive :mod:`proxy.identity.scram` with ``scramp``'s *client* as the peer,
check the stored-credential format against the RFC 7677 test vector, and the
``hash-password`` subcommand. The end-to-end tests at the bottom run the real pymongo
client against a tiny in-test OP_MSG server that routes the handshake and the SASL
commands to :class:`ClientAuthenticator`: it is test scaffolding for the authentication
state machine only, not the proxy (the end-to-end test through the proxy comes with the
listener wiring).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import bson
import pytest
from bson.binary import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure
from scramp import ScramClient

from proxy.commands import HELLO_COMMANDS
from proxy.identity.credentials import (
    CredentialError,
    StoredCredential,
    hash_password,
    parse,
)
from proxy.identity.handshake import UpstreamLimits, hello_reply
from proxy.identity.hash_cli import hash_password_main
from proxy.identity.scram import (
    FAILED,
    AuthenticatedUser,
    ClientAuthenticator,
    ClientAuthSession,
    ScramServerConversation,
    Stage,
)
from proxy.wire import (
    OpCode,
    decode_body,
    encode_op_msg,
    encode_op_reply,
    parse_header,
    parse_op_msg,
    parse_op_query,
)

Doc = dict[str, Any]
ITER = 4096  # the minimum: keeps the tests fast


@dataclass(frozen=True)
class User:
    username: str
    password_sha256: str
    tenant: str


USERS = [
    User("acme_app", hash_password("secret", ITER), "acme"),
    User("beta_app", hash_password("beta-secret", ITER), "beta"),
    User("ops_admin", hash_password("ops pass", ITER), "*"),
]


@pytest.fixture(scope="module")
def auth() -> ClientAuthenticator:
    return ClientAuthenticator(USERS)


def _client(user: str = "acme_app", password: str = "secret") -> ScramClient:
    return ScramClient(["SCRAM-SHA-256"], user, password)


def _start(client: ScramClient, skip: bool = True, db: str = "admin") -> Doc:
    cmd: Doc = {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": Binary(client.get_client_first().encode()),
        "autoAuthorize": 1,
        "$db": db,
    }
    if skip:
        cmd["options"] = {"skipEmptyExchange": True}
    return cmd


def _continue(conversation_id: Any, payload: bytes, db: str = "admin") -> Doc:
    return {"saslContinue": 1, "conversationId": conversation_id, "payload": Binary(payload),
            "$db": db}


def _assert_failed(reply: Doc, errmsg: str = FAILED) -> None:
    assert reply == {"ok": 0.0, "code": 18, "codeName": "AuthenticationFailed",
                     "errmsg": errmsg}


def _login(
    session: ClientAuthSession, user: str = "acme_app", password: str = "secret",
    db: str = "admin",
) -> tuple[Doc, AuthenticatedUser | None]:
    client = _client(user, password)
    reply, who = session.handle(_start(client, db=db))
    assert who is None and reply["ok"] == 1.0, reply
    client.set_server_first(reply["payload"].decode())
    return session.handle(_continue(reply["conversationId"], client.get_client_final().encode(),
                                    db=db))


# -- the conversation ---------------------------------------------------------------------


def test_full_exchange_skip_empty(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    reply, who = session.handle(_start(client))
    assert who is None
    assert set(reply) == {"conversationId", "done", "payload", "ok"}
    assert reply["conversationId"] == 1 and reply["done"] is False and reply["ok"] == 1.0
    assert isinstance(reply["payload"], Binary)
    client.set_server_first(reply["payload"].decode())
    final, who = session.handle(_continue(1, client.get_client_final().encode()))
    assert final["done"] is True and final["ok"] == 1.0 and final["conversationId"] == 1
    client.set_server_final(final["payload"].decode())  # the server's signature checks out
    assert who == AuthenticatedUser("acme_app", "acme", "admin")
    assert session.user == who and session.last_failure is None
    assert not session.in_progress


def test_exchange_without_skip_empty_needs_a_third_step(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client, skip=False))
    client.set_server_first(reply["payload"].decode())
    second, who = session.handle(_continue(1, client.get_client_final().encode()))
    assert second["done"] is False and who is None and session.user is None
    client.set_server_final(second["payload"].decode())
    third, who = session.handle(_continue(1, b""))
    assert third == {"conversationId": 1, "done": True, "payload": Binary(b""), "ok": 1.0}
    assert who is not None and who.tenant == "acme" and session.user == who


def test_non_empty_third_step_fails(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client, skip=False))
    client.set_server_first(reply["payload"].decode())
    session.handle(_continue(1, client.get_client_final().encode()))
    reply, who = session.handle(_continue(1, b"x=1"))
    _assert_failed(reply)
    assert who is None and session.user is None


def test_wrong_password(auth: ClientAuthenticator) -> None:
    session = auth.session()
    reply, who = _login(session, password="Secret")
    _assert_failed(reply)
    assert who is None and session.user is None
    assert session.last_failure is not None and "invalid-proof" in session.last_failure
    assert "Secret" not in session.last_failure


def test_unknown_user_fails_like_a_wrong_password(auth: ClientAuthenticator) -> None:
    def server_first(user: str) -> dict[str, str]:
        reply, _ = auth.session().handle(_start(_client(user, "secret")))
        assert reply["ok"] == 1.0  # no early failure that would reveal the user is unknown
        return dict(item.split("=", 1) for item in reply["payload"].decode().split(","))

    known, unknown = server_first("acme_app"), server_first("nobody")
    assert unknown["i"] == known["i"] == str(ITER)
    assert len(base64.b64decode(unknown["s"])) == len(base64.b64decode(known["s"]))
    # The decoy salt is stable, as a real user's salt is.
    assert server_first("nobody")["s"] == unknown["s"]
    assert server_first("nobody2")["s"] != unknown["s"]
    session = auth.session()
    reply, who = _login(session, user="nobody", password="secret")
    _assert_failed(reply)
    assert who is None and session.user is None


def test_decoy_salt_survives_a_restart() -> None:
    first = ClientAuthenticator(USERS).credential("nobody")
    again = ClientAuthenticator(USERS).credential("nobody")
    assert first.salt == again.salt and first.stored_key != again.stored_key


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "PLAIN", "scram-sha-256", None, 1])
def test_wrong_mechanism(auth: ClientAuthenticator, mechanism: Any) -> None:
    session = auth.session()
    cmd = _start(_client())
    cmd["mechanism"] = mechanism
    reply, who = session.handle(cmd)
    _assert_failed(reply)
    assert who is None and not session.in_progress


def test_forged_proof(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client))
    client.set_server_first(reply["payload"].decode())
    final = client.get_client_final()
    without_proof, proof = final.rsplit(",p=", 1)
    forged = bytearray(base64.b64decode(proof))
    forged[0] ^= 1
    reply, who = session.handle(_continue(
        1, f"{without_proof},p={base64.b64encode(bytes(forged)).decode()}".encode()))
    _assert_failed(reply)
    assert who is None and session.user is None and not session.in_progress


def test_replayed_client_final(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client))
    client.set_server_first(reply["payload"].decode())
    final = client.get_client_final().encode()
    _, who = session.handle(_continue(1, final))
    assert who is not None
    # Again on the same connection: the conversation is over.
    reply, who = session.handle(_continue(1, final))
    assert reply["code"] == 17 and reply["codeName"] == "ProtocolError" and who is None
    assert "no SASL conversation in progress" in reply["errmsg"]
    # In a new conversation (new server nonce) on another connection: the nonce differs.
    other = auth.session()
    reply, _ = other.handle(_start(_client()))
    reply, who = other.handle(_continue(reply["conversationId"], final))
    _assert_failed(reply)
    assert who is None and other.user is None


def test_proof_from_another_conversation(auth: ClientAuthenticator) -> None:
    """An eavesdropped client-final of one connection cannot log in another."""
    a, b = auth.session(), auth.session()
    ca, cb = _client(), _client()
    ra, _ = a.handle(_start(ca))
    b.handle(_start(cb))
    ca.set_server_first(ra["payload"].decode())
    reply, who = b.handle(_continue(1, ca.get_client_final().encode()))
    _assert_failed(reply)
    assert who is None


@pytest.mark.parametrize(
    ("payload", "errmsg"),
    [
        ("not base64!", "Authentication failed: saslStart: the payload string is not valid "
                        "base64"),
        (None, "Authentication failed: saslStart: payload must be BinData (or a base64 "
               "string), not missing"),
        (12, "Authentication failed: saslStart: payload must be BinData (or a base64 "
             "string), not int"),
        (Binary(b"\xff\xfe"), FAILED),  # not UTF-8
        (Binary(b"garbage"), FAILED),
        (Binary(b""), FAILED),
        (Binary(b"n,,r=abc"), FAILED),  # no user name
        (Binary(b"n,,n=acme_app"), FAILED),  # no nonce
        (Binary(b"p=tls-unique,,n=acme_app,r=abc"), FAILED),  # channel binding
        (Binary(b"y,,n=acme_app,r=abc"), FAILED),
        (Binary(b"n,a=other,n=acme_app,r=abc"), FAILED),  # authzid
        (Binary(b"n,,n=acme_app,r=a,b"), FAILED),
    ],
)
def test_bad_client_first(auth: ClientAuthenticator, payload: Any, errmsg: str) -> None:
    session = auth.session()
    cmd = _start(_client())
    if payload is None:
        del cmd["payload"]
    else:
        cmd["payload"] = payload
    reply, who = session.handle(cmd)
    _assert_failed(reply, errmsg)
    assert who is None and not session.in_progress


def test_base64_string_payloads_are_accepted(auth: ClientAuthenticator) -> None:
    """MongoDB takes a base64 string where BinData is expected (old shells sent that)."""
    session = auth.session()
    client = _client()
    cmd = _start(client)
    cmd["payload"] = base64.b64encode(bytes(cmd["payload"])).decode()
    reply, _ = session.handle(cmd)
    client.set_server_first(reply["payload"].decode())
    final = base64.b64encode(client.get_client_final().encode()).decode()
    reply, who = session.handle({"saslContinue": 1, "conversationId": 1, "payload": final})
    assert reply["done"] is True and who is not None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda final: b"\xff" + final,
        lambda final: final.replace(b",p=", b",p=!!"),  # proof is not base64
        lambda final: final.replace(b"c=biws", b"c=%%%%"),  # channel binding not base64
        lambda final: final.replace(b"c=biws", b"c=eSws"),  # "y,," instead of "n,,"
        lambda final: final.split(b",p=")[0],  # no proof
        lambda final: b"",
    ],
)
def test_bad_client_final(auth: ClientAuthenticator, mangle: Any) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client))
    client.set_server_first(reply["payload"].decode())
    reply, who = session.handle(_continue(1, mangle(client.get_client_final().encode())))
    _assert_failed(reply)
    assert who is None and session.user is None and not session.in_progress


@pytest.mark.parametrize("given", [2, "1", True, None, 1.5])
def test_conversation_id_mismatch(auth: ClientAuthenticator, given: Any) -> None:
    session = auth.session()
    client = _client()
    reply, _ = session.handle(_start(client))
    client.set_server_first(reply["payload"].decode())
    final = client.get_client_final().encode()
    reply, who = session.handle(_continue(given, final))
    assert reply["code"] == 17 and who is None
    assert f"conversationId {given!r} does not match" in reply["errmsg"]
    # The conversation is abandoned: the right id now finds nothing to continue.
    reply, who = session.handle(_continue(1, final))
    assert reply["code"] == 17 and who is None and session.user is None


def test_continue_without_start(auth: ClientAuthenticator) -> None:
    reply, who = auth.session().handle(_continue(1, b"c=biws,r=x,p=eHl6"))
    assert reply["code"] == 17 and who is None
    assert "send saslStart first" in reply["errmsg"]


def test_new_start_abandons_the_conversation_in_progress(auth: ClientAuthenticator) -> None:
    session = auth.session()
    first = _client()
    reply, _ = session.handle(_start(first))
    first.set_server_first(reply["payload"].decode())
    second = _client()
    reply2, _ = session.handle(_start(second))
    assert reply2["conversationId"] == 2
    reply, who = session.handle(_continue(1, first.get_client_final().encode()))
    assert reply["code"] == 17 and who is None
    # And the second one was abandoned by that mismatch as well (fail closed).
    second.set_server_first(reply2["payload"].decode())
    reply, who = session.handle(_continue(2, second.get_client_final().encode()))
    assert reply["code"] == 17 and who is None


def test_conversation_steps_out_of_order() -> None:
    conversation = ScramServerConversation(ClientAuthenticator(USERS).credential)
    with pytest.raises(Exception, match="out of order"):
        conversation.server_final(b"c=biws,r=x,p=eHl6")
    assert conversation.stage is Stage.FAILED
    with pytest.raises(Exception, match="out of order"):
        conversation.server_first(b"n,,n=acme_app,r=abc")


def test_source_is_recorded(auth: ClientAuthenticator) -> None:
    session = auth.session()
    _, who = _login(session, db="app")
    assert who == AuthenticatedUser("acme_app", "acme", "app")
    cmd = _start(_client())
    del cmd["$db"]
    reply, _ = auth.session().handle(cmd)
    assert reply["ok"] == 1.0  # defaults to admin


def test_authenticate_command_fails(auth: ClientAuthenticator) -> None:
    reply, who = auth.session().handle({"authenticate": 1, "mechanism": "MONGODB-X509"})
    _assert_failed(reply)
    assert who is None


def test_not_an_auth_command(auth: ClientAuthenticator) -> None:
    with pytest.raises(ValueError, match="not an authentication command"):
        auth.session().handle({"find": "x"})


# -- one identity per connection ----------------------------------------------------------


def test_reauthenticating_as_the_same_user(auth: ClientAuthenticator) -> None:
    session = auth.session()
    _, first = _login(session)
    reply, again = _login(session, db="other")
    assert reply["done"] is True and again == first and session.user == first


def test_switching_user_is_refused(auth: ClientAuthenticator) -> None:
    session = auth.session()
    _, first = _login(session)
    reply, who = _login(session, user="beta_app", password="beta-secret")
    assert who is None and session.user == first
    assert reply["code"] == 18
    assert "already authenticated as 'acme_app'" in reply["errmsg"]


def test_failed_reauthentication_keeps_the_identity(auth: ClientAuthenticator) -> None:
    session = auth.session()
    _, first = _login(session)
    reply, who = _login(session, password="wrong")
    _assert_failed(reply)
    assert who is None and session.user == first


def test_logout(auth: ClientAuthenticator) -> None:
    session = auth.session()
    assert session.handle({"logout": 1, "$db": "admin"}) == ({"ok": 1.0}, None)
    _, first = _login(session)
    reply, who = session.handle({"logout": 1, "$db": "admin"})
    assert reply["code"] == 20 and reply["codeName"] == "IllegalOperation"
    assert who is None and session.user == first


def test_cross_tenant_identity(auth: ClientAuthenticator) -> None:
    _, who = _login(auth.session(), user="ops_admin", password="ops pass")
    assert who is not None and who.all_tenants and who.tenant == "*"


def test_no_users_configured() -> None:
    empty = ClientAuthenticator([])
    assert len(empty) == 0
    reply, who = _login(empty.session())
    _assert_failed(reply)
    assert who is None


# -- speculative authentication and mechanism negotiation in hello -----------------------


def _hello_with_speculative(client: ScramClient, mechanism: str = "SCRAM-SHA-256") -> Doc:
    return {
        "hello": 1,
        "client": {"driver": {"name": "test"}},
        "speculativeAuthenticate": {
            "saslStart": 1,
            "mechanism": mechanism,
            "payload": Binary(client.get_client_first().encode()),
            "autoAuthorize": 1,
            "options": {"skipEmptyExchange": True},
            "db": "app",
        },
        "$db": "admin",
    }


def test_speculative_flow(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client()
    spec = session.speculative(_hello_with_speculative(client))
    assert spec is not None and set(spec) == {"conversationId", "done", "payload"}
    assert spec["done"] is False
    client.set_server_first(spec["payload"].decode())
    reply, who = session.handle(_continue(spec["conversationId"],
                                          client.get_client_final().encode()))
    assert reply["done"] is True
    client.set_server_final(reply["payload"].decode())
    assert who == AuthenticatedUser("acme_app", "acme", "app")


def test_speculative_wrong_password_fails_on_continue(auth: ClientAuthenticator) -> None:
    session = auth.session()
    client = _client(password="nope")
    spec = session.speculative(_hello_with_speculative(client))
    assert spec is not None
    client.set_server_first(spec["payload"].decode())
    reply, who = session.handle(_continue(spec["conversationId"],
                                          client.get_client_final().encode()))
    _assert_failed(reply)
    assert who is None


@pytest.mark.parametrize(
    "hello",
    [
        {"hello": 1},
        {"hello": 1, "speculativeAuthenticate": {"authenticate": 1,
                                                 "mechanism": "MONGODB-X509"}},
        {"hello": 1, "speculativeAuthenticate": {"saslStart": 1, "mechanism": "SCRAM-SHA-1",
                                                 "payload": Binary(b"n,,n=a,r=b")}},
        {"hello": 1, "speculativeAuthenticate": {"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                                                 "payload": Binary(b"garbage")}},
        {"hello": 1, "speculativeAuthenticate": "yes"},
    ],
)
def test_speculative_left_out(auth: ClientAuthenticator, hello: Doc) -> None:
    session = auth.session()
    assert session.speculative(hello) is None
    assert not session.in_progress


def test_supported_mechs(auth: ClientAuthenticator) -> None:
    session = auth.session()
    assert session.supported_mechs({"hello": 1, "saslSupportedMechs": "admin.acme_app"}) == [
        "SCRAM-SHA-256"]
    # Unknown users get the same answer: the handshake does not reveal who exists.
    assert auth.supported_mechs({"hello": 1, "saslSupportedMechs": "app.nobody"}) == [
        "SCRAM-SHA-256"]
    for value in (None, "nodot", ".user", "db.", 3):
        assert auth.supported_mechs({"hello": 1, "saslSupportedMechs": value}) is None
    assert auth.supported_mechs({"hello": 1}) is None


# -- the authenticator's configuration ------------------------------------------------------


def test_authenticator_rejects_bad_users() -> None:
    good = hash_password("x", ITER)
    with pytest.raises(ValueError, match="user 'a' is configured twice"):
        ClientAuthenticator([User("a", good, "t"), User("a", good, "u")])
    with pytest.raises(ValueError, match="user 'b': password_sha256: not a stored credential"):
        ClientAuthenticator([User("b", "plain-password", "t")])
    with pytest.raises(ValueError, match="must not be empty"):
        ClientAuthenticator([User("", good, "t")])
    assert ClientAuthenticator([User("a", good, "t")]).usernames == ["a"]


# -- stored credentials -------------------------------------------------------------------

# RFC 7677, section 3.
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_vector() -> None:
    stored = hash_password("pencil", 4096, base64.b64decode(RFC_SALT))
    assert stored.startswith(f"SCRAM-SHA-256$4096:{RFC_SALT}$")
    authenticator = ClientAuthenticator([User("user", stored, "t")])
    session = ClientAuthSession(authenticator, s_nonce=RFC_SERVER_NONCE)
    reply, _ = session.handle({"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                               "payload": Binary(RFC_CLIENT_FIRST),
                               "options": {"skipEmptyExchange": True}})
    assert bytes(reply["payload"]) == RFC_SERVER_FIRST
    reply, who = session.handle(_continue(1, RFC_CLIENT_FINAL))
    assert bytes(reply["payload"]) == RFC_SERVER_FINAL and reply["done"] is True
    assert who == AuthenticatedUser("user", "t")


def test_hash_round_trip() -> None:
    stored = hash_password("secret")
    credential = parse(stored)
    assert credential.iterations == 15000 and len(credential.salt) == 28
    assert len(credential.stored_key) == len(credential.server_key) == 32
    assert str(credential) == stored
    assert StoredCredential.parse(stored) == credential
    assert "stored_key" not in repr(credential)
    assert hash_password("secret") != stored  # a fresh salt each time


def test_password_is_saslprepped() -> None:
    """RFC 4013: soft hyphen is mapped to nothing, so "I\\u00adX" is the password "IX"."""
    authenticator = ClientAuthenticator([User("u", hash_password("I\u00adX", ITER), "t")])
    _, who = _login(authenticator.session(), user="u", password="IX")
    assert who is not None


@pytest.mark.parametrize(
    ("password", "iterations", "salt", "message"),
    [
        ("", 4096, None, "empty"),
        ("ok", 4095, None, "out of range"),
        ("ok", 10_000_001, None, "out of range"),
        ("ok", 4096, b"short", "at least 12"),
        ("bell\u0007", 4096, None, "cannot be used"),
    ],
)
def test_hash_password_errors(
    password: str, iterations: int, salt: bytes | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        hash_password(password, iterations, salt)


_GOOD = hash_password("x", ITER, b"0123456789abcdef")
_, _SALT_AND_KEYS = _GOOD.split("$", 1)
_ITERS_SALT, _KEYS = _SALT_AND_KEYS.split("$")
_SALT = _ITERS_SALT.split(":")[1]
_STORED, _SERVER = _KEYS.split(":")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("secret", "not a stored credential"),
        ("", "not a stored credential"),
        (f"SCRAM-SHA-1$4096:{_SALT}${_KEYS}", "mechanism 'SCRAM-SHA-1' is not supported"),
        (f"scram-sha-256$4096:{_SALT}${_KEYS}", "mechanism 'scram-sha-256'"),
        (f"SCRAM-SHA-256$4096:{_SALT}", "exactly three"),
        (f"SCRAM-SHA-256$4096:{_SALT}${_KEYS}$x", "exactly three"),
        (f"SCRAM-SHA-256$4096{_SALT}${_KEYS}", "iterations and salt"),
        (f"SCRAM-SHA-256$4096:{_SALT}${_STORED}{_SERVER}", "StoredKey and ServerKey"),
        (f"SCRAM-SHA-256$abc:{_SALT}${_KEYS}", "not a decimal"),
        (f"SCRAM-SHA-256$+4096:{_SALT}${_KEYS}", "not a decimal"),
        (f"SCRAM-SHA-256$04096:{_SALT}${_KEYS}", "must not start with 0"),
        (f"SCRAM-SHA-256$1000:{_SALT}${_KEYS}", "out of range"),
        (f"SCRAM-SHA-256$4096:{_SALT[:-2]}${_KEYS}", "salt is not valid base64"),
        (f"SCRAM-SHA-256$4096:{_SALT.rstrip('=')}${_KEYS}", "salt is not valid base64"),
        (f"SCRAM-SHA-256$4096:c2hvcnQ=${_KEYS}", "salt is 5 bytes"),
        (f"SCRAM-SHA-256$4096:${_KEYS}", "salt is empty"),
        (f"SCRAM-SHA-256$4096:{_SALT}$c2hvcnQ=:{_SERVER}", "StoredKey is 5 bytes"),
        (f"SCRAM-SHA-256$4096:{_SALT}${_STORED}:{_STORED[:-2]}", "ServerKey is not valid"),
        (f"SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZh==${_KEYS}", "salt is not canonical"),
        (f"SCRAM-SHA-256$4096:{_SALT}${_STORED}:é{_SERVER}", "ServerKey is not valid"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(CredentialError, match=message) as info:
        parse(text)
    assert _STORED not in str(info.value) and _SERVER not in str(info.value)


def test_parse_accepts_its_own_output() -> None:
    assert str(parse(_GOOD)) == _GOOD


# -- hash-password ---------------------------------------------------------------------------


def _cli(argv: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = hash_password_main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_reads_stdin() -> None:
    code, out, err = _cli(["--iterations", "4096", "acme_app"], "secret\n")
    assert code == 0 and err == ""
    stored = out.strip()
    assert parse(stored).iterations == 4096
    _, who = _login(ClientAuthenticator([User("acme_app", stored, "acme")]).session())
    assert who is not None


def test_cli_keeps_other_whitespace() -> None:
    code, out, _ = _cli(["--iterations", "4096"], " spaced \r\n")
    assert code == 0
    authenticator = ClientAuthenticator([User("u", out.strip(), "t")])
    assert _login(authenticator.session(), user="u", password=" spaced ")[1] is not None
    assert _login(authenticator.session(), user="u", password="spaced")[1] is None


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        ([], "", "the password is empty"),
        ([], "\n", "the password is empty"),
        (["--iterations", "10"], "pw", "out of range"),
        ([], "bell\u0007", "cannot be used"),
        (["bad\u0007user"], "pw", "user name"),
    ],
)
def test_cli_errors(argv: list[str], stdin: str, message: str) -> None:
    code, out, err = _cli(argv, stdin)
    assert code == 2 and out == "" and message in err


# -- end to end with pymongo (test scaffolding, not the proxy) -----------------------------


class MiniServer:
    """Just enough of a mongos for pymongo to authenticate and run ``ping``.

    Test scaffolding for the authentication state machine only: the handshake (OP_QUERY
    or OP_MSG, answered with the proxy's own ``hello_reply`` plus the authentication
    fields), ``saslStart``/``saslContinue`` routed to a :class:`ClientAuthSession` per
    connection, ``ping`` refused until the connection is authenticated. The real
    end-to-end test goes through the proxy once the listener is wired.
    """

    def __init__(self, authenticator: ClientAuthenticator, speculative: bool = True) -> None:
        self.authenticator = authenticator
        self.speculative = speculative
        self.seen: list[str] = []
        self.logins: list[AuthenticatedUser] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._next_id = 0

    def __enter__(self) -> MiniServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            # Client sockets pymongo has not closed yet: their tasks end with the loop.
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        connection_id = self._next_id
        session = self.authenticator.session()
        try:
            while True:
                head = await reader.readexactly(4)
                (length,) = struct.unpack("<i", head)
                message = head + await reader.readexactly(length - 4)
                header = parse_header(message)
                if header.op_code == OpCode.OP_QUERY:
                    query = parse_op_query(message)
                    command = bson.decode(query.query)
                    reply = self._dispatch(session, connection_id, command)
                    writer.write(encode_op_reply(0, header.request_id, [bson.encode(reply)]))
                else:
                    msg = parse_op_msg(message)
                    reply = self._dispatch(session, connection_id, decode_body(msg))
                    writer.write(encode_op_msg(0, header.request_id, bson.encode(reply)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _dispatch(self, session: ClientAuthSession, connection_id: int, command: Doc) -> Doc:
        name = next(iter(command))
        self.seen.append(name if "speculativeAuthenticate" not in command
                         else f"{name}+speculative")
        if name in HELLO_COMMANDS:
            reply = hello_reply(name, UpstreamLimits(max_wire_version=21), connection_id, [],
                                datetime.datetime.now(datetime.UTC))
            mechs = session.supported_mechs(command)
            if mechs is not None:
                reply["saslSupportedMechs"] = mechs
            spec = session.speculative(command) if self.speculative else None
            if spec is not None:
                reply["speculativeAuthenticate"] = spec
            return reply
        if name in {"saslStart", "saslContinue", "authenticate", "logout"}:
            reply, user = session.handle(command)
            if user is not None:
                self.logins.append(user)
            return reply
        if name in {"ping", "endSessions"}:
            if session.user is None and name == "ping":
                return {"ok": 0.0, "code": 13, "codeName": "Unauthorized",
                        "errmsg": "not authenticated"}
            return {"ok": 1.0}
        return {"ok": 0.0, "code": 59, "codeName": "CommandNotFound", "errmsg": name}


@pytest.fixture
def mini() -> Iterator[MiniServer]:
    with MiniServer(ClientAuthenticator(USERS)) as server:
        yield server


def _mongo(port: int, user: str, password: str, mechanism: str | None) -> MongoClient[Doc]:
    options = "authSource=admin&serverSelectionTimeoutMS=3000&connectTimeoutMS=3000"
    if mechanism is not None:
        options += f"&authMechanism={mechanism}"
    return MongoClient(f"mongodb://{user}:{password}@127.0.0.1:{port}/?{options}")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", None])
def test_pymongo_authenticates(mini: MiniServer, mechanism: str | None) -> None:
    client = _mongo(mini.port, "acme_app", "secret", mechanism)
    try:
        assert client.admin.command("ping")["ok"] == 1.0
    finally:
        client.close()
    assert mini.logins and all(
        u == AuthenticatedUser("acme_app", "acme", "admin") for u in mini.logins)
    # Speculative authentication in the handshake: no saslStart round trip.
    assert "saslStart" not in mini.seen and "saslContinue" in mini.seen
    assert any(name.endswith("+speculative") for name in mini.seen)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", None])
@pytest.mark.parametrize(("user", "password"), [("acme_app", "wrong"), ("nobody", "secret")])
def test_pymongo_refused(
    mini: MiniServer, mechanism: str | None, user: str, password: str
) -> None:
    client = _mongo(mini.port, user, password, mechanism)
    try:
        with pytest.raises(OperationFailure) as info:
            client.admin.command("ping")
        assert info.value.code == 18
        assert info.value.details is not None
        assert info.value.details["errmsg"] == FAILED
    finally:
        client.close()
    assert not mini.logins


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", None])
def test_pymongo_without_speculative_uses_sasl_start(mechanism: str | None) -> None:
    with MiniServer(ClientAuthenticator(USERS), speculative=False) as server:
        client = _mongo(server.port, "beta_app", "beta-secret", mechanism)
        try:
            assert client.admin.command("ping")["ok"] == 1.0
        finally:
            client.close()
        assert "saslStart" in server.seen and "saslContinue" in server.seen
        assert server.logins[0] == AuthenticatedUser("beta_app", "beta", "admin")


def test_pymongo_saslprep_password() -> None:
    users = [User("u", hash_password("IX", ITER), "t")]
    with MiniServer(ClientAuthenticator(users)) as server:
        # pymongo SASLpreps "I\u00adX" to "IX" too (percent-encoded in the uri).
        client = _mongo(server.port, "u", "I%C2%ADX", None)
        try:
            assert client.admin.command("ping")["ok"] == 1.0
        finally:
            client.close()
