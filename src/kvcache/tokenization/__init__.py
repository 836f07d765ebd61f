"""The read path from text: prompts and chats -> the token ids vLLM computes -> pod scores.

Needs the optional ``hf`` extra (tokenizers, transformers, jinja2): ``pip install 'kvcache[hf]'``.
Importing this package does not import them; the first tokenizer load does, with a clear error
if they are missing.
"""

from __future__ import annotations

from kvcache.tokenization.chat import ChatRequest, detect_content_format, render_chat
from kvcache.tokenization.errors import (
    ChatTemplateError,
    MissingDependencyError,
    PoolOverloadedError,
    TokenizationError,
    TokenizationTimeoutError,
    TokenizerNotFoundError,
    UnsupportedRequestError,
)
from kvcache.tokenization.loader import (
    LoadedTokenizer,
    TokenizerRegistry,
    TokenizerResolver,
    TokenizerSource,
    discover_models,
    load_tokenizer,
)
from kvcache.tokenization.pool import TokenizationPool
from kvcache.tokenization.prefix_store import PrefixStore
from kvcache.tokenization.requests import (
    chat_request,
    prepare_chat,
    prepare_completion,
    prepare_request,
    request_kind,
)
from kvcache.tokenization.text import (
    TextTokenizer,
    TokenizedPrompt,
    Truncation,
    mm_items_from_features,
)

__all__ = [
    "ChatRequest",
    "ChatTemplateError",
    "LoadedTokenizer",
    "MissingDependencyError",
    "PoolOverloadedError",
    "PrefixStore",
    "TextTokenizer",
    "TokenizationError",
    "TokenizationPool",
    "TokenizationTimeoutError",
    "TokenizedPrompt",
    "TokenizerNotFoundError",
    "TokenizerRegistry",
    "TokenizerResolver",
    "TokenizerSource",
    "Truncation",
    "UnsupportedRequestError",
    "chat_request",
    "detect_content_format",
    "discover_models",
    "load_tokenizer",
    "mm_items_from_features",
    "prepare_chat",
    "prepare_completion",
    "prepare_request",
    "render_chat",
    "request_kind",
]
