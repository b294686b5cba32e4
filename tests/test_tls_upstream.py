"""TLS from the proxy to its upstream: the ``tls*`` options of ``upstream.uri`` apply to the
proxy's own pools and health checks, as pymongo applies them.

Upstreams are real FerretDB servers listening with TLS only (``--listen-tls``, no
plaintext port), with certificates made at test time. SCRAM-SHA-1 and SCRAM-SHA-256 run
against FerretDB's own authentication. FerretDB has no MONGODB-X509, so that conversation
is tested against ``mockupdb`` over TLS (the test says so); ``mongodb+srv://`` has no DNS
server here, so the SRV test replaces dnspython's resolver, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from proxy.config import ConfigError, PoolConfig, parse_config
from proxy.errors import ProxyError
from proxy.pool.auth import Credentials
from proxy.pool.connection import UpstreamConnection
from proxy.pool.pool import HANDSHAKE, UpstreamPool
from proxy.tls.client import context_from_options
from tests.support import FerretDBProcess, ProxyFactory
from tests.support.certs import PKI

Doc = dict[str, Any]
USER, PASSWORD = "proxyuser", "s3cret:p@ss"


class TLSFerretDB(FerretDBProcess):
    """FerretDB with TLS only; optionally authentication with one user."""

    auth = False

    def command(self) -> list[str]:
        extra = [
            "--test-enable-new-auth", f"--setup-username={USER}",
            f"--setup-password={PASSWORD}", "--setup-database=admin",
        ] if self.auth else []
        return [*super().command(), *extra]

    def tls_uri(self, options: str, user: bool = False) -> str:
        auth = f"{quote_plus(USER)}:{quote_plus(PASSWORD)}@" if user else ""
        return f"mongodb://{auth}{self.address}/?{options}"


class AuthTLSFerretDB(TLSFerretDB):
    auth = True


@pytest.fixture(scope="module")
def auth_tls_ferretdb(pki: PKI, tmp_path_factory: pytest.TempPathFactory,
                      ) -> Iterator[TLSFerretDB]:
    """TLS without client certificates, with SCRAM authentication."""
    proc = AuthTLSFerretDB(tmp_path_factory.mktemp("ferretdb-tls-auth"),
                           tls=(pki.server.cert, pki.server.key, None))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mtls_ferretdb(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSFerretDB]:
    """TLS that requires a client certificate signed by the test CA."""
    proc = TLSFerretDB(tmp_path_factory.mktemp("ferretdb-mtls"),
                       tls=(pki.server.cert, pki.server.key, pki.ca))
    proc.start()
    yield proc
    proc.stop()


def client(uri: str) -> MongoClient[Doc]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000, retryReads=False, retryWrites=False)


def crud(c: MongoClient[Doc], db_name: str) -> None:
    coll = c[db_name].items
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(120)])
    assert [d["_id"] for d in coll.find({}, batch_size=25).sort("_id", 1)] == list(range(120))


def readyz(admin_url: str) -> Doc:
    with urllib.request.urlopen(f"{admin_url}/readyz", timeout=5) as resp:
        assert resp.status == 200
        body: Doc = json.loads(resp.read())
        return body


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_pools_connect_with_the_uri_tls_options_and_authenticate(
    auth_tls_ferretdb: TLSFerretDB, proxy_factory: ProxyFactory, pki: PKI, db_name: str,
    mechanism: str,
) -> None:
    # The case: FerretDB with TLS and tls=true&tlsCAFile= in upstream.uri; the
    # monitor connected with TLS while the pools did not ("0 bytes read").
    uri = auth_tls_ferretdb.tls_uri(
        f"tls=true&tlsCAFile={pki.ca}&authSource=admin&authMechanism={mechanism}", user=True)
    proxy = proxy_factory(uri, {"upstream": {"pool": {"min_size": 2}}})
    readyz(proxy.admin_url)
    with client(proxy.uri) as c:
        crud(c, db_name)
    assert PASSWORD not in proxy.log_text()


def test_client_certificate_for_an_upstream_that_requires_one(
    mtls_ferretdb: TLSFerretDB, proxy_factory: ProxyFactory, pki: PKI, db_name: str,
) -> None:
    good = proxy_factory(mtls_ferretdb.tls_uri(
        f"tls=true&tlsCAFile={pki.ca}&tlsCertificateKeyFile={pki.client.pem}"))
    with client(good.uri) as c:
        crud(c, db_name)
    # Declared members: the member's own tls block, and the same without one (the uri's
    # options apply to it).
    for member_tls in ({"ca_file": str(pki.ca), "certificate_key_file": str(pki.client.pem)},
                       None):
        member: Doc = {"host": mtls_ferretdb.address, "role": "primary"}
        uri = mtls_ferretdb.tls_uri(
            f"tls=true&tlsCAFile={pki.ca}&tlsCertificateKeyFile={pki.client.pem}")
        if member_tls is not None:
            member["tls"] = member_tls
            uri = f"mongodb://{mtls_ferretdb.address}/"  # no TLS options of its own
        declared = proxy_factory(uri, {"upstream": {"members": [member]}})
        with client(declared.uri) as c:
            assert c[db_name].items.count_documents({}) == 120


def test_upstream_tls_failures_are_clear_errors(
    mtls_ferretdb: TLSFerretDB, auth_tls_ferretdb: TLSFerretDB, proxy_factory: ProxyFactory,
    pki: PKI, db_name: str,
) -> None:
    cases = [
        # No client certificate for a server that requires one: TLS 1.3 reports it after
        # the handshake, and pymongo's asyncio monitor (whose error the reply carries)
        # sees either the alert or, when the server closed first, the connection closed.
        (mtls_ferretdb.tls_uri(f"tls=true&tlsCAFile={pki.ca}"),
         "certificate required|closed"),
        # The server's certificate is not signed by tlsCAFile.
        (auth_tls_ferretdb.tls_uri(f"tls=true&tlsCAFile={pki.other_ca}"),
         "certificate verify failed"),
    ]
    for uri, reason in cases:
        proxy = proxy_factory(uri, {"upstream": {
            "pool": {"connect_timeout_ms": 3000}, "server_selection_timeout_ms": 1000}})
        with client(proxy.uri) as c, pytest.raises(OperationFailure) as err:
            c[db_name].items.find_one()
        message = str(err.value.details)
        assert re.search(reason, message.lower()), message
        assert "last errors: " + uri.split("/")[2] in message, message
        assert "Traceback" not in proxy.log_text()


async def test_pool_names_the_missing_client_certificate(
    mtls_ferretdb: TLSFerretDB, pki: PKI
) -> None:
    # The proxy's own pools see the server's alert (pymongo's monitor does not).
    context = context_from_options({"tls": True, "tlsCAFile": str(pki.ca)})
    pool = UpstreamPool((mtls_ferretdb.host, mtls_ferretdb.port), PoolConfig(), None, context)
    try:
        with pytest.raises(ProxyError) as err:
            await pool.checkout()
        assert err.value.code == 6
        assert "certificate required" in err.value.errmsg, err.value.errmsg
        assert pool.size == 0
    finally:
        await pool.close()


def test_tls_insecure_and_invalid_hostnames(
    pki: PKI, tmp_path_factory: pytest.TempPathFactory, proxy_factory: ProxyFactory,
    db_name: str,
) -> None:
    # A server whose certificate names "localhost" only, reached as 127.0.0.1.
    server = TLSFerretDB(tmp_path_factory.mktemp("ferretdb-localhost"),
                         tls=(pki.localhost_only.cert, pki.localhost_only.key, None))
    server.start()
    try:
        strict = proxy_factory(server.tls_uri(f"tls=true&tlsCAFile={pki.ca}"), {"upstream": {
            "pool": {"connect_timeout_ms": 3000}, "server_selection_timeout_ms": 1000}})
        with client(strict.uri) as c, pytest.raises(OperationFailure) as err:
            c[db_name].items.find_one()
        assert "mismatch" in str(err.value.details).lower()
        for options in (f"tls=true&tlsCAFile={pki.ca}&tlsAllowInvalidHostnames=true",
                        "tls=true&tlsInsecure=true"):
            lenient = proxy_factory(server.tls_uri(options))
            with client(lenient.uri) as c:
                c[db_name].items.insert_one({"options": options})
    finally:
        server.stop()


# --- MONGODB-X509 (mockupdb: FerretDB has no X509 authentication) -----------------------


async def test_x509_authentication_over_tls_with_mockupdb(pki: PKI) -> None:
    from mockupdb import MockupDB

    server = MockupDB(ssl=True, auto_ismaster=False)  # mockupdb's own server certificate
    server.run()
    try:
        context = context_from_options({
            "tls": True, "tlsAllowInvalidCertificates": True,
            "tlsCertificateKeyFile": str(pki.client.pem)})
        creds = Credentials.from_uri("mongodb://h/?authMechanism=MONGODB-X509")
        assert creds == Credentials("", "", "$external", "MONGODB-X509")
        # 1. The server ignores the speculative authenticate: a separate one follows.
        opening = asyncio.create_task(
            UpstreamConnection.open(server.address, 10, HANDSHAKE, creds, context))
        hello = await asyncio.to_thread(server.receives)
        assert hello.doc["speculativeAuthenticate"] == {
            "authenticate": 1, "mechanism": "MONGODB-X509", "db": "$external"}
        hello.ok(maxWireVersion=21)
        auth = await asyncio.to_thread(server.receives)
        assert auth.doc["authenticate"] == 1
        assert auth.doc["mechanism"] == "MONGODB-X509"
        assert auth.doc["$db"] == "$external"
        auth.ok(user="CN=mongoproxy-client", dbname="$external")
        (await opening).close()
        # 2. The server answers it speculatively: no second round trip.
        named = Credentials.from_uri(
            "mongodb://CN%3Dmongoproxy-client@h/?authMechanism=MONGODB-X509")
        opening = asyncio.create_task(
            UpstreamConnection.open(server.address, 10, HANDSHAKE, named, context))
        hello = await asyncio.to_thread(server.receives)
        assert hello.doc["speculativeAuthenticate"]["user"] == "CN=mongoproxy-client"
        hello.ok(maxWireVersion=21, speculativeAuthenticate={"dbname": "$external"})
        conn = await opening
        # 3. A refusal is AuthenticationFailed naming the upstream.
        conn.close()
        opening = asyncio.create_task(
            UpstreamConnection.open(server.address, 10, HANDSHAKE, creds, context))
        (await asyncio.to_thread(server.receives)).ok(maxWireVersion=21)
        (await asyncio.to_thread(server.receives)).command_err(
            11, "No verified subject name available from client")
        with pytest.raises(ProxyError) as err:
            await opening
        assert err.value.code == 18
        assert "MONGODB-X509" in err.value.errmsg
        assert "No verified subject name" in err.value.errmsg
    finally:
        server.stop()


# --- mongodb+srv:// (dnspython's resolver replaced: no DNS server on this machine) ------


class _Srv:
    def __init__(self, target: str, port: int) -> None:
        import dns.name

        self.target = dns.name.from_text(target)
        self.port = port


class _Txt:
    def __init__(self, text: str) -> None:
        self.strings = [text.encode()]


def fake_dns(records: dict[tuple[str, str], list[Any]]) -> Any:
    def resolve(name: str, kind: str, **_: Any) -> list[Any]:
        import dns.resolver

        try:
            return records[(name, kind)]
        except KeyError:
            raise dns.resolver.NXDOMAIN() from None  # type: ignore[no-untyped-call]

    async def aresolve(name: str, kind: str, **kwargs: Any) -> list[Any]:
        return resolve(name, kind, **kwargs)

    return resolve, aresolve


async def test_srv_uri_builds_the_seed_list_tls_and_auth_source(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    import dns.asyncresolver
    import dns.resolver

    from proxy.app import Proxy

    resolve, aresolve = fake_dns({
        ("_mongodb._tcp.cluster0.example.test", "SRV"): [
            _Srv("node-a.example.test.", 27017), _Srv("node-b.example.test.", 27018)],
        ("cluster0.example.test", "TXT"): [_Txt("authSource=admin&replicaSet=atlas-rs")],
    })
    monkeypatch.setattr(dns.resolver, "resolve", resolve)
    monkeypatch.setattr(dns.asyncresolver, "resolve", aresolve)
    config = parse_config({"upstream": {
        "uri": f"mongodb+srv://{USER}:{quote_plus(PASSWORD)}@cluster0.example.test/"
               f"?tlsCAFile={pki.ca}&authMechanism=SCRAM-SHA-1",
        "server_selection_timeout_ms": 500,
    }})
    proxy = Proxy(config)
    assert proxy.pools.credentials == Credentials(USER, PASSWORD, "admin", "SCRAM-SHA-1")
    # mongodb+srv implies tls=true: every pool gets pymongo's verifying context.
    context = proxy.pools.get(("node-a.example.test", 27017)).tls
    assert context is not None and context.check_hostname
    await proxy.topology.start()
    try:
        seeds = set(proxy.topology.description().server_descriptions())
        assert seeds == {("node-a.example.test", 27017), ("node-b.example.test", 27018)}
        assert proxy.topology.description().replica_set_name == "atlas-rs"
    finally:
        await proxy.topology.close()


# --- configuration ------------------------------------------------------------------


def test_check_config_refuses_options_the_pools_would_ignore(pki: PKI, tmp_path: Path) -> None:
    def upstream(uri: str) -> Doc:
        return {"upstream": {"uri": uri}}

    for options, hint in [
        ("maxPoolSize=5", "upstream.pool.max_size"),
        ("compressors=zlib", "not implemented"),
        ("readPreference=secondary", "applications' connection strings"),
        ("appName=x", "not implemented"),
    ]:
        with pytest.raises(ConfigError, match=hint):
            parse_config(upstream(f"mongodb://h:1/?{options}"))
    with pytest.raises(ConfigError, match="tlscafile file is not readable"):
        parse_config(upstream(f"mongodb://h:1/?tls=true&tlsCAFile={tmp_path}/missing-ca.pem"))
    with pytest.raises(ConfigError, match="MONGODB-X509 needs"):
        parse_config(upstream("mongodb://h:1/?authMechanism=MONGODB-X509"))
    with pytest.raises(ConfigError, match=r"members.0.tls.*cannot read"):
        parse_config({"upstream": {"members": [{"host": "h:1", "role": "primary", "tls": {
            "certificate_key_file": str(tmp_path / "nope.pem")}}]}})
    ok = parse_config(upstream(
        f"mongodb://h:1/?tls=true&tlsCAFile={pki.ca}&tlsCertificateKeyFile={pki.client.pem}"
        "&authMechanism=MONGODB-X509&replicaSet=rs&directConnection=false"))
    assert ok.upstream.uri is not None


def test_encrypted_client_key_with_its_password(pki: PKI, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), password=None)
    encrypted = tmp_path / "client-encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"k3y-pass")) + pki.client.cert.read_bytes())
    uri = f"mongodb://h:1/?tls=true&tlsCAFile={pki.ca}&tlsCertificateKeyFile={encrypted}"
    assert parse_config({"upstream": {"uri": f"{uri}&tlsCertificateKeyFilePassword=k3y-pass"}})
    with pytest.raises(ConfigError) as err:
        parse_config({"upstream": {"uri": f"{uri}&tlsCertificateKeyFilePassword=wrong-pass"}})
    assert "upstream.uri" in str(err.value)
    assert "wrong-pass" not in str(err.value)
    # The same through a declared member's tls block.
    member = {"host": "h:1", "role": "primary", "tls": {
        "ca_file": str(pki.ca), "certificate_key_file": str(encrypted),
        "certificate_key_file_password": "k3y-pass"}}
    config = parse_config({"upstream": {"members": [member]}})
    assert "k3y-pass" not in repr(config)
