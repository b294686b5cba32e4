"""The hardening pieces on their own (issue 15): outlier detection, the login throttle,
the pre-authentication allowlist, log redaction, and the memory budget of client
streams (real loopback sockets, in this process)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Hashable

import bson
import pytest

from proxy.identity.config import AuthThrottleConfig
from proxy.identity.preauth import preauth_decision, preauth_reply
from proxy.identity.scram import ClientAuthenticator
from proxy.identity.throttle import AuthThrottle
from proxy.observe.redact import redact_reason
from proxy.pool.outlier import OutlierDetector
from proxy.server.limits import ConnectionLimit, MemoryBudget
from proxy.server.stream import ClientStream
from proxy.wire import encode_op_msg

# --------------------------------------------------------------------------- outliers


class Probe:
    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self.calls = 0

    async def __call__(self, server: Hashable) -> bool:
        self.calls += 1
        return self.healthy


def _detector(probe: Probe, ejected: list[Hashable]) -> OutlierDetector:
    return OutlierDetector(ejected.append, probe, consecutive=3, distinct_clients=2)


async def test_failures_of_one_client_never_eject_a_healthy_server() -> None:
    ejected: list[Hashable] = []
    probe = Probe(healthy=True)
    detector = _detector(probe, ejected)
    for _ in range(10):
        assert not detector.failure("s", client_id=1)
        await asyncio.sleep(0)
    await detector.close()
    assert ejected == [] and probe.calls >= 1


async def test_consecutive_failures_across_clients_eject() -> None:
    ejected: list[Hashable] = []
    detector = _detector(Probe(healthy=True), ejected)
    assert not detector.failure("s", 1)
    assert not detector.failure("s", 1)
    assert detector.failure("s", 2)  # 3 in a row, on 2 clients
    await detector.close()
    assert ejected == ["s"]


async def test_a_success_breaks_the_streak() -> None:
    ejected: list[Hashable] = []
    detector = _detector(Probe(healthy=True), ejected)
    detector.failure("s", 1)
    detector.failure("s", 2)
    detector.success("s")
    assert not detector.failure("s", 3)
    await detector.close()
    assert ejected == []


async def test_a_failed_probe_ejects() -> None:
    ejected: list[Hashable] = []
    detector = _detector(Probe(healthy=False), ejected)
    assert not detector.failure("s", 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert ejected == ["s"]


# --------------------------------------------------------------------------- throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_delays_grow_then_lock_out_and_expire() -> None:
    clock = Clock()
    config = AuthThrottleConfig(free_failures=2, base_delay_ms=100, max_delay_ms=350,
                                lockout_failures=6, lockout_ms=60_000, window_ms=120_000)
    throttle = AuthThrottle(config, clock)
    delays = [throttle.failed("10.0.0.1", "app") for _ in range(5)]
    assert delays == [0.0, 0.0, 0.1, 0.2, 0.35]
    assert not throttle.locked("10.0.0.1", "app")
    throttle.failed("10.0.0.9", "app")  # the 6th failure for the user, from elsewhere
    assert throttle.locked("10.0.0.1", None) is False
    assert throttle.locked("10.0.0.2", "app"), "the user is locked from any address"
    clock.now += 61
    assert not throttle.locked("10.0.0.2", "app")


def test_throttle_success_clears_and_memory_is_bounded() -> None:
    throttle = AuthThrottle(AuthThrottleConfig(max_tracked=10, free_failures=0), Clock())
    throttle.failed("p", "u")
    throttle.succeeded("p", "u")
    assert throttle.failed("p", "u") == 0.1  # counting starts again
    for i in range(100):
        throttle.failed(f"peer{i}", None)
    assert len(throttle._counts) <= 10


def test_unknown_users_get_a_decoy_like_a_real_one() -> None:
    """The SCRAM work is the same for an unknown user: a salt of the same length and
    the same iteration count, so neither the reply nor its cost tells them apart."""
    from proxy.identity.credentials import hash_password

    auth = ClientAuthenticator([_User("app", hash_password("pw", iterations=4096))])
    real, decoy = auth.credential("app"), auth.credential("nobody")
    assert decoy.iterations == real.iterations
    assert len(decoy.salt) == len(real.salt)
    assert auth.credential("nobody").salt == decoy.salt  # stable: no probing by repeats


class _User:
    def __init__(self, username: str, password_sha256: str) -> None:
        self.username = username
        self.password_sha256 = password_sha256
        self.tenant = "acme"


# --------------------------------------------------------------------------- pre-auth


@pytest.mark.parametrize(("name", "expected"), [
    ("ping", "local"), ("buildInfo", "local"), ("listDatabases", "refuse"),
    ("listCollections", "refuse"), ("find", "refuse"), ("endSessions", "refuse"),
])
def test_preauth_decision(name: str, expected: str) -> None:
    assert preauth_decision(name, users_configured=True, authenticated=False) == expected
    assert preauth_decision(name, users_configured=True, authenticated=True) == "pass"
    assert preauth_decision(name, users_configured=False, authenticated=False) == "pass"


def test_preauth_build_info_is_reduced() -> None:
    assert preauth_reply("buildInfo", 21) == {
        "version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1.0}


def test_redacted_tenancy_reasons_keep_no_values() -> None:
    reason = ('find on app.tasks: filter has tenant_id "SECRET, X", connection is bound '
              'to "acme"')
    assert redact_reason(reason) == (
        "find on app.tasks: filter has tenant_id ?, connection is bound to ?")
    assert "SECRET" not in redact_reason(
        "find: filter has tenant_id {'a': 'SECRET'}: not a single tenant value")
    assert redact_reason("find: filter has no tenant_id") == "find: filter has no tenant_id"


def test_connection_limit_follows_the_fd_limit() -> None:
    limit = ConnectionLimit(10_000, upstream_fds=200, fd_limit=1024)
    assert limit.limit == 1024 - 200 - 64 and limit.by_fds
    assert limit.admit(10, "peer") and not limit.admit(limit.limit, "peer")
    assert limit.refused == 1


# --------------------------------------------------------------------------- budget


async def test_a_message_that_does_not_fit_the_budget_waits_unread() -> None:
    """Two clients each start a 30 MB message with a 48 MB budget: the second is not
    read until the first is complete, then both complete."""
    budget = MemoryBudget(48_000_000)
    streams: list[ClientStream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientStream(streams.append, budget),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    message = encode_op_msg(1, 0, bson.encode({"ping": 1, "pad": b"x" * 30_000_000}))
    first, second = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
    try:
        for sock in (first, second):
            sock.setblocking(False)
        await loop.sock_sendall(first, message[:1_000_000])
        await _until(lambda: budget.used == len(message))
        await loop.sock_sendall(second, message[:100_000])
        await _until(lambda: len(streams) == 2 and streams[1]._budget_wait)
        assert budget.used == len(message)
        sending = loop.create_task(loop.sock_sendall(second, message[100_000:]))
        await loop.sock_sendall(first, message[1_000_000:])
        got = await streams[0].next_message(48_000_000, 10)
        assert got is not None and got[0] == message
        got = await streams[1].next_message(48_000_000, 10)
        assert got is not None and got[0] == message
        await sending
        assert budget.used == 0
    finally:
        first.close()
        second.close()
        server.close()


async def _until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- pacing


async def test_preauth_messages_are_paced_to_the_configured_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token bucket of ``max_preauth_messages_per_s``: a burst of that many passes at
    once, each further message waits 1/rate (the clock and the sleeps are recorded)."""
    from proxy.config import ListenConfig
    from proxy.server import session_limits

    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock.now += seconds

    monkeypatch.setattr(session_limits, "_clock", clock)
    monkeypatch.setattr(session_limits, "_sleep", sleep)
    limits = session_limits.SessionLimits(ListenConfig(max_preauth_messages_per_s=5), True)
    assert limits.paced(None) and not limits.paced(object())
    for _ in range(8):
        await limits.pace()
    assert slept == [0.2, 0.2, 0.2]
    clock.now += 10  # a quiet client gets its burst back, no more
    for _ in range(5):
        await limits.pace()
    assert len(slept) == 3
    assert not session_limits.SessionLimits(ListenConfig(), False).paced(None)


def test_small_messages_always_fit_the_budget() -> None:
    budget = MemoryBudget(48_000_000)
    assert budget.try_reserve(47_000_000)
    assert not budget.try_reserve(2_000_000)
    assert budget.try_reserve(60_000)  # ordinary traffic is never held up
    budget.release(47_000_000)
    assert budget.try_reserve(2_000_000)
