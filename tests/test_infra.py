"""Checks of the test infrastructure itself (no proxy needed)."""

from __future__ import annotations

import redis
from pymongo import MongoClient

from tests.support import FerretDBFactory, FerretDBProcess, RedisProcess, free_port


def _client(uri: str) -> MongoClient[dict[str, object]]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000, directConnection=True)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ferretdb_ping(ferretdb: FerretDBProcess, db_name: str) -> None:
    assert ferretdb.uri == f"mongodb://127.0.0.1:{ferretdb.port}/"
    with _client(ferretdb.uri) as client:
        assert client.admin.command("ping")["ok"] == 1.0
        coll = client[db_name]["things"]
        coll.insert_one({"_id": 1, "v": "x"})
        assert coll.find_one({"_id": 1}) == {"_id": 1, "v": "x"}


def test_redis_ping(redis_server: RedisProcess) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=5)
    try:
        assert r.ping() is True
        r.set("k", "v")
        assert r.get("k") == b"v"
    finally:
        r.close()


def test_ferretdb_restart_keeps_data(ferretdb_factory: FerretDBFactory, db_name: str) -> None:
    fdb = ferretdb_factory()
    with _client(fdb.uri) as client:
        client[db_name]["c"].insert_many([{"_id": i} for i in range(5)])

    port = fdb.port
    fdb.restart()
    assert fdb.port == port
    with _client(fdb.uri) as client:
        assert client[db_name]["c"].count_documents({}) == 5

    # A crash (SIGKILL) and start keeps committed data too.
    fdb.kill()
    assert not fdb.running
    fdb.start()
    with _client(fdb.uri) as client:
        assert client[db_name]["c"].count_documents({}) == 5
