"""OpenAI-shaped request bodies -> the token ids and extra keys vLLM would hash.

``/v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of
such lists; ``add_special_tokens`` defaults to true. ``/v1/chat/completions``: ``messages`` plus
``tools``, ``tool_choice``, ``documents``, ``chat_template``, ``chat_template_kwargs``,
``add_generation_prompt`` (true), ``continue_final_message`` (false), ``reasoning_effort``,
``add_special_tokens`` (false). Both: ``truncate_prompt_tokens``, ``truncation_side``,
``max_tokens`` / ``max_completion_tokens`` (only for ``truncate_prompt_tokens: -1``),
``cache_salt``, and the model, which may name a LoRA adapter. Optional ``mm_features`` (kvcache's
extension, the shape of upstream's sidecar) gives multimodal hashes and placeholder ranges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kvcache.tokenization.chat import ChatRequest
from kvcache.tokenization.errors import TokenizationError
from kvcache.tokenization.text import (
    TextTokenizer,
    TokenizedPrompt,
    Truncation,
    mm_items_from_features,
)

RequestKind = Literal["completion", "chat"]


def request_kind(body: Mapping[str, Any]) -> RequestKind:
    """ "chat" for bodies with ``messages``, "completion" for bodies with ``prompt``."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    raise TokenizationError("request body has neither 'messages' nor 'prompt'")


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizationError(f"{name} must be a boolean, got {value!r}")
    return value


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise TokenizationError(f"{name} must be a string, got {value!r}")
    return value


def _truncation(body: Mapping[str, Any], output_field: str) -> Truncation:
    tokens = body.get("truncate_prompt_tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)):
        raise TokenizationError(f"truncate_prompt_tokens must be an integer, got {tokens!r}")
    side = body.get("truncation_side")
    output = body.get(output_field)
    if output is None and output_field == "max_completion_tokens":
        output = body.get("max_tokens")
    if output is not None and (not isinstance(output, int) or isinstance(output, bool)):
        raise TokenizationError(f"{output_field} must be an integer, got {output!r}")
    return Truncation(tokens=tokens, side=side, max_output_tokens=output or 0)


def _model(body: Mapping[str, Any], default_model: str | None) -> str:
    model = body.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise TokenizationError("the request needs a 'model' (or a default model)")
    return model


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def _prompts(prompt: object) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        if not prompt:
            raise TokenizationError("prompt must not be empty")
        if _is_token_list(prompt):
            return [list(prompt)]
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(_is_token_list(item) for item in prompt):
            return [list(item) for item in prompt]
    raise TokenizationError(
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
    )


def prepare_completion(
    body: Mapping[str, Any], text: TextTokenizer, *, default_model: str | None = None
) -> list[TokenizedPrompt]:
    """One TokenizedPrompt per prompt of a /v1/completions body."""
    model = _model(body, default_model)
    add_special = _flag(body, "add_special_tokens", True)
    truncation = _truncation(body, "max_tokens")
    lora, extras = _extras(body, text, model)
    base = text.base_model(model)
    results = []
    for prompt in _prompts(body.get("prompt")):
        if isinstance(prompt, str):
            ids = text.tokenize_completion(
                prompt, model, add_special_tokens=add_special, truncation=truncation
            )
        else:
            ids = text.encode_ids(prompt, truncation)
        results.append(TokenizedPrompt(ids, base, extras, lora))
    return results


def chat_request(body: Mapping[str, Any], *, trust_chat_template: bool = True) -> ChatRequest:
    """The rendering inputs of a /v1/chat/completions body (vLLM's defaults filled in)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise TokenizationError("messages must be a list of objects")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)
    ):
        raise TokenizationError("tools must be a list of objects")
    if tools == []:
        raise TokenizationError("tools must not be an empty list (vLLM refuses it)")
    documents = body.get("documents")
    if documents is not None and not isinstance(documents, list):
        raise TokenizationError("documents must be a list of objects")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TokenizationError("chat_template_kwargs must be an object")
    template = _optional_str(body, "chat_template")
    if template is not None and not trust_chat_template:
        raise TokenizationError(
            "chat_template in the request is refused (the engines need "
            "--trust-request-chat-template; set tokenization.trust_request_chat_template)"
        )
    return ChatRequest(
        messages=messages,
        tools=tools,
        documents=documents,
        chat_template=template,
        add_generation_prompt=_flag(body, "add_generation_prompt", True),
        continue_final_message=_flag(body, "continue_final_message", False),
        chat_template_kwargs=kwargs,
        reasoning_effort=_optional_str(body, "reasoning_effort"),
    )


def prepare_chat(
    body: Mapping[str, Any], text: TextTokenizer, *, default_model: str | None = None
) -> TokenizedPrompt:
    """The TokenizedPrompt of a /v1/chat/completions body."""
    model = _model(body, default_model)
    request = chat_request(body, trust_chat_template=text.config.trust_request_chat_template)
    ids = text.tokenize_chat(
        request,
        model,
        add_special_tokens=_flag(body, "add_special_tokens", False),
        truncation=_truncation(body, "max_completion_tokens"),
    )
    lora, extras = _extras(body, text, model)
    return TokenizedPrompt(ids, text.base_model(model), extras, lora)


def prepare_request(
    body: Mapping[str, Any],
    text: TextTokenizer,
    *,
    kind: RequestKind | None = None,
    default_model: str | None = None,
) -> list[TokenizedPrompt]:
    """Completions or chat body (detected from its fields unless ``kind`` is given)."""
    if not isinstance(body, Mapping):
        raise TokenizationError("the request body must be a JSON object")
    if (kind or request_kind(body)) == "chat":
        return [prepare_chat(body, text, default_model=default_model)]
    return prepare_completion(body, text, default_model=default_model)


def _extras(body: Mapping[str, Any], text: TextTokenizer, model: str) -> tuple[Any, Any]:
    features = body.get("mm_features")
    items: Sequence[Any] = ()
    if features is not None:
        if not isinstance(features, Mapping):
            raise TokenizationError("mm_features must be an object")
        items = mm_items_from_features(features)
    return text.extras(model, cache_salt=_optional_str(body, "cache_salt"), mm_items=items)
