"""The mover's side of the clusters (sync pymongo): a tenant's documents of every scoped
collection, copied, re-synced by id, compared and deleted. Documents are handled as raw
BSON (``RawBSONDocument``), so the target gets the source's bytes and the content hash
compares bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, OperationFailure

from proxy.config import UpstreamConfig
from proxy.placement.directory import tenant_values
from proxy.placement.move_store import MoveError
from proxy.placement.written import raw_id_doc
from proxy.tenancy.config import TenancyConfig

__all__ = ["POINT_IDS", "Cluster", "connect", "tenant_values"]

_SYSTEM_DBS = frozenset({"admin", "config", "local"})
_NAMESPACE_EXISTS = 48
_DUPLICATE_KEY = 11000
# Up to this many written ids are re-copied by point lookups, one {_id: v} each (see
# Cluster.by_ids); more by one $in query.
POINT_IDS = 100
# BSON's comparison order of the types an _id can have (the server's, which FerretDB
# follows): a resumed copy continues after the last _id within its type's bracket
# ($gt only compares within one) and then takes every later bracket.
# Symbol (14, with strings) and MaxKey (127, last) are left out: FerretDB refuses them
# in $type; an _id of either after a resumed copy's last one would be missed by the
# copy and then reported by the verification.
_TYPE_ORDER: tuple[tuple[int, ...], ...] = (
    (-1,), (10,), (1, 16, 18, 19), (2,), (3,), (5,), (7,), (8,), (9,), (17,), (11,))


def connect(config: UpstreamConfig) -> MongoClient[RawBSONDocument]:
    """A client for a cluster as configured (uri, or the declared primary member)."""
    if config.uri is not None and not config.members:
        return MongoClient(config.uri, document_class=RawBSONDocument)
    primary = next((m for m in config.members if m.role == "primary"), config.members[0])
    host, port = primary.address
    return MongoClient(host, port, directConnection=True, document_class=RawBSONDocument)


def _type_code(value: Any) -> int:
    """The BSON type byte of ``value`` (as an ``_id``)."""
    return bson.encode({"_id": value})[4]


def _bracket(value: Any) -> int | None:
    """The comparison bracket of an ``_id`` value whose range queries every server
    handles alike (numbers, strings, ObjectIds, dates); None for the others."""
    code = _type_code(value)
    for group in ((1, 16, 18, 19), (2,), (7,), (9,)):
        if code in group:
            return group[0]
    return None


def _span(ids: list[Any]) -> dict[str, Any]:
    """A condition on ``_id`` matching ``ids`` (sorted, one batch of a tenant's
    documents): their range when the first and last are in one bracket (so are all
    between them, and a range only matches values of its own bracket), else ``$in``."""
    first = _bracket(ids[0])
    if first is not None and first == _bracket(ids[-1]):
        return {"$gte": ids[0], "$lte": ids[-1]}
    return {"$in": ids}


def _later_types(value: Any) -> list[int]:
    code = _type_code(value)
    for index, group in enumerate(_TYPE_ORDER):
        if code in group:
            return [t for g in _TYPE_ORDER[index + 1:] for t in g]
    return []


class Cluster:
    """One cluster's documents of one tenant."""

    def __init__(self, name: str, client: MongoClient[RawBSONDocument],
                 tenancy: TenancyConfig, tenant: str) -> None:
        self.name = name
        self.client = client
        self.field = tenancy.field
        self._scoped = tenancy.scoped_patterns()
        self._exempt = tenancy.exempt_patterns()
        self._values = tenant_values(tenant)
        self.match: dict[str, Any] = {tenancy.field: {"$in": self._values}}

    def close(self) -> None:
        self.client.close()

    def coll(self, ns: str) -> Collection[RawBSONDocument]:
        db, _, coll = ns.partition(".")
        return self.client[db][coll]

    def namespaces(self) -> list[str]:
        """Every scoped, non-exempt collection outside admin/config/local, sorted."""
        found = []
        for db in self.client.list_database_names():
            if db in _SYSTEM_DBS:
                continue
            for info in self.client[db].list_collections():
                name = info["name"]
                if info.get("type", "collection") != "collection" or name.startswith("system."):
                    continue
                if self._scoped(db, name) and not self._exempt(db, name):
                    found.append(f"{db}.{name}")
        return sorted(found)

    def ensure_like(self, source: Cluster, ns: str) -> None:
        """Create ``ns`` here with the source's options and indexes (idempotent)."""
        db, _, coll = ns.partition(".")
        info = next(iter(source.client[db].list_collections(filter={"name": coll})), None)
        options = dict(info.get("options", {})) if info is not None else {}
        try:
            self.client[db].command({"create": coll, **options})
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise
        specs = []
        for index in source.coll(ns).list_indexes():
            spec = {k: v for k, v in dict(index).items() if k not in ("v", "ns")}
            if spec.get("name") != "_id_":
                specs.append(spec)
        if specs:
            self.client[db].command({"createIndexes": coll, "indexes": specs})

    def documents(self, ns: str, after: Any = None, *, resume: bool = False,
                  batch: int = 1000) -> Iterator[RawBSONDocument]:
        """The tenant's documents of ``ns`` in _id order (``resume``: after ``after``)."""
        query: dict[str, Any] = dict(self.match)
        if resume:
            later = _later_types(after)
            gt: dict[str, Any] = {"_id": {"$gt": after}}
            query["$or"] = [gt, {"_id": {"$type": later}}] if later else [gt]
        return iter(self.coll(ns).find(query, sort=[("_id", 1)], batch_size=batch))

    def insert(self, ns: str, docs: list[RawBSONDocument]) -> None:
        """Insert ``docs``; one already there as the tenant's (a resumed copy) is left
        as it is: any change made to it since the move began is in the dirty set. One
        already there as another tenant's document is a collision: MoveError, before
        the switch, so the tenant keeps being served whole from its source."""
        if not docs:
            return
        try:
            self.coll(ns).insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            for error in errors:
                value = docs[error["index"]]["_id"]
                there = self.coll(ns).find_one({"_id": value})
                if there is not None and not self.owns(there):
                    raise MoveError(
                        f"{ns} on cluster {self.name!r} already holds a document with "
                        f"_id {value!r} of another tenant: _ids collide, the move cannot "
                        f"go on. The tenant is still served from its source; --abort the "
                        f"move, or change one of the _ids first") from None

    def replace(self, ns: str, ids: list[Any], docs: list[RawBSONDocument]) -> None:
        """Make the documents ``ids`` here equal ``docs`` (the source's; an id missing
        from ``docs`` is deleted). Delete then insert, not replace-upserts: FerretDB
        1.24 leaks a SQLite connection per upsert in some batches and then hangs. The
        target does not serve the tenant before the switch, so the gap is unseen. One
        delete for all ids: FerretDB scans the collection for every delete, even
        ``{_id: v}``."""
        if ids:
            self.coll(ns).delete_many({"_id": {"$in": ids}, **self.match})
        self.insert(ns, docs)

    def by_ids(self, ns: str, ids: list[Any]) -> list[RawBSONDocument]:
        """The tenant's documents among ``ids``. A small set is looked up one ``{_id:
        v}`` at a time: every server answers that from the _id index, while FerretDB
        1.24 (SQLite) scans the whole collection for any other filter, ``$in``
        included (docs/placement.md, "Moves on FerretDB")."""
        if len(ids) > POINT_IDS:
            return list(self.coll(ns).find({"_id": {"$in": ids}, **self.match}))
        coll = self.coll(ns)
        found = (coll.find_one({"_id": value}) for value in ids)
        return [doc for doc in found if doc is not None and self.owns(doc)]

    def owns(self, doc: RawBSONDocument) -> bool:
        """Whether ``doc`` is the tenant's (``self.match``, evaluated here)."""
        value = doc.get(self.field)
        values = value if isinstance(value, list) else [value]
        # bool == int in Python, never in BSON's $in
        return any(not isinstance(v, bool) and v in self._values for v in values)

    def delete_tenant(self, ns: str, batch: int = 10_000) -> int:
        """Delete the tenant's documents of ``ns``: in one delete, or, when the server
        refuses that (FerretDB 1.24's SQLite backend fails past some tens of thousands:
        "too many SQL variables"), ``batch`` documents at a time in ``_id`` order, each
        batch by its ``_id`` range (an ``$in`` of 10,000 ids costs FerretDB a comparison
        per id and document: 26 s against 1.8 s for the range, at 100,000 documents)."""
        coll = self.coll(ns)
        try:
            return coll.delete_many(self.match).deleted_count
        except OperationFailure:
            pass
        deleted = 0
        while True:
            ids = [doc["_id"] for doc in coll.find(self.match, {"_id": 1},
                                                   sort=[("_id", 1)], limit=batch)]
            if not ids:
                return deleted
            done = coll.delete_many({"_id": _span(ids), **self.match}).deleted_count
            if not done:  # found but not deletable: stop rather than spin
                raise OperationFailure(f"deleting tenant documents of {ns}: {len(ids)} "
                                       "found, none deleted")
            deleted += done

    def digest(self, ns: str) -> list[tuple[bytes, bytes]]:
        """(raw ``{_id: v}``, sha256 of the raw document) of each of the tenant's
        documents of ``ns``, in _id order."""
        return [(raw_id_doc(bytes(doc.raw)) or b"", hashlib.sha256(bytes(doc.raw)).digest())
                for doc in self.coll(ns).find(self.match, sort=[("_id", 1)])]
