"""`kvcache keys`: the debugging tool, run as a real subprocess through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"
KVCACHE = [
    sys.executable,
    "-c",
    "import sys; from kvcache.service.cli import main; sys.exit(main())",
]


def _run(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVCACHE, "keys", *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def _vector(case_id: str) -> dict[str, object]:
    cases = json.loads((DATA / "block_hashes.json").read_text())["cases"]
    found: dict[str, object] = next(case for case in cases if case["id"] == case_id)
    return found


@pytest.mark.parametrize(
    ("case_id", "extra_args"),
    [
        ("default_seed_sha256_bs16", []),
        ("default_seed_sha256_cbor_bs16", ["--scheme", "sha256_cbor"]),
        ("seed12345_sha256_cbor_bs64", ["--scheme", "sha256_cbor", "--seed", "12345"]),
        ("seed0_xxhash_cbor_bs16", ["--scheme", "xxhash_cbor", "--seed", "0"]),
        ("cache_salt_tagged_sha256_cbor_seed0", ["--scheme", "sha256_cbor", "--seed", "0"]),
        ("lora_name_sha256_cbor_seed0", ["--scheme", "sha256_cbor", "--seed", "0"]),
        ("lora_tagged_sha256_cbor_seed0", ["--scheme", "sha256_cbor", "--seed", "0"]),
    ],
)
def test_keys_match_vllm_vectors(case_id: str, extra_args: list[str]) -> None:
    case = _vector(case_id)
    inputs = case["inputs"]
    assert isinstance(inputs, dict)
    args = [*extra_args, "--block-size", str(inputs["block_size"])]
    if inputs.get("cache_salt"):
        args += ["--cache-salt", inputs["cache_salt"]]
    if inputs.get("lora"):
        args += ["--lora-name", inputs["lora"]["name"], "--lora-path", inputs["lora"]["path"]]
    if inputs.get("extra_key_era") == "name":
        args += ["--vllm-version", "0.18"]
    result = _run(json.dumps(inputs["token_ids"]), *args)
    assert result.returncode == 0, result.stderr
    blocks = case["blocks"]
    assert isinstance(blocks, list)
    assert json.loads(result.stdout) == [block["u64"] for block in blocks]


def test_llmd_scheme_matches_fnv_vector() -> None:
    vectors = json.loads((DATA / "request_keys_fnv64a.json").read_text())
    vector = vectors["computed_request_key_vectors"][1]
    result = _run(
        json.dumps(vector["tokens"]),
        "--scheme",
        "llmd-fnv64a",
        "--seed",
        vector["hash_seed"],
        "--model",
        vector["model_name"],
        "--block-size",
        str(vector["block_size_tokens"]),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == vector["request_keys"]


def test_short_prompt_prints_empty_array() -> None:
    result = _run("[1, 2, 3]")
    assert result.returncode == 0
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        ("[1, 2,", [], "not valid JSON"),
        ('{"a": 1}', [], "expected a JSON array"),
        ("[1, -2]", [], "index 1 is negative"),
        ('[1, "x"]', [], "index 1 is not an integer"),
        ("[1]", ["--scheme", "md5"], "md5"),
        ("[1]", ["--block-size", "0"], "block"),
        ("[1]", ["--vllm-version", "banana"], "banana"),
        ("[1]", ["--block-size", "x"], "invalid int value"),
    ],
)
def test_errors_are_one_clear_line_and_nonzero(stdin: str, args: list[str], message: str) -> None:
    result = _run(stdin, *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
