"""Single flight: concurrent misses on one key within one instance make one upstream query.

The first miss on a key becomes the *leader* and goes upstream; misses on the same key
that arrive while it is in flight wait for its reply body instead. The key includes the
generation token the lookup saw, so a request that looked up after a write's token
replacement never joins a flight that started before it (and could have read the state
before the write). When the leader's reply cannot be shared (an error, a cursor left
open on the leader's connection, too large) or the leader fails, waiters get None and
go upstream themselves.
"""

from __future__ import annotations

import asyncio

__all__ = ["Flight", "SingleFlight"]


class Flight:
    __slots__ = ("_future", "_key", "_owner")

    def __init__(self, owner: SingleFlight, key: tuple[str, bytes, str]) -> None:
        self._owner = owner
        self._key = key
        self._future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

    def finish(self, body: bytes | None) -> None:
        """Hand the shareable reply body (or None) to the waiters; idempotent."""
        if self._owner._flights.get(self._key) is self:
            del self._owner._flights[self._key]
        if not self._future.done():
            self._future.set_result(body)


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[tuple[str, bytes, str], Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def lead(self, key: tuple[str, bytes, str]) -> Flight | None:
        """A new flight led by the caller, or None when one is already in the air."""
        if key in self._flights:
            return None
        flight = self._flights[key] = Flight(self, key)
        return flight

    async def wait(self, key: tuple[str, bytes, str]) -> bytes | None:
        """The body of the flight in the air for ``key`` (None if it cannot be shared)."""
        flight = self._flights.get(key)
        if flight is None:
            return None
        # shield: a cancelled waiter must not cancel the leader's future for the others.
        return await asyncio.shield(flight._future)
