"""Chat rendering as vLLM's HF renderer does it, with transformers' own template machinery.

vLLM (``vllm/renderers/hf.py`` and ``chat_utils.py``, 0.32) turns OpenAI messages into the
conversation a chat template sees, then calls ``tokenizer.apply_chat_template(conversation,
tools=..., chat_template=..., tokenize=False, **kwargs)``; the rendered text is tokenized with
``add_special_tokens=False`` unless the request says otherwise. This module reproduces the
message normalisation and kwarg selection (text content only) and leaves the rendering itself to
transformers, whose Jinja environment is an ``ImmutableSandboxedEnvironment``.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from kvcache.tokenization.errors import (
    ChatTemplateError,
    MissingDependencyError,
    TokenizationError,
    UnsupportedRequestError,
)
from kvcache.tokenization.loader import LoadedTokenizer

ContentFormat = Literal["string", "openai"]

# Part types vLLM treats as text, and the media types whose tokens only the engine's
# multimodal processor can produce (placeholder expansion depends on the media itself).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
_MEDIA_PARTS = frozenset(
    {
        "image_url",
        "input_image",
        "image_pil",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
    }
)
# Keys of OpenAI content parts; others are passed through to the template (vLLM 0.32's set).
_KNOWN_PART_FIELDS = frozenset(
    {
        "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil",
        "image_url", "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text",
        "thinking", "type", "uuid", "video_embeds", "video_url",
    }
)  # fmt: skip
_BILLING_HEADER = "x-anthropic-billing-header"
_UNSET = (None, "auto")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What a chat completion needs for rendering (the OpenAI fields that reach the template)."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] | None = None
    documents: Sequence[Mapping[str, str]] | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Mapping[str, Any] | None = None
    reasoning_effort: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def _merge(
    defaults: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """vLLM's ``merge_kwargs``: overrides win unless None or "auto"."""
    merged = dict(defaults or {})
    for key, value in (overrides or {}).items():
        if value is None or (isinstance(value, str) and value == "auto"):
            continue
        merged[key] = value
    return merged


# ------------------------------------------------------------------------------------------
# Content format detection (does the template loop over message content parts?)
# ------------------------------------------------------------------------------------------


def _jinja_environment() -> Any:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        raise MissingDependencyError("transformers") from None
    return _compile_jinja_template


def _names_bound_to(root: Any, name: str, nodes: Any) -> list[str]:
    """``name`` and every variable assigned from it (or from its items, filters, slices)."""
    found = [name]
    pending = [name]
    while pending:
        current = pending.pop()
        for assign in root.find_all(nodes.Assign):
            if _reads(assign.node, current, None, nodes) and isinstance(assign.target, nodes.Name):
                target = assign.target.name
                if target not in found:
                    found.append(target)
                    pending.append(target)
    return found


