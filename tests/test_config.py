"""Configuration validation: ``python -m proxy check-config FILE`` and ``parse_config``.

Every rejected file exits non-zero and the message names the offending key path, so an
operator can fix the file without reading code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, ConfigError, load_config, parse_config
from tests.support import REPO_ROOT

EXAMPLE_CONFIGS = sorted((REPO_ROOT / "config").glob("*.yaml"))
URI = "mongodb://127.0.0.1:27018/"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, text: str, name: str = "proxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CLI: valid


def test_example_configs_exist() -> None:
    assert EXAMPLE_CONFIGS, "config/*.yaml: no example configuration found"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    proc = check_config(path)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert proc.stderr == ""


def test_minimal_config_is_valid(tmp_path: Path) -> None:
    proc = check_config(write(tmp_path, f"upstream:\n  uri: {URI}\n"))
    assert proc.returncode == 0, proc.stderr


def test_full_config_is_valid(tmp_path: Path) -> None:
    data = {
        "listen": {"host": "127.0.0.1", "port": 27016, "compressors": ["zlib"],
                   "max_message_size_bytes": 1_000_000, "read_timeout_ms": 1000},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"uri": URI, "socket_timeout_ms": 5000,
                     "pool": {"max_size": 5, "min_size": 1, "connect_timeout_ms": 1000,
                              "wait_queue_timeout_ms": 2000}},
        "shutdown": {"drain_timeout_ms": 0},
    }
    proc = check_config(write(tmp_path, yaml.safe_dump(data)))
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- CLI: invalid

INVALID_CASES: list[Any] = [
    pytest.param(f"upstream: {{uri: '{URI}'}}\nbogus: 1\n", ["bogus"], id="unknown-top-level-key"),
    pytest.param(
        f"upstream:\n  uri: '{URI}'\n  pool:\n    bogus: 1\n",
        ["upstream.pool.bogus"],
        id="unknown-nested-key",
    ),
    pytest.param(
        f"listen:\n  port: abc\nupstream: {{uri: '{URI}'}}\n",
        ["listen.port"],
        id="wrong-type-port",
    ),
    pytest.param(
        f"listen:\n  port: 70000\nupstream: {{uri: '{URI}'}}\n",
        ["listen.port"],
        id="port-out-of-range",
    ),
    pytest.param(
        f"upstream:\n  uri: '{URI}'\n  pool:\n    max_size: 0\n",
        ["upstream.pool.max_size"],
        id="pool-max-size-zero",
    ),
    pytest.param(
        f"upstream:\n  uri: '{URI}'\n  pool: 5\n",
        ["upstream.pool"],
        id="mapping-expected",
    ),
    pytest.param(
        f"listen:\n  compressors: [lz4]\nupstream: {{uri: '{URI}'}}\n",
        ["listen.compressors"],
        id="unknown-compressor",
    ),
    pytest.param(
        "upstream:\n  pool: {max_size: 3}\n", ["upstream", "uri"], id="missing-upstream-uri"
    ),
    pytest.param("listen: {port: 1}\n", ["upstream"], id="missing-upstream"),
    pytest.param("", ["upstream"], id="empty-file"),
    pytest.param("upstream:\n  uri: 'http://example.com/'\n", ["upstream.uri"], id="invalid-uri"),
    pytest.param("upstream:\n  uri: 'not a uri'\n", ["upstream.uri"], id="uri-without-scheme"),
    pytest.param("upstream:\n  uri: [\n", ["invalid YAML"], id="invalid-yaml"),
    pytest.param("upstream: {uri: x}\n  bad indent: 1\n", ["invalid YAML"], id="bad-indent"),
    pytest.param("- upstream\n- listen\n", ["top level"], id="top-level-list"),
]


@pytest.mark.parametrize(("text", "needles"), INVALID_CASES)
def test_invalid_config_is_rejected(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    proc = check_config(path)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr: {proc.stderr!r}"
    assert "OK" not in proc.stdout


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    proc = check_config(write(tmp_path, "upstream:\n  uri: 'a'\n  pool: [1, 2\n"))
    assert proc.returncode != 0
    assert "line" in proc.stderr, proc.stderr


def test_several_errors_are_all_named(tmp_path: Path) -> None:
    text = f"listen: {{port: abc}}\nupstream:\n  uri: '{URI}'\n  pool: {{bogus: 1}}\n"
    proc = check_config(write(tmp_path, text))
    assert proc.returncode != 0
    assert "listen.port" in proc.stderr
    assert "upstream.pool.bogus" in proc.stderr


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    proc = check_config(path)
    assert proc.returncode != 0
    assert str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_refuses_invalid_config(tmp_path: Path) -> None:
    path = write(tmp_path, f"upstream: {{uri: '{URI}'}}\nbogus: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "bogus" in proc.stderr


# --------------------------------------------------------------------------- parse_config


def test_parse_config_defaults() -> None:
    config = parse_config({"upstream": {"uri": URI}})
    assert isinstance(config, Config)
    assert config.upstream.uri == URI
    assert config.listen.port == 27016
    assert config.listen.max_message_size_bytes == 48_000_000
    assert config.upstream.pool.max_size > 0
    assert config.shutdown.drain_timeout_ms >= 0
    assert config.upstream.members == ()


def test_parse_config_nested_values() -> None:
    config = parse_config({
        "listen": {"port": 0, "compressors": ["zlib", "zstd"]},
        "upstream": {"uri": "mongodb://h1:1,h2:2/", "socket_timeout_ms": 5000,
                     "pool": {"connect_timeout_ms": 1000, "wait_queue_timeout_ms": 2000}},
        "shutdown": {"drain_timeout_ms": 0},
    })
    assert config.listen.port == 0
    assert tuple(config.listen.compressors) == ("zlib", "zstd")
    assert config.upstream.pool.connect_timeout_ms == 1000
    assert config.upstream.pool.wait_queue_timeout_ms == 2000
    assert config.upstream.socket_timeout_ms == 5000
    assert config.upstream.uri == "mongodb://h1:1,h2:2/"
    assert config.shutdown.drain_timeout_ms == 0


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        pytest.param({"upstream": {"uri": URI}, "bogus": 1}, ["bogus"], id="unknown-top-level"),
        pytest.param({"upstream": {"uri": URI, "pool": {"bogus": 1}}},
                     ["upstream.pool.bogus"], id="unknown-nested"),
        pytest.param({"listen": {"port": "abc"}, "upstream": {"uri": URI}},
                     ["listen.port"], id="wrong-type"),
        pytest.param({"listen": {"port": -1}, "upstream": {"uri": URI}},
                     ["listen.port"], id="negative-port"),
        pytest.param({"upstream": {"uri": URI, "pool": {"max_size": 0}}},
                     ["upstream.pool.max_size"], id="zero-max-size"),
        pytest.param({"upstream": {"uri": URI, "socket_timeout_ms": "soon"}},
                     ["upstream.socket_timeout_ms"], id="wrong-type-timeout"),
        pytest.param({"listen": {"max_message_size_bytes": 48_000_001},
                      "upstream": {"uri": URI}},
                     ["listen.max_message_size_bytes"], id="message-size-above-max"),
        pytest.param({"upstream": {}}, ["upstream", "uri"], id="missing-uri"),
        pytest.param({}, ["upstream"], id="missing-upstream"),
        pytest.param(None, ["upstream"], id="empty-document"),
        pytest.param({"upstream": {"uri": "http://x/"}}, ["upstream.uri"], id="bad-scheme"),
        pytest.param({"upstream": {"uri": "mongodb://"}}, ["upstream.uri"], id="no-host"),
        pytest.param({"upstream": {"uri": 42}}, ["upstream.uri"], id="uri-not-a-string"),
        pytest.param(["upstream"], ["top level"], id="not-a-mapping"),
        pytest.param("upstream", ["top level"], id="a-string"),
    ],
)
def test_parse_config_rejects(data: Any, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_config_is_immutable() -> None:
    config = parse_config({"upstream": {"uri": URI}})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        config.listen.port = 1


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_load_config_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"upstream: {{uri: '{URI}', pool: {{bogus: 1}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "upstream.pool.bogus" in str(info.value)


def test_load_config_example_roundtrip() -> None:
    for path in EXAMPLE_CONFIGS:
        config = load_config(path)
        raw = yaml.safe_load(path.read_text())
        assert config.upstream.uri == raw["upstream"].get("uri")


def test_declared_members_parse_and_validate() -> None:
    config = parse_config({"upstream": {"members": [
        {"host": "127.0.0.1:27018", "role": "primary"},
        {"host": "127.0.0.1:27019", "role": "secondary", "tags": {"use": "analytics"}},
    ]}})
    assert [m.address for m in config.upstream.members] == [
        ("127.0.0.1", 27018), ("127.0.0.1", 27019)]
    assert config.upstream.members[1].tags == {"use": "analytics"}
    with pytest.raises(ConfigError, match="at most one member may have role primary"):
        parse_config({"upstream": {"members": [
            {"host": "a:1", "role": "primary"}, {"host": "b:1", "role": "primary"}]}})
    with pytest.raises(ConfigError, match=r"upstream\.members\.0\.host"):
        parse_config({"upstream": {"members": [{"host": "nocolon", "role": "primary"}]}})
    with pytest.raises(ConfigError, match=r"upstream\.members\.0\.role"):
        parse_config({"upstream": {"members": [{"host": "a:1", "role": "arbiter"}]}})
