"""Read preferences as drivers send them (``$readPreference``), as pymongo objects.

Pure functions: the selection itself is pymongo's own (``TopologyDescription.apply_selector``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pymongo.errors import ConfigurationError
from pymongo.read_preferences import Primary, _ServerMode, make_read_preference

PRIMARY = Primary()
_MODES = {
    "primary": 0,
    "primaryPreferred": 1,
    "secondary": 2,
    "secondaryPreferred": 3,
    "nearest": 4,
}


class ReadPreferenceError(ValueError):
    """A ``$readPreference`` document the proxy cannot honour exactly."""


def read_preference(
    mode: str,
    tag_sets: list[dict[str, str]] | None = None,
    max_staleness_s: int = -1,
) -> _ServerMode:
    if mode not in _MODES:
        raise ReadPreferenceError(
            f"unknown read preference mode {mode!r}; expected one of {', '.join(_MODES)}"
        )
    try:
        return make_read_preference(_MODES[mode], tag_sets, max_staleness_s)
    except (ConfigurationError, ValueError, TypeError) as exc:
        raise ReadPreferenceError(str(exc)) from None


def from_command(command: Mapping[str, Any]) -> _ServerMode:
    """The read preference a command asks for; primary when it names none."""
    doc = command.get("$readPreference")
    if doc is None:
        return PRIMARY
    if not isinstance(doc, dict) or not isinstance(doc.get("mode"), str):
        raise ReadPreferenceError("$readPreference must be a document with a string mode")
    tags = doc.get("tags")
    if tags is not None and not (
        isinstance(tags, list) and all(isinstance(t, dict) for t in tags)
    ):
        raise ReadPreferenceError("$readPreference.tags must be an array of documents")
    staleness = doc.get("maxStalenessSeconds", -1)
    if (
        not isinstance(staleness, int | float)
        or isinstance(staleness, bool)
        or not math.isfinite(staleness)
    ):
        raise ReadPreferenceError(
            "$readPreference.maxStalenessSeconds must be a finite number"
        )
    return read_preference(
        doc["mode"],
        [dict(t) for t in tags] if tags is not None else None,
        int(staleness),
    )
