"""An instance's side of online moves (docs/placement.md, "Moving a tenant online"):
it keeps the shared placement state fresh, records the writes of a moving tenant in
Redis before and after they are forwarded, holds them during the final catch-up, and
refuses writes while it cannot read the state (the lease).

Why the order of operations is safe:

* The state and Redis ``TIME`` are read in one transaction (with the heartbeat), so a
  hold is "expired" only in a snapshot taken at or after ``hold_until_ms``, and the
  mover's switch refuses such a hold atomically: an instance never releases a held
  write to the source after the tenant was switched.
* A tracked write's ids go into the dirty set and its in-flight entry in one
  transaction that also reads the state back. If that read already shows the hold, the
  entry is removed and the write waits; otherwise the entry was in Redis before the
  hold was set, so the mover, which waits for in-flight entries after setting the
  hold, sees it. The final catch-up therefore covers every write sent to the source.
* The lease: a write is checked against a state read sent at most ``lease_ms`` ago;
  the mover waits ``lease_ms`` (and a margin) after setting a move's first phase
  before it copies, so every write that passed an older check has reached its cluster.
* A statement inside a multi-document transaction is applied at the commit, not at its
  reply: its in-flight entry stays until the transaction's ``commitTransaction`` or
  ``abortTransaction`` passes through :meth:`before_write`/:meth:`after_write` (which
  records the ids again and clears the entries; never held, it is what the mover waits
  for), or, failing that, until ``TXN_KEEP_S`` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.config import PlacementConfig
from proxy.errors import (
    RETRYABLE_WRITE_ERROR,
    TRANSIENT_TRANSACTION_ERROR,
    ProxyError,
)
from proxy.placement.directory import EMPTY_STATE, PlacementState
from proxy.placement.shared import (
    HOLD,
    VERIFYING,
    Keys,
    effective_phase,
    full_member,
    parse_state,
    redis_ms,
)
from proxy.placement.written import may_upsert, members_after, members_before
from proxy.request import Request
from proxy.upstream.roundtrip import Roundtrip
from proxy.wire.op_msg import DocumentSequence

__all__ = ["PRIMARY_STEPPED_DOWN", "PlacementAgent"]

log = logging.getLogger("mongoproxy.placement")
PRIMARY_STEPPED_DOWN = (189, "PrimarySteppedDown")
# A write of a moving tenant touching more documents than this marks its whole
# collection for re-copy instead of listing the ids.
MAX_WRITE_IDS = 1_000
_PENDING_LIMIT = 10_000  # post-records kept for retry while Redis is unreachable
# A transaction's entries are kept this long at most (the server's default
# transactionLifetimeLimitSeconds is 60): then recorded again and cleared.
TXN_KEEP_S = 120.0
_TXN_END = frozenset({"commitTransaction", "abortTransaction"})


@dataclass(slots=True)
class _Ticket:
    """One recorded write: where its members go, and its in-flight entry (if any)."""

    tenant: str
    name: str
    db: str
    collection: str
    set_key: str
    members: list[bytes]
    inflight_key: str | None = None
    entries: list[str] = field(default_factory=list)
    extra: list[bytes] = field(default_factory=list)
    txn: tuple[bytes, int] | None = None  # (lsid, txnNumber) of a transaction statement
    since: float = 0.0


def _labels(request: Request) -> list[str]:
    """The write was not forwarded, so a retry is always safe."""
    if request.autocommit is False:
        return [TRANSIENT_TRANSACTION_ERROR]
    return [RETRYABLE_WRITE_ERROR] if request.txn_number is not None else []


class PlacementAgent:
    """The shared placement state of one instance, and its part in moves."""

    def __init__(self, config: PlacementConfig, instance_id: str) -> None:
        if config.redis_url is None:
            raise ValueError("PlacementAgent needs placement.redis_url")
        self.config = config
        self.instance = instance_id
        self.keys = Keys(config.key_prefix)
        self.state: PlacementState = EMPTY_STATE
        self.redis_ms = 0  # Redis TIME read with ``state``
        self._lease_sent = -float("inf")  # monotonic time the last good read was sent
        self._lease_s = config.lease_ms / 1000
        self._hold_s = config.hold_timeout_ms / 1000
        self._changed = asyncio.Event()
        self._seq = itertools.count(1)
        self._pending: list[_Ticket] = []
        self._txns: dict[tuple[bytes, int], list[_Ticket]] = {}
        self._refreshed = 0  # the version the last refresh read
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down = False
        self.client: Redis = Redis.from_url(
            config.redis_url, socket_timeout=self._lease_s,
            socket_connect_timeout=self._lease_s, retry=Retry(NoBackoff(), 0))

    # -- the refresh task --------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="placement-refresh")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            # A cancellation landing in redis-py's own clean-up can be lost (seen in
            # tests: close() then waited forever); the flag ends the loop at its next
            # turn, and the cancel is repeated until the task is done.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=self.config.refresh_ms / 1000 + 0.1)
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        await self._flush_pending()
        await self.client.aclose()

    async def _loop(self) -> None:
        interval = self.config.refresh_ms / 1000
        while not self._closing:
            await asyncio.sleep(interval)
            await self.refresh()
            if self._txns:
                self._expire_txns()
            if self._pending:
                await self._flush_pending()

    async def refresh(self) -> bool:
        """Read the state (with Redis TIME) and beat the heartbeat; False on failure."""
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._lease_s):
                pipe = self.client.pipeline(transaction=True)
                pipe.get(self.keys.state)
                pipe.time()
                pipe.set(self.keys.live(self.instance), b"1", px=3 * self.config.lease_ms)
                raw, now, _ = await pipe.execute()
            state = parse_state(raw)
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            if not self._down:
                log.warning("placement state unreadable (%s): %s; writes are refused "
                            "once the last read is %d ms old", self.config.redis_url,
                            exc or type(exc).__name__, self.config.lease_ms)
                self._down = True
            self._wake()
            return False
        if self._down:
            log.info("placement state readable again (version %d)", state.version)
            self._down = False
        self._adopt(state, redis_ms(now), refresh=True)
        self._lease_sent = sent
        self._wake()
        return True

    def _adopt(self, state: PlacementState, now_ms: int, *, refresh: bool = False) -> None:
        """Keep the newer snapshot: a write's own read may be newer than a refresh that
        was sent before it and answered after. Only a refresh may go back (a Redis that
        lost the state: it is the truth now, and says so in the log)."""
        last_refresh, self._refreshed = self._refreshed, (
            state.version if refresh else self._refreshed)
        if state.version < self.state.version:
            if not refresh or state.version >= last_refresh:
                return
            log.error("placement state version went back from %d to %d: was the "
                      "placement Redis restarted without persistence?",
                      self.state.version, state.version)
        elif state.version == self.state.version and now_ms <= self.redis_ms:
            return
        self.state, self.redis_ms = state, now_ms

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the write path ------------------------------------------------------------------

    def gated(self, key: str) -> bool:
        """Whether a write of tenant ``key`` must go through :meth:`before_write`."""
        return (key in self.state.moves
                or time.monotonic() - self._lease_sent > self._lease_s)

    async def before_write(self, key: str, request: Request, command: Mapping[str, Any],
                           sequences: Sequence[DocumentSequence],
                           roundtrip: Roundtrip) -> object | None:
        """Wait out a hold, record what the write may touch; the ticket for
        :meth:`after_write` (None: nothing recorded). Raises ProxyError (retryable)."""
        if request.name in _TXN_END:
            return self._txn_end(request)
        # A statement of a transaction that already has statements in flight is not held:
        # the mover waits for those until the commit, which this one precedes.
        open_txn = (request.autocommit is False and request.session_id is not None
                    and (request.session_id, request.txn_number or 0) in self._txns)
        deadline: float | None = None
        while True:
            if time.monotonic() - self._lease_sent > self._lease_s:
                raise ProxyError(PRIMARY_STEPPED_DOWN, (
                    f"tenant placement: this proxy could not read the placement state "
                    f"from Redis for {self.config.lease_ms} ms (lease_ms), so it cannot "
                    f"know where tenant {key!r} lives; the write was not sent, retry"),
                    _labels(request))
            move = self.state.moves.get(key)
            if move is None:
                return None
            phase = effective_phase(move, self.redis_ms)
            if phase == HOLD and not open_txn:
                if deadline is None:
                    deadline = time.monotonic() + self._hold_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProxyError(PRIMARY_STEPPED_DOWN, (
                        f"tenant placement: tenant {key!r} is being moved from "
                        f"{move.get('from')!r} to {move.get('to')!r}; its writes were held "
                        f"for hold_timeout_ms ({self.config.hold_timeout_ms} ms) without "
                        f"the move finishing; the write was not sent, retry"),
                        _labels(request))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                continue
            ticket = await self._ticket(key, request, command, sequences, roundtrip, phase)
            if ticket is None:
                return None
            if await self._record(ticket, request, open_txn):
                return ticket

    async def _ticket(self, key: str, request: Request, command: Mapping[str, Any],
                      sequences: Sequence[DocumentSequence], roundtrip: Roundtrip,
                      phase: str) -> _Ticket | None:
        db, collection = request.db or "", request.collection or ""
        try:
            members = await members_before(request.name, db, collection, command,
                                           sequences, roundtrip.command, MAX_WRITE_IDS)
        except ProxyError:
            members = [full_member(f"{db}.{collection}")]
        if not members and not may_upsert(request.name, command, sequences):
            return None
        if phase in VERIFYING:
            return _Ticket(key, request.name, db, collection, self.keys.after(key), members)
        txn = None
        if request.autocommit is False and request.session_id is not None:
            txn = (request.session_id, request.txn_number or 0)
        return _Ticket(key, request.name, db, collection, self.keys.dirty(key), members,
                       self.keys.inflight(key), [f"{self.instance}:{next(self._seq)}"],
                       txn=txn)

    async def _record(self, ticket: _Ticket, request: Request, open_txn: bool) -> bool:
        """The pre-record; False when the state read with it says the write must wait
        (a hold, unless ``open_txn``) or be recorded elsewhere (switched meanwhile). An
        entry that may have been written but must not stay is cleared (or retried)."""
        try:
            async with asyncio.timeout(self._lease_s):
                pipe = self.client.pipeline(transaction=True)
                if ticket.members:
                    pipe.sadd(ticket.set_key, *ticket.members)
                if ticket.inflight_key is None:
                    await pipe.execute()
                    return True
                pipe.hset(ticket.inflight_key, ticket.entries[0], b"\n".join(ticket.members))
                pipe.get(self.keys.state)
                pipe.time()
                *_, raw, now = await pipe.execute()
                state = parse_state(raw)
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            if ticket.inflight_key is not None:
                self._pending.append(ticket)  # the entry may have been written: clear it
            raise ProxyError(PRIMARY_STEPPED_DOWN, (
                f"tenant placement: tenant {ticket.tenant!r} is being moved and its write "
                f"could not be recorded in Redis ({exc or type(exc).__name__}); the write "
                f"was not sent, retry"), _labels(request)) from None
        self._adopt(state, redis_ms(now))
        move = state.moves.get(ticket.tenant)
        phase = None if move is None else effective_phase(move, redis_ms(now))
        if phase not in VERIFYING and (phase != HOLD or open_txn):
            return True
        try:
            async with asyncio.timeout(self._lease_s):
                await self.client.hdel(ticket.inflight_key, *ticket.entries)
        except (RedisError, OSError, TimeoutError):
            self._pending.append(ticket)  # the drain must not wait for it
        return False

    async def after_write(self, ticket: object, body: bytes | None) -> None:
        """Record the write's ids again now that it is done (plus upserted ids) and
        clear its in-flight entry; kept for retry if Redis does not answer."""
        if not isinstance(ticket, _Ticket):
            return
        ticket.extra = members_after(ticket.name, ticket.db, ticket.collection, body)
        if ticket.txn is not None:  # applied at the commit: the entry stays until then
            ticket.since = time.monotonic()
            self._txns.setdefault(ticket.txn, []).append(ticket)
            return
        if not await self._post(ticket) and len(self._pending) < _PENDING_LIMIT:
            self._pending.append(ticket)

    async def _post(self, ticket: _Ticket) -> bool:
        try:
            async with asyncio.timeout(self._lease_s):
                pipe = self.client.pipeline(transaction=True)
                if ticket.members or ticket.extra:
                    pipe.sadd(ticket.set_key, *ticket.members, *ticket.extra)
                if ticket.inflight_key is not None:
                    pipe.hdel(ticket.inflight_key, *ticket.entries)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not record the write of moving tenant %r after it was "
                        "done (%s); will retry", ticket.tenant, exc or type(exc).__name__)
            return False
        return True

    async def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for index, ticket in enumerate(pending):
            if not await self._post(ticket):
                self._pending.extend(pending[index:])
                return

    # -- transactions ----------------------------------------------------------------------

    def _txn_end(self, request: Request) -> _Ticket | None:
        """The commit or abort of a transaction whose statements were recorded: one
        ticket with all of them, posted by :meth:`after_write`."""
        if request.session_id is None:
            return None
        tickets = self._txns.pop((request.session_id, request.txn_number or 0), None)
        if not tickets:
            return None
        return _merged(tickets)

    def _expire_txns(self) -> None:
        """Transactions never seen ending: recorded again and cleared after TXN_KEEP_S."""
        limit = time.monotonic() - TXN_KEEP_S
        for key in [k for k, v in self._txns.items() if v[0].since < limit]:
            self._pending.append(_merged(self._txns.pop(key)))


def _merged(tickets: list[_Ticket]) -> _Ticket:
    first = tickets[0]
    return _Ticket(first.tenant, "", first.db, first.collection, first.set_key,
                   [m for t in tickets for m in (*t.members, *t.extra)], first.inflight_key,
                   [e for t in tickets for e in t.entries])
