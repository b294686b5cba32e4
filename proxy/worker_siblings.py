"""Cursors and transactions continued in another worker (``listen.workers`` > 1).

A driver sends a cursor's getMore on whichever of its pooled connections is free, and
with several workers that connection can live in a worker that did not open the
cursor. That worker does not know the cursor's server (the router would send it to the
primary) nor its tenant (tenancy would refuse it). So, before routing a getMore or
killCursors whose cursor it does not know, a worker asks its siblings' private admin
endpoints (``GET /cursor?id=N`` on their unix sockets); the one that opened the cursor
answers with its server, namespace and tenant, and the worker remembers it as a
*foreign* cursor (:meth:`~proxy.route.cursors.CursorTable.add_foreign`). Cost: one
round of unix-socket requests the first time a cursor shows up in another worker,
nothing on the ordinary path (a known cursor, or one worker).

Transactions likewise: a statement of a transaction (not its ``startTransaction``) whose
session this worker has not pinned asks ``GET /transaction?session=HEX&txn=N``, so it
goes to the server (e.g. the mongos) the transaction started on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.admin.http import Handler, json_response
from proxy.route.cursors import FOREIGN_OWNER, CursorTable
from proxy.supervisor_admin import http_get

if TYPE_CHECKING:
    from proxy.app import Proxy
    from proxy.route.router import Router
    from proxy.worker import WorkerSlot

__all__ = ["Siblings", "attach"]

log = logging.getLogger("mongoproxy.worker")

# A sibling that does not answer within this long is taken not to know the cursor.
LOOKUP_TIMEOUT_S = 1.0
# Cursor ids of one killCursors looked up at most (the rest go as unknown ones do).
MAX_LOOKUPS = 16


class Siblings:
    def __init__(self, cursors: CursorTable, slot: WorkerSlot) -> None:
        self.cursors = cursors
        mine = Path(slot.admin_socket)
        self.siblings = [str(mine.with_name(f"worker-{i}.sock"))
                         for i in range(slot.count) if i != slot.index]

    async def resolve(self, cursor_ids: Sequence[int]) -> None:
        """Learn from the siblings the cursors of a getMore/killCursors not known here."""
        unknown = [i for i in cursor_ids[:MAX_LOOKUPS] if i and self.cursors.get(i) is None]
        answers = await asyncio.gather(*(self._ask(f"/cursor?id={i}") for i in unknown))
        for cursor_id, found in zip(unknown, answers, strict=True):
            if found is not None:
                host, port = found["server"]
                self.cursors.add_foreign(cursor_id, (str(host), int(port)),
                                         str(found["namespace"]), found.get("tenant"),
                                         str(found.get("cluster", "home")))

    async def transaction(self, session: bytes, number: int) -> tuple[str, int] | None:
        """The server a sibling pinned this transaction to, if one did."""
        found = await self._ask(f"/transaction?session={session.hex()}&txn={number}")
        if found is None:
            return None
        host, port = found["server"]
        return str(host), int(port)

    async def _ask(self, target: str) -> dict[str, Any] | None:
        answers = await asyncio.gather(
            *(http_get(s, target, LOOKUP_TIMEOUT_S) for s in self.siblings),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                continue  # a sibling being replaced: it has no cursors anyway
            status, body = answer
            if status == 200:
                found: dict[str, Any] = json.loads(body)
                return found
        return None


def cursor_handler(cursors: CursorTable) -> Handler:
    """``GET /cursor?id=N``: a cursor this worker opened (404 otherwise)."""

    def handle(query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        raw = (query.get("id") or [""])[-1]
        try:
            entry = cursors.get(int(raw))
        except ValueError:
            return json_response(400, {"error": f"id must be an integer, got {raw!r}"})
        if entry is None or entry.owner == FOREIGN_OWNER:
            return json_response(404, {"error": "not a cursor of this worker"})
        return json_response(200, {"server": list(entry.server), "namespace": entry.namespace,
                                   "tenant": entry.tenant, "cluster": entry.cluster})

    return handle


def transaction_handler(router: Router) -> Handler:
    """``GET /transaction?session=HEX&txn=N``: the server this worker pinned it to."""

    def handle(query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        session, number = (query.get("session") or [""])[-1], (query.get("txn") or [""])[-1]
        try:
            server = router.transaction_server(bytes.fromhex(session), int(number))
        except ValueError:
            return json_response(400, {"error": "session must be hex and txn an integer"})
        if server is None:
            return json_response(404, {"error": "not a transaction of this worker"})
        return json_response(200, {"server": list(server)})

    return handle


def attach(proxy: Proxy, slot: WorkerSlot) -> Siblings:
    """Serve this worker's cursors and transactions to its siblings; ask them theirs."""
    siblings = Siblings(proxy.cursors, slot)
    proxy.admin.routes["/cursor"] = cursor_handler(proxy.cursors)
    router = proxy.roundtrip.router
    proxy.admin.routes["/transaction"] = transaction_handler(router)
    router.sibling_transactions = siblings.transaction
    return siblings
