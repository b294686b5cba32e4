"""The result cache over ``rediss://``: a real redis-server listening with TLS only and
requiring client certificates (``--tls-port``, ``--tls-auth-clients yes``), certificates
made at test time. Both of the cache's Redis paths are covered: redis-py's client
(tokens, stores, invalidation) and the raw lookup lane (``proxy.cache.lane``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from bson.int64 import Int64

from proxy.cache.config import CacheConfig
from proxy.cache.eligibility import WriteTargets
from proxy.cache.entry import encode_entry
from proxy.cache.lane import lane_for
from proxy.cache.layer import ResultCache
from proxy.cache.store import StoreUnavailable
from tests.support import RedisProcess
from tests.support.certs import PKI


@pytest.fixture(scope="module")
def tls_redis(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path_factory.mktemp("redis-tls"),
                        tls=(pki.server.cert, pki.server.key, pki.ca)).start()
    yield proc
    proc.stop()


def rediss_url(server: RedisProcess, ca: Any, cert: Any = None) -> str:
    url = f"rediss://{server.host}:{server.port}/0?ssl_ca_certs={ca}"
    if cert is not None:
        url += f"&ssl_certfile={cert.cert}&ssl_keyfile={cert.key}"
    return url


def config(url: str) -> CacheConfig:
    return CacheConfig.model_validate({
        "redis_url": url, "timeout_ms": 500, "connect_timeout_ms": 2000, "key_prefix": "tls:",
        "breaker": {"failures": 1, "probe_interval_ms": 100},
        "rules": [{"match": {"collection": "users"}, "ttl_s": 60}],
    })


def _body() -> bytes:
    import struct

    import bson

    doc = {"cursor": {"firstBatch": [{"_id": 1}], "id": Int64(0), "ns": "app.users"}, "ok": 1.0}
    return struct.pack("<I", 0) + b"\x00" + bson.encode(doc)


async def test_rediss_with_ca_and_client_certificate(tls_redis: RedisProcess, pki: PKI) -> None:
    url = rediss_url(tls_redis, pki.ca, pki.client)
    cache = ResultCache(config(url))
    store = cache.store
    await cache.start()
    try:
        assert cache.state == "ok"
        assert store._lane is not None and store._lane.ssl is not None  # lookups: the lane
        token, entry = await store.lookup("app.users", "d1")
        assert entry is None
        await store.store("app.users", "d1", encode_entry(token, _body(), 4096), 60)
        again, raw = await store.lookup("app.users", "d1")
        assert again == token and raw is not None
        assert await store.invalidate(WriteTargets(("app.users",)))
        assert (await store.lookup("app.users", "d1"))[0] != token
    finally:
        await cache.close()


@pytest.mark.parametrize("case", ["no client certificate", "wrong CA"])
async def test_rediss_refused_handshakes_leave_the_cache_unavailable(
    tls_redis: RedisProcess, pki: PKI, case: str
) -> None:
    url = (rediss_url(tls_redis, pki.ca) if case == "no client certificate"
           else rediss_url(tls_redis, pki.other_ca, pki.client))
    cache = ResultCache(config(url))
    await cache.start()
    try:
        # A refused handshake is Redis unavailable (lookups bypass), not a crash.
        assert cache.state != "ok"
        with pytest.raises(StoreUnavailable):
            await cache.store.lookup("app.users", "d1")
    finally:
        await cache.close()
    lane = lane_for(url, 2.0, 0.5)
    assert lane is not None
    with pytest.raises(OSError):  # ssl.SSLError, or the connection reset by the server
        await lane.mget("tls:x")
    lane.close()
