"""TLS between applications and the proxy (``listen.tls``), against a real proxy process
and the session FerretDB, with certificates made at test time (tests.support.certs).

Each refused client (no TLS, no client certificate, a foreign or expired certificate,
a client that does not trust the proxy's CA) gets a clear error, costs the proxy one log
line and no traceback, and a TLS client connected meanwhile keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import bson
import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError, ServerSelectionTimeoutError

from proxy.wire import compress, decode_body, decompress, encode_op_msg, parse_op_msg
from tests.support import FerretDBProcess, ProxyFactory, ProxyProcess
from tests.support.certs import PKI, CertFiles

Doc = dict[str, Any]


def tls_config(pki: PKI, **extra: Any) -> dict[str, Any]:
    tls: dict[str, Any] = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                           **extra}
    return {"listen": {"tls": tls}}


def tls_client(proxy: ProxyProcess, ca: Path, cert: CertFiles | None = None,
               **kwargs: Any) -> MongoClient[Doc]:
    options: dict[str, Any] = {"tls": True, "tlsCAFile": str(ca),
                               "serverSelectionTimeoutMS": 3000, **kwargs}
    if cert is not None:
        options["tlsCertificateKeyFile"] = str(cert.pem)
    return MongoClient(proxy.uri, retryReads=False, retryWrites=False, **options)


def refused(client: MongoClient[Doc]) -> str:
    with client, pytest.raises(ServerSelectionTimeoutError) as err:
        client.admin.command("ping")
    return str(err.value)


def wait_for_log(proxy: ProxyProcess, text: str, count: int = 1, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proxy.log_text()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} time(s):\n{proxy.log_text()}")


def metric(proxy: ProxyProcess, sample: str) -> float:
    """The value of one sample (name with its labels) of the proxy's /metrics."""
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def _crud(client: MongoClient[Doc], db_name: str) -> None:
    coll = client[db_name].items
    coll.drop()
    coll.insert_many([{"_id": i, "v": "x" * 100} for i in range(300)])
    assert [d["_id"] for d in coll.find({}, batch_size=50).sort("_id", 1)] == list(range(300))
    assert coll.count_documents({}) == 300


def test_pymongo_over_tls_with_compression(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(pki))
    with tls_client(proxy, pki.ca, compressors="zlib") as client:
        hello = client.admin.command("hello")
        assert hello["isWritablePrimary"] is True
        assert hello["maxWireVersion"] >= 17
        _crud(client, db_name)
    # Compression over TLS, on the wire: the hello negotiates zlib, then a compressed
    # ping is answered compressed.
    context = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        hello = {"hello": 1, "client": {"driver": {"name": "test", "version": "0"}},
                 "compression": ["zlib"], "$db": "admin"}
        tls.sendall(encode_op_msg(1, 0, bson.encode(hello)))
        assert _read_reply(tls)["compression"] == ["zlib"]
        tls.sendall(compress(encode_op_msg(2, 0, bson.encode({"ping": 1, "$db": "admin"})),
                             "zlib"))
        assert _read_reply(tls, compressed=True) == {"ok": 1.0}
    assert "Traceback" not in proxy.log_text()


def _read_reply(tls: ssl.SSLSocket, compressed: bool = False) -> Doc:
    data = b""
    while len(data) < 4 or len(data) < int.from_bytes(data[:4], "little"):
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    op_code = int.from_bytes(data[12:16], "little")
    assert op_code == (2012 if compressed else 2013)
    if compressed:
        data = decompress(data, 48_000_000)[0]
    return decode_body(parse_op_msg(data))


def test_plaintext_client_is_refused_clearly_and_tls_clients_carry_on(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(pki))
    with tls_client(proxy, pki.ca) as good:
        good[db_name].items.insert_one({"_id": 1})
        message = refused(MongoClient(proxy.uri, serverSelectionTimeoutMS=1500))
        # The proxy answered the plaintext hello with an error the driver shows.
        assert "requires TLS" in message, message
        assert good[db_name].items.find_one({"_id": 1}) == {"_id": 1}
    log = wait_for_log(proxy, "refused a plaintext connection")
    assert "Traceback" not in log
    assert metric(proxy, "mongoproxy_tls_plaintext_refused_total") >= 1
    # A raw socket sending garbage: closed, nothing else happens.
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert raw.recv(100) == b""


def test_allow_plaintext_serves_both(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(pki, allow_plaintext=True))
    plaintext: MongoClient[Doc] = MongoClient(proxy.uri, serverSelectionTimeoutMS=3000)
    with tls_client(proxy, pki.ca) as secure, plaintext as plain:
        secure[db_name].items.insert_one({"_id": "tls"})
        plain[db_name].items.insert_one({"_id": "plain"})
        assert secure[db_name].items.count_documents({}) == 2
        assert plain[db_name].items.count_documents({}) == 2


