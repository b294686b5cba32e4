"""Which server a command goes to, once the routing rules have decided how.

Cursor continuations follow their cursor; statements of a transaction follow the server
that took the first one; everything else is selected with the decision's read
preference (always primary for writes: see ``proxy.route.rules``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from proxy.address import Address
from proxy.request import Request
from proxy.route.cursors import CursorTable
from proxy.route.readpref import PRIMARY
from proxy.route.rules import RouteDecision
from proxy.route.topology import Topology

# A session's transaction pin is forgotten after this long unused (the server's own
# transactionLifetimeLimitSeconds default).
TRANSACTION_PIN_TTL_S = 60.0
# listen.workers > 1: the server a sibling worker pinned a transaction to, for a
# statement of it that reaches this worker (proxy/worker_siblings.py).
TransactionLookup = Callable[[bytes, int], Awaitable[Address | None]]


def transaction_key(command: Mapping[str, Any]) -> tuple[bytes, int] | None:
    """(session id, txnNumber) of a statement inside a multi-statement transaction."""
    if command.get("autocommit") is not False:
        return None
    lsid = command.get("lsid")
    session = lsid.get("id") if isinstance(lsid, dict) else None
    txn = command.get("txnNumber")
    if not isinstance(session, bytes) or not isinstance(txn, int):
        return None
    return bytes(session), txn


class Router:
    def __init__(self, topology: Topology, cursors: CursorTable) -> None:
        self.topology = topology
        self.cursors = cursors
        # session id -> (txnNumber, server, last used)
        self._transactions: dict[bytes, tuple[int, Address, float]] = {}
        self.sibling_transactions: TransactionLookup | None = None

    async def server_for(self, request: Request, decision: RouteDecision) -> Address:
        """The server for a request the routing rules have decided on."""
        if decision.pinned == "cursor":
            for cursor_id in request.cursor_ids:
                entry = self.cursors.get(cursor_id)
                if entry is not None:
                    return entry.server
            # unknown cursor: the primary will answer CursorNotFound
        elif decision.pinned == "transaction":
            txn = request.transaction_key
            if txn is not None:
                return await self._transaction_server(txn, request.start_transaction is True)
        return await self.topology.select(decision.read_preference)

    def transaction_server(self, session: bytes, number: int) -> Address | None:
        """The server this router pinned a session's transaction ``number`` to."""
        pinned = self._transactions.get(session)
        return pinned[1] if pinned is not None and pinned[0] == number else None

    async def _transaction_server(self, txn: tuple[bytes, int], starts: bool = False) -> Address:
        """The server of a session's transaction, pinned from its first statement.

        The pin outlives commit and abort: a driver may send commitTransaction again
        (a retried or repeated commit) and it must reach the same server. It is replaced
        when the session starts a newer transaction, and forgotten after the TTL.
        """
        session, number = txn
        now = time.monotonic()
        pinned = self._transactions.get(session)
        if pinned is not None and pinned[0] == number:
            self._transactions[session] = (number, pinned[1], now)
            return pinned[1]
        address = None
        if not starts and self.sibling_transactions is not None:
            # A statement of a transaction that started in another worker.
            address = await self.sibling_transactions(session, number)
        if address is None:
            address = await self.topology.select(PRIMARY)
        self._expire(now)
        self._transactions[session] = (number, address, now)
        return address

    def _expire(self, now: float) -> None:
        stale = [k for k, (_, _, t) in self._transactions.items()
                 if now - t > TRANSACTION_PIN_TTL_S]
        for key in stale:
            del self._transactions[key]
