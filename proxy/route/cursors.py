"""Which server owns each open cursor, and which client connection opened it.

Multiplexing must not break cursors: getMore and killCursors go to the server that
answered the find/aggregate, and when a client disconnects the cursors it opened are
killed on their servers rather than left to time out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from proxy.address import Address

if TYPE_CHECKING:
    from proxy.pool.connection import UpstreamConnection


@dataclass(frozen=True, slots=True)
class CursorEntry:
    server: Address
    namespace: str  # "db.collection", needed by killCursors
    owner: int  # client connection id
    # The upstream connection that opened it: FerretDB kills a cursor when that
    # connection closes, so the pool must not reap it while this cursor lives.
    conn: UpstreamConnection
    # The tenant the opening command was confined to (tenancy checks getMore against it).
    tenant: Any = None
    # The placement cluster whose server holds it (proxy.placement).
    cluster: str = "home"


# The owner of cursors another worker of listen.workers opened (client ids start at 1):
# no connection of this worker owns them, so none's departure kills them.
FOREIGN_OWNER = 0
# Foreign cursors remembered at most (the oldest are forgotten first): a client that
# abandons cursors it continued here must not grow the table without bound.
MAX_FOREIGN = 10_000


class _NoConnection:
    """Stands for the upstream connection of a foreign cursor: it is another worker's."""

    def cursor_opened(self) -> None:
        pass

    def cursor_closed(self) -> None:
        pass


class CursorTable:
    def __init__(self) -> None:
        self._cursors: dict[int, CursorEntry] = {}
        self._by_owner: dict[int, set[int]] = defaultdict(set)
        self._foreign: dict[int, None] = {}  # insertion-ordered: the oldest first

    def __len__(self) -> int:
        return len(self._cursors)

    def add(
        self,
        cursor_id: int,
        server: Address,
        namespace: str,
        owner: int,
        conn: UpstreamConnection,
        tenant: Any = None,
        cluster: str = "home",
    ) -> None:
        self.remove(cursor_id)
        self._cursors[cursor_id] = CursorEntry(server, namespace, owner, conn, tenant,
                                               cluster)
        self._by_owner[owner].add(cursor_id)
        conn.cursor_opened()

    def add_foreign(self, cursor_id: int, server: Address, namespace: str,
                    tenant: Any = None, cluster: str = "home") -> None:
        """A cursor another worker opened, continued by a client connection of this one
        (a driver may send a getMore on any of its pooled connections)."""
        if len(self._foreign) >= MAX_FOREIGN:
            self.remove(next(iter(self._foreign)))
        self.add(cursor_id, server, namespace, FOREIGN_OWNER,
                 cast("UpstreamConnection", _NoConnection()), tenant, cluster)
        self._foreign[cursor_id] = None

    def get(self, cursor_id: int) -> CursorEntry | None:
        return self._cursors.get(cursor_id)

    def tenant_of(self, cursor_id: int) -> tuple[bool, Any]:
        """(known, tenant) of a cursor, for the tenancy check of getMore/killCursors."""
        entry = self._cursors.get(cursor_id)
        return (False, None) if entry is None else (True, entry.tenant)

    def remove(self, cursor_id: int) -> None:
        entry = self._cursors.pop(cursor_id, None)
        self._foreign.pop(cursor_id, None)
        if entry is not None:
            entry.conn.cursor_closed()
            owned = self._by_owner.get(entry.owner)
            if owned is not None:
                owned.discard(cursor_id)
                if not owned:
                    del self._by_owner[entry.owner]

    def release_owner(self, owner: int) -> dict[tuple[Address, str], list[int]]:
        """Forget an owner's cursors; returns them grouped by (server, namespace)."""
        groups: dict[tuple[Address, str], list[int]] = defaultdict(list)
        for cursor_id in self._by_owner.pop(owner, set()):
            entry = self._cursors.pop(cursor_id)
            entry.conn.cursor_closed()
            groups[(entry.server, entry.namespace)].append(cursor_id)
        return dict(groups)

    def release_owner_by_cluster(self, owner: int
                                 ) -> dict[tuple[str, Address, str], list[int]]:
        """Forget an owner's cursors; grouped by (cluster, server, namespace)."""
        groups: dict[tuple[str, Address, str], list[int]] = defaultdict(list)
        for cursor_id in self._by_owner.pop(owner, set()):
            entry = self._cursors.pop(cursor_id)
            entry.conn.cursor_closed()
            groups[(entry.cluster, entry.server, entry.namespace)].append(cursor_id)
        return dict(groups)
