"""Where one admitted command goes among the clusters: :meth:`PlacementRouter.place`.

Pure but for the state it consults (the cursor table, the transactions seen, the
shared placement state): it returns a :class:`Placed` value, never talks to a server.

* ``getMore`` / ``killCursors`` follow their cursor's cluster (a merged cursor of a
  fan-out read is the fan-out's own).
* A statement of a transaction goes where the transaction's first statement went; a
  statement whose tenant lives elsewhere is refused (a transaction stays on one cluster).
* A command confined to one tenant goes to that tenant's cluster.
* Otherwise: a ``"*"`` command on a scoped collection naming no single tenant is fanned
  out when it is an eligible read (``proxy.placement.fanout``), its index commands run on
  every cluster, anything else is refused; exempt and unscoped collections and
  database-level commands go ``home`` (a tenant-bound connection's database-level
  commands go to its tenant's cluster, where its collections are).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.commands import CONTINUATIONS
from proxy.config import PlacementConfig
from proxy.errors import UNAUTHORIZED, ProxyError
from proxy.placement.directory import HOME, PlacementState, cluster_of, tenant_key
from proxy.request import Request
from proxy.route.cursors import CursorTable
from proxy.tenancy.gate import Admission
from proxy.upstream.roundtrip import Roundtrip

if TYPE_CHECKING:
    from proxy.placement.clusters import Clusters

__all__ = ["BROADCAST_COMMANDS", "OPERATION_NOT_SUPPORTED_IN_TRANSACTION", "TRANSACTION_ENDS",
           "Placed", "PlacementRouter"]

OPERATION_NOT_SUPPORTED_IN_TRANSACTION = (263, "OperationNotSupportedInTransaction")
TRANSACTION_ENDS = frozenset({"commitTransaction", "abortTransaction"})
# "*" commands on a scoped collection that run on every cluster: a collection's indexes
# belong on every cluster that holds some of its tenants (moves copy them too).
BROADCAST_COMMANDS = frozenset({"createIndexes", "dropIndexes"})
# A transaction's cluster is forgotten after this long unused (the server's own
# transactionLifetimeLimitSeconds default), as the router's server pin is.
_TRANSACTION_TTL_S = 60.0
_MAX_TRANSACTIONS = 100_000


@dataclass(slots=True)
class Placed:
    """Where a command goes: one cluster's ``roundtrip``; or ``fanout`` (every cluster,
    merged); or ``broadcast`` (every cluster, one reply); or ``refused`` (why, with
    ``code``). ``cluster``: the cluster's name; ``key``: the tenant's directory key
    (None: not confined to one tenant)."""

    cluster: str = HOME
    roundtrip: Roundtrip | None = None
    key: str | None = None
    fanout: bool = False
    broadcast: bool = False
    refused: str | None = None
    code: tuple[int, str] = UNAUTHORIZED

    def error(self) -> ProxyError:
        assert self.refused is not None
        return ProxyError(self.code, self.refused)


class PlacementRouter:
    def __init__(self, clusters: Clusters, cursors: CursorTable) -> None:
        self.clusters = clusters
        self.cursors = cursors
        # (session id, txnNumber) -> (cluster, tenant key, last used)
        self._transactions: dict[tuple[bytes, int], tuple[str, str | None, float]] = {}
        # Set by the wiring when fan-out reads exist: owns(cursor_id) -> bool.
        self.fanout_owns: Any = None
        # Commands placed per cluster ("*": every cluster), for the metrics.
        self.placed: dict[str, int] = {}

    def cluster_for(self, key: str, config: PlacementConfig, state: PlacementState) -> str:
        return cluster_of(key, config.tenants, config.hash, state.overrides)

    def place(self, request: Request, admission: Admission, bound_tenant: str | None,
              config: PlacementConfig, state: PlacementState) -> Placed:
        name = request.name
        txn = request.transaction_key
        tenant = admission.tenant
        if name in CONTINUATIONS:
            placed = self._continuation(request)
            txn = None
        elif tenant is not None:
            key = tenant_key(tenant)
            placed = self._one(self.cluster_for(key, config, state), key)
        elif admission.spans is not None:
            if name in BROADCAST_COMMANDS:
                placed = Placed(broadcast=True)
            else:
                placed = Placed(fanout=True, refused=admission.spans)
        elif (bound_tenant is not None and bound_tenant != "*"
              and request.collection is None):
            key = tenant_key(bound_tenant)  # its database-level commands: its cluster
            placed = self._one(self.cluster_for(key, config, state), key)
        else:
            placed = self._one(HOME, None)
        if txn is not None:
            placed = self._in_transaction(txn, request, placed)
        counted = "*" if placed.fanout or placed.broadcast else placed.cluster
        self.placed[counted] = self.placed.get(counted, 0) + 1
        return placed

    def _one(self, cluster: str, key: str | None) -> Placed:
        try:
            roundtrip = self.clusters.get(cluster)
        except ProxyError as exc:
            return Placed(cluster, None, key, refused=exc.errmsg,
                          code=(exc.code, exc.code_name))
        return Placed(cluster, roundtrip, key)

    def _continuation(self, request: Request) -> Placed:
        owns = self.fanout_owns
        for cursor_id in request.cursor_ids:
            if owns is not None and owns(cursor_id):
                return Placed(fanout=True)
            entry = self.cursors.get(cursor_id)
            if entry is not None:
                return self._one(entry.cluster, None)
        return self._one(HOME, None)  # unknown cursor: the server answers CursorNotFound

    def _in_transaction(self, txn: tuple[bytes, int], request: Request, placed: Placed
                        ) -> Placed:
        now = time.monotonic()
        pinned = self._transactions.get(txn)
        if request.name in TRANSACTION_ENDS:
            if pinned is None:
                return placed
            # The key of the tenant whose statements it ends: the move agent's record.
            self._transactions[txn] = (pinned[0], pinned[1], now)
            return self._one(pinned[0], pinned[1])
        if placed.roundtrip is None:  # fan-out, broadcast or refused
            if placed.refused is None or placed.fanout:
                return Placed(refused=f"{request.name} inside a transaction spans the "
                              "tenants of several clusters; a transaction stays on one "
                              "cluster", code=OPERATION_NOT_SUPPORTED_IN_TRANSACTION)
            return placed
        if pinned is None:
            self._expire(now)
            self._transactions[txn] = (placed.cluster, placed.key, now)
            return placed
        if pinned[0] != placed.cluster:
            return Placed(refused=(
                f"{request.name} on {request.namespace}: its tenant is on cluster "
                f"{placed.cluster!r}, this transaction runs on {pinned[0]!r}; a "
                "transaction stays on one cluster"),
                code=OPERATION_NOT_SUPPORTED_IN_TRANSACTION)
        self._transactions[txn] = (pinned[0], pinned[1] or placed.key, now)
        return placed

    def _expire(self, now: float) -> None:
        if len(self._transactions) < 1024:
            return
        stale = [k for k, (_, _, t) in self._transactions.items()
                 if now - t > _TRANSACTION_TTL_S]
        for key in stale:
            del self._transactions[key]
        while len(self._transactions) >= _MAX_TRANSACTIONS:
            del self._transactions[next(iter(self._transactions))]

    def describe(self, config: PlacementConfig, state: PlacementState
                 ) -> Mapping[str, Any]:
        """The directory as /readyz and /placement show it."""
        return {
            "clusters": list(self.clusters.by_name),
            "tenants": dict(config.tenants),
            "hash": list(config.hash),
            "overrides": dict(state.overrides),
            "moves": {k: dict(v) for k, v in state.moves.items()},
            "state_version": state.version,
        }
