"""Reads that span tenants on several clusters, fanned out and merged (docs/placement.md,
"Fan-out reads").

A ``"*"`` identity's read that names no single tenant goes to every cluster; the
proxy merges the answers as the one server would have given them: sorted streams
merged in order, then skip and limit; counts summed; distinct values unioned. A cursor
that spans clusters is the proxy's own (:class:`_Merged`): a proxy-chosen id, and per
cluster an upstream cursor on the server and connection that opened it, with the
documents read ahead. What cannot be merged exactly is refused (``proxy.placement.plan``).

Nothing here runs for a request that is not fanned out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import bson
from bson import Int64
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from proxy.errors import (
    CURSOR_IN_USE,
    CURSOR_NOT_FOUND,
    EXCEEDED_MEMORY_LIMIT,
    UNAUTHORIZED,
    ProxyError,
)
from proxy.placement.merge import Key, Unmergeable, count_total, pick, sort_key, union_values
from proxy.placement.plan import DEFAULT_BATCH, Plan, plan
from proxy.route.readpref import PRIMARY
from proxy.wire import parse_op_msg

if TYPE_CHECKING:
    from proxy.address import Address
    from proxy.pool.connection import UpstreamConnection
    from proxy.route.rules import RouteDecision
    from proxy.upstream.roundtrip import Roundtrip

__all__ = ["FanOut"]

log = logging.getLogger("mongoproxy.placement")

# Documents stay raw: a merged batch re-encodes them as the bytes the clusters sent.
_RAW = CodecOptions(document_class=RawBSONDocument)
# A batch stops growing past this many bytes (the server's own batch bound).
_MAX_BATCH_BYTES = 16 * 1024 * 1024
# Merged cursor ids: above every id FerretDB hands out and unlike a server's small ones.
_ID_FLOOR = 2**41
_ID_SPAN = 2**63 - 1 - _ID_FLOOR
_T = TypeVar("_T")


class _Stream:
    """One cluster's part of a merged cursor: its upstream cursor and read-ahead."""

    __slots__ = ("address", "conn", "cursor_id", "docs", "keys", "killed", "namespace",
                 "roundtrip")

    def __init__(self, roundtrip: Roundtrip, address: Address, conn: UpstreamConnection,
                 cursor_id: int, namespace: str) -> None:
        self.roundtrip = roundtrip
        self.address = address
        self.conn = conn
        self.cursor_id = cursor_id
        self.namespace = namespace
        self.docs: deque[RawBSONDocument] = deque()
        self.keys: deque[tuple[Key, ...]] = deque()
        self.killed = False
        if cursor_id:
            conn.cursor_opened()  # the pool keeps the connection that holds the cursor

    def extend(self, docs: list[RawBSONDocument], cursor_id: int, merge: Plan) -> None:
        if self.killed:  # a getMore that raced a killCursors or the client's departure
            return
        self.docs.extend(docs)
        if merge.sort is not None:
            self.keys.extend(sort_key(doc, merge.sort) for doc in docs)
        if self.cursor_id and not cursor_id:
            self.conn.cursor_closed()
        self.cursor_id = cursor_id

    def kill(self) -> None:
        """Kill the upstream cursor (in the background) if it is still open."""
        self.killed = True
        self.docs.clear()
        self.keys.clear()
        if self.cursor_id:
            cursor_id, self.cursor_id = self.cursor_id, 0
            self.conn.cursor_closed()
            self.roundtrip.kill_cursors(self.address, self.namespace, [cursor_id])


class _Merged:
    """A cursor spanning clusters, as its client sees it."""

    __slots__ = ("busy", "cursor_id", "last_used", "owner", "plan", "remaining", "skip",
                 "streams")

    def __init__(self, merge: Plan, streams: list[_Stream], owner: int) -> None:
        self.cursor_id = 0
        self.plan = merge
        self.streams = streams
        self.owner = owner
        self.skip = merge.skip
        self.remaining = merge.limit
        self.busy = False
        self.last_used = time.monotonic()

    @property
    def exhausted(self) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        return all(not s.cursor_id and not s.docs for s in self.streams)

    def kill(self) -> None:
        for stream in self.streams:
            stream.kill()


