"""The result cache as the request path sees it: one :class:`Access` per command.

The listener calls :meth:`ResultCache.begin` once the command is final (tenancy has
injected its conditions, routing has decided), and then, on the returned access:

* reads: ``await lookup()`` before server selection: a reply body on a hit (sent with a
  new header, nothing goes upstream), else None (a miss or a bypass);
* every forwarded command: ``await replied(body)`` when the upstream reply is in, before
  the client gets it: a write replaces its namespaces' tokens here (so the client's
  acknowledgement follows the invalidation), a read leader hands its reply to the
  requests waiting on its flight; ``await failed()`` when there is no reply (a write
  may still have been applied, so it invalidates too);
* reads: ``await store()`` after the reply was written to the client.

``access.result`` is what the operation record's ``cache`` field says: ``hit``,
``miss``, ``bypass:<reason>``, or None for commands the cache does not concern (no rule
matched; writes). Redis never fails a request: any Redis problem is a bypass
(``redis_unavailable``: circuit open; ``redis_timeout``: no reply within the lookup
budget; ``redis_error``; ``redis_garbage``; ``pending_invalidation``: a write's
invalidation through this instance has not reached Redis yet).

Transactions: writes inside a transaction (``autocommit: false``) are invisible until
``commitTransaction``, so their namespaces are remembered per session and transaction
number, and replaced when the commit's reply arrives (again before the client sees it).
This assumes, as the transaction pinning of ``proxy.route.router`` does, that a
transaction's statements and its commit go through the same proxy instance.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.cache.config import CacheConfig
from proxy.cache.eligibility import (
    NOTHING,
    WriteTargets,
    read_bypass,
    reply_bypass,
    strip_fields,
    written_namespaces,
)
from proxy.cache.entry import CorruptEntry, decode_entry, encode_entry
from proxy.cache.flight import Flight, SingleFlight
from proxy.cache.key import entry_digest
from proxy.cache.metrics import CacheMetrics
from proxy.cache.store import RedisStore, StoreUnavailable
from proxy.classify import Classification
from proxy.route.router import transaction_key
from proxy.route.rules import RouteDecision

__all__ = ["Access", "ResultCache"]

log = logging.getLogger("mongoproxy.cache")

# Sessions whose transaction writes are remembered at most (oldest forgotten first).
MAX_TRANSACTIONS = 10_000


class Access:
    """The cache's part in one command (see the module docstring)."""

    __slots__ = (
        "_body", "_cache", "_flight", "_token", "digest", "is_read", "ns", "result",
        "targets", "ttl_s",
    )

    def __init__(
        self,
        cache: ResultCache,
        *,
        result: str | None = None,
        ns: str = "",
        digest: str = "",
        ttl_s: float = 0.0,
        targets: WriteTargets = NOTHING,
    ) -> None:
        self._cache = cache
        self.is_read = bool(digest)
        self.result = result
        self.ns = ns
        self.digest = digest
        self.ttl_s = ttl_s
        self.targets = targets
        self._token: bytes | None = None
        self._flight: Flight | None = None
        self._body: bytes | None = None  # the body to store after the reply

    async def lookup(self) -> bytes | None:
        """A reply body to answer with, or None to go upstream."""
        if not self.is_read or self.result is not None:
            return None
        cache = self._cache
        store = cache.store
        if not store.available:
            self.result = "bypass:redis_unavailable"
            return None
        try:
            token, raw = await store.lookup(self.ns, self.digest)
        except StoreUnavailable as exc:
            self.result = f"bypass:{exc.reason}"
            return None
        if raw is not None:
            try:
                entry_token, body = decode_entry(raw, cache.config.max_entry_bytes + 5)
            except CorruptEntry as exc:
                cache.metrics.error("lookup", "garbage")
                store.failed(f"corrupt entry: {exc}")
                self.result = "bypass:redis_garbage"
                return None
            if entry_token == token:
                self.result = "hit"
                cache.metrics.served(len(body))
                return body
        self._token = token
        self.result = "miss"
        key = (self.ns, token, self.digest)
        flight = cache.flights.lead(key)
        if flight is not None:
            self._flight = flight
            return None
        shared = await cache.flights.wait(key)
        if shared is not None:
            self.result = "hit"
            cache.metrics.flight_waits.inc()
            cache.metrics.served(len(shared))
            return shared
        return None  # the leader's reply could not be shared: go upstream ourselves

    async def replied(self, body: bytes) -> None:
        """The upstream reply is in (not yet sent to the client). For a write, returns
        only once its invalidation reached Redis, or ``invalidate_timeout_ms`` ran out
        and its namespaces are pending (docs/cache.md): the client's acknowledgement
        must follow the invalidation."""
        if self.targets:
            await self._cache.store.invalidate(self.targets)
            return
        if self._token is None:
            return
        why = reply_bypass(body, self._cache.config.max_entry_bytes)
        shared: bytes | None = None
        if why is None:
            try:
                shared = strip_fields(body)
            except (ValueError, IndexError):
                why = "malformed"
        if why is not None:
            self.result = f"bypass:{why}"
        self._body = shared
        if self._flight is not None:
            self._flight.finish(shared)

    async def failed(self) -> None:
        """No usable reply (network error, timeout, shutdown)."""
        if self.targets:
            await self._cache.store.invalidate(self.targets)
        self.abandon()

    def cancelled(self) -> None:
        """The request was cancelled during its upstream exchange (shutdown, client
        gone): a write may have been applied, so its invalidation is left pending (the
        retry loop lands it); then release the flight. Nothing is awaited."""
        if self.targets:
            self._cache.store.invalidations.cancelled(self.targets)
        self.abandon()

    def abandon(self) -> None:
        """Release flight waiters without awaiting anything (cancellation)."""
        if self._flight is not None:
            self._flight.finish(None)

    async def store(self) -> None:
        """Write the miss's reply to Redis, tagged with the token read before it."""
        body, token = self._body, self._token
        if body is None or token is None:
            return
        self._body = None
        cache = self._cache
        value = encode_entry(token, body, cache.config.compress_min_bytes)
        try:
            await cache.store.store(self.ns, self.digest, value, self.ttl_s)
        except StoreUnavailable:
            cache.metrics.stores.labels("error").inc()
            return
        cache.metrics.stored(len(value))


