"""The result cache on a real 3-node Redis Cluster (``redis-server --cluster-enabled yes``
x3 on loopback, joined by ``redis-cli --cluster create``), shared by two proxy instances:
hits, a write through one instance seen through the other, ``dropDatabase`` reaching
namespaces whose tokens live on other nodes, and one namespace's keys in one slot."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pymongo import MongoClient

from tests.support import FerretDBProcess, ProxyProcess, RedisProcess, free_port
from tests.test_cache_integration import Doc, assert_counts, cache_ops, cache_section, client


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000, so at most 55535) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode(RedisProcess):
    name = "redis-cluster-node"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, port=_cluster_port())

    def command(self) -> list[str]:
        return [*super().command(), "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout", "2000"]


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        pytest.fail("redis-cli not found: run `make test` (scripts/install-system-deps.sh)",
                    pytrace=False)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    nodes = [ClusterNode(tmp_path_factory.mktemp("cluster")).start() for _ in range(3)]
    try:
        subprocess.run(
            [_redis_cli(), "--cluster", "create", *(n.address for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in nodes:
            with redis.Redis(host=node.host, port=node.port) as r:
                while r.cluster("info").get("cluster_state") != "ok":
                    assert time.monotonic() < deadline, "cluster did not become ok"
                    time.sleep(0.2)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def proxies(
    cluster: list[ClusterNode], ferretdb: FerretDBProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    section = cache_section(f"redis://{cluster[0].address}/0", cluster=True)
    procs = [ProxyProcess(ferretdb.uri, {"cache": section},
                          workdir=tmp_path_factory.mktemp("cluster-proxy")).start()
             for _ in range(2)]
    yield procs[0], procs[1]
    for proc in procs:
        proc.stop()


def _keys_by_node(cluster: list[ClusterNode], pattern: str) -> dict[str, list[str]]:
    found = {}
    for node in cluster:
        with redis.Redis(host=node.host, port=node.port) as r:
            found[node.address] = sorted(k.decode() for k in r.keys(pattern))
    return found


def test_cluster_hits_invalidation_across_instances_and_slots(
    cluster: list[ClusterNode], proxies: tuple[ProxyProcess, ProxyProcess],
    ferretdb: FerretDBProcess, db_name: str, tmp_path: Path,
) -> None:
    proxy_a, proxy_b = proxies
    colls = [f"c{i}" for i in range(12)]
    with client(ferretdb.uri) as direct, client(proxy_a.uri) as a, client(proxy_b.uri) as b:
        direct.drop_database(db_name)
        for name in colls:
            direct[db_name][name].insert_one({"_id": name, "v": 1})

        def read_all(c: MongoClient[Doc]) -> list[int]:
            return [c[db_name][name].find_one({"_id": name})["v"] for name in colls]

        before = cache_ops(proxy_a)
        assert read_all(a) == read_all(a) == [1] * len(colls)
        assert_counts(proxy_a, before, {"miss": len(colls), "hit": len(colls)})

        # a namespace's token and entries share one slot, so one node holds them all;
        # different namespaces spread over the nodes
        by_node = _keys_by_node(cluster, f"mp:{{{db_name}.*")
        holders = {ns: [addr for addr, keys in by_node.items()
                        if any(k.startswith(f"mp:{{{db_name}.{ns}}}") for k in keys)]
                   for ns in colls}
        assert all(len(h) == 1 for h in holders.values()), holders
        assert len({h[0] for h in holders.values()}) > 1, holders

        # a write through B: A's next read is a miss with the new value
        b[db_name].c3.update_one({"_id": "c3"}, {"$set": {"v": 2}})
        before = cache_ops(proxy_a)
        assert a[db_name].c3.find_one({"_id": "c3"})["v"] == 2
        assert_counts(proxy_a, before, {"miss": 1})

        # dropDatabase through B: every namespace's token (on every node) is replaced
        b.drop_database(db_name)
        before = cache_ops(proxy_a)
        assert [a[db_name][name].find_one({"_id": name}) for name in colls] == [None] * 12
        assert_counts(proxy_a, before, {"miss": len(colls)})
