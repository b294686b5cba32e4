"""Optional (``advice.explain: true``), rate-limited confirmation of a suggestion: the
server's own ``explain`` of a slow shape that lacks an index, to see whether it scans
the collection.

The digest keeps shapes, not values, so the explained command is the shape with a
neutral value of each placeholder's type (``?str`` -> ``""``, ``?int`` -> ``0``,
``?date`` -> the epoch...): the planner picks a collection scan or an index by the
fields and operators, not by the values. Only ``find`` shapes are explained, with
``verbosity: "queryPlanner"`` (the query is planned, not run), at most one per
``explain_interval_s``, the slowest unconfirmed shape first; nothing of it touches the
request path.

A plan is read as a collection scan when a MongoDB stage says ``COLLSCAN`` (classic
and SBE plans), or a FerretDB (SQLite) plan line says ``SCAN <table>`` without an
index; when the answer has neither form the result is ``None``, "did not say".
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Mapping
from typing import Any

from bson import Regex
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.timestamp import Timestamp

from proxy.advice.catalog import RunCommand

__all__ = ["Explainer", "collection_scan", "example_command"]

_NEUTRAL: dict[str, Any] = {
    "?str": "", "?int": 0, "?double": 0.0, "?decimal": Decimal128("0"), "?bool": False,
    "?null": None, "?date": datetime.datetime(1970, 1, 1), "?oid": ObjectId("0" * 24),
    "?binary": Binary(b""), "?uuid": uuid.UUID(int=0), "?regex": Regex("a"),
    "?regex:prefix": Regex("^a"), "?timestamp": Timestamp(0, 0), "?array": [],
    "?object": {}, "?minkey": MinKey(), "?maxkey": MaxKey(),
}
_SQLITE_SCAN = re.compile(r"\bSCAN \S+\s*$")


def _neutral(value: Any, key: str = "") -> Any:
    if isinstance(value, str):
        if key == "$regex":  # the $regex operator takes the pattern as a string
            return "^a" if value == "?regex:prefix" else "a"
        return _NEUTRAL.get(value, value)
    if isinstance(value, dict):
        return {k: _neutral(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_neutral(v) for v in value]
    return value


def example_command(shape: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``find`` with the shape's fields and operators and neutral values; None for
    other commands."""
    if shape.get("cmd") != "find" or not isinstance(shape.get("coll"), str):
        return None
    command: dict[str, Any] = {"find": shape["coll"], "filter": _neutral(shape.get("filter", {}))}
    sort = shape.get("sort")
    if isinstance(sort, dict):
        command["sort"] = sort
    return command


def _stages(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, Mapping):
        stage = node.get("stage")
        if isinstance(stage, str):
            found.append(stage)
        for value in node.values():
            found.extend(_stages(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_stages(value))
    return found


def collection_scan(reply: Mapping[str, Any]) -> tuple[bool | None, str]:
    """(scans the collection?, the plan in a few words) from an explain reply."""
    planner = reply.get("queryPlanner")
    if not isinstance(planner, Mapping):
        return None, "no queryPlanner in the reply"
    stages = _stages(planner.get("winningPlan"))
    if stages:
        return "COLLSCAN" in stages, " <- ".join(stages)
    lines = planner.get("Plan")
    if isinstance(lines, list) and all(isinstance(x, str) for x in lines):
        details = [x.split("detail=", 1)[-1] for x in lines]
        return any(_SQLITE_SCAN.search(d) for d in details), "; ".join(details)
    return None, "plan not understood"


class Explainer:
    def __init__(self, run_command: RunCommand, interval_s: float, min_avg_ms: float,
                 max_results: int = 1000) -> None:
        self._run = run_command
        self.interval_s = interval_s
        self.min_avg_ms = min_avg_ms
        self.max_results = max_results
        self.results: dict[str, dict[str, Any]] = {}
        self._last = 0.0

    def due(self, now: float) -> bool:
        return now - self._last >= self.interval_s

    async def explain_one(self, candidates: list[dict[str, Any]], now: float) -> None:
        """Explain the first candidate (digest rows of shapes lacking an index, slowest
        first) slow enough and not explained within ten intervals."""
        for row in candidates:
            known = self.results.get(row["shape_hash"])
            if (row.get("avg_ms") or 0.0) < self.min_avg_ms or (
                    known is not None and now - known["at"] < 10 * self.interval_s):
                continue
            shape = row.get("shape_doc")
            command = example_command(shape) if isinstance(shape, Mapping) else None
            if command is None:
                continue
            self._last = now
            database = str(row["namespace"]).partition(".")[0]
            try:
                reply = await self._run(database, {"explain": command,
                                                   "verbosity": "queryPlanner"})
            except Exception as exc:  # the upstream path failed: say so, retry later
                result: dict[str, Any] = {"collscan": None, "plan": f"explain failed: {exc!r}"}
            else:
                if reply.get("ok"):
                    scan, plan = collection_scan(reply)
                    result = {"collscan": scan, "plan": plan}
                else:
                    result = {"collscan": None, "plan": f"explain: {reply.get('errmsg')}"}
            if len(self.results) >= self.max_results:
                self.results.clear()
            self.results[row["shape_hash"]] = {"at": now, **result}
            return
