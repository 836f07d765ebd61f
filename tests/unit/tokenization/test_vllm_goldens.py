"""kvcache's token ids equal real vLLM 0.32's for every case in vllm_goldens.json.

The goldens were produced by vLLM's own renderer (tests/data/tokenization/vllm_goldens.py); each
case is replayed with the prefix store cold and then warm, so reuse is checked against vLLM too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import json
from typing import Any

import models

from kvcache.tokenization import TextTokenizer, prepare_request

GOLDENS = Path(__file__).parents[2] / "data" / "tokenization" / "vllm_goldens.json"
CASES: list[dict[str, Any]] = json.loads(GOLDENS.read_text(encoding="utf-8"))["cases"]


@pytest.fixture
def chatml_dir() -> Path:
    return models.chatml_dir()


@pytest.fixture
def text() -> TextTokenizer:
    return models.text_tokenizer()


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['kind']}" for i, c in enumerate(CASES)])
def test_matches_vllm(case: dict[str, Any], text: TextTokenizer) -> None:
    body = {"model": "m", **case["body"]}
    for _ in range(2):  # second pass runs with the prefix store warm
        (prompt,) = prepare_request(body, text)
        assert prompt.token_ids == case["token_ids"]


def test_goldens_cover_both_special_token_defaults() -> None:
    first = {json.dumps(c["body"]): c["token_ids"] for c in CASES}
    completion = first[json.dumps({"prompt": "Hello, world!"})]
    bare = first[json.dumps({"prompt": "Hello, world!", "add_special_tokens": False})]
    assert completion == [0, *bare]  # completions add BOS by default, chats do not
