"""Types of the factory fixtures in tests/conftest.py, for annotating tests."""

from __future__ import annotations

from typing import Any, Protocol

from tests.support.procs import FerretDBProcess, ProxyProcess, RedisProcess


class ProxyFactory(Protocol):
    def __call__(
        self,
        upstream_uri: str,
        extra: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> ProxyProcess: ...


class FerretDBFactory(Protocol):
    def __call__(self, *, start: bool = True) -> FerretDBProcess: ...


class RedisFactory(Protocol):
    def __call__(self, *, start: bool = True) -> RedisProcess: ...
