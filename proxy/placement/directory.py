"""Which cluster holds a tenant: a pure function of the configuration's directory, the
overrides online moves persisted, and a rendezvous hash (docs/placement.md).

The order: an override (a finished move), then ``placement.tenants``, then the hash
over ``placement.hash``, then ``home``. Rendezvous hashing moves only the tenants of a
cluster added to or removed from ``hash``; every instance computes the same answer.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from bson import ObjectId
from bson.binary import Binary

HOME = "home"

__all__ = ["HOME", "PlacementState", "cluster_of", "rendezvous", "tenant_key",
           "tenant_values"]

_INT64 = re.compile(r"-?[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class PlacementState:
    """The shared state every instance reads from Redis (``proxy.placement.agent``):
    ``overrides`` (tenant key -> cluster, from finished moves) and ``moves`` (tenant
    key -> the move's phase document). ``version`` increases with every change."""

    version: int = 0
    overrides: Mapping[str, str] = field(default_factory=dict)
    moves: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


EMPTY_STATE = PlacementState()


def tenant_key(tenant: Any) -> str:
    """The directory's name for a tenant value (``str``, ``int``, ObjectId or UUID)."""
    if isinstance(tenant, str):
        return tenant
    if isinstance(tenant, ObjectId):
        return str(tenant)
    return str(tenant)


def tenant_values(key: str) -> list[Any]:
    """The values a tenant key can stand for in documents: the string itself, and the
    int64, ObjectId or UUID it spells (the directory's key is the value as a string)."""
    values: list[Any] = [key]
    if _INT64.fullmatch(key) and -2**63 <= int(key) < 2**63:
        values.append(int(key))
    if ObjectId.is_valid(key) and len(key) == 24:
        values.append(ObjectId(key))
    try:
        parsed = uuid.UUID(key)
    except ValueError:
        pass
    else:
        if str(parsed) == key.lower():
            values.append(Binary.from_uuid(parsed))
    return values


@lru_cache(maxsize=65_536)
def rendezvous(key: str, clusters: tuple[str, ...]) -> str:
    """The cluster with the highest hash of (cluster, tenant): highest random weight."""
    best, best_score = clusters[0], b""
    for cluster in clusters:
        score = hashlib.blake2b(f"{cluster}\x00{key}".encode(), digest_size=8).digest()
        if score > best_score:
            best, best_score = cluster, score
    return best


def cluster_of(key: str, tenants: Mapping[str, str], hash_over: tuple[str, ...],
               overrides: Mapping[str, str]) -> str:
    """The cluster that holds tenant ``key`` (see the module docstring)."""
    cluster = overrides.get(key)
    if cluster is not None:
        return cluster
    cluster = tenants.get(key)
    if cluster is not None:
        return cluster
    if hash_over:
        return rendezvous(key, hash_over)
    return HOME
