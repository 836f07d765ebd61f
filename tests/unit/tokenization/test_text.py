"""Completions, truncation, token-id prompts, LoRA and MM extras, bodies, the Indexer facade."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import asyncio
import threading

import models

from kvcache import Indexer, MMItem
from kvcache.config import Config, TokenizationConfig
from kvcache.tokenization import (
    PoolOverloadedError,
    TextTokenizer,
    TokenizationError,
    TokenizationPool,
    TokenizationTimeoutError,
    Truncation,
    prepare_request,
)

PROMPT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def chatml_dir() -> Path:
    return models.chatml_dir()


@pytest.fixture
def text() -> TextTokenizer:
    return models.text_tokenizer()


def test_completion_matches_transformers_call(text: TextTokenizer) -> None:
    hf = text.tokenizer("m").hf
    for add in (True, False):
        expected = hf(PROMPT, add_special_tokens=add)["input_ids"]
        assert text.tokenize_completion(PROMPT, "m", add_special_tokens=add) == expected


@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("limit", [1, 2, 7, 50, 4000])
def test_tokenizer_truncation_matches_transformers(
    text: TextTokenizer, add: bool, limit: int
) -> None:
    hf = text.tokenizer("m").hf
    expected = hf(PROMPT, add_special_tokens=add, truncation=True, max_length=limit)["input_ids"]
    got = text.tokenize_completion(
        PROMPT, "m", add_special_tokens=add, truncation=Truncation(tokens=limit)
    )
    assert got == expected


def test_explicit_side_slices_after_encoding(text: TextTokenizer) -> None:
    full = text.tokenize_completion(PROMPT, "m")
    assert text.tokenize_completion(PROMPT, "m", truncation=Truncation(5, "left")) == full[-5:]
    assert text.tokenize_completion(PROMPT, "m", truncation=Truncation(5, "right")) == full[:5]
    assert text.tokenize_completion(PROMPT, "m", truncation=Truncation(0)) == []


def test_minus_one_and_length_limits(chatml_dir: Path) -> None:
    small = TextTokenizer(
        TokenizationConfig(tokenizers={"m": str(chatml_dir)}, models_dir=None, max_model_len=8)
    )
    assert len(small.tokenize_completion(PROMPT, "m", truncation=Truncation(-1))) == 8
    assert (
        len(small.tokenize_completion(PROMPT, "m", truncation=Truncation(-1, max_output_tokens=3)))
        == 7
    )
    with pytest.raises(TokenizationError, match="max_model_len"):
        small.tokenize_completion(PROMPT, "m")
    with pytest.raises(TokenizationError, match="greater than"):
        small.tokenize_completion(PROMPT, "m", truncation=Truncation(9))
    unbounded = TextTokenizer(
        TokenizationConfig(tokenizers={"m": str(chatml_dir)}, models_dir=None)
    )
    with pytest.raises(TokenizationError, match="max_model_len"):
        unbounded.tokenize_completion(PROMPT, "m", truncation=Truncation(-1))


def test_bodies_of_every_prompt_shape(text: TextTokenizer) -> None:
    many = prepare_request({"model": "m", "prompt": ["a b", "c d"]}, text)
    assert [p.token_ids for p in many] == [
        text.tokenize_completion("a b", "m"),
        text.tokenize_completion("c d", "m"),
    ]
    ids = prepare_request({"model": "m", "prompt": [[1, 2, 3], [4]]}, text)
    assert [p.token_ids for p in ids] == [[1, 2, 3], [4]]
    with pytest.raises(TokenizationError, match="prompt must be"):
        prepare_request({"model": "m", "prompt": [1, "x"]}, text)
    with pytest.raises(TokenizationError, match="neither"):
        prepare_request({"model": "m"}, text)
    with pytest.raises(TokenizationError, match="model"):
        prepare_request({"prompt": "x"}, text)


def test_lora_adapter_uses_base_tokenizer_and_adapter_keys(chatml_dir: Path) -> None:
    config = Config.from_mapping(
        {
            "tokenization": {
                "tokenizers": {"base": str(chatml_dir)},
                "models_dir": None,
                "lora_adapters": {"sql": {"base_model": "base", "path": "/adapters/sql"}},
            }
        }
    )
    indexer = Indexer(config)
    ids = indexer.text.tokenize_completion(PROMPT, "base")
    (prompt,) = prepare_request({"model": "sql", "prompt": PROMPT}, indexer.text)
    assert prompt.token_ids == ids and prompt.lora == "sql" and prompt.model == "base"
    assert prompt.extras is not None and prompt.extras.lora_path == "/adapters/sql"
    adapter_keys = indexer.block_keys(ids, "base", lora="sql", extra=prompt.extras)
    assert adapter_keys != indexer.block_keys(ids, "base")
    # Scores equal score_tokens over the same tokens and adapter keys.
    assert indexer.score(PROMPT, "sql") == indexer.score_tokens(
        ids, "base", lora="sql", extra=prompt.extras
    )


def test_score_methods_equal_score_tokens(chatml_dir: Path) -> None:
    from kvcache.blocks import PodEntry

    config = Config.from_mapping(
        {"tokenization": {"tokenizers": {"m": str(chatml_dir)}, "models_dir": None}}
    )
    indexer = Indexer(config)
    messages = [{"role": "user", "content": PROMPT}]
    chat_ids = indexer.text.tokenize_chat(
        __import__("kvcache.tokenization", fromlist=["ChatRequest"]).ChatRequest(messages=messages),
        "m",
    )
    keys = indexer.block_keys(chat_ids, "m")
    indexer.index.add(keys, keys, [PodEntry("pod-a", "gpu")])
    assert (
        indexer.score_chat(messages, "m")
        == indexer.score_tokens(chat_ids, "m")
        == {"pod-a": len(keys)}
    )
    assert indexer.score_request({"model": "m", "messages": messages}) == {"pod-a": len(keys)}
    assert indexer.score(PROMPT, "m") == {}  # BOS shifts the completion's blocks
    salted = indexer.score_chat(messages, "m", cache_salt="s")
    assert salted == {}


def test_mm_features_become_extras(text: TextTokenizer) -> None:
    body = {
        "model": "m",
        "prompt": list(range(64)),
        "mm_features": {
            "mm_hashes": {"image": ["h2", "h1"]},
            "mm_placeholders": {"image": [{"offset": 30, "length": 4}, {"offset": 3, "length": 8}]},
        },
    }
    (prompt,) = prepare_request(body, text)
    assert prompt.extras is not None
    assert prompt.extras.mm_items == (MMItem("h1", 3, 8), MMItem("h2", 30, 4))
    bad = {**body, "mm_features": {"mm_hashes": {"image": ["x"]}, "mm_placeholders": {}}}
    with pytest.raises(TokenizationError, match="placeholder"):
        prepare_request(bad, text)


def test_pool_deadline_overload_and_async() -> None:
    pool = TokenizationPool(1, queue_size=1, timeout=0.2)
    release = threading.Event()
    with pytest.raises(TokenizationTimeoutError):
        pool.run(release.wait, 5)
    with pytest.raises(PoolOverloadedError):
        pool.run(len, "x")  # the timed-out call still holds the only slot
    release.set()
    pool.close()
    pool = TokenizationPool(2, timeout=5)
    assert asyncio.run(pool.arun(len, "abc")) == 3
    assert pool.run(sum, [1, 2]) == 3
    pool.close()
