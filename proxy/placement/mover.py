"""``mongoproxy move-tenant``: move one tenant's documents to another cluster while the
proxies keep serving it (docs/placement.md, "Moving a tenant online").

Phases, persisted in the shared state (running the same command again resumes)::

    tracking -> copy -> catch-up -> hold -> (switch) verify -> cleanup -> (done)
                            ^--------'  hold expired / could not drain in time

Test hook: with ``MONGOPROXY_MOVE_PAUSE_AFTER=<step>[,<step>...]`` the command prints
``move-tenant: paused after <step>`` and sleeps (to be SIGKILLed) once that step is done
and persisted. Steps: tracking, copy-batch (the first copied batch), copy, catch-up,
hold (the hold set, before draining), drained (final catch-up done, before the switch),
switch, verify.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from proxy.config import Config
from proxy.placement.directory import HOME, cluster_of
from proxy.placement.move_data import Cluster, connect
from proxy.placement.move_phases import Limits, catch_up, copy_namespace, verify
from proxy.placement.move_store import MoveError, MoveStore, Refused
from proxy.placement.shared import HOLD, VERIFYING

__all__ = ["PAUSE_ENV", "Mover"]

log = logging.getLogger("mongoproxy.move")
PAUSE_ENV = "MONGOPROXY_MOVE_PAUSE_AFTER"
_HOLD_ATTEMPTS = 5


class Mover:
    """One tenant's move, driven step by step from the persisted phase."""

    def __init__(self, config: Config, tenant: str, limits: Limits | None = None) -> None:
        placement = config.placement
        if placement.redis_url is None:
            raise MoveError("placement.redis_url is not set: moves need the shared state")
        self.config = config
        self.tenant = tenant
        self.limits = limits = limits or Limits()
        self.store = MoveStore(placement.redis_url, placement.key_prefix, tenant)
        self.lease_ms = placement.lease_ms
        self.settle_ms = limits.settle_ms if limits.settle_ms is not None else self.lease_ms
        self.hold_ms = limits.hold_ms if limits.hold_ms is not None else \
            placement.hold_timeout_ms
        self._pause = set(filter(None, os.environ.get(PAUSE_ENV, "").split(",")))
        self._clusters: dict[str, Cluster] = {}

    def close(self) -> None:
        for cluster in self._clusters.values():
            cluster.close()
        self.store.close()

    def cluster(self, name: str) -> Cluster:
        if name not in self._clusters:
            upstream = (self.config.upstream if name == HOME
                        else self.config.placement.clusters.get(name))
            if upstream is None:
                raise MoveError(f"unknown cluster {name!r} (known: "
                                f"{', '.join(self.config.placement.cluster_names())})")
            self._clusters[name] = Cluster(name, connect(upstream), self.config.tenancy,
                                           self.tenant)
        return self._clusters[name]

    def current_cluster(self) -> str:
        placement = self.config.placement
        return cluster_of(self.tenant, placement.tenants, placement.hash,
                          self.store.state().overrides)

    def _paused(self, step: str) -> None:
        if step in self._pause:
            print(f"move-tenant: paused after {step}", flush=True)
            while True:
                time.sleep(3600)

    def _say(self, text: str) -> None:
        print(f"move-tenant {self.tenant}: {text}", flush=True)

    # -- the command --------------------------------------------------------------------

    def run(self, to: str) -> int:
        self.cluster(to)  # an unknown cluster fails before anything changes
        move = self.store.move()
        if move is None:
            source = self.current_cluster()
            if source == to:
                self._say(f"already on {to}")
                return 0
            self.store.set_move({"phase": "tracking", "from": source, "to": to,
                                 "started_ms": self.store.now_ms()})
            move = self.store.move()
            assert move is not None
            self._say(f"moving from {source} to {to}")
        elif move.get("to") != to:
            raise MoveError(f"a move of {self.tenant!r} to {move.get('to')!r} is in "
                            f"progress (phase {move.get('phase')}): run it with --to "
                            f"{move.get('to')} to resume it, or --abort it")
        else:
            self._say(f"resuming in phase {move.get('phase')}")
        return self._drive(move)

    def _drive(self, move: dict[str, Any]) -> int:
        source, target = self.cluster(move["from"]), self.cluster(move["to"])
        phase = move["phase"]
        if phase == "tracking":
            # Every instance whose lease is valid read the phase before this wait ends,
            # and writes checked before it have reached their cluster (settle_ms).
            time.sleep((self.lease_ms + self.settle_ms) / 1000)
            self._paused("tracking")
            self.store.set_move({"phase": "copy"}, expect="tracking")
            phase = "copy"
        if phase == "copy":
            self._copy(source, target)
            self.store.set_move({"phase": "catch-up"}, expect="copy")
            phase = "catch-up"
        if phase in ("catch-up", HOLD):
            self._switch(source, target)
            phase = "verify"
        if phase in ("verify", "verify-failed"):
            if not self._verify(source, target):
                return 1
            phase = "cleanup"
        if phase == "cleanup":
            self._cleanup(source)
        return 0

    def _copy(self, source: Cluster, target: Cluster) -> None:
        first = [True]

        def on_batch() -> None:
            if self.store.move() is None:
                raise MoveError("the move was aborted")
            if first[0]:
                first[0] = False
                self._paused("copy-batch")
        total = 0
        for ns in source.namespaces():
            total += copy_namespace(source, target, self.store, ns, self.limits, on_batch)
        self._say(f"copied {total} documents")
        self._paused("copy")

    def _switch(self, source: Cluster, target: Cluster) -> None:
        """Catch-up passes, then hold, drain, final catch-up and the switch; a hold that
        ran out goes back to catch-up and tries again."""
        for attempt in range(_HOLD_ATTEMPTS):
            move = self.store.move()
            if move is None:
                raise MoveError("the move was aborted")
            if move["phase"] == HOLD:  # resumed, or the last attempt: tracked again first
                self.store.set_move({"phase": "catch-up"}, expect=HOLD)
            for _ in range(self.limits.passes):
                catch_up(source, target, self.store, self.limits, until_empty=False)
                if self.store.dirty_count() <= self.limits.small:
                    break
            self._paused("catch-up")
            held_at = time.monotonic()
            hold_until = self.store.now_ms() + self.hold_ms
            self.store.set_move({"phase": HOLD, "hold_until_ms": hold_until},
                                expect="catch-up")
            self._paused("hold")
            if not self._drain(source, target, hold_until):
                self._say(f"hold attempt {attempt + 1}: writes did not drain in time")
                continue
            self._paused("drained")
            try:
                self.store.set_move({"phase": "verify", "switched_ms": self.store.now_ms()},
                                    expect=HOLD, deadline_ms=hold_until, override=target.name)
            except Refused:
                self._say(f"hold attempt {attempt + 1}: the hold expired before the switch")
                continue
            self._say(f"switched to {target.name} (writes held "
                      f"{(time.monotonic() - held_at) * 1000:.0f} ms)")
            self._paused("switch")
            return
        raise MoveError(f"could not switch within {_HOLD_ATTEMPTS} holds of {self.hold_ms} "
                        f"ms: writes kept arriving; the tenant stays on {source.name}, "
                        f"run again (or with a longer --hold-ms)")

    def _drain(self, source: Cluster, target: Cluster, hold_until: int) -> bool:
        """Wait for the in-flight writes of live instances, then catch up on every
        recorded id; False when the hold would expire first."""
        reserve = max(self.hold_ms // 4, 50)  # for the final catch-up and the switch
        while self.store.settle_inflight():
            if self.store.now_ms() >= hold_until - reserve:
                return False
            time.sleep(0.01)
        def late() -> bool:
            return self.store.now_ms() >= hold_until - 10
        return (catch_up(source, target, self.store, self.limits, until_empty=True,
                         late=late)
                and not late())

    def _verify(self, source: Cluster, target: Cluster) -> bool:
        namespaces = sorted(set(source.namespaces()) | set(target.namespaces()))
        verdict = verify(source, target, self.store, namespaces)
        if verdict.skipped:
            self._say("not compared (written in bulk after the switch): "
                      + ", ".join(verdict.skipped))
        if verdict.failed:
            self.store.set_move({"phase": "verify-failed",
                                 "failed": ",".join(verdict.failed)})
            self._say(f"VERIFY FAILED for {', '.join(verdict.failed)}: the source copy on "
                      f"{source.name} is kept; the tenant is served from {target.name}. "
                      "Inspect, then run the command again to verify again.")
            return False
        self._say(f"verified {len(verdict.compared)} collections")
        self._paused("verify")
        self.store.set_move({"phase": "cleanup"})
        return True

    def _cleanup(self, source: Cluster) -> None:
        deleted = sum(source.delete_tenant(ns) for ns in source.namespaces())
        self.store.drop_move()
        self.store.forget()
        self._say(f"done: deleted {deleted} documents on {source.name}")

    # -- abort and status -------------------------------------------------------------------

    def abort(self) -> int:
        try:
            move = self.store.drop_move(refuse=VERIFYING)
        except MoveError:
            move = self.store.move() or {}
            self._say(f"cannot abort: the tenant was already switched to {move.get('to')} "
                      f"(phase {move.get('phase')}). Let the move finish (run it again "
                      f"without --abort), then move the tenant back with --to "
                      f"{move.get('from')}.")
            return 2
        if move is None:
            self._say("no move in progress")
            return 0
        target = self.cluster(move["to"])
        deleted = sum(target.delete_tenant(ns) for ns in target.namespaces())
        self.store.forget()
        self._say(f"aborted: the tenant stays on {move['from']}; deleted the {deleted} "
                  f"documents copied to {move['to']}")
        return 0

    def status(self) -> int:
        move = self.store.move()
        self._say(f"on cluster {self.current_cluster()}")
        if move is None:
            self._say("no move in progress")
            return 0
        fields = " ".join(f"{k}={v}" for k, v in sorted(move.items()))
        self._say(f"move {fields}; dirty={self.store.dirty_count()} "
                  f"inflight={len(self.store.inflight())} "
                  f"copied={len(self.store.progress())} collections")
        return 0


def main(config: Config, tenant: str, to: str | None, abort: bool, status: bool,
         limits: Limits) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        mover = Mover(config, tenant, limits)
    except MoveError as exc:
        print(f"mongoproxy move-tenant: {exc}", file=sys.stderr)
        return 2
    try:
        if status:
            return mover.status()
        if abort:
            return mover.abort()
        if to is None:
            print("mongoproxy move-tenant: --to CLUSTER is required", file=sys.stderr)
            return 2
        return mover.run(to)
    except MoveError as exc:
        print(f"mongoproxy move-tenant: {exc}", file=sys.stderr)
        return 1
    except (PyMongoError, RedisError) as exc:
        print(f"mongoproxy move-tenant: {type(exc).__name__}: {exc}; the move stays in its "
              f"phase (see --status): run the command again to resume", file=sys.stderr)
        return 1
    finally:
        mover.close()
