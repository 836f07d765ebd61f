"""Typed bodies of the HTTP API (msgspec structs); the OpenAPI schemas are generated from them.

Bodies of kvcache's own route (``/score_tokens``) reject unknown fields, so a typo is an error.
The Go-example routes (``/score_completions``, ``/score_chat_completions``) ignore unknown fields
as Go's JSON decoder does; the OpenAI routes take any OpenAI body and read what tokenization
needs (``kvcache.tokenization.requests``). Field descriptions are ``Meta`` annotations so that
they reach the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1, description="A token id (u32).")]
Pods = Annotated[
    list[str] | None,
    _doc(
        "Candidate pods; null or empty means every pod. Listed pods that hold nothing get a "
        "normalized score of 0.0."
    ),
]
Model = Annotated[
    str, _doc("The served model name (or a configured LoRA adapter); selects the tokenizer.")
]
CacheSalt = Annotated[str | None, _doc("vLLM's cache_salt: it changes every block key.")]
TruncatePromptTokens = Annotated[
    int | None, _doc("Keep only the last N prompt tokens (-1: the model's length), as vLLM does.")
]


class ScoreTokensRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Body of POST /score_tokens: token ids as the engine sees them (unknown fields refused)."""

    token_ids: list[TokenId]
    model: Annotated[
        str, _doc("The model the keys are computed for (only the llmd-fnv64a scheme uses it).")
    ] = ""
    pods: Pods = None
    lora: Annotated[str | None, _doc("The LoRA adapter name the engine hashes into keys.")] = None


class RawScoreTokensRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`ScoreTokensRequest` with ``token_ids`` left as JSON text for the compiled parser, and
    optional: it also decodes the body with that member cut out (`kvcache.service.http`). Not
    in the OpenAPI document: the wire shape is `ScoreTokensRequest`'s."""

    token_ids: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    model: str = ""
    pods: list[str] | None = None
    lora: str | None = None


