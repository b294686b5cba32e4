"""The result cache around the upstream path: :class:`CachedUpstream`.

It owns the cache's rule for the request path: **a write's invalidation precedes its
acknowledgement** (read-your-writes across proxy instances). :meth:`CachedUpstream.forward`
returns an upstream reply only after the write's namespaces were invalidated (or the
read's flight was handed the reply); the caller sends the reply to the client after it
returns, and stores a read's reply after sending it (:meth:`CachedUpstream.after_reply`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.cache.config import CacheConfig
from proxy.cache.layer import Access, ResultCache
from proxy.classify import Classification
from proxy.errors import ProxyError
from proxy.pool.connection import next_request_id
from proxy.request import Request
from proxy.route.rules import RouteDecision
from proxy.upstream.roundtrip import Exchanged, Roundtrip
from proxy.wire import HEADER_SIZE, OpCode, pack_header

__all__ = ["CachedUpstream"]


class CachedUpstream:
    def __init__(self, cache: ResultCache, roundtrip: Roundtrip) -> None:
        self.cache = cache
        self.roundtrip = roundtrip

    def begin(
        self,
        request: Request,
        command: dict[str, Any],
        classification: Classification,
        decision: RouteDecision,
        tenants: tuple[Any, Any],
        has_sequences: bool,
        rules: CacheConfig | None,
    ) -> Access | None:
        """The cache's part in the command as it will be forwarded (after tenancy and
        routing), or None when the cache has nothing to do with it."""
        cache = self.cache
        access = cache.begin(command, classification, decision, tenants,
                             has_sequences=has_sequences, rules=rules or cache.config,
                             name=request.raw_name)
        if access is not None and access.is_read and request.more_to_come:
            return None  # no reply expected: nothing to serve from the cache
        return access

    async def forward(self, request: Request, message: bytes, decision: RouteDecision,
                      access: Access, timer: Any, client: int = 0,
                      roundtrip: Roundtrip | None = None) -> Exchanged:
        """A reply for the request: from the cache (a hit), else from the upstream once
        the cache has seen it (a write's invalidation done)."""
        if access.is_read:
            cached = await access.lookup()
            timer.mark("cache")
            if cached is not None:
                header = pack_header(HEADER_SIZE + len(cached), next_request_id(),
                                     request.request_id, OpCode.OP_MSG)
                return Exchanged(None, None, header, cached)
        try:
            done = await (roundtrip or self.roundtrip).exchange(request, message, decision,
                                                                timer, client)
        except ProxyError:
            await access.failed()  # a write may have been applied anyway
            raise
        except asyncio.CancelledError:
            access.cancelled()  # likewise, but nothing may be awaited now
            raise
        # Before the client sees the reply: invalidate before acknowledging.
        await access.replied(done.body)
        timer.mark("cache")
        return done

    @staticmethod
    async def after_reply(access: Access) -> None:
        """The reply was sent: store a miss's reply; release this request's flight."""
        try:
            await access.store()
        finally:
            access.abandon()  # waiters on this request's flight never hang
