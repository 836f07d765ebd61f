"""`kvcache config show` as a real process: the same layers as serve, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Start from a clean slate: no KVCACHE_* of the developer's shell may leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    return subprocess.run(
        [sys.executable, "-m", "kvcache.service.cli", "config", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


def _show(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _run("show", *args, env=env)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_defaults_are_printed_in_full() -> None:
    data = _show()
    assert data["http"] == {
        "host": "127.0.0.1",
        "port": 8080,
        "max_body_bytes": 16 * 1024 * 1024,
        "token": None,
        "max_tokens": 1 << 20,
        "max_pods": 10_000,
        "keepalive_timeout_seconds": 120.0,
        "head_timeout_seconds": 10.0,
        "shutdown_timeout_seconds": 20.0,
    }
    assert data["events"]["zmq_bind"] == ["tcp://*:5557"]
    assert data["logging"] == {"format": "text", "level": "info"}


def test_file_environment_and_flags_layer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "kvcache.yaml"
    path.write_text("http: {port: 1000, host: 10.0.0.1, max_pods: 7}\n", encoding="utf-8")
    env = {"KVCACHE_CONFIG": str(path), "KVCACHE_HTTP__PORT": "2000", "KVCACHE_HTTP__HOST": "h"}
    data = _show("--http-port", "3000", "--log-format", "json", env=env)
    assert data["http"]["port"] == 3000
    assert data["http"]["host"] == "h"
    assert data["http"]["max_pods"] == 7
    assert data["logging"]["format"] == "json"


def test_secrets_are_masked_in_both_formats() -> None:
    env = {
        "KVCACHE_HTTP__TOKEN": "tok-s3cret",
        "KVCACHE_INDEX__BACKEND": "redis",
        "KVCACHE_INDEX__REDIS__URL": "redis://app:pw-s3cret@redis:6379/1",
    }
    as_json = _run("show", env=env)
    as_yaml = _run("show", "--format", "yaml", env=env)
    for result in (as_json, as_yaml):
        assert result.returncode == 0, result.stderr
        assert "s3cret" not in result.stdout
    data = json.loads(as_json.stdout)
    assert data["http"]["token"] == "***"
    assert data["index"]["redis"]["url"] == "redis://app:***@redis:6379/1"
    assert yaml.safe_load(as_yaml.stdout) == data


def test_go_shaped_file_is_translated_and_its_warnings_go_to_stderr(tmp_path: Path) -> None:
    path = tmp_path / "scorer.json"
    path.write_text(
        json.dumps(
            {
                "tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"},
                "indexerConfig": {"tokenizersPoolConfig": {"modelName": "Qwen/Qwen3-8B"}},
                "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "discoverPods": False},
            }
        ),
        encoding="utf-8",
    )
    result = _run("show", "--config", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hashing"]["block_size"] == 64
    assert data["hashing"]["seed"] == "42"
    assert data["events"]["zmq_bind"] == ["tcp://*:5557"]
    assert "indexerConfig.tokenizersPoolConfig.modelName" in result.stderr
    assert "warning" in result.stderr


def test_a_bad_variable_fails_with_its_name_and_no_output() -> None:
    result = _run("show", env={"KVCACHE_HTTP_PORT": "9000"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert "KVCACHE_HTTP_PORT" in result.stderr
    assert "KVCACHE_HTTP__PORT" in result.stderr  # the suggestion


def test_schema_describes_the_file() -> None:
    result = _run("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    config = schema["$defs"]["Config"]
    assert {"hashing", "index", "http", "logging", "discovery"} <= set(config["properties"])
