"""The data steps of a move (``proxy.placement.mover`` runs them in order): the copy, the
catch-up of written ids, the full re-sync of a collection and the verification. Each is
idempotent, so a resumed move simply runs it again."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument

from proxy.placement.move_data import Cluster
from proxy.placement.move_store import MoveStore
from proxy.placement.shared import decode_member

__all__ = ["Late", "Limits", "catch_up", "copy_namespace", "full_resync", "verify"]

log = logging.getLogger("mongoproxy.move")
DONE = b"done"


@dataclass(frozen=True, slots=True)
class Limits:
    """The mover's batch sizes and thresholds (``mongoproxy move-tenant --help``)."""

    batch: int = 1_000          # documents per copy/upsert batch
    pop: int = 1_000            # written ids taken from the dirty set per catch-up step
    small: int = 100            # a dirty set this small ends the catch-up passes ...
    passes: int = 20            # ... and so does this many passes
    settle_ms: int | None = None  # extra wait after lease_ms (default: lease_ms)
    hold_ms: int | None = None    # the hold's length (default: hold_timeout_ms)


def copy_namespace(source: Cluster, target: Cluster, store: MoveStore, ns: str,
                   limits: Limits, on_batch: Callable[[], None]) -> int:
    """Copy the tenant's documents of ``ns`` (resuming after the saved last _id);
    the number copied by this call."""
    saved = store.progress().get(ns)
    if saved == DONE:
        return 0
    target.ensure_like(source, ns)
    if saved is None:  # documents of the tenant already there are leftovers, not its own
        target.delete_tenant(ns)
    after: Any = None
    if saved is not None:
        after = bson.decode(bytes.fromhex(saved.decode()))["_id"]
    copied = 0
    batch: list[RawBSONDocument] = []
    for doc in source.documents(ns, after, resume=saved is not None, batch=limits.batch):
        batch.append(doc)
        if len(batch) >= limits.batch:
            copied += _flush(target, store, ns, batch)
            on_batch()
    copied += _flush(target, store, ns, batch)
    store.save_progress(ns, DONE)
    return copied


def _flush(target: Cluster, store: MoveStore, ns: str, batch: list[RawBSONDocument]) -> int:
    if not batch:
        return 0
    target.insert(ns, batch)
    store.save_progress(ns, bson.encode({"_id": batch[-1]["_id"]}).hex().encode())
    count = len(batch)
    batch.clear()
    return count


class Late(Exception):
    """The catch-up ran past its deadline (the hold's); what it took is put back."""


def _never() -> bool:
    return False


def full_resync(source: Cluster, target: Cluster, ns: str, limits: Limits,
                late: Callable[[], bool] = _never) -> None:
    """Make the target's documents of ``ns`` equal the source's (before the switch).
    Raises Late between batches once ``late()``: run again, it starts over."""
    target.ensure_like(source, ns)
    target.delete_tenant(ns)
    batch: list[RawBSONDocument] = []
    for doc in source.documents(ns, batch=limits.batch):
        batch.append(doc)
        if len(batch) >= limits.batch:
            target.insert(ns, batch)
            batch = []
            if late():
                raise Late(ns)
    target.insert(ns, batch)


def _sync_members(source: Cluster, target: Cluster, members: list[bytes], limits: Limits,
                  ensured: set[str], late: Callable[[], bool]) -> None:
    by_ns: dict[str, list[Any]] = defaultdict(list)
    full: set[str] = set()
    for member in members:
        ns, value, whole = decode_member(member)
        if whole:
            full.add(ns)
        else:
            by_ns[ns].append(value)
    for ns in sorted(full):
        full_resync(source, target, ns, limits, late)
        ensured.add(ns)
    for ns, ids in by_ns.items():
        if ns in full:
            continue
        if ns not in ensured:  # a collection or index made on the source meanwhile
            target.ensure_like(source, ns)
            ensured.add(ns)
        target.replace(ns, ids, source.by_ids(ns, ids))


def catch_up(source: Cluster, target: Cluster, store: MoveStore, limits: Limits,
             *, until_empty: bool, late: Callable[[], bool] = _never) -> bool:
    """Re-copy the written ids popped from the dirty set; one pass takes what is there
    now (``until_empty``: until the set is empty). A step that fails or runs late puts
    its ids back. False when ``late()`` stopped it first (checked before each step):
    writes released by an expired hold can refill the set as fast as it is emptied."""
    handled = 0
    budget = store.dirty_count()
    ensured: set[str] = set()
    while until_empty or handled < budget:
        if late():
            return False
        members = store.pop_dirty(limits.pop)
        if not members:
            break
        try:
            _sync_members(source, target, members, limits, ensured, late)
        except Late:
            store.redirty(members)
            return False
        except BaseException:
            store.redirty(members)
            raise
        handled += len(members)
    return True


@dataclass(slots=True)
class Verdict:
    compared: list[str]
    failed: list[str]
    skipped: list[str]  # written in bulk after the switch: not comparable


def verify(source: Cluster, target: Cluster, store: MoveStore,
           namespaces: list[str]) -> Verdict:
    """Count and content hash per collection, source vs target, leaving out the ids
    written after the switch. The after set is read after the documents: a write is
    recorded there before it is sent, so every write the read saw is left out."""
    digests = {ns: (source.digest(ns), target.digest(ns)) for ns in namespaces}
    excluded: dict[str, set[bytes]] = defaultdict(set)
    bulk: set[str] = set()
    for member in store.after_members():
        ns, value, whole = decode_member(member)
        if whole:
            bulk.add(ns)
        else:
            excluded[ns].add(bson.encode({"_id": value}))
    verdict = Verdict([], [], sorted(bulk))
    for ns in namespaces:
        if ns in bulk:
            continue
        skip = excluded.get(ns, set())
        (src_count, src_hash), (dst_count, dst_hash) = (
            _summary(docs, skip) for docs in digests[ns])
        verdict.compared.append(ns)
        if (src_count, src_hash) != (dst_count, dst_hash):
            log.error("verify %s: source %d documents %s, target %d documents %s",
                      ns, src_count, src_hash[:12], dst_count, dst_hash[:12])
            verdict.failed.append(ns)
    return verdict


def _summary(docs: list[tuple[bytes, bytes]], skip: set[bytes]) -> tuple[int, str]:
    """(count, sha256 over the documents' own sha256s in _id order) without ``skip``."""
    sha = hashlib.sha256()
    count = 0
    for id_doc, doc_sha in docs:
        if id_doc not in skip:
            sha.update(doc_sha)
            count += 1
    return count, sha.hexdigest()