class ScoreCompletionsRequest(msgspec.Struct, frozen=True):
    """Body of POST /score_completions (the Go example's shape, plus kvcache's options)."""

    prompt: Annotated[str, _doc("The completion prompt; must not be empty.")]
    model: Model
    pods: Pods = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePromptTokens = None
    cache_salt: CacheSalt = None

    def openai_body(self) -> dict[str, Any]:
        """The equivalent /v1/completions body (what tokenization reads)."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "add_special_tokens": self.add_special_tokens,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "cache_salt": self.cache_salt,
        }


class ScoreChatCompletionsRequest(msgspec.Struct, frozen=True):
    """Body of POST /score_chat_completions (the Go example's render-chat request shape)."""

    model: Model
    messages: Annotated[
        list[dict[str, Any]] | None, _doc("OpenAI chat messages; required unless conversation.")
    ] = None
    conversation: Annotated[
        list[Any] | None,
        _doc("Alias of messages; a list holding one list of messages is accepted as well."),
    ] = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: Annotated[
        str | None,
        _doc("A template overriding the model's (needs tokenization.trust_request_chat_template)."),
    ] = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    truncate_prompt_tokens: TruncatePromptTokens = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    cache_salt: CacheSalt = None
    pods: Pods = None

    def openai_body(self) -> dict[str, Any]:
        """The equivalent /v1/chat/completions body (``messages`` may be None or empty)."""
        messages: list[Any] | None = self.messages
        if messages is None and self.conversation is not None:
            # The Go original's older render request held a batch of conversations.
            single = len(self.conversation) == 1 and isinstance(self.conversation[0], list)
            messages = self.conversation[0] if single else self.conversation
        return {
            "model": self.model,
            "messages": messages,
            "tools": self.tools,
            "documents": self.documents,
            "chat_template": self.chat_template,
            "continue_final_message": self.continue_final_message,
            "add_generation_prompt": self.add_generation_prompt,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "chat_template_kwargs": self.chat_template_kwargs,
            "add_special_tokens": self.add_special_tokens,
            "cache_salt": self.cache_salt,
        }


class OpenAICompletionRequest(msgspec.Struct, frozen=True):
    """An OpenAI /v1/completions body; the fields that do not change the tokens are ignored.

    Also read: ``add_special_tokens``, ``truncate_prompt_tokens``, ``truncation_side``,
    ``max_tokens``, ``cache_salt``, ``mm_features`` (kvcache's multimodal extension).
    """

    model: Model
    prompt: Annotated[
        Any,
        _doc(
            "A string, a list of strings, a list of token ids or a list of such lists; the "
            "first prompt is scored."
        ),
    ]
    pods: Pods = None


class OpenAIChatRequest(msgspec.Struct, frozen=True):
    """An OpenAI /v1/chat/completions body; the fields that do not change the tokens are ignored.

    Also read: ``tools``, ``documents``, ``chat_template``, ``chat_template_kwargs``,
    ``add_generation_prompt``, ``continue_final_message``, ``reasoning_effort``,
    ``add_special_tokens``, ``truncate_prompt_tokens``, ``truncation_side``,
    ``max_completion_tokens`` / ``max_tokens``, ``cache_salt``, ``mm_features``.
    """

    model: Model
    messages: list[dict[str, Any]]
    pods: Pods = None


class ScoreResponse(msgspec.Struct, frozen=True):
    """Scores of every scoring route. Maps are ordered by score (highest first), then pod."""

    scores: Annotated[
        dict[str, float],
        _doc(
            "Pod -> weighted number of leading blocks cached (gpu 1.0, cpu 0.8 per block by "
            "default); pods that miss block 0 are absent. The map the Go examples return."
        ),
    ]
    normalized: Annotated[
        dict[str, float],
        _doc(
            "Min-max normalised scores as llm-d's scheduler computes them: all 1.0 when every "
            "score is equal; pods named in the request's pods without a score get 0.0."
        ),
    ]
    matched_blocks: Annotated[dict[str, int], _doc("Pod -> leading blocks cached on any tier.")]
    blocks: Annotated[int, _doc("Full blocks in the request (the most a pod can match).")]
    model: Annotated[str, _doc("The model named by the request.")]


class ErrorResponse(msgspec.Struct, frozen=True):
    """Body of every 4xx/5xx answer."""

    error: Annotated[str, _doc("What was wrong, naming the offending field where there is one.")]


class StatusResponse(msgspec.Struct, frozen=True):
    """Body of /healthz (ok, unhealthy) and /readyz (ready, not ready)."""

    status: str


class StreamInfo(msgspec.Struct, frozen=True):
    """One event stream of a pod (one per data-parallel rank)."""

    last_seq: int = -1
    batches: int = 0
    gaps: int = 0
    lost_batches: int = 0
    resets: int = 0
    last_event_time: Annotated[float, _doc("Unix time of the last batch received.")] = 0.0


class PodInfo(msgspec.Struct, frozen=True):
    """What ingest knows about one pod."""

    pod: str
    hash_mode: Annotated[
        str | None,
        _doc(
            "identity (the engine's hashes are our keys), dual (keys recomputed from token "
            "ids, engine -> request map) or unverified (no checkable event yet)."
        ),
    ] = None
    matched_scheme: Annotated[
        str | None, _doc("In dual mode: the scheme the engine's hashes do match, if found.")
    ] = None
    verified_events: int = 0
    last_seq: Annotated[int, _doc("The highest sequence number over the pod's streams.")] = -1
    gaps: Annotated[int, _doc("Sequence jumps seen (lost batches), summed over streams.")] = 0
    lost_batches: int = 0
    resets: Annotated[int, _doc("Publisher restarts seen (the pod's entries were cleared).")] = 0
    last_event_time: Annotated[
        float | None, _doc("Unix time of the last batch received from the pod.")
    ] = None
    blocks: Annotated[
        int | None, _doc("Blocks indexed for the pod; null while not counted per pod.")
    ] = None
    tiers: Annotated[
        dict[str, int] | None, _doc("Blocks per device tier; null while not counted per pod.")
    ] = None
    streams: Annotated[
        dict[str, StreamInfo], _doc("Per data-parallel rank ('None': batches without one).")
    ] = {}


class PodList(msgspec.Struct, frozen=True):
    """Body of GET /pods."""

    pods: list[PodInfo]


class ClearResponse(msgspec.Struct, frozen=True):
    """Body of DELETE /pods/{pod}."""

    pod: str
    removed: Annotated[int, _doc("(block, entry) pairs removed from the index.")]


REQUEST_BODIES: dict[str, type[msgspec.Struct]] = {
    "/score_tokens": ScoreTokensRequest,
    "/score_completions": ScoreCompletionsRequest,
    "/score_chat_completions": ScoreChatCompletionsRequest,
    "/v1/completions": OpenAICompletionRequest,
    "/v1/chat/completions": OpenAIChatRequest,
}
"""The scoring routes and the struct that documents (and validates) each body."""
