"""docs/configuration.md is generated from the configuration models
(`python -m scripts.gen_config_docs`): it must be current, and every key documented."""

from __future__ import annotations

import subprocess
import sys

import yaml
from pydantic import BaseModel, Field

from proxy.config import Config, parse_config
from scripts import gen_config_docs as gen
from tests.support import REPO_ROOT


class _Sample(BaseModel):
    """A sample section.

    Only the first paragraph is used."""

    # Above the field,
    # over two lines.
    first: int = Field(default=3, gt=0, le=10)
    second: tuple[str, ...] = ("a",)  # at the end of the line
    third: str | None = Field(default=None, description="from Field")
    undocumented: bool = False


def test_the_page_is_current() -> None:
    page = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == gen.render(), (
        "docs/configuration.md is out of date: run `python -m scripts.gen_config_docs`")


def test_check_mode_agrees() -> None:
    result = subprocess.run([sys.executable, "-m", "scripts.gen_config_docs", "--check"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_key_is_documented() -> None:
    missing = [row.path for row in gen.rows() if not row.description]
    assert not missing, (
        f"configuration keys without a description: {missing}; write a `#` comment above "
        "the field (or Field(description=...)), then run `python -m scripts.gen_config_docs`")


def test_every_model_field_has_a_row() -> None:
    paths = {row.path for row in gen.rows()}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}.{field.alias or name}" if prefix else (field.alias or name)
            if not any(p == path or (p.endswith(".*") and path.startswith(p[:-1]))
                       for p in paths):
                raise AssertionError(f"{path} is not in the reference")
            for sub, suffix in gen._models_in(field.annotation):
                if path + suffix not in {p.removesuffix(".*") for p in paths}:
                    walk(sub, path + suffix)

    walk(Config, "")


def test_descriptions_types_defaults_and_limits_come_from_the_model() -> None:
    rows = {row.path: row for row in gen.rows(_Sample, "sample")}
    first, second, third = rows["sample.first"], rows["sample.second"], rows["sample.third"]
    assert (first.type, first.default, first.limits, first.description) == (
        "integer", "`3`", "> 0, ≤ 10", "Above the field, over two lines.")
    assert (second.type, second.default, second.description) == (
        "list of string", '`["a"]`', "At the end of the line")
    assert (third.type, third.default, third.description) == ("string", "none", "From Field")
    assert rows["sample.undocumented"].description == ""
    assert gen._docstring(_Sample) == "A sample section."


def test_the_shipped_example_files_are_valid_configurations() -> None:
    """The reference points readers at these files: they must load as they are."""
    for name in ("example.yaml", "routing.yaml", "dev.yaml", "docker.yaml"):
        parse_config(yaml.safe_load((REPO_ROOT / "config" / name).read_text()))
