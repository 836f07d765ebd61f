"""Chat rendering details that vLLM applies before the template sees the messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from typing import Any

import models

from kvcache.tokenization import (
    ChatRequest,
    ChatTemplateError,
    TextTokenizer,
    TokenizationError,
    UnsupportedRequestError,
    detect_content_format,
)
from kvcache.tokenization.chat import conversation_from_messages, template_kwargs


@pytest.fixture
def chatml_dir() -> Path:
    return models.chatml_dir()


@pytest.fixture
def text() -> TextTokenizer:
    return models.text_tokenizer()


def test_content_format_detection() -> None:
    assert detect_content_format(models.CHATML_TEMPLATE) == "openai"
    assert detect_content_format(models.STRING_TEMPLATE) == "string"
    macro = (
        "{% macro show(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
        "{% for m in messages %}{{ show(m.content) }}{% endfor %}"
    )
    assert detect_content_format(macro) == "openai"


def test_string_format_joins_text_parts_with_newlines() -> None:
    parts = [{"type": "text", "text": "a"}, "b", {"type": "refusal", "refusal": "c"}]
    (message,) = conversation_from_messages([{"role": "user", "content": parts}], "string")
    assert message["content"] == "a\nb\nc"
    (wrapped,) = conversation_from_messages([{"role": "user", "content": parts}], "openai")
    assert wrapped["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
        {"type": "text", "text": "c"},
    ]


def test_media_parts_are_refused_clearly() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(UnsupportedRequestError, match="mm_items"):
        conversation_from_messages([{"role": "user", "content": [image]}], "openai")


def test_tool_call_arguments_become_objects() -> None:
    calls: list[dict[str, Any]] = [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}
    ]
    (message,) = conversation_from_messages(
        [{"role": "assistant", "content": None, "tool_calls": calls}], "string"
    )
    assert message["tool_calls"][0]["function"] == {"arguments": {}, "name": "f"}
    assert calls[0]["function"]["arguments"] == "not json"  # the caller's body is not mutated


def test_kwargs_precedence_follows_vllm() -> None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "x"}],
        chat_template_kwargs={"add_generation_prompt": False, "enable_thinking": True},
        reasoning_effort="none",
    )
    kwargs = template_kwargs(request, {"enable_thinking": False, "custom": 1})
    # The request's own fields override its chat_template_kwargs; both override server defaults.
    assert kwargs["add_generation_prompt"] is True
    assert kwargs["enable_thinking"] is True
    assert kwargs["custom"] == 1
    with pytest.raises(TokenizationError, match="tokenize"):
        template_kwargs(ChatRequest(messages=[], chat_template_kwargs={"tokenize": True}))


def test_enable_thinking_reaches_the_template(text: TextTokenizer) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "q"}]
    on = text.render_chat(ChatRequest(messages=messages), "m")
    off = text.render_chat(
        ChatRequest(messages=messages, chat_template_kwargs={"enable_thinking": False}), "m"
    )
    assert off == on + "<think>\n\n</think>\n\n"


def test_template_is_sandboxed(text: TextTokenizer) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match=r"unsafe|SecurityError|access"):
        text.render_chat(
            ChatRequest(messages=[{"role": "user", "content": "x"}], chat_template=evil), "m"
        )


def test_conflicting_generation_flags(text: TextTokenizer) -> None:
    request = ChatRequest(messages=[{"role": "user", "content": "x"}], continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="cannot both"):
        text.render_chat(request, "m")