def _reads(node: Any, var: str, key: str | None, nodes: Any) -> bool:
    """Whether ``node`` reads ``var`` (or ``var.key`` / ``var['key']``), maybe filtered/sliced."""
    if isinstance(node, nodes.Filter | nodes.Test):
        return node.node is not None and _reads(node.node, var, key, nodes)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _reads(node.node, var, key, nodes)
    if key is None:
        return isinstance(node, nodes.Name) and node.name == var and node.ctx == "load"
    if isinstance(node, nodes.Getitem):
        return (
            _reads(node.node, var, None, nodes)
            and isinstance(node.arg, nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, nodes.Getattr):
        return _reads(node.node, var, None, nodes) and node.attr == key
    return False


def _content_loops(root: Any, nodes: Any) -> Iterator[Any]:
    """For-loops over a message's content (directly, through a macro parameter, or ``content``)."""
    message_vars = []
    for messages_var in _names_bound_to(root, "messages", nodes):
        for loop in root.find_all(nodes.For):
            if _reads(loop.iter, messages_var, None, nodes) and isinstance(loop.target, nodes.Name):
                message_vars.append(loop.target.name)
    in_macro: set[int] = set()
    macro_params: dict[int, set[str]] = {}
    for macro in root.find_all(nodes.Macro):
        names = {arg.name for arg in macro.args}
        params: set[str] = set()
        for call in root.find_all(nodes.Call):
            if not (isinstance(call.node, nodes.Name) and call.node.name == macro.name):
                continue
            for index, arg in enumerate(call.args):
                if index < len(macro.args) and any(
                    _reads(arg, var, "content", nodes) for var in message_vars
                ):
                    params.add(macro.args[index].name)
            for keyword in call.kwargs:
                if keyword.key in names and any(
                    _reads(keyword.value, var, "content", nodes) for var in message_vars
                ):
                    params.add(keyword.key)
        for loop in macro.find_all(nodes.For):
            in_macro.add(id(loop))
            if params:
                macro_params[id(loop)] = params
    for loop in root.find_all(nodes.For):
        if any(_reads(loop.iter, var, "content", nodes) for var in message_vars):
            yield loop
        elif isinstance(loop.iter, nodes.Name):
            name = loop.iter.name
            via_macro = name in macro_params.get(id(loop), ())
            if via_macro or (id(loop) not in in_macro and name == "content"):
                yield loop


@lru_cache(maxsize=64)
def detect_content_format(template: str) -> ContentFormat:
    """ "openai" if the template iterates over content parts, else "string" (vLLM's rule)."""
    from jinja2 import nodes

    compile_template = _jinja_environment()
    try:
        environment = compile_template(template).environment
        root = environment.parse(template)
    except Exception:
        return "string"
    try:
        next(_content_loops(root, nodes))
    except StopIteration:
        return "string"
    except Exception:
        return "string"
    return "openai"


@lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """Undeclared variables of the template: the kwargs it can see."""
    from jinja2 import meta

    compile_template = _jinja_environment()
    try:
        environment = compile_template(template).environment
        return frozenset(meta.find_undeclared_variables(environment.parse(template)))
    except Exception as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


@lru_cache(maxsize=1)
def _hf_render_parameters() -> frozenset[str]:
    """Parameters of transformers' ``apply_chat_template`` (vLLM always lets them through)."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        raise MissingDependencyError("transformers") from None
    signature = inspect.signature(PreTrainedTokenizerBase.apply_chat_template)
    return frozenset(
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    )


# ------------------------------------------------------------------------------------------
# Messages -> conversation
# ------------------------------------------------------------------------------------------


def _part_text(part: Mapping[str, Any]) -> str | None:
    kind = part.get("type")
    if not isinstance(kind, str):
        raise TokenizationError(f"content part without a string 'type': {part!r}")
    if kind in _TEXT_PARTS:
        key = kind if kind in ("refusal", "thinking") else "text"
        text = part.get(key)
        return text if isinstance(text, str) else None
    if kind in _MEDIA_PARTS:
        raise UnsupportedRequestError(
            f"content part {kind!r}: its tokens depend on the engine's multimodal processor; "
            "tokenize with the engine (or vLLM's /render) and score the token ids with "
            "mm_items instead"
        )
    raise TokenizationError(f"unsupported chat content part type: {kind!r}")


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        text = (
            part
            if isinstance(part, str)
            else (
                part.get("text")
                if isinstance(part, Mapping) and part.get("type") == "text"
                else None
            )
        )
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _content(role: str, content: Any, content_format: ContentFormat) -> Any:
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = list(content)
    else:
        raise TokenizationError(f"message content must be a string or a list, got {content!r}")
    if role == "system":
        parts = _strip_billing_header(parts)
    pieces: list[Any] = []
    for part in parts:
        if isinstance(part, str):
            pieces.append({"type": "text", "text": part} if content_format == "openai" else part)
            continue
        if not isinstance(part, Mapping):
            raise TokenizationError(f"content part must be an object or a string: {part!r}")
        if part.get("type") == "tool_reference":
            name = part.get("name")
            if content_format == "openai":
                pieces.append({"type": "tool_reference", "name": name})
            elif isinstance(name, str):
                pieces.append(name)
            continue
        text = _part_text(part)
        if text is None:
            continue  # vLLM skips text parts without text
        if content_format == "openai":
            extra = {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}
            pieces.append({"type": "text", "text": text, **extra})
        else:
            pieces.append(text)
    if content_format == "openai":
        return pieces
    return "\n".join(pieces)


def _ordered(source: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``source``'s keys in vLLM's schema order (pydantic rebuilds dicts so), others after."""
    result = {key: source[key] for key in order if key in source}
    result.update((key, value) for key, value in source.items() if key not in result)
    return result


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools as vLLM's ``ChatCompletionToolsParam.model_dump()`` hands them to templates."""
    out = []
    for tool in tools:
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TokenizationError(f"each tool needs a function with a name: {tool!r}")
        dumped = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        dumped.update((k, v) for k, v in function.items() if k not in dumped)
        out.append({"type": tool.get("type", "function"), "function": dumped})
    return out


def _tool_calls(calls: Sequence[Any]) -> list[Any]:
    """Tool calls in the key order vLLM's request model gives them (id, function, type)."""
    out: list[Any] = []
    for call in calls:
        if not isinstance(call, Mapping):
            out.append(call)
            continue
        ordered = _ordered(call, ("id", "function", "type"))
        if isinstance(ordered.get("function"), Mapping):
            ordered["function"] = _ordered(ordered["function"], ("arguments", "name"))
        out.append(ordered)
    return out


def _tool_call_arguments(message: dict[str, Any]) -> None:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return
    if not calls:
        message.pop("tool_calls", None)
        return
    for call in calls:
        if not isinstance(call, dict):
            raise TokenizationError("assistant tool_calls entries must be objects")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise TokenizationError("only tool_calls of type 'function' are supported")
        arguments = function.get("arguments")
        if not arguments:
            function["arguments"] = {}
            continue
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
        else:
            parsed = arguments
        function["arguments"] = parsed if isinstance(parsed, dict) else {}


def conversation_from_messages(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The conversation vLLM passes to the template (text content only)."""
    conversation: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizationError(f"each message needs a string 'role': {message!r}")
        role: str = message["role"]
        result: dict[str, Any] = {
            "role": role,
            "content": _content(role, message.get("content"), content_format),
        }
        if role == "assistant":
            if message.get("tool_calls") is not None:
                result["tool_calls"] = _tool_calls(copy.deepcopy(list(message["tool_calls"])))
            reasoning = message.get("reasoning")
            if reasoning is not None:
                result["reasoning"] = reasoning
                result["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                result["tool_call_id"] = message["tool_call_id"]
            content = result["content"]
            if isinstance(content, list) and all(
                isinstance(item, dict) and item.get("type") == "text" for item in content
            ):
                texts = [item.get("text", "") for item in content]
                result["content"] = "\n".join(texts) if texts else ""
        if isinstance(message.get("name"), str):
            result["name"] = message["name"]
        if isinstance(message.get("task"), str):
            result["task"] = message["task"]
        if role == "developer":
            result["tools"] = message.get("tools")
        conversation.append(result)
    for message in conversation:
        if message["role"] == "assistant" and "tool_calls" in message:
            _tool_call_arguments(message)
    return conversation


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Templates without a developer role see it as system, merged first (vLLM's fallback)."""
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            converted.append({**message, "role": "system"})
            converted[-1].pop("tools", None)
        else:
            converted.append(message)
    systems: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for index, message in enumerate(converted):
        if message["role"] != "system":
            others.append(message)
            continue
        if index > 0 or systems:
            merge = True
        content = message.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                part["text"] if isinstance(part, dict) else part
                for part in content
                if isinstance(part, str) or (isinstance(part, dict) and "text" in part)
            )
        if content:
            systems.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(systems)}, *others]


