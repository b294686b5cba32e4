"""The advice as text people paste: mongosh commands and a plain-text report."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["create_index_js", "drop_index_js", "render_js", "render_text"]

_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*\Z")


def _collection(namespace: str) -> str:
    database, _, collection = namespace.partition(".")
    db = f"db.getSiblingDB({json.dumps(database)})"
    if _IDENT.match(collection) and not collection.startswith("$"):
        return f"{db}.{collection}"
    return f"{db}.getCollection({json.dumps(collection)})"


def _key_js(key: Iterable[tuple[str, Any]]) -> str:
    parts = []
    for field, direction in key:
        name = field if _IDENT.match(field) else json.dumps(field)
        parts.append(f"{name}: {json.dumps(direction)}")
    return "{" + ", ".join(parts) + "}"


def create_index_js(namespace: str, key: Iterable[tuple[str, Any]]) -> str:
    return f"{_collection(namespace)}.createIndex({_key_js(key)})"


def drop_index_js(namespace: str, name: str) -> str:
    return f"{_collection(namespace)}.dropIndex({json.dumps(name)})"


def _ms(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.1f} ms"


def render_js(advice: Mapping[str, Any]) -> str:
    """Ready-to-paste mongosh: each ``createIndex`` preceded by its reason as a comment;
    redundant indexes as commented-out ``dropIndex`` lines (dropping is a decision)."""
    lines: list[str] = []
    for item in advice.get("missing", []):
        lines.append(f"// {item['reason']}: {len(item['shapes'])} shape(s), "
                     f"{item['count']} operations, {_ms(item['total_ms'])} at stake")
        lines.append(create_index_js(item["namespace"], item["key"].items()) + ";")
    for item in advice.get("redundant", []):
        lines.append(f"// redundant: {item['index']} is a prefix of {item['covered_by']}")
        lines.append(f"// {item['js']};")
    for item in advice.get("unused", []):
        lines.append(f"// unused since {item['since']}: {item['namespace']} {item['index']}")
    if not lines:
        lines.append("// no index advice")
    return "\n".join(lines) + "\n"


def render_text(advice: Mapping[str, Any]) -> str:
    out: list[str] = []
    missing = advice.get("missing", [])
    out.append(f"Missing indexes ({len(missing)}), by time at stake:")
    for n, item in enumerate(missing, 1):
        out.append(f"{n}. {item['namespace']} {json.dumps(item['key'])}")
        out.append(f"   why: {item['reason']}")
        out.append(f"   at stake: {_ms(item['total_ms'])} over {item['count']} operations "
                   f"of {len(item['shapes'])} shape(s)")
        for shape in item["shapes"]:
            out.append(f"     {shape['count']:>8} x {shape['avg_ms']} ms  {shape['shape']}")
            explained = shape.get("explain")
            if explained:
                verdict = {True: "collection scan", False: "no collection scan",
                           None: "did not say"}[explained["collscan"]]
                out.append(f"       explain: {verdict} ({explained['plan']})")
        out.append(f"   {create_index_js(item['namespace'], item['key'].items())}")
    unindexable = advice.get("unindexable", [])
    if unindexable:
        out.append("")
        out.append(f"Shapes no index serves well ({len(unindexable)}):")
        for item in unindexable:
            out.append(f"- {item['namespace']} {item['count']} ops, {_ms(item['total_ms'])}: "
                       f"{'; '.join(item['problems'])}")
            out.append(f"    {item['shape']}")
    redundant = advice.get("redundant", [])
    out.append("")
    out.append(f"Redundant indexes ({len(redundant)}):")
    for item in redundant:
        out.append(f"- {item['namespace']} {item['index']} {json.dumps(item['key'])}: "
                   f"{item['reason']}")
    out.append("")
    unused = advice.get("unused", [])
    unknown = advice.get("usage_unknown", [])
    out.append(f"Unused indexes ({len(unused)} found; unknown for {len(unknown)} "
               "collection(s)):")
    for item in unused:
        out.append(f"- {item['namespace']} {item['index']}: 0 operations since {item['since']}")
    for item in unknown:
        out.append(f"- {item['namespace']}: unknown ({item['why']})")
    pending = [ns for ns, c in advice.get("catalog", {}).items() if c.get("state") != "ok"]
    if pending:
        out.append("")
        out.append("Indexes not known yet for: " + ", ".join(pending))
    return "\n".join(out) + "\n"
