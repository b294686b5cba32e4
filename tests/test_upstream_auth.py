"""The proxy authenticates its own upstream connections (SCRAM-SHA-256) as the user in
``upstream.uri``; clients connect to the proxy without credentials.

Against a real FerretDB started with authentication enabled (``--test-enable-new-auth``
and a setup user), plus unit tests of the SASL messages and the SCRAM conversation
against ``scramp``'s server side and the RFC 7677 test vector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus

import pytest
from bson.binary import Binary
from pymongo import MongoClient
from pymongo.errors import OperationFailure
from scramp import ScramMechanism

from proxy.config import ConfigError, PoolConfig, parse_config
from proxy.errors import ProxyError
from proxy.pool.auth import (
    AuthenticationError,
    Credentials,
    ScramConversation,
    authenticate,
    sasl_continue,
    sasl_start,
    speculative_authenticate,
    with_speculative_auth,
)
from proxy.pool.connection import UpstreamConnection
from proxy.pool.pool import HANDSHAKE, UpstreamPool
from tests.support import FerretDBProcess, ProxyFactory

Doc = dict[str, Any]

USER = "proxyuser"
# Characters that must be percent-encoded in a uri, to prove the uri is decoded.
PASSWORD = "s3cret:p@ss/w%rd"
AUTH_DB = "authdb"
WRONG_PASSWORD = "not-the-Password-42"


class AuthFerretDB(FerretDBProcess):
    """FerretDB with authentication enabled and one user created at start."""

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--test-enable-new-auth",
            f"--setup-username={USER}",
            f"--setup-password={PASSWORD}",
            f"--setup-database={AUTH_DB}",
        ]

    def uri_as(self, password: str = PASSWORD, source: str = AUTH_DB) -> str:
        return (
            f"mongodb://{quote_plus(USER)}:{quote_plus(password)}@{self.host}:{self.port}/"
            f"?authSource={source}&authMechanism=SCRAM-SHA-256"
        )


@pytest.fixture(scope="module")
def auth_ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthFerretDB]:
    proc = AuthFerretDB(tmp_path_factory.mktemp("ferretdb-auth"))
    proc.start()
    yield proc
    proc.stop()


def client(uri: str) -> MongoClient[Doc]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000, retryReads=False, retryWrites=False)


# --- the premise: FerretDB really requires authentication ---------------------------


def test_ferretdb_requires_authentication(auth_ferretdb: AuthFerretDB) -> None:
    with client(auth_ferretdb.uri_as()) as authed:
        authed[AUTH_DB].premise.insert_one({"x": 1})
        assert authed[AUTH_DB].premise.count_documents({}) == 1
    with client(auth_ferretdb.uri) as anonymous, pytest.raises(OperationFailure) as err:
        anonymous[AUTH_DB].premise.find_one()
    assert err.value.code == 13  # Unauthorized


# --- through the proxy -----------------------------------------------------------------


def _crud(c: MongoClient[Doc], db_name: str) -> None:
    coll = c[db_name].items
    coll.drop()
    coll.insert_many([{"_id": i, "n": i} for i in range(250)])
    assert coll.count_documents({}) == 250
    coll.update_one({"_id": 7}, {"$set": {"n": -7}})
    assert coll.find_one({"_id": 7}) == {"_id": 7, "n": -7}
    coll.delete_many({"n": {"$gte": 200}})
    # A cursor read in several batches (getMore on pooled, authenticated connections).
    assert [d["_id"] for d in coll.find({}, batch_size=20).sort("_id", 1)] == list(range(200))
    assert coll.aggregate([{"$count": "k"}]).next() == {"k": 200}


def test_proxy_with_credentials_serves_anonymous_clients(
    auth_ferretdb: AuthFerretDB, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(auth_ferretdb.uri_as(), {"upstream": {"pool": {"min_size": 2}}})
    with client(proxy.uri) as c:
        _crud(c, db_name)
    assert PASSWORD not in proxy.log_text()


def test_declared_members_take_credentials_from_uri(
    auth_ferretdb: AuthFerretDB, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(auth_ferretdb.uri_as(), {
        "upstream": {"members": [{"host": auth_ferretdb.address, "role": "primary"}]},
    })
    with client(proxy.uri) as c:
        _crud(c, db_name)


def test_wrong_password_is_authentication_failed_naming_the_upstream(
    auth_ferretdb: AuthFerretDB, proxy_factory: ProxyFactory, db_name: str
) -> None:
    proxy = proxy_factory(auth_ferretdb.uri_as(WRONG_PASSWORD), {
        "upstream": {"pool": {"connect_timeout_ms": 3000}},
    })
    with client(proxy.uri) as c:
        for _ in range(2):  # every attempt fails the same way; nothing is left reserved
            with pytest.raises(OperationFailure) as err:
                c[db_name].items.find_one()
            assert err.value.code == 18
            message = str(err.value.details)
            assert auth_ferretdb.address in message
            assert USER in message
            assert WRONG_PASSWORD not in message
            assert quote_plus(WRONG_PASSWORD) not in message
    assert WRONG_PASSWORD not in proxy.log_text()


def test_clients_are_still_refused_by_ferretdb_without_the_proxy(
    auth_ferretdb: AuthFerretDB, proxy_factory: ProxyFactory
) -> None:
    # A proxy without credentials forwards commands unauthenticated: FerretDB refuses.
    proxy = proxy_factory(auth_ferretdb.uri)
    with client(proxy.uri) as c, pytest.raises(OperationFailure) as err:
        c[AUTH_DB].items.find_one()
    assert err.value.code == 13


# --- UpstreamConnection / UpstreamPool against the authenticating FerretDB ------------


async def test_connection_open_authenticates(auth_ferretdb: AuthFerretDB) -> None:
    creds = Credentials.from_uri(auth_ferretdb.uri_as())
    address = (auth_ferretdb.host, auth_ferretdb.port)
    conn = await UpstreamConnection.open(address, 5.0, HANDSHAKE, creds)
    try:
        reply = await conn.command({"connectionStatus": 1, "$db": "admin"}, 5.0)
        assert reply["ok"] == 1
        reply = await conn.command({"find": "premise", "filter": {}, "$db": AUTH_DB}, 5.0)
        assert reply["ok"] == 1
    finally:
        conn.close()
    # Monitoring connections (no credentials) can still say hello.
    conn = await UpstreamConnection.open(address, 5.0, HANDSHAKE)
    try:
        assert (await conn.command({"hello": 1, "$db": "admin"}, 5.0))["ok"] == 1
    finally:
        conn.close()


@pytest.mark.parametrize(("password", "source"), [
    (WRONG_PASSWORD, AUTH_DB),
    (PASSWORD, "admin"),  # the user lives in another database
])
async def test_pool_auth_failure_is_code_18_and_releases_the_slot(
    auth_ferretdb: AuthFerretDB, password: str, source: str
) -> None:
    creds = Credentials.from_uri(auth_ferretdb.uri_as(password, source))
    pool = UpstreamPool(
        (auth_ferretdb.host, auth_ferretdb.port), PoolConfig(max_size=1), creds
    )
    try:
        for _ in range(3):
            with pytest.raises(ProxyError) as err:
                await pool.checkout()
            assert err.value.code == 18
            assert err.value.code_name == "AuthenticationFailed"
            assert auth_ferretdb.address in err.value.errmsg
            assert repr(source) in err.value.errmsg
            assert password not in err.value.errmsg
            assert pool.size == 0
            assert pool.in_use == 0
    finally:
        await pool.close()


# --- credentials from the connection string --------------------------------------------


def test_credentials_from_uri() -> None:
    assert Credentials.from_uri(None) is None
    assert Credentials.from_uri("mongodb://h:1/") is None
    creds = Credentials.from_uri("mongodb://u%3Dx:p%40ss@h:1/?authSource=src")
    assert creds == Credentials("u=x", "p@ss", "src", "SCRAM-SHA-256")
    assert "p@ss" not in repr(creds)
    # authSource: the option, else the uri's database, else admin.
    assert Credentials.from_uri("mongodb://u:p@h/appdb").source == "appdb"  # type: ignore[union-attr]
    assert Credentials.from_uri("mongodb://u:p@h/").source == "admin"  # type: ignore[union-attr]
    explicit = Credentials.from_uri("mongodb://u:p@h/?authMechanism=SCRAM-SHA-256")
    assert explicit is not None
    assert explicit.mechanism == "SCRAM-SHA-256"
    sha1 = Credentials.from_uri("mongodb://u:p@h/?authMechanism=SCRAM-SHA-1")
    assert sha1 == Credentials("u", "p", "admin", "SCRAM-SHA-1")
    with pytest.raises(ValueError, match="PLAIN is not supported"):
        Credentials.from_uri("mongodb://u:p@h/?authMechanism=PLAIN")
    with pytest.raises(ValueError, match="no password"):
        Credentials.from_uri("mongodb://u@h/")


def test_config_rejects_unsupported_mechanism_without_echoing_the_password() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"upstream": {"uri": "mongodb://u:hunter2@h/?authMechanism=PLAIN"}})
    assert "upstream.uri" in str(err.value)
    assert "PLAIN" in str(err.value)
    assert "hunter2" not in str(err.value)


# --- SASL message building ---------------------------------------------------------------

CREDS = Credentials("user", "pencil", "admin")


def test_sasl_start_message() -> None:
    doc = sasl_start(CREDS, b"n,,n=user,r=abc")
    assert doc == {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": Binary(b"n,,n=user,r=abc"),
        "autoAuthorize": 1,
        "options": {"skipEmptyExchange": True},
        "$db": "admin",
    }
    assert next(iter(doc)) == "saslStart"  # the command name comes first
    assert isinstance(doc["payload"], Binary)
    assert doc["payload"].subtype == 0


def test_sasl_continue_message() -> None:
    doc = sasl_continue(Credentials("u", "p", "src"), 7, b"c=biws,r=x,p=y")
    assert doc == {
        "saslContinue": 1,
        "conversationId": 7,
        "payload": Binary(b"c=biws,r=x,p=y"),
        "$db": "src",
    }
    assert next(iter(doc)) == "saslContinue"


def test_speculative_authenticate_in_hello() -> None:
    spec = speculative_authenticate(CREDS, b"n,,n=user,r=abc")
    assert spec == {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": Binary(b"n,,n=user,r=abc"),
        "options": {"skipEmptyExchange": True},
        "db": "admin",
    }
    hello = with_speculative_auth(HANDSHAKE, CREDS, b"n,,n=user,r=abc")
    assert next(iter(hello)) == "hello"
    assert hello["speculativeAuthenticate"] == spec
    assert "speculativeAuthenticate" not in HANDSHAKE  # the shared handshake is untouched


# RFC 7677 section 3: SCRAM-SHA-256, user "user", password "pencil".
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_conversation_rfc7677_vector() -> None:
    conv = ScramConversation(CREDS, nonce=RFC_NONCE)
    assert conv.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert conv.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    conv.verify_server_final(RFC_SERVER_FINAL)


def test_scram_conversation_rejects_a_forged_server_signature() -> None:
    conv = ScramConversation(CREDS, nonce=RFC_NONCE)
    conv.client_first()
    conv.client_final(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationError, match="signature"):
        conv.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")


def _client_final(password: str) -> bytes:
    conv = ScramConversation(Credentials("user", password), nonce=RFC_NONCE)
    conv.client_first()
    return conv.client_final(RFC_SERVER_FIRST)


def test_password_is_saslprepped() -> None:
    # RFC 4013: U+00AD (soft hyphen) maps to nothing, U+00A0 (no-break space) to a space.
    assert _client_final("pen\u00adcil") == _client_final("pencil") == RFC_CLIENT_FINAL
    assert _client_final("pen\u00a0cil") == _client_final("pen cil")
    assert _client_final("pen cil") != RFC_CLIENT_FINAL
    # Prohibited characters (here a control character) are refused before any I/O.
    with pytest.raises(AuthenticationError, match="invalid credentials"):
        ScramConversation(Credentials("user", "pen\u0007cil"))


# --- the whole conversation against scramp's server side ----------------------------------


class FakeSaslServer:
    """MongoDB's side of the SASL conversation, with scramp's SCRAM server."""

    def __init__(self, password: str, *, skip_empty_exchange: bool = True) -> None:
        mechanism = ScramMechanism("SCRAM-SHA-256")
        auth_info = mechanism.make_auth_info(password, iteration_count=4096)
        self.mechanism = mechanism
        self.auth_fn = lambda _user: auth_info
        self.skip_empty_exchange = skip_empty_exchange
        self.commands: list[Doc] = []
        self._server: Any = None
        self._step = 0

    def start(self, payload: bytes) -> Doc:
        self._server = self.mechanism.make_server(self.auth_fn)
        self._server.set_client_first(payload.decode())
        self._step = 1
        return {"conversationId": 1, "done": False,
                "payload": self._server.get_server_first().encode()}

    async def command(self, command: Doc) -> Doc:
        self.commands.append(command)
        name = next(iter(command))
        if name == "saslStart":
            return {**self.start(bytes(command["payload"])), "ok": 1.0}
        assert name == "saslContinue"
        assert command["conversationId"] == 1
        if self._step == 1:
            self._step = 2
            try:
                self._server.set_client_final(bytes(command["payload"]).decode())
            except Exception:
                return {"ok": 0.0, "errmsg": "Authentication failed.", "code": 18,
                        "codeName": "AuthenticationFailed"}
            return {"conversationId": 1, "done": self.skip_empty_exchange,
                    "payload": self._server.get_server_final().encode(), "ok": 1.0}
        assert bytes(command["payload"]) == b""
        return {"conversationId": 1, "done": True, "payload": b"", "ok": 1.0}


async def test_authenticate_with_sasl_start() -> None:
    server = FakeSaslServer("pencil")
    await authenticate(server.command, CREDS)
    assert [next(iter(c)) for c in server.commands] == ["saslStart", "saslContinue"]
    assert all(c["$db"] == "admin" for c in server.commands)


async def test_authenticate_continues_a_speculative_start() -> None:
    server = FakeSaslServer("pencil")
    conv = ScramConversation(CREDS)
    hello = with_speculative_auth(HANDSHAKE, CREDS, conv.client_first())
    speculative_reply = server.start(bytes(hello["speculativeAuthenticate"]["payload"]))
    await authenticate(server.command, CREDS, conv, speculative_reply)
    assert [next(iter(c)) for c in server.commands] == ["saslContinue"]


async def test_authenticate_sends_the_empty_exchange_if_the_server_wants_it() -> None:
    server = FakeSaslServer("pencil", skip_empty_exchange=False)
    await authenticate(server.command, CREDS)
    assert [next(iter(c)) for c in server.commands] == [
        "saslStart", "saslContinue", "saslContinue"]


async def test_authenticate_wrong_password() -> None:
    server = FakeSaslServer("pencil")
    with pytest.raises(AuthenticationError) as err:
        await authenticate(server.command, Credentials("user", "crayon"))
    assert err.value.code == 18
    assert "crayon" not in str(err.value)


async def test_authenticate_rejects_a_server_that_does_not_know_the_password() -> None:
    # The server accepts anything but cannot produce the right signature.
    server = FakeSaslServer("other-password")

    async def lenient(command: Doc) -> Doc:
        reply = await server.command(command)
        if next(iter(command)) == "saslContinue" and reply["ok"] == 0:
            return {"conversationId": 1, "done": True, "ok": 1.0,
                    "payload": b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
        return reply

    with pytest.raises(AuthenticationError, match="signature"):
        await authenticate(lenient, CREDS)
