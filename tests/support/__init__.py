"""Reusable helpers for tests: free ports and managed FerretDB/Redis/proxy processes."""

from tests.support.factories import FerretDBFactory, ProxyFactory, RedisFactory
from tests.support.procs import (
    REPO_ROOT,
    FerretDBProcess,
    ManagedProcess,
    ProxyProcess,
    RedisProcess,
    ToolMissingError,
    deep_merge,
    find_ferretdb,
    find_redis_server,
    free_port,
    wait_for_http,
    wait_for_port,
)

__all__ = [
    "REPO_ROOT",
    "FerretDBFactory",
    "FerretDBProcess",
    "ManagedProcess",
    "ProxyFactory",
    "ProxyProcess",
    "RedisFactory",
    "RedisProcess",
    "ToolMissingError",
    "deep_merge",
    "find_ferretdb",
    "find_redis_server",
    "free_port",
    "wait_for_http",
    "wait_for_port",
]
