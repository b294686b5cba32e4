"""The mover's side of the shared Redis state (sync redis-py): the state's
compare-and-set, the written-ids sets, in-flight entries, heartbeats and copy progress
(the keys: ``proxy.placement.shared``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from redis import Redis

from proxy.placement.directory import PlacementState
from proxy.placement.shared import CAS_SCRIPT, Keys, parse_state, redis_ms, render_state

__all__ = ["MoveError", "MoveStore", "Refused"]

# A state change: the current state -> (overrides, moves) to write, or None: no change.
Change = Callable[[PlacementState], tuple[dict[str, str], dict[str, dict[str, Any]]] | None]


class MoveError(Exception):
    """A move cannot go on; the message says why and what to do."""


class Refused(MoveError):
    """The switch was refused: the hold had expired (by Redis's clock)."""


class MoveStore:
    def __init__(self, url: str, prefix: str, tenant: str) -> None:
        self.client: Redis = Redis.from_url(url, socket_timeout=10,
                                            socket_connect_timeout=10)
        self.keys = Keys(prefix)
        self.tenant = tenant
        self._cas = self.client.register_script(CAS_SCRIPT)

    def close(self) -> None:
        self.client.close()

    def now_ms(self) -> int:
        return redis_ms(self.client.time())

    def state(self) -> PlacementState:
        return parse_state(self.client.get(self.keys.state))

    def move(self) -> dict[str, Any] | None:
        move = self.state().moves.get(self.tenant)
        return dict(move) if move is not None else None

    def change(self, change: Change, deadline_ms: int = 0) -> PlacementState | None:
        """Apply ``change`` atomically (retried while other writers race); the new
        state, or None when ``change`` declined. Raises Refused past ``deadline_ms``."""
        for _ in range(1000):
            raw = self.client.get(self.keys.state)
            state = parse_state(raw)
            new = change(state)
            if new is None:
                return None
            rendered = render_state(state.version + 1, *new)
            result = int(self._cas(keys=[self.keys.state],
                                   args=[raw or b"", rendered, deadline_ms]))
            if result == 1:
                return parse_state(rendered)
            if result == -1:
                raise Refused("the hold expired before the switch")
        raise MoveError("the placement state keeps changing under the mover")

    def set_move(self, fields: Mapping[str, Any], *, expect: str | None = None,
                 deadline_ms: int = 0, override: str | None = None) -> PlacementState:
        """Update this tenant's move document (``expect``: only in that phase, else
        MoveError); ``override``: also set the tenant's cluster (the switch)."""
        def change(state: PlacementState
                   ) -> tuple[dict[str, str], dict[str, dict[str, Any]]] | None:
            moves = {k: dict(v) for k, v in state.moves.items()}
            current = moves.get(self.tenant)
            if expect is not None and (current is None or current.get("phase") != expect):
                raise MoveError(f"the move of {self.tenant!r} is no longer in phase "
                                f"{expect!r} (now: {current and current.get('phase')}); "
                                f"was it aborted?")
            moves[self.tenant] = {**(current or {}), **fields}
            overrides = dict(state.overrides)
            if override is not None:
                overrides[self.tenant] = override
            return overrides, moves
        state = self.change(change, deadline_ms)
        assert state is not None
        return state

    def drop_move(self, *, refuse: frozenset[str] = frozenset()) -> dict[str, Any] | None:
        """Remove this tenant's move from the state (the override stays); the move
        removed, None if there was none. MoveError when its phase is in ``refuse``."""
        removed: list[dict[str, Any]] = []

        def change(state: PlacementState
                   ) -> tuple[dict[str, str], dict[str, dict[str, Any]]] | None:
            current = state.moves.get(self.tenant)
            if current is None:
                return None
            if current.get("phase") in refuse:
                raise MoveError(f"phase {current.get('phase')!r}")
            removed.append(dict(current))
            moves = {k: dict(v) for k, v in state.moves.items() if k != self.tenant}
            return dict(state.overrides), moves
        self.change(change)
        return removed[0] if removed else None

    # -- written ids ------------------------------------------------------------------

    def pop_dirty(self, count: int) -> list[bytes]:
        return cast(list[bytes], self.client.spop(self.keys.dirty(self.tenant), count) or [])

    def dirty_count(self) -> int:
        return int(self.client.scard(self.keys.dirty(self.tenant)))

    def redirty(self, members: list[bytes]) -> None:
        if members:
            self.client.sadd(self.keys.dirty(self.tenant), *members)

    def after_members(self) -> set[bytes]:
        return cast(set[bytes], self.client.smembers(self.keys.after(self.tenant)))

    def live_instances(self) -> set[str]:
        prefix = self.keys.live("")
        return {key.decode()[len(prefix):]
                for key in self.client.scan_iter(match=self.keys.live_pattern())}

    def inflight(self) -> dict[str, list[bytes]]:
        entries = cast(dict[bytes, bytes], self.client.hgetall(self.keys.inflight(self.tenant)))
        return {k.decode(): v.split(b"\n") for k, v in entries.items()}

    def settle_inflight(self) -> int:
        """Re-dirty and remove the in-flight entries of instances whose heartbeat is gone
        (their writes may or may not have been applied); the live instances' entries
        left."""
        live = self.live_instances()
        left = 0
        for entry, members in self.inflight().items():
            instance = entry.rpartition(":")[0]
            if instance in live:
                left += 1
                continue
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(self.keys.dirty(self.tenant), *members)
            pipe.hdel(self.keys.inflight(self.tenant), entry)
            pipe.execute()
        return left

    # -- copy progress ----------------------------------------------------------------

    def progress(self) -> dict[str, bytes]:
        got = cast(dict[bytes, bytes], self.client.hgetall(self.keys.copied(self.tenant)))
        return {k.decode(): v for k, v in got.items()}

    def save_progress(self, ns: str, value: bytes) -> None:
        self.client.hset(self.keys.copied(self.tenant), ns, value)

    def forget(self) -> None:
        """Delete the move's sets (after it finished or was aborted)."""
        self.client.delete(*self.keys.of_move(self.tenant))

    def wait_ms(self, ms: int) -> None:
        time.sleep(ms / 1000)