def test_client_certificates_required(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(
        pki, ca_file=str(pki.ca), client_certificates="required"))
    with tls_client(proxy, pki.ca, pki.client) as good:
        good[db_name].items.insert_one({"_id": 1})
        for cert in (None, pki.foreign_client, pki.expired_client):
            refused(tls_client(proxy, pki.ca, cert, serverSelectionTimeoutMS=1500))
            assert good[db_name].items.find_one() == {"_id": 1}
    log = wait_for_log(proxy, "TLS handshake with", 3)
    assert "the client sent no certificate" in log
    assert "client certificate not accepted: unable to get local issuer certificate" in log
    assert "client certificate not accepted: certificate has expired" in log
    assert metric(proxy, "mongoproxy_tls_handshake_failures_total") >= 3
    assert "Traceback" not in log


def test_client_certificates_optional(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(
        pki, ca_file=str(pki.ca), client_certificates="optional"))
    with tls_client(proxy, pki.ca) as anonymous, tls_client(proxy, pki.ca, pki.client) as known:
        anonymous[db_name].items.insert_one({"_id": 1})
        assert known[db_name].items.find_one() == {"_id": 1}
    # A certificate that is presented must still be valid.
    refused(tls_client(proxy, pki.ca, pki.foreign_client, serverSelectionTimeoutMS=1500))


def test_client_that_does_not_trust_the_proxy_ca(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(pki))
    message = refused(tls_client(proxy, pki.other_ca, serverSelectionTimeoutMS=1500))
    assert "certificate verify failed" in message
    log = wait_for_log(proxy, "the client does not trust the proxy's certificate")
    assert "Traceback" not in log


def _served_serial(proxy: ProxyProcess, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def _serial(cert: CertFiles) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.cert.read_bytes()).serial_number


@pytest.mark.parametrize("trigger", ["file change", "SIGHUP"])
def test_certificate_reload_under_load(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str,
    tmp_path: Path, trigger: str,
) -> None:
    import trustme

    from tests.support.certs import issue

    # The proxy serves a copy of the files; the test replaces them.
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    proxy = proxy_factory(ferretdb.uri, {"listen": {"tls": {
        "cert_file": str(cert), "key_file": str(key)}}})
    assert _served_serial(proxy, pki.ca) == _serial(pki.server)

    errors: list[BaseException] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        with tls_client(proxy, pki.ca) as client:  # one connection pool kept throughout
            coll = client[db_name].items
            while not stop.is_set():
                try:
                    coll.insert_one({})
                    coll.find_one()
                    done += 1
                except PyMongoError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        # 1. A broken certificate (key and certificate do not match): the old one stays.
        new_ca = trustme.CA()
        new_ca.cert_pem.write_to_path(str(tmp_path / "new-ca.pem"))
        fresh = issue(new_ca, tmp_path, "fresh", "127.0.0.1", "localhost")
        shutil.copy(fresh.cert, cert)  # the key is still the old one
        if trigger == "SIGHUP":
            proxy.send_signal(signal.SIGHUP)
        # The named trigger proves SIGHUP reloads (the file watcher may reload as well).
        wait_for_log(proxy, f"TLS certificate reload ({trigger}) failed")
        assert _served_serial(proxy, pki.ca) == _serial(pki.server)
        # 2. The key follows: the new certificate is served to new handshakes.
        shutil.copy(fresh.key, key)
        if trigger == "SIGHUP":
            proxy.send_signal(signal.SIGHUP)
        wait_for_log(proxy, f"TLS certificate reloaded ({trigger})")
        assert _served_serial(proxy, tmp_path / "new-ca.pem") == _serial(fresh)
        before = done
        time.sleep(0.5)
        assert done > before  # the connections opened before the reload still serve
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert "Traceback" not in proxy.log_text()
    assert metric(proxy, 'mongoproxy_tls_certificate_reloads_total{result="failed"}') >= 1
    assert metric(proxy, 'mongoproxy_tls_certificate_reloads_total{result="ok"}') >= 1


