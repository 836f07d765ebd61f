"""Text -> the token ids vLLM computes: completions, chats, truncation, LoRA and MM extras.

vLLM 0.32 (``renderers/params.py``, ``renderers/base.py``): a completion prompt is encoded with
``add_special_tokens=True`` unless the request says false; a chat is rendered to text and
encoded with ``add_special_tokens=False`` unless the request says true. ``truncate_prompt_tokens``
(N) without ``truncation_side`` makes the tokenizer truncate (left side: the generate runner's
default), which keeps the special tokens it adds; with ``truncation_side`` the full encoding is
sliced afterwards. N = -1 means the model length (minus one when output tokens are requested).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvcache.config import TokenizationConfig
from kvcache.hashing import MMItem, RequestExtras
from kvcache.tokenization.chat import ChatRequest, render_chat
from kvcache.tokenization.errors import TokenizationError
from kvcache.tokenization.loader import LoadedTokenizer, TokenizerRegistry, TokenizerResolver
from kvcache.tokenization.pool import TokenizationPool
from kvcache.tokenization.prefix_store import PrefixStore

Side = Literal["left", "right"]


@dataclass(frozen=True, slots=True)
class Truncation:
    """vLLM's ``truncate_prompt_tokens`` / ``truncation_side`` / output budget of one request."""

    tokens: int | None = None
    side: Side | None = None
    max_output_tokens: int = 0

    def __post_init__(self) -> None:
        if self.tokens is not None and (type(self.tokens) is not int or self.tokens < -1):
            raise TokenizationError(f"truncate_prompt_tokens must be >= -1, got {self.tokens!r}")
        if self.side not in (None, "left", "right"):
            raise TokenizationError("truncation_side must be either 'left' or 'right'")


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """Token ids as the engine sees them, the model they are keyed under, and extra keys."""

    token_ids: list[int]
    model: str
    extras: RequestExtras | None = None
    lora: str | None = None


