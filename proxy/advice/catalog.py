"""The real indexes of the collections the traffic queries, fetched off the request path.

A background task keeps, per namespace, the ``listIndexes`` answer and the
``$indexStats`` access counts (``None``: the server does not say, e.g. FerretDB). A
namespace is fetched when first wanted, again after ``refresh_s``, and at once after
an index change seen through the proxy (:meth:`IndexCatalog.invalidate`, called from
the observer for ``createIndexes``, ``dropIndexes``, ``collMod`` (hides and unhides
indexes), ``drop``, ``dropDatabase``).

The catalog runs commands through a callable it is given,
``run_command(db, command) -> reply document`` (awaitable), so it does not care how the
proxy reaches its upstream. A failed fetch is kept as an error and retried at the next
refresh; the advice says "unknown" for that namespace meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.advice.compare import IndexInfo

__all__ = ["INDEX_COMMANDS", "CatalogEntry", "IndexCatalog", "RunCommand"]

log = logging.getLogger("mongoproxy.advice")

RunCommand = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]
# Commands after which the namespace's indexes are fetched again.
INDEX_COMMANDS = frozenset({"createIndexes", "dropIndexes", "collMod", "drop", "dropDatabase"})
_NAMESPACE_NOT_FOUND = 26


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """What is known of one namespace. ``indexes`` None: not known (``error`` says why);
    ``usage`` None: the server has no ``$indexStats`` (``usage_error`` says what it said)."""

    fetched_at: float
    indexes: tuple[IndexInfo, ...] | None
    usage: dict[str, int] | None = None
    usage_since: dict[str, Any] | None = None
    error: str | None = None
    usage_error: str | None = None
    exists: bool = True


class IndexCatalog:
    def __init__(self, run_command: RunCommand, *, refresh_s: float = 300.0,
                 poll_s: float = 10.0, max_namespaces: int = 500, retry_s: float = 30.0,
                 source: Callable[[], Iterable[str]] | None = None,
                 after: Callable[[], Awaitable[None]] | None = None) -> None:
        self._run = run_command
        self._source = source
        self._after = after
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.max_namespaces = max_namespaces
        self.entries: dict[str, CatalogEntry] = {}
        self._wanted: dict[str, None] = {}
        self._stale: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0

    # -- called from the event loop, never awaiting -----------------------------------

    def want(self, namespaces: Iterable[str]) -> None:
        """Namespaces the advice needs; new ones are fetched soon."""
        new = False
        for ns in namespaces:
            if ns not in self._wanted and len(self._wanted) < self.max_namespaces:
                self._wanted[ns] = None
                new = True
        if new:
            self._wake.set()

    def invalidate(self, database: str | None, collection: str | None) -> None:
        """An index change seen through the proxy: fetch again (a whole database when
        ``collection`` is None)."""
        if database is None:
            return
        if collection:
            self._stale.add(f"{database}.{collection}")
        else:
            prefix = database + "."
            self._stale.update(ns for ns in self._wanted if ns.startswith(prefix))
        self._wake.set()

    def get(self, namespace: str) -> CatalogEntry | None:
        return self.entries.get(namespace)

    # -- the background task -------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _due(self, now: float) -> list[str]:
        due = []
        for ns in self._wanted:
            entry = self.entries.get(ns)
            if entry is None or ns in self._stale:
                due.append(ns)
            else:
                age = self.retry_s if entry.error is not None else self.refresh_s
                if now - entry.fetched_at >= age:
                    due.append(ns)
        return due

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._poll_once()
            except Exception:  # a bug here must not end the advice for good
                log.exception("index advice: poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)

    async def _poll_once(self) -> None:
        if self._source is not None:
            self.want(self._source())
        for ns in self._due(time.time()):
            self._stale.discard(ns)
            await self.refresh(ns)
        if self._after is not None:
            await self._after()

    async def refresh(self, namespace: str) -> CatalogEntry:
        """Fetch one namespace's indexes and usage now."""
        database, _, collection = namespace.partition(".")
        self.fetches += 1
        now = time.time()
        try:
            reply = await self._run(database, {"listIndexes": collection})
        except Exception as exc:  # any failure of the upstream path: retried later
            entry = CatalogEntry(now, None, error=f"listIndexes failed: {exc!r}")
        else:
            entry = await self._entry(now, database, collection, reply)
        self.entries[namespace] = entry
        return entry

    async def _entry(self, now: float, database: str, collection: str,
                     reply: Mapping[str, Any]) -> CatalogEntry:
        if not reply.get("ok"):
            if reply.get("code") == _NAMESPACE_NOT_FOUND:
                return CatalogEntry(now, (), exists=False, usage={})
            return CatalogEntry(now, None, error=f"listIndexes: {reply.get('errmsg')}")
        cursor = reply.get("cursor")
        batch = cursor.get("firstBatch", []) if isinstance(cursor, Mapping) else []
        indexes = tuple(IndexInfo.from_document(d) for d in batch if isinstance(d, Mapping))
        usage, since, error = await self._usage(database, collection)
        return CatalogEntry(now, indexes, usage, since, usage_error=error)

    async def _usage(self, database: str, collection: str
                     ) -> tuple[dict[str, int] | None, dict[str, Any] | None, str | None]:
        try:
            reply = await self._run(database, {
                "aggregate": collection, "pipeline": [{"$indexStats": {}}], "cursor": {}})
        except Exception as exc:
            return None, None, f"$indexStats failed: {exc!r}"
        if not reply.get("ok"):
            return None, None, f"$indexStats: {reply.get('errmsg')}"
        cursor = reply.get("cursor")
        batch = cursor.get("firstBatch", []) if isinstance(cursor, Mapping) else []
        usage: dict[str, int] = {}
        since: dict[str, Any] = {}
        for doc in batch:
            accesses = doc.get("accesses") if isinstance(doc, Mapping) else None
            if isinstance(accesses, Mapping):
                name = str(doc.get("name"))
                # Several members' stats (a mongos) add up.
                usage[name] = usage.get(name, 0) + int(accesses.get("ops", 0))
                since[name] = accesses.get("since")
        return usage, since, None