def template_kwargs(
    request: ChatRequest, server_defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The kwargs vLLM hands ``apply_chat_template`` (before filtering by the template)."""
    user = dict(request.chat_template_kwargs or {})
    for name in ("chat_template", "tokenize"):
        if name in user:
            raise TokenizationError(f"chat_template_kwargs may not set {name!r}")
    extra: dict[str, Any] = {
        "add_generation_prompt": request.add_generation_prompt,
        "continue_final_message": request.continue_final_message,
        "documents": list(request.documents) if request.documents is not None else None,
        "reasoning_effort": request.reasoning_effort,
    }
    if request.reasoning_effort is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = request.reasoning_effort != "none"
    merged = _merge(user, extra)
    tools = normalize_tools(request.tools) if request.tools is not None else None
    defaults = _merge(server_defaults, {"tools": tools, "tokenize": False})
    return _merge(defaults, merged)


def render_chat(
    tokenizer: LoadedTokenizer,
    request: ChatRequest,
    *,
    server_chat_template: str | None = None,
    server_defaults: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text vLLM renders for this chat request."""
    if request.add_generation_prompt and request.continue_final_message:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt cannot both be true"
        )
    if not request.messages:
        raise ChatTemplateError("cannot render an empty conversation")
    kwargs = template_kwargs(request, server_defaults)
    tools = kwargs.pop("tools", None)
    kwargs.pop("tokenize", None)
    template = tokenizer.resolve_chat_template(request.chat_template or server_chat_template, tools)
    conversation = conversation_from_messages(request.messages, detect_content_format(template))
    if any(m["role"] == "developer" for m in conversation) and not (
        '"developer"' in template or "'developer'" in template
    ):
        conversation = _developer_to_system(conversation)
    accepted = (template_variables(template) | _hf_render_parameters()) - {
        "chat_template",
        "tokenize",
    }
    kwargs = {key: value for key, value in kwargs.items() if key in accepted}
    kwargs["return_dict"] = False
    try:
        if tokenizer.hf is not None:
            rendered = tokenizer.hf.apply_chat_template(
                conversation, tools=tools, chat_template=template, tokenize=False, **kwargs
            )
        else:
            rendered = _render_without_tokenizer(tokenizer, conversation, tools, template, kwargs)
    except TokenizationError:
        raise
    except Exception as exc:
        raise ChatTemplateError(f"chat template rejected the request: {exc}") from None
    if not isinstance(rendered, str):
        raise ChatTemplateError(f"chat template rendered {type(rendered).__name__}, not text")
    return rendered


