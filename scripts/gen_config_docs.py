"""Write docs/configuration.md from the configuration models themselves.

    python -m scripts.gen_config_docs            # rewrite docs/configuration.md
    python -m scripts.gen_config_docs --check    # exit 1 when the file is out of date

Every key of ``proxy.config.Config`` (and of the section models it mounts) becomes one
row: its path, type, default, limits and description. The description is the field's
``Field(description=...)`` or else the ``#`` comment lines right above the field in the
model's source (or a comment at the end of its line), so documenting an option is
writing the comment next to it. ``tests/test_config_reference.py`` fails when the page
and the models disagree, or when a key has no description.
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "configuration.md"
COMMAND = "python -m scripts.gen_config_docs"

# The page that explains a section in depth (the reference says what each key is).
GUIDES = {
    "upstream": "operations.md",
    "observability": "observability.md",
    "routing": "routing.md",
    "tenancy": "tenancy.md",
    "cache": "cache.md",
    "placement": "placement.md",
}

HEADER = f"""\
# Configuration reference

<!-- Generated from the pydantic models by `{COMMAND}`; do not edit by hand.
     tests/test_config_reference.py fails when this page and the models disagree. -->

mongoproxy reads one YAML file (`mongoproxy run --config FILE`) and validates it into
one typed object before it starts. Unknown keys are refused, and every error names the
key path, e.g. `upstream.pool.max_size: Input should be greater than 0`. Check a file
without starting the proxy with `mongoproxy check-config FILE` (exit status 2 on an
error). `config/example.yaml` is an annotated example; `config/routing.yaml` shows every
routing option.

Only `upstream` is required. `name[]` is an item of a list, `name.<key>` an entry of a
mapping whose keys you choose. Durations are in the unit their name ends with (`_ms`,
`_s`). Reloading: on `SIGHUP` and when the file changes, `routing`, `cache.rules`,
`placement.tenants` and `placement.hash` are swapped in live (an invalid file is refused
and the running configuration kept); every other key needs a restart.
"""


@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    limits: str
    description: str


# -- descriptions from the source -------------------------------------------------------


@cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment above it (or at the end of its line) in ``cls``'s body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string:
            trailing[tok.start[0]] = tok.string
    found: dict[str, str] = {}
    indent = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        head = stripped.split(":", 1)[0].strip()
        if ":" not in stripped or not head.isidentifier() or stripped.startswith("#"):
            continue
        this_indent = len(line) - len(line.lstrip())
        if indent is None and number > 1:
            indent = this_indent
        if this_indent != indent:
            continue
        above: list[str] = []
        i = number - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip())
            i -= 1
        text = above or ([trailing[number]] if number in trailing else [])
        if text:
            found.setdefault(head, _clean(" ".join(t.lstrip("#").strip() for t in text)))
    return found


def _clean(text: str) -> str:
    text = text.removeprefix("type: ignore").strip()
    return text.split("# type: ignore")[0].strip()


def _description(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    text = field.description or ""
    for cls in model.__mro__:
        if not text and name in getattr(cls, "__annotations__", {}):
            text = _comments(cls).get(name, "")
    if not text:  # a section: what its model says of itself
        text = next((_docstring(m) for m, _ in _models_in(field.annotation)), "")
    return text[:1].upper() + text[1:]


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    if not doc or doc == BaseModel.__doc__:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")


# -- types, defaults, limits -------------------------------------------------------------


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """Models reachable from a field's type, with the path suffix that reaches them."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin in (tuple, list):
        return [(m, "[]" + s) for m, s in _models_in(args[0])] if args else []
    if origin is dict and len(args) == 2:
        return [(m, ".<name>" + s) for m, s in _models_in(args[1])]
    return []


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type_text(inner[0])}" if inner else "list"
    if origin is dict:
        return f"mapping of {_type_text(args[1])}" if len(args) == 2 else "mapping"
    if origin is typing.Annotated:
        return _type_text(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean",
             typing.Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "none"
    return f"`{_yaml_value(value)}`"


def _limits_text(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            bound = getattr(item, attr, None)
            if isinstance(item, annotated_types.BaseMetadata) and bound is not None:
                parts.append(f"{sign} {_yaml_value(bound)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append("not empty" if item.min_length == 1 else
                         f"length ≥ {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"length ≤ {item.max_length}")
    return ", ".join(parts)


# -- the walk ------------------------------------------------------------------------------


def rows(model: type[BaseModel] = Config, prefix: str = "",
         seen: dict[type[BaseModel], str] | None = None) -> list[Row]:
    """Every key below ``model``, depth first; a model met before is referred to (and of
    a subclass of one, only the keys it adds are listed)."""
    seen = {} if seen is None else seen
    seen.setdefault(model, prefix)
    inherited: set[str] = set()
    found: list[Row] = []
    base = next((b for b in model.__mro__[1:] if b in seen), None)
    if base is not None:
        inherited = set(base.model_fields)
        found.append(Row(f"{prefix}.*", "", "", "", f"the keys of `{seen[base]}`, and:"))
    for name, field in model.model_fields.items():
        if name in inherited:
            continue
        key = field.alias or name
        path = f"{prefix}.{key}" if prefix else key
        found.append(Row(path, _type_text(field.annotation), _default_text(field),
                         _limits_text(field), _description(model, name, field)))
        for sub, suffix in _models_in(field.annotation):
            below = path + suffix
            if sub in seen:
                found.append(Row(f"{below}.*", "", "", "",
                                 f"the same keys as `{seen[sub]}`"))
                continue
            found.extend(rows(sub, below, seen))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out = [HEADER]
    by_section: dict[str, list[Row]] = {}
    for row in rows():
        by_section.setdefault(row.path.split(".")[0].split("[")[0], []).append(row)
    for section, section_rows in by_section.items():
        out.append(f"\n## `{section}`\n")
        annotation = Config.model_fields[section].annotation
        models = _models_in(annotation)
        intro = [_docstring(models[0][0])] if models and _docstring(models[0][0]) else []
        if section in GUIDES:
            intro.append(f"In depth: [{GUIDES[section]}]({GUIDES[section]}).")
        if intro:
            out.append(" ".join(intro) + "\n")
        out.append("| key | type | default | limits | description |")
        out.append("| --- | --- | --- | --- | --- |")
        for row in section_rows:
            if row.path == section and not row.default:
                continue  # the heading and its intro say it
            out.append(f"| `{row.path}` | {_cell(row.type)} | {_cell(row.default)} | "
                       f"{_cell(row.limits)} | {_cell(row.description)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run `{COMMAND}`",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