class FanOut:
    """Fanned-out reads and the merged cursors they leave open (module docstring)."""

    def __init__(self, batch_size: int, tenant_field: str, *, max_cursors: int = 1000,
                 idle_timeout_s: float = 600.0) -> None:
        self.batch_size = batch_size
        self.tenant_field = tenant_field
        self.max_cursors = max_cursors
        self.idle_timeout_s = idle_timeout_s
        self._cursors: dict[int, _Merged] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- the pipeline's questions -------------------------------------------------------------

    def refusal(self, name: str, command: Mapping[str, Any]) -> str | None:
        """None: ``command`` may be fanned out; else why not."""
        try:
            plan(name, command, self.tenant_field)
        except Unmergeable as exc:
            return str(exc)
        except ProxyError:
            return None  # malformed: run() answers with the server's error
        return None

    def owns(self, cursor_id: int) -> bool:
        return cursor_id in self._cursors

    def __len__(self) -> int:
        return len(self._cursors)

    # -- a fanned-out command ----------------------------------------------------------------

    async def run(self, name: str, command: dict[str, Any], targets: Sequence[Roundtrip],
                  decision: RouteDecision, owner: int,
                  exclude: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
        """The merged reply to ``command`` run on every cluster of ``targets``.
        ``exclude``: per cluster name, tenant values whose documents there are not read
        (a tenant being moved has a copy on a cluster that does not serve it yet, or
        any more)."""
        try:
            merge = plan(name, command, self.tenant_field)
        except Unmergeable as exc:
            raise ProxyError(UNAUTHORIZED, (
                f"{name} on {command.get('$db')}.{command.get(name)} spans tenants on "
                f"several clusters: {exc}")) from None
        if merge.kind == "cursor" and len(self._cursors) >= self.max_cursors:
            raise self._too_many(name, merge)
        upstream = self._upstream_command(merge, decision)
        streams: list[_Stream] = []
        try:
            replies = await _all(
                self._open(target, merge, _excluding(upstream, self.tenant_field,
                                                     (exclude or {}).get(target.cluster)),
                           decision, streams)
                for target in targets)
        except BaseException:
            for stream in streams:
                stream.kill()
            raise
        # In the targets' order (they answered in any): ties and unsorted reads follow it.
        streams = [s for target in targets for s in streams if s.roundtrip is target]
        if merge.kind == "count":
            total = count_total((_number(r, "n") for r in replies), merge.skip, merge.limit)
            return {"n": total, "ok": 1.0}
        if merge.kind == "distinct":
            values = union_values(_values(r) for r in replies)
            return {"values": values, "ok": 1.0}
        if merge.kind == "pipeline_count":
            return _counted(merge, streams)
        merged = _Merged(merge, streams, owner)
        return await self._first_batch(merged)

    def _upstream_command(self, merge: Plan, decision: RouteDecision) -> dict[str, Any]:
        upstream = dict(merge.command)
        if merge.kind == "cursor" and next(iter(upstream)) == "find":
            upstream["batchSize"] = self.batch_size
        elif merge.kind == "cursor":
            upstream["cursor"] = {"batchSize": self.batch_size}
        if decision.max_time_ms is not None:
            upstream["maxTimeMS"] = decision.max_time_ms
        if decision.read_preference.mode != PRIMARY.mode:
            # A replica-set secondary refuses a read whose preference says primary.
            upstream["$readPreference"] = decision.read_preference.document
        return upstream

    async def _open(self, target: Roundtrip, merge: Plan, upstream: dict[str, Any],
                    decision: RouteDecision, streams: list[_Stream]) -> Mapping[str, Any]:
        done = await target.command_on(merge.database, upstream, decision.read_preference)
        reply = _decoded(target, done.header + done.body)
        if merge.kind in ("cursor", "pipeline_count") and done.address and done.conn:
            cursor = reply["cursor"]
            stream = _Stream(target, done.address, done.conn, int(cursor["id"]),
                             str(cursor.get("ns", merge.namespace)))
            streams.append(stream)  # at once: a failure elsewhere kills it
            stream.extend(list(cursor["firstBatch"]), stream.cursor_id, merge)
        return reply

    async def _first_batch(self, merged: _Merged) -> dict[str, Any]:
        merge = merged.plan
        try:
            docs = await self._next(merged, merge.first_batch)
        except BaseException:
            merged.kill()
            raise
        cursor_id = 0
        if merge.single_batch or merged.exhausted:
            merged.kill()
        elif len(self._cursors) >= self.max_cursors:  # others opened meanwhile
            merged.kill()
            raise self._too_many(next(iter(merge.command)), merge)
        else:
            cursor_id = self._register(merged)
        return {"cursor": {"firstBatch": docs, "id": Int64(cursor_id),
                           "ns": merge.namespace}, "ok": 1.0}

    def _too_many(self, name: str, merge: Plan) -> ProxyError:
        return ProxyError(EXCEEDED_MEMORY_LIMIT, (
            f"{name} on {merge.namespace}: {len(self._cursors)} cursors spanning clusters "
            f"are open, the limit (max_cursors {self.max_cursors}); close some or wait for "
            f"idle ones to expire"))

    def _register(self, merged: _Merged) -> int:
        cursor_id = _ID_FLOOR + secrets.randbelow(_ID_SPAN)
        while cursor_id in self._cursors or any(
                s.roundtrip.cursors.get(cursor_id) is not None for s in merged.streams):
            cursor_id = _ID_FLOOR + secrets.randbelow(_ID_SPAN)
        merged.cursor_id = cursor_id
        self._cursors[cursor_id] = merged
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())
        return cursor_id

    # -- merging -----------------------------------------------------------------------------

    async def _next(self, merged: _Merged, wanted: int) -> list[RawBSONDocument]:
        """Up to ``wanted`` documents more, in order, after the skip, within the limit."""
        merge = merged.plan
        streams = merged.streams
        out: list[RawBSONDocument] = []
        size = 0
        while len(out) < wanted and size < _MAX_BATCH_BYTES:
            if merged.remaining is not None and merged.remaining <= 0:
                break
            if merge.sort is not None:
                # Every open stream needs its head before the least can be chosen.
                empty = [s for s in streams if not s.docs and s.cursor_id]
                if empty:
                    await self._fill(empty, merge)
                    continue
                index = pick([s.keys[0] if s.docs else None for s in streams], merge.sort)
                if index < 0:
                    break
                stream = streams[index]
                stream.keys.popleft()
            else:
                current = next((s for s in streams if s.docs or s.cursor_id), None)
                if current is None:
                    break
                stream = current
                if not stream.docs:
                    await self._fill([stream], merge)
                    continue
            doc = stream.docs.popleft()
            if merged.skip:
                merged.skip -= 1
                continue
            out.append(doc)
            size += len(doc.raw)
            if merged.remaining is not None:
                merged.remaining -= 1
        return out

    async def _fill(self, streams: list[_Stream], merge: Plan) -> None:
        """One getMore on each of ``streams`` (concurrently); one failure fails all."""
        await _all(self._more(s, merge) for s in streams)

    async def _more(self, stream: _Stream, merge: Plan) -> None:
        database, _, collection = stream.namespace.partition(".")
        command = {"getMore": Int64(stream.cursor_id), "collection": collection,
                   "batchSize": self.batch_size}
        done = await stream.roundtrip.command_on(database, command, PRIMARY,
                                                 server=stream.address)
        try:
            reply = _decoded(stream.roundtrip, done.header + done.body)
        except ProxyError:
            # The server answered: the cursor is gone there (nothing left to kill).
            stream.conn.cursor_closed()
            stream.cursor_id = 0
            raise
        cursor = reply["cursor"]
        stream.extend(list(cursor["nextBatch"]), int(cursor["id"]), merge)

    # -- cursor continuations ------------------------------------------------------------------

    async def get_more(self, command: dict[str, Any], owner: int) -> dict[str, Any]:
        """The next batch of a merged cursor (``owner`` is not checked: a driver sends a
        getMore on any of its connections, as to a server)."""
        cursor_id = command.get("getMore")
        merged = self._cursors.get(cursor_id) if isinstance(cursor_id, int) else None
        if merged is None:
            raise ProxyError(CURSOR_NOT_FOUND, f"cursor id {cursor_id} not found")
        merge = merged.plan
        namespace = f"{command.get('$db', merge.database)}.{command.get('collection')}"
        if namespace != merge.namespace:
            raise ProxyError(UNAUTHORIZED, (
                f"Requested getMore on namespace '{namespace}', but cursor belongs to a "
                f"different namespace {merge.namespace}"))
        if merged.busy:
            raise ProxyError(CURSOR_IN_USE, f"cursor id {cursor_id} is already in use")
        batch = command.get("batchSize")
        wanted = batch if isinstance(batch, int) and not isinstance(
            batch, bool) and batch > 0 else max(self.batch_size, DEFAULT_BATCH)
        merged.busy = True
        try:
            docs = await self._next(merged, wanted)
        except BaseException:
            self._forget(merged)
            raise
        finally:
            merged.busy = False
            merged.last_used = time.monotonic()
        next_id = merged.cursor_id
        if merged.exhausted or next_id not in self._cursors:
            self._forget(merged)
            next_id = 0
        return {"cursor": {"nextBatch": docs, "id": Int64(next_id), "ns": merge.namespace},
                "ok": 1.0}

    async def kill(self, command: dict[str, Any], owner: int) -> dict[str, Any]:
        """killCursors of merged cursors: their upstream cursors are killed."""
        killed: list[Int64] = []
        not_found: list[Int64] = []
        ids = command.get("cursors")
        for cursor_id in ids if isinstance(ids, list) else ():
            merged = self._cursors.get(cursor_id)
            (not_found if merged is None else killed).append(Int64(cursor_id))
            if merged is not None:
                self._forget(merged)
        return {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [],
                "cursorsUnknown": [], "ok": 1.0}

    def release(self, owner: int) -> None:
        """The client connection ``owner`` closed: its merged cursors die with it."""
        for merged in [m for m in self._cursors.values() if m.owner == owner]:
            self._forget(merged)

    async def close(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        for merged in list(self._cursors.values()):
            self._forget(merged)

    def _forget(self, merged: _Merged) -> None:
        self._cursors.pop(merged.cursor_id, None)
        merged.kill()

    async def _reap(self) -> None:
        """Kill merged cursors idle longer than idle_timeout_s (as a server times out
        its cursors); ends when none is left."""
        period = min(max(self.idle_timeout_s / 4, 0.05), 60.0)
        while self._cursors:
            await asyncio.sleep(period)
            limit = time.monotonic() - self.idle_timeout_s
            for merged in list(self._cursors.values()):
                if not merged.busy and merged.last_used < limit:
                    log.info("merged cursor %d on %s idle for %.0f s: killed",
                             merged.cursor_id, merged.plan.namespace, self.idle_timeout_s)
                    self._forget(merged)


def _excluding(upstream: dict[str, Any], field: str,
               values: Sequence[Any] | None) -> dict[str, Any]:
    """``upstream`` narrowed to documents whose tenant is none of ``values``."""
    if not values:
        return upstream
    narrowed = dict(upstream)
    condition = {field: {"$nin": list(values)}}
    if "pipeline" in narrowed:
        narrowed["pipeline"] = [{"$match": condition}, *narrowed["pipeline"]]
    else:
        key = "filter" if next(iter(narrowed)) == "find" else "query"
        original = narrowed.get(key)
        narrowed[key] = {"$and": [original, condition]} if original else condition
    return narrowed


async def _all(calls: Iterable[Awaitable[_T]]) -> list[_T]:
    """Every call's result; the first failure is raised only once every call has
    settled (none is left running to open or move a cursor after the cleanup)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


# -- replies --------------------------------------------------------------------------------

def _decoded(roundtrip: Roundtrip, message: bytes) -> Mapping[str, Any]:
    """A cluster's reply document; its error reply as a ProxyError naming the cluster."""
    reply: RawBSONDocument = bson.decode(parse_op_msg(message).body, _RAW)
    if reply.get("ok") == 1:
        return reply
    code = reply.get("code")
    code_name = reply.get("codeName")
    raise ProxyError(
        (int(code) if isinstance(code, int) else 8,
         str(code_name) if isinstance(code_name, str) else "UnknownError"),
        f"cluster {roundtrip.cluster}: {reply.get('errmsg', 'command failed')}",
        reply.get("errorLabels") or ())


def _number(reply: Mapping[str, Any], field: str) -> int:
    value = reply.get(field, 0)
    return int(value) if isinstance(value, int | float) else 0


def _values(reply: Mapping[str, Any]) -> list[Any]:
    values = reply.get("values")
    return list(values) if isinstance(values, list) else []


def _counted(merge: Plan, streams: list[_Stream]) -> dict[str, Any]:
    """A counting pipeline's merged reply: one document with the sum (none for 0, as
    the server's $count and $group give none for no input)."""
    counts: list[int] = []
    for stream in streams:
        counts.extend(_number(doc, merge.counter_field) for doc in stream.docs)
        stream.kill()
    total = count_total(counts, merge.skip, merge.limit)
    batch = [{**dict(merge.counter_head), merge.counter_field: total}] if total else []
    return {"cursor": {"firstBatch": batch, "id": Int64(0), "ns": merge.namespace},
            "ok": 1.0}