def test_check_config_refuses_a_certificate_that_does_not_load(pki: PKI, tmp_path: Path) -> None:
    from proxy.config import ConfigError, parse_config

    def config(**tls: Any) -> dict[str, Any]:
        return {"upstream": {"uri": "mongodb://127.0.0.1:1/"}, "listen": {"tls": tls}}

    with pytest.raises(ConfigError, match=r"listen.tls.*cannot read .*missing.pem"):
        parse_config(config(cert_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match=r"listen.tls.*does not load"):
        parse_config(config(cert_file=str(pki.server.cert), key_file=str(pki.client.key)))
    with pytest.raises(ConfigError, match="needs ca_file"):
        parse_config(config(cert_file=str(pki.server.pem), client_certificates="required"))
    ok = parse_config(config(cert_file=str(pki.server.pem), ca_file=str(pki.ca),
                             client_certificates="required", min_version="TLS1.3"))
    assert ok.listen.tls is not None


def test_node_driver_through_a_tls_listener_with_client_certificates(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    from tests.test_driver_node import run_crud

    proxy = proxy_factory(ferretdb.uri, tls_config(
        pki, ca_file=str(pki.ca), client_certificates="required"))
    result = run_crud(
        f"{proxy.uri}?tls=true&tlsCAFile={pki.ca}&tlsCertificateKeyFile={pki.client.pem}",
        db_name)
    assert result["hello"]["msg"] == "isdbgrid"
    assert result["insertMany"] == {"insertedCount": 120}
    assert result["countDocuments"] == {"all": 120, "flagged": 30}
    assert result["duplicate"] == {"code": 11000, "name": "MongoServerError"}


def run_mongosh(uri: str, script: str, home: Path) -> subprocess.CompletedProcess[str]:
    from tests.test_driver_node import NODE_DIR

    binary = NODE_DIR / "node_modules" / ".bin" / "mongosh"
    if not binary.exists():
        pytest.fail(f"{binary} missing; run `make node`", pytrace=False)
    return subprocess.run(
        [str(binary), uri, "--quiet", "--norc", "--eval", script],
        capture_output=True, text=True, timeout=120, check=False,
        # mongosh keeps history and logs under $HOME/.mongodb.
        env={**os.environ, "MONGOSH_NO_UPDATE_CHECK": "1", "HOME": str(home)},
    )


def test_mongosh_through_a_tls_listener(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str,
    tmp_path: Path,
) -> None:
    proxy = proxy_factory(ferretdb.uri, tls_config(
        pki, ca_file=str(pki.ca), client_certificates="required"))
    script = (f'const d = db.getSiblingDB("{db_name}"); d.items.insertOne({{_id: 1}}); '
              'print(JSON.stringify({n: d.items.countDocuments({}), '
              'msg: db.adminCommand({hello: 1}).msg}))')
    tls = f"{proxy.uri}?tls=true&tlsCAFile={pki.ca}&serverSelectionTimeoutMS=3000"
    ok = run_mongosh(f"{tls}&tlsCertificateKeyFile={pki.client.pem}", script, tmp_path)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert json.loads(ok.stdout.strip().splitlines()[-1]) == {"n": 1, "msg": "isdbgrid"}
    # Without its certificate, and in plaintext: refused, with the reason shown.
    no_cert = run_mongosh(tls, script, tmp_path)
    assert no_cert.returncode != 0
    plain = run_mongosh(f"{proxy.uri}?serverSelectionTimeoutMS=3000", script, tmp_path)
    assert plain.returncode != 0
    assert "requires TLS" in plain.stdout + plain.stderr, plain.stdout + plain.stderr


def test_stalled_handshakes_are_bounded_and_time_out(
    ferretdb: FerretDBProcess, proxy_factory: ProxyFactory, pki: PKI, db_name: str
) -> None:
    # One pending handshake at most: a client that connects and says nothing holds it
    # until handshake_timeout_ms; the next client waits in the backlog, then is served.
    proxy = proxy_factory(ferretdb.uri, tls_config(
        pki, max_pending_handshakes=1, handshake_timeout_ms=1000))
    served_at: list[float] = []

    def use() -> None:
        with tls_client(proxy, pki.ca, serverSelectionTimeoutMS=10_000) as client:
            client[db_name].items.insert_one({"_id": 1})
            served_at.append(time.monotonic())

    with socket.create_connection((proxy.host, proxy.port), timeout=10) as silent:
        thread = threading.Thread(target=use)
        thread.start()
        assert silent.recv(10) == b""  # dropped at its deadline
        dropped_at = time.monotonic()
        thread.join()
    # An order, not a duration: the client could only be served once the slot was free.
    assert served_at and served_at[0] >= dropped_at
    log = wait_for_log(proxy, "failed: not completed in time")
    assert "Traceback" not in log


async def test_listener_on_the_standard_asyncio_loop(pki: PKI) -> None:
    # The proxy runs on uvloop (the tests above); the listener relies only on loop APIs
    # both implement. Here, in process, on asyncio's own loop, with an echo protocol.
    import asyncio

    from proxy.tls.config import ListenTLSConfig
    from proxy.tls.server import ServerTLS, TLSListener

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    tls = ServerTLS(ListenTLSConfig(cert_file=str(pki.server.cert),
                                    key_file=str(pki.server.key), allow_plaintext=True))
    listener = await TLSListener.start(Echo, tls, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        for ssl_context in (context, None):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_context,
                server_hostname="127.0.0.1" if ssl_context else None)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
        assert listener.handshake_failures == 0
    finally:
        listener.close()
