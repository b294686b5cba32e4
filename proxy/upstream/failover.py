"""What a failed exchange may do next, as mongos and the drivers decide it.

* A connect that failed before anything was sent is not the client's failure: the
  request waits in server selection (up to ``upstream.server_selection_timeout_ms``) for
  the server, or another suitable one, to be seen healthy by a check, and goes there.
* A failure after the message was sent (reset, EOF, a not-primary reply) is retried
  once on a freshly selected server only when that cannot apply anything twice: a read
  outside a transaction (the retryable-reads spec), or a retryable write (a
  ``txnNumber`` outside a transaction) when the upstream deduplicates by ``txnNumber``
  (a replica set or mongos; never a standalone server nor FerretDB).

The decision is a pure function of the request (:func:`retry_kind`); the waiting is the
topology's (:meth:`proxy.route.topology.Topology.select` with a deadline, which asks the
server checks to run soon while requests wait: one shared check, not a connect each).
"""

from __future__ import annotations

import time
from typing import Any

from pymongo.topology_description import TOPOLOGY_TYPE

from proxy.address import Address
from proxy.errors import ProxyError
from proxy.pool.pool import ConnectFailed
from proxy.request import Request
from proxy.route.rules import RouteDecision
from proxy.route.topology import Topology

__all__ = ["NO_RETRY", "RETRY_READ", "RETRY_WRITE", "Failover", "SentFailed", "retry_kind"]

NO_RETRY = 0
RETRY_READ = 1
RETRY_WRITE = 2

# The retryable-reads spec's commands (aggregate only without an output stage).
_RETRYABLE_READS = frozenset({
    "find", "aggregate", "count", "distinct", "listCollections", "listIndexes",
    "listDatabases",
})


class SentFailed(ProxyError):
    """The exchange failed after the message was (or may have been) sent: the server may
    have applied it. ``timed_out``: no reply within socket_timeout_ms (the server may be
    stopped rather than gone)."""

    def __init__(self, code: tuple[int, str], errmsg: str, *, timed_out: bool) -> None:
        super().__init__(code, errmsg)
        self.timed_out = timed_out


def retry_kind(request: Request, decision: RouteDecision, retryable_writes: bool) -> int:
    """How a request whose exchange failed after sending may be retried, if at all."""
    if decision.pinned is not None or request.in_transaction or request.more_to_come:
        # A cursor lives on its connection's server; a transaction on its first
        # statement's; an unacknowledged write has no reply to wait for.
        return NO_RETRY
    if request.txn_number is not None:
        return RETRY_WRITE if retryable_writes else NO_RETRY
    if request.name in _RETRYABLE_READS and not _writes_output(request.command):
        return RETRY_READ
    return NO_RETRY


def _writes_output(command: dict[str, Any]) -> bool:
    """An aggregate with $out/$merge is a write, never retried as a read."""
    pipeline = command.get("pipeline")
    if not isinstance(pipeline, list) or not pipeline:
        return False
    last = pipeline[-1]
    return isinstance(last, dict) and ("$out" in last or "$merge" in last)


class Failover:
    """One request's way past failed exchanges: its selection deadline (set at the first
    failure) and whether its one retry after sending was used."""

    __slots__ = ("avoid", "deadline", "decision", "request", "retried", "topology")

    def __init__(self, topology: Topology, request: Request, decision: RouteDecision) -> None:
        self.topology = topology
        self.request = request
        self.decision = decision
        self.deadline = time.monotonic() + topology.config.server_selection_timeout_ms / 1000
        self.retried = False
        # The server the sent attempt failed on, and when: the retry goes there only
        # after a newer check has seen it healthy.
        self.avoid: tuple[Address, float] | None = None

    async def after_error(self, error: ProxyError, address: Address) -> Address:
        """The server to try next after ``error`` on ``address``; raises ``error`` when
        the client is to have it (or 133 when no server became suitable in time)."""
        if isinstance(error, ConnectFailed):
            # Nothing was sent. The server is marked failed (Roundtrip._server_failed):
            # selection now waits for a check newer than the failure. pymongo never
            # checks a load balancer, so there waiting would only repeat the connect.
            if (self.decision.pinned is not None or self.topology.description()
                    .topology_type == TOPOLOGY_TYPE.LoadBalanced):
                raise error
            return await self.topology.select(self.decision.read_preference, self.deadline,
                                              self.avoid)
        if (not isinstance(error, SentFailed) or error.timed_out or self.retried
                or self._kind() == NO_RETRY):
            # A timeout is not retried: the request would outlive socket_timeout_ms.
            raise error
        self.retried = True
        # Whether the server is down for everyone is outlier detection's verdict; this
        # request waits for a check of it (or goes to another suitable server).
        self.avoid = (address, time.monotonic())
        return await self.topology.select(self.decision.read_preference, self.deadline,
                                          self.avoid)

    async def after_not_primary(self) -> Address | None:
        """Where to retry a request a server answered "not primary" (it is marked
        failed), or None: the client gets that reply."""
        if self.retried or self._kind() == NO_RETRY:
            return None
        self.retried = True
        try:
            return await self.topology.select(self.decision.read_preference, self.deadline)
        except ProxyError:
            return None  # no new primary in time: the server's own reply says why

    def _kind(self) -> int:
        return retry_kind(self.request, self.decision, self.topology.retryable_writes())