class ResultCache:
    def __init__(self, config: CacheConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = CacheMetrics(registry)
        self.store = RedisStore(config, self.metrics)
        self.flights = SingleFlight()
        # session id -> (txnNumber, namespaces, databases) written in that transaction
        self._transactions: OrderedDict[bytes, tuple[int, set[str], set[str]]] = OrderedDict()

    @property
    def state(self) -> str:
        """For /readyz: "ok", "down" (circuit open) or "connecting"."""
        return self.store.state

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def begin(
        self,
        command: Mapping[str, Any],
        c: Classification,
        decision: RouteDecision,
        tenants: tuple[Any, ...],
        *,
        has_sequences: bool,
        rules: CacheConfig,
        name: str | None = None,
    ) -> Access | None:
        """The cache's part in ``command`` as it will be forwarded, or None.

        ``rules`` is the live configuration's cache section (its rules reload live);
        ``tenants`` the connection's bound tenant and the tenant the policy admitted the
        command for: both are part of the key. ``name``: the command's name as sent
        (``Request.raw_name``), so the key does not read the document for it again.
        """
        if c.is_read:
            rule = rules.compiled.ttl_for(c, decision.class_name)
            if rule is None:
                return None
            reason = read_bypass(command, c, has_sequences)
            if reason is not None:
                return Access(self, result=f"bypass:{reason}")
            return Access(
                self,
                ns=f"{c.database}.{c.collection}",
                digest=entry_digest(command, decision.read_preference.document, tenants,
                                    name),
                ttl_s=rule[0],
            )
        if c.is_write:
            targets = written_namespaces(command, c)
            if not targets:
                return None
            if c.in_transaction:
                self._remember(command, targets)
                return None
            return Access(self, targets=targets)
        if c.command == "commitTransaction":
            targets = self._transaction_targets(command)
            return Access(self, targets=targets) if targets else None
        if c.command == "abortTransaction":
            self._forget(command)
        return None

    # -- transactions -----------------------------------------------------------------

    def _remember(self, command: Mapping[str, Any], targets: WriteTargets) -> None:
        key = transaction_key(command)
        if key is None:
            return
        session, txn = key
        known = self._transactions.get(session)
        if known is None or known[0] != txn:
            known = (txn, set(), set())
            self._transactions[session] = known
        self._transactions.move_to_end(session)
        known[1].update(targets.namespaces)
        known[2].update(targets.databases)
        while len(self._transactions) > MAX_TRANSACTIONS:
            self._transactions.popitem(last=False)

    def _transaction_targets(self, command: Mapping[str, Any]) -> WriteTargets:
        key = transaction_key({**command, "autocommit": False})
        if key is None:
            return NOTHING
        known = self._transactions.get(key[0])
        if known is None or known[0] != key[1]:
            return NOTHING
        # Kept (not popped): a retried commit must invalidate again.
        return WriteTargets(tuple(sorted(known[1])), tuple(sorted(known[2])))

    def _forget(self, command: Mapping[str, Any]) -> None:
        key = transaction_key({**command, "autocommit": False})
        if key is not None:
            known = self._transactions.get(key[0])
            if known is not None and known[0] == key[1]:
                del self._transactions[key[0]]
