"""Which cluster holds a tenant: a pure function of the configuration's directory, the
overrides online moves persisted, and a rendezvous hash (docs/placement.md).

The order: an override (a finished move), then ``placement.tenants``, then the hash
over ``placement.hash``, then ``home``. Rendezvous hashing moves only the tenants of a
cluster added to or removed from ``hash``; every instance computes the same answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from bson import ObjectId

HOME = "home"

__all__ = ["HOME", "PlacementState", "cluster_of", "rendezvous", "tenant_key"]


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
