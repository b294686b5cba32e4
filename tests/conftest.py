"""Shared fixtures: FerretDB, Redis and proxy processes on free loopback ports.

Missing binaries make the fixtures *fail* (never skip): `make test` installs them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    FerretDBFactory,
    FerretDBProcess,
    ProxyFactory,
    ProxyProcess,
    RedisFactory,
    RedisProcess,
    ToolMissingError,
)
from tests.support.certs import PKI, make_pki


def _fail_missing(e: ToolMissingError) -> None:
    pytest.fail(str(e), pytrace=False)


def _ferretdb(workdir: Path) -> FerretDBProcess:
    try:
        return FerretDBProcess(workdir)
    except ToolMissingError as e:
        _fail_missing(e)
        raise


def _redis(workdir: Path) -> RedisProcess:
    try:
        return RedisProcess(workdir)
    except ToolMissingError as e:
        _fail_missing(e)
        raise


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Test-time certificates (trustme): CA, server, client, foreign and expired ones."""
    return make_pki(tmp_path_factory.mktemp("pki"))[0]


@pytest.fixture(scope="session")
def ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDBProcess]:
    """One FerretDB shared by the whole session (use `db_name` to stay isolated)."""
    proc = _ferretdb(tmp_path_factory.mktemp("ferretdb")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server shared by the whole session."""
    proc = _redis(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def proxy(
    ferretdb: FerretDBProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy (default config) in front of the session FerretDB."""
    proc = ProxyProcess(ferretdb.uri, workdir=tmp_path_factory.mktemp("proxy")).start()
    yield proc
    proc.stop()


@pytest.fixture
def proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """Start extra proxies: `proxy_factory(upstream_uri, extra_config)`; stopped at teardown."""
    started: list[ProxyProcess] = []

    def make(
        upstream_uri: str,
        extra: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> ProxyProcess:
        proc = ProxyProcess(
            upstream_uri, extra, workdir=tmp_path_factory.mktemp("proxy"), env=env
        )
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def ferretdb_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDBFactory]:
    """Start extra, private FerretDB servers; stopped at teardown."""
    started: list[FerretDBProcess] = []

    def make(*, start: bool = True) -> FerretDBProcess:
        proc = _ferretdb(tmp_path_factory.mktemp("ferretdb"))
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisFactory]:
    """Start extra, private redis-servers (e.g. to kill one); stopped at teardown."""
    started: list[RedisProcess] = []

    def make(*, start: bool = True) -> RedisProcess:
        proc = _redis(tmp_path_factory.mktemp("redis"))
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def db_name(request: pytest.FixtureRequest) -> str:
    """A database name unique to this test (stable across runs), e.g. `t_test_find_3f2a91c0`."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    # Keep a readable hint of the test name, within MongoDB/FerretDB name rules.
    hint = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{hint}_{digest}"
