"""Strict YAML for configuration files: a key given twice in one mapping is an error.

PyYAML's ``safe_load`` lets the second ``listen:`` silently win, so an operator who
appends a section to a long file may run a configuration they never read. Errors name
the file (``config.yaml, line 7, column 1``), not ``<unicode string>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

__all__ = ["StrictLoader", "load_yaml_file"]


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys in a mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" merge keys may repeat; their keys are checked when merged
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first is not None:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first given at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | Path) -> Any:
    """Parse the YAML file at ``path``; OSError and yaml.YAMLError propagate."""
    with open(path, encoding="utf-8") as stream:
        return yaml.load(stream, Loader=StrictLoader)  # a SafeLoader subclass