def _read_template(value: str | None) -> str | None:
    """vLLM's ``--chat-template``: a readable file's content, else the literal template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass
    return value


class TextTokenizer:
    """Tokenizes completions and chats per model exactly as vLLM's OpenAI server does."""

    def __init__(
        self,
        config: TokenizationConfig | None = None,
        *,
        registry: TokenizerRegistry | None = None,
        store: PrefixStore | None = None,
    ) -> None:
        self.config = config or TokenizationConfig()
        cfg = self.config
        self.registry = registry or TokenizerRegistry(
            TokenizerResolver(
                cfg.tokenizers,
                models_dir=cfg.models_dir,
                hf_cache=cfg.hf_cache,
                allow_hub=cfg.allow_hub,
            ),
            capacity=cfg.cache_size,
        )
        self.store = store if store is not None else PrefixStore(cfg.prefix_store_bytes)
        self.server_chat_template = _read_template(cfg.chat_template)
        self._pool: TokenizationPool | None = None
        self._pool_lock = threading.Lock()

    @property
    def pool(self) -> TokenizationPool:
        """The worker pool (started on first use)."""
        with self._pool_lock:
            if self._pool is None:
                cfg = self.config
                self._pool = TokenizationPool(
                    cfg.workers, queue_size=cfg.queue_size, timeout=cfg.timeout_seconds
                )
            return self._pool

    def close(self) -> None:
        """Stop the worker pool."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    # -- models and LoRA ------------------------------------------------------------------------

    def tokenizer(self, model: str) -> LoadedTokenizer:
        """The tokenizer for ``model`` (a LoRA adapter uses its base model's)."""
        return self.registry.get(self.base_model(model))

    def base_model(self, model: str) -> str:
        """The model whose tokenizer serves ``model`` (itself unless it is a LoRA adapter)."""
        adapter = self.config.lora_adapters.get(model)
        return adapter.base_model if adapter is not None else model

    def extras(
        self,
        model: str,
        *,
        lora: str | None = None,
        cache_salt: str | None = None,
        mm_items: Sequence[MMItem] = (),
    ) -> tuple[str | None, RequestExtras | None]:
        """(adapter name, extra keys) of a request for ``model`` (an adapter name or a base)."""
        if lora is None and model in self.config.lora_adapters:
            lora = model
        path = None
        if lora is not None:
            adapter = self.config.lora_adapters.get(lora)
            path = adapter.path if adapter is not None else None
        if lora is None and cache_salt is None and not mm_items:
            return None, None
        items = tuple(sorted(mm_items, key=lambda item: item.offset))
        extras = RequestExtras(
            lora_name=lora, lora_path=path, cache_salt=cache_salt, mm_items=items
        )
        return lora, extras

    # -- encoding -------------------------------------------------------------------------------

    def _limit(self, truncation: Truncation) -> int | None:
        """The number of tokens to keep, or None (vLLM's ``truncate_prompt_tokens`` rules)."""
        limit = truncation.tokens
        max_len = self.config.max_model_len
        if limit is None:
            return None
        if max_len is not None and limit > max_len:
            raise TokenizationError(
                f"truncate_prompt_tokens={limit} cannot be greater than max_model_len={max_len}"
            )
        if limit == -1:
            if max_len is None:
                raise TokenizationError(
                    "truncate_prompt_tokens=-1 needs tokenization.max_model_len (the engines' "
                    "--max-model-len)"
                )
            return max_len if truncation.max_output_tokens == 0 else max(0, max_len - 1)
        return limit

    def _check_length(self, count: int) -> None:
        max_len = self.config.max_model_len
        if max_len is not None and count > max_len:
            raise TokenizationError(
                f"prompt has {count} tokens, more than max_model_len={max_len} (vLLM refuses it)"
            )

    def _bare(self, tokenizer: LoadedTokenizer, text: str) -> list[int]:
        ids: list[int] = self.store.encode_bare(tokenizer, text)
        return ids

    def encode_text(
        self,
        tokenizer: LoadedTokenizer,
        text: str,
        *,
        add_special_tokens: bool,
        truncation: Truncation = Truncation(),
    ) -> list[int]:
        """Token ids of a text prompt, as vLLM tokenizes it (prefix store used when exact)."""
        limit = self._limit(truncation)
        max_len = self.config.max_model_len
        if max_len is not None:
            max_chars = max_len * tokenizer.max_chars_per_token
            if len(text) > max_chars:
                if limit is None:
                    raise TokenizationError(
                        f"prompt has {len(text)} characters, more than the {max_chars} that "
                        f"{max_len} tokens can hold (vLLM refuses it)"
                    )
                if truncation.side == "left":
                    text = text[-max_chars:]
                elif truncation.side == "right":
                    text = text[:max_chars]
        if limit == 0:
            return []
        if limit is not None and truncation.side is None:
            return self._tokenizer_truncation(tokenizer, text, add_special_tokens, limit)
        bare = self._bare(tokenizer, text)
        if add_special_tokens:
            ids = (
                tokenizer.with_specials(bare)
                if tokenizer.specials is not None
                else tokenizer.encode(text, add_special_tokens=True)
            )
        else:
            ids = bare
        if limit is not None and limit < len(ids):
            ids = ids[-limit:] if truncation.side == "left" else ids[:limit]
        self._check_length(len(ids))
        return ids

    def _tokenizer_truncation(
        self, tokenizer: LoadedTokenizer, text: str, add_special_tokens: bool, limit: int
    ) -> list[int]:
        """Rust-side truncation: the text's tokens are cut, then the special tokens added."""
        side = tokenizer.truncation_side
        specials = tokenizer.specials
        if specials is None:
            return tokenizer.encode_truncated(
                text, add_special_tokens=add_special_tokens, max_length=limit, side=side
            )
        prefix, suffix = specials if add_special_tokens else ((), ())
        room = limit - len(prefix) - len(suffix)
        if room <= 0:
            return tokenizer.encode_truncated(
                text, add_special_tokens=add_special_tokens, max_length=limit, side=side
            )
        bare = self._bare(tokenizer, text)
        if len(bare) > room:
            bare = bare[-room:] if side == "left" else bare[:room]
        return [*prefix, *bare, *suffix]

    def encode_ids(
        self, token_ids: Sequence[int], truncation: Truncation = Truncation()
    ) -> list[int]:
        """A token-id prompt after vLLM's post-tokenization truncation and length check."""
        ids = list(token_ids)
        limit = self._limit(truncation)
        if limit is not None and limit < len(ids):
            # vLLM's generate runner loads tokenizers with truncation_side="left".
            side = truncation.side or "left"
            ids = [] if limit == 0 else (ids[-limit:] if side == "left" else ids[:limit])
        self._check_length(len(ids))
        return ids

    def tokenize_completion(
        self,
        prompt: str,
        model: str,
        *,
        add_special_tokens: bool = True,
        truncation: Truncation = Truncation(),
    ) -> list[int]:
        """The token ids of a /v1/completions text prompt."""
        tokenizer = self.tokenizer(model)
        return self.encode_text(
            tokenizer, prompt, add_special_tokens=add_special_tokens, truncation=truncation
        )

    def tokenize_completions(
        self, prompts: Sequence[str], model: str, *, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Several untruncated prompts in one Rust batch (parallel on the Rust side)."""
        tokenizer = self.tokenizer(model)
        if self.config.max_model_len is not None:
            return [
                self.encode_text(tokenizer, prompt, add_special_tokens=add_special_tokens)
                for prompt in prompts
            ]
        return tokenizer.encode_batch(prompts, add_special_tokens=add_special_tokens)

    def render_chat(self, request: ChatRequest, model: str) -> str:
        """The prompt text vLLM renders for a chat request."""
        return render_chat(
            self.tokenizer(model),
            request,
            server_chat_template=self.server_chat_template,
            server_defaults=self.config.default_chat_template_kwargs,
        )

    def tokenize_chat(
        self,
        request: ChatRequest,
        model: str,
        *,
        add_special_tokens: bool = False,
        truncation: Truncation = Truncation(),
    ) -> list[int]:
        """The token ids of a /v1/chat/completions request."""
        tokenizer = self.tokenizer(model)
        text = render_chat(
            tokenizer,
            request,
            server_chat_template=self.server_chat_template,
            server_defaults=self.config.default_chat_template_kwargs,
        )
        return self.encode_text(
            tokenizer, text, add_special_tokens=add_special_tokens, truncation=truncation
        )

    def statistics(self) -> dict[str, Any]:
        """Loaded tokenizers, prefix store and pool counters."""
        stats: dict[str, Any] = {
            "loaded_tokenizers": self.registry.loaded(),
            "tokenizer_loads": self.registry.loads,
            "prefix_store": self.store.statistics(),
        }
        if self._pool is not None:
            stats["pool"] = self._pool.statistics()
        return stats


def mm_items_from_features(features: Mapping[str, Any]) -> tuple[MMItem, ...]:
    """MM items from ``{"mm_hashes": {modality: [...]}, "mm_placeholders": {modality: [...]}}``.

    The shape upstream's tokenizer sidecar returns; ranges are positions in the final token ids.
    """
    hashes = features.get("mm_hashes") or {}
    ranges = features.get("mm_placeholders") or {}
    if not isinstance(hashes, Mapping) or not isinstance(ranges, Mapping):
        raise TokenizationError("mm_hashes and mm_placeholders must be objects keyed by modality")
    items: list[MMItem] = []
    for modality, values in hashes.items():
        spans = ranges.get(modality)
        if not isinstance(values, list) or not isinstance(spans, list) or len(values) != len(spans):
            raise TokenizationError(
                f"modality {modality!r}: needs as many placeholder ranges as hashes"
            )
        for identifier, span in zip(values, spans, strict=True):
            if not isinstance(span, Mapping):
                raise TokenizationError(f"placeholder range must be an object: {span!r}")
            items.append(MMItem(str(identifier), span.get("offset"), span.get("length")))  # type: ignore[arg-type]
    return tuple(sorted(items, key=lambda item: item.offset))
