"""Today's wiring of :data:`proxy.advice.catalog.RunCommand` to the proxy's pools.

The catalog only needs ``run_command(db, command) -> reply``; this adapter runs the
command on a pooled connection to the primary (or any member when there is none: index
definitions are the same on every member). It is the one place to change when the
upstream path moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.advice.catalog import RunCommand
from proxy.pool.registry import Pools
from proxy.route.readpref import read_preference
from proxy.route.topology import Topology

__all__ = ["pooled_runner"]

_PRIMARY_PREFERRED = read_preference("primaryPreferred")


def pooled_runner(topology: Topology, pools: Pools, timeout_s: float) -> RunCommand:
    async def run_command(database: str, command: dict[str, Any]) -> Mapping[str, Any]:
        pool = pools.get(await topology.select(_PRIMARY_PREFERRED))
        conn = await pool.checkout()
        ok = False
        try:
            reply = await conn.command({**command, "$db": database}, timeout_s)
            ok = True
            return reply
        finally:
            pool.checkin(conn, ok)

    return run_command
