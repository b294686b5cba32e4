"""What the instances (``proxy.placement.agent``) and the mover (``proxy.placement.mover``)
share in Redis: the key names, the state's JSON, the written-ids members and the one
compare-and-set every state change goes through (docs/placement.md, "Moving a tenant
online").

Keys (``P`` = ``placement.key_prefix``, ``T`` = a tenant key)::

    P state                 JSON {version, overrides: {T: cluster}, moves: {T: {phase, ...}}}
    P live:<instance>       an instance's heartbeat (PX 3 x lease_ms)
    P move:T:dirty          written ids of T the mover has not copied again yet (a set)
    P move:T:inflight       <instance>:<seq> -> the members of a write in flight (a hash)
    P move:T:after          ids of T written after the switch (a set; verify skips them)
    P move:T:copied         namespace -> copy progress (a hash; resume)

A member is ``"<db>.<coll>\\0<hex of BSON {_id: v}>"``; an empty hex part means "every
document of the tenant in that collection" (a write whose ids are not known).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import bson

from proxy.placement.directory import PlacementState

__all__ = [
    "CAS_SCRIPT", "FULL", "HOLD", "TRACKED", "VERIFYING", "Keys", "decode_member",
    "effective_phase", "full_member", "id_member", "parse_state", "redis_ms",
    "render_state",
]

# Phases (the move document's "phase"). TRACKED: writes are recorded in the dirty set
# (and in flight); HOLD: writes wait; VERIFYING: the switch is done, writes go to the
# target and are recorded in the after set.
TRACKED = frozenset({"tracking", "copy", "catch-up"})
HOLD = "hold"
VERIFYING = frozenset({"verify", "verify-failed", "cleanup"})
FULL = b""  # the hex part of a "whole collection" member


class Keys:
    """The Redis key names under one prefix."""

    __slots__ = ("prefix", "state")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.state = f"{prefix}state"

    def live(self, instance: str) -> str:
        return f"{self.prefix}live:{instance}"

    def live_pattern(self) -> str:
        return f"{self.prefix}live:*"

    def dirty(self, tenant: str) -> str:
        return f"{self.prefix}move:{tenant}:dirty"

    def inflight(self, tenant: str) -> str:
        return f"{self.prefix}move:{tenant}:inflight"

    def after(self, tenant: str) -> str:
        return f"{self.prefix}move:{tenant}:after"

    def copied(self, tenant: str) -> str:
        return f"{self.prefix}move:{tenant}:copied"

    def of_move(self, tenant: str) -> list[str]:
        return [self.dirty(tenant), self.inflight(tenant), self.after(tenant),
                self.copied(tenant)]


def parse_state(raw: bytes | str | None) -> PlacementState:
    """The state from its JSON (absent: version 0, nothing)."""
    if raw is None:
        return PlacementState()
    doc = json.loads(raw)
    return PlacementState(int(doc.get("version", 0)), dict(doc.get("overrides") or {}),
                          {k: dict(v) for k, v in (doc.get("moves") or {}).items()})


def render_state(version: int, overrides: Mapping[str, str],
                 moves: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps({"version": version, "overrides": dict(overrides),
                       "moves": {k: dict(v) for k, v in moves.items()}},
                      sort_keys=True, separators=(",", ":"))


def redis_ms(time_reply: Iterable[Any]) -> int:
    """Redis ``TIME`` ([seconds, microseconds]) in milliseconds."""
    seconds, micros = time_reply
    return int(seconds) * 1000 + int(micros) // 1000


def effective_phase(move: Mapping[str, Any], now_ms: int) -> str:
    """The phase an instance acts on: a hold whose ``hold_until_ms`` has passed (by the
    Redis TIME read with the state, in one transaction) is tracking again, so a dead
    mover never holds a tenant for longer than its hold. The switch refuses an expired
    hold in the same atomic step, so "expired" and "switched" exclude each other."""
    phase = str(move.get("phase", ""))
    if phase == HOLD and now_ms >= int(move.get("hold_until_ms", 0)):
        return "hold-expired"
    return phase


def id_member(ns: str, raw_id_doc: bytes) -> bytes:
    """The member for one document: ``raw_id_doc`` is the BSON of ``{_id: value}``."""
    return ns.encode() + b"\0" + raw_id_doc.hex().encode()


def full_member(ns: str) -> bytes:
    return ns.encode() + b"\0" + FULL


def decode_member(member: bytes) -> tuple[str, Any, bool]:
    """(namespace, _id value, whole collection?) of a member."""
    ns, _, hexed = member.partition(b"\0")
    if not hexed:
        return ns.decode(), None, True
    return ns.decode(), bson.decode(bytes.fromhex(hexed.decode()))["_id"], False


# The one compare-and-set of the state: KEYS[1] = the state key; ARGV[1] = the JSON the
# writer read ('' = absent), ARGV[2] = the new JSON, ARGV[3] = a Redis-time deadline in
# ms (0: none). Returns 1 (set), 0 (the state changed since it was read), -1 (deadline
# passed: the switch of an expired hold is refused, judged by Redis's own clock).
CAS_SCRIPT = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
local deadline = tonumber(ARGV[3])
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= deadline then
    return -1
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