def _render_without_tokenizer(
    tokenizer: LoadedTokenizer,
    conversation: list[dict[str, Any]],
    tools: Any,
    template: str,
    kwargs: dict[str, Any],
) -> str:
    """transformers' renderer for a bare tokenizer.json (no transformers tokenizer object)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise MissingDependencyError("transformers") from None
    kwargs = dict(kwargs)
    kwargs.pop("return_dict", None)
    for name in ("padding", "truncation", "max_length", "return_tensors", "tokenizer_kwargs"):
        kwargs.pop(name, None)
    documents = kwargs.pop("documents", None)
    add_generation_prompt = bool(kwargs.pop("add_generation_prompt", False))
    continue_final_message = kwargs.pop("continue_final_message", False)
    kwargs.pop("return_assistant_tokens_mask", None)
    conversation = [{k: v for k, v in m.items() if v is not None} for m in conversation]
    rendered: Any = render_jinja_template(
        conversations=[conversation],
        tools=tools,
        documents=documents,
        chat_template=template,
        continue_final_message=continue_final_message,
        add_generation_prompt=add_generation_prompt,
        **{**tokenizer.special_tokens_map, **kwargs},
    )
    # transformers 5 returns (rendered texts, generation spans).
    result: str = rendered[0][0]
    return result
