"""The facade: token ids -> block keys -> index lookup -> pod scores. It owns no logic."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from kvcache.config import Config, IndexConfig
from kvcache.hashing import KeyScheme, MMItem, RequestExtras, TokenIds, VllmScheme, make_scheme
from kvcache.histogram import LatencyHistogram
from kvcache.index.memory import TableIndex
from kvcache.index.protocol import Index
from kvcache.priority import ReadPriority
from kvcache.scoring import LongestPrefixScorer

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from kvcache.tokenization.text import TextTokenizer, TokenizedPrompt


def build_index(config: IndexConfig) -> Index:
    """The backend the config names (the choice is explicit, never "first non-null")."""
    if config.backend == "cost_aware":
        from kvcache.index.cost_aware import CostAwareIndex

        return CostAwareIndex(budget_bytes=config.cost_aware.budget)
    if config.backend == "redis":
        from kvcache.index.redis import RedisIndex

        r = config.redis
        return RedisIndex(
            r.url,
            timeout=r.timeout_ms / 1000,
            write_timeout=r.write_timeout_ms / 1000,
            ttl=r.ttl_seconds,
            key_prefix=r.key_prefix,
            backlog_keys=r.backlog_keys,
        )
    from kvcache.index.memory import MemoryIndex

    return MemoryIndex(size=config.memory.size, pod_cache_size=config.memory.pod_cache_size)


@dataclasses.dataclass(frozen=True, slots=True)
class ScoreDetail:
    """The scores of one request and what they are made of."""

    scores: dict[str, float]
    """Pod -> weighted count of leading blocks cached (`Indexer.score_tokens`)."""
    matched_blocks: dict[str, int]
    """Pod -> number of leading blocks cached on any tier (same pods as ``scores``)."""
    blocks: int
    """Full blocks of the request (the most any pod can match)."""


class Indexer:
    """Scores pods for a prompt by the longest prefix of its blocks that each pod caches.

    >>> indexer = Indexer()
    >>> indexer.score_tokens(list(range(64)), model="m")
    {}
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        index: Index | None = None,
        scheme: KeyScheme | None = None,
    ) -> None:
        self.config = config or Config()
        hashing = self.config.hashing
        self.scheme = scheme or make_scheme(
            hashing.scheme,
            seed=hashing.seed,
            block_size=hashing.block_size,
            vllm_version=hashing.vllm_version,
        )
        self.index = index if index is not None else build_index(self.config.index)
        self.scorer = LongestPrefixScorer(self.config.scoring.tier_weights)
        # No weights: every tier weighs 1.0, so the "score" is the number of leading blocks.
        self._block_counter = LongestPrefixScorer({})
        self._lock = threading.Lock()
        self._requests = 0
        self._keys = 0
        self._max_pod_hits = 0
        self._lookup_latency = LatencyHistogram()  # the index lookup alone (upstream's metric)
        self._score_latency = LatencyHistogram()  # block keys + lookup + scorer
        self._degraded = 0  # lookups a shared backend answered only in part (server unreachable)
        self._text: TextTokenizer | None = None
        self._text_lock = threading.Lock()
        self.tracer: Tracer | None = None
        """Emits the score spans when set (`kvcache.tracing.tracer()`); None costs one check."""
        self.read_priority = ReadPriority()
        """Scoring marks itself here so that ingest (given the same object) pauses meanwhile."""

    def block_keys(
        self,
        token_ids: TokenIds,
        model: str = "",
        *,
        lora: str | None = None,
        extra: RequestExtras | None = None,
    ) -> list[int]:
        """The block keys the engine computes for these tokens (full blocks only)."""
        if lora is not None:
            extra = dataclasses.replace(extra or RequestExtras(), lora_name=lora)
        return self.scheme.block_keys(token_ids, model=model, extras=extra)  # type: ignore[arg-type]

    def _request_keys(
        self,
        token_ids: TokenIds,
        model: str,
        lora: str | None,
        extra: RequestExtras | None,
    ) -> Sequence[int]:
        """`block_keys` as the lookup takes them: a u64 array when the scheme makes one and the
        index reads one (the in-process tables), saving a Python int per block both ways."""
        scheme = self.scheme
        if (
            lora is None
            and extra is None
            and isinstance(scheme, VllmScheme)
            and isinstance(self.index, TableIndex)
        ):
            # TableIndex takes any u64 buffer where the protocol says Sequence[int].
            return cast("Sequence[int]", scheme.block_key_array(token_ids))
        return self.block_keys(token_ids, model, lora=lora, extra=extra)

    def score_tokens(
        self,
        token_ids: TokenIds,
        model: str = "",
        pods: Collection[str] | None = None,
        *,
        lora: str | None = None,
        extra: RequestExtras | None = None,
    ) -> dict[str, float]:
        """Pod -> weighted count of leading blocks cached, for pods holding block 0.

        ``token_ids``: any int sequence or 1-D integer array (a uint32 ndarray goes to the hash
        kernel as it is). ``pods`` restricts the candidates (None or empty: all pods). Fewer
        tokens than one block give ``{}``.
        """
        with self.read_priority.reading():
            return self._score(token_ids, model, pods, lora, extra, False).scores

    def score_tokens_detailed(
        self,
        token_ids: TokenIds,
        model: str = "",
        pods: Collection[str] | None = None,
        *,
        lora: str | None = None,
        extra: RequestExtras | None = None,
    ) -> ScoreDetail:
        """`score_tokens` plus, per pod, how many leading blocks it holds on any tier.

        One lookup serves both: the weighted score and the plain count can differ (a block held
        only on cpu adds 0.8 to the score and 1 to the count).
        """
        with self.read_priority.reading():
            return self._score(token_ids, model, pods, lora, extra, True)

    def _score(  # noqa: PLR0917 (private; mirrors the public signatures)
        self,
        token_ids: TokenIds,
        model: str,
        pods: Collection[str] | None,
        lora: str | None,
        extra: RequestExtras | None,
        detailed: bool,
    ) -> ScoreDetail:
        """Keys, one lookup, scores (and with ``detailed`` the per-pod block counts)."""
        if self.tracer is not None:
            return self._traced(self.tracer, token_ids, model, pods, lora, extra, detailed)
        started = time.perf_counter()
        keys = self._request_keys(token_ids, model, lora, extra)
        if len(keys) == 0:
            return ScoreDetail({}, {}, 0)
        looking = time.perf_counter()
        runs = self.index.lookup_runs(keys, pods or None)
        looked = time.perf_counter()
        scores = self.scorer.score_runs(runs)
        self._record(keys, runs, started, looking, looked)
        return self._detail(scores, runs, len(keys), detailed)

    def _detail(
        self,
        scores: dict[str, float],
        runs: Sequence[tuple[Collection[Any], int]],
        blocks: int,
        detailed: bool,
    ) -> ScoreDetail:
        if not detailed:
            return ScoreDetail(scores, {}, blocks)
        # The second pass only when a tier weighs other than 1.0 (e.g. a block held on cpu).
        counts = scores if self.scorer.counts_blocks(runs) else self._block_counter.score_runs(runs)
        return ScoreDetail(scores, {pod: round(n) for pod, n in counts.items()}, blocks)

    def _traced(  # noqa: PLR0917 (private; mirrors the public signatures)
        self,
        tracer: Tracer,
        token_ids: TokenIds,
        model: str,
        pods: Collection[str] | None,
        lora: str | None,
        extra: RequestExtras | None,
        detailed: bool,
    ) -> ScoreDetail:
        """`score_tokens_detailed` inside upstream's ``score_tokens`` and ``scorer.compute`` spans.

        The lookup span comes from the index when it is a `TracedIndex`.
        """
        with tracer.start_as_current_span("llm_d.kv_cache.score_tokens") as span:
            started = time.perf_counter()
            keys = self._request_keys(token_ids, model, lora, extra)
            span.set_attributes(
                {
                    "gen_ai.request.model": model,
                    "llm_d.kv_cache.pod_count": len(pods or ()),
                    "llm_d.kv_cache.token_count": len(token_ids),
                    "llm_d.kv_cache.block_keys.count": len(keys),
                }
            )
            if len(keys) == 0:
                return ScoreDetail({}, {}, 0)
            looking = time.perf_counter()
            runs = self.index.lookup_runs(keys, pods or None)
            looked = time.perf_counter()
            found = sum(length for _, length in runs)
            span.set_attributes(
                {
                    "llm_d.kv_cache.block_hit_ratio": found / len(keys),
                    "llm_d.kv_cache.blocks_found": found,
                }
            )
            with tracer.start_as_current_span("llm_d.kv_cache.scorer.compute") as compute:
                compute.set_attributes(
                    {
                        "llm_d.kv_cache.scorer.algorithm": self.scorer.strategy,
                        "llm_d.kv_cache.scorer.key_count": len(keys),
                    }
                )
                scores = self.scorer.score_runs(runs)
                if scores:
                    compute.set_attributes(
                        {
                            "llm_d.kv_cache.score.max": max(scores.values()),
                            "llm_d.kv_cache.score.avg": sum(scores.values()) / len(scores),
                            "llm_d.kv_cache.scorer.pods_scored": len(scores),
                        }
                    )
            self._record(keys, runs, started, looking, looked)
            return self._detail(scores, runs, len(keys), detailed)

    def _record(
        self,
        keys: Sequence[int],
        runs: Sequence[tuple[Collection[Any], int]],
        started: float,
        looking: float,
        looked: float,
    ) -> None:
        """Count one scored request; times from `time.perf_counter` (start, lookup start/end)."""
        done = time.perf_counter()
        with self._lock:
            self._requests += 1
            self._degraded += getattr(runs, "degraded", False)
            self._keys += len(keys)
            hit = sum(length for _, length in runs)
            self._max_pod_hits += hit
            self._lookup_latency.observe(looked - looking)
            self._score_latency.observe(done - started)

    # -- the read path from text (needs kvcache[hf]) ---------------------------------------------

    @property
    def text(self) -> TextTokenizer:
        """Text -> vLLM's token ids for ``config.tokenization`` (created on first use)."""
        with self._text_lock:
            if self._text is None:
                from kvcache.tokenization.text import TextTokenizer

                self._text = TextTokenizer(self.config.tokenization)
            return self._text

    def _score_prompt(
        self, prompt: TokenizedPrompt, pods: Collection[str] | None
    ) -> dict[str, float]:
        return self.score_tokens(
            prompt.token_ids, prompt.model, pods, lora=prompt.lora, extra=prompt.extras
        )

    def score(
        self,
        prompt: str,
        model: str,
        pods: Collection[str] | None = None,
        *,
        add_special_tokens: bool = True,
        truncate_prompt_tokens: int | None = None,
        cache_salt: str | None = None,
        mm_items: Sequence[MMItem] = (),
    ) -> dict[str, float]:
        """Scores for a /v1/completions text prompt (``model`` may name a LoRA adapter)."""
        from kvcache.tokenization.text import TokenizedPrompt, Truncation

        text = self.text
        ids = text.tokenize_completion(
            prompt,
            model,
            add_special_tokens=add_special_tokens,
            truncation=Truncation(tokens=truncate_prompt_tokens),
        )
        lora, extras = text.extras(model, cache_salt=cache_salt, mm_items=mm_items)
        return self._score_prompt(TokenizedPrompt(ids, text.base_model(model), extras, lora), pods)

    def score_chat(  # noqa: PLR0917 (the issue's positional signature)
        self,
        messages: Sequence[Mapping[str, Any]],
        model: str,
        pods: Collection[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        documents: Sequence[Mapping[str, str]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_special_tokens: bool = False,
        truncate_prompt_tokens: int | None = None,
        cache_salt: str | None = None,
        mm_items: Sequence[MMItem] = (),
    ) -> dict[str, float]:
        """Scores for a chat: rendered with the model's template, tokenized as vLLM does."""
        from kvcache.tokenization.chat import ChatRequest
        from kvcache.tokenization.text import TokenizedPrompt, Truncation

        text = self.text
        request = ChatRequest(
            messages=messages,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
        )
        ids = text.tokenize_chat(
            request,
            model,
            add_special_tokens=add_special_tokens,
            truncation=Truncation(tokens=truncate_prompt_tokens),
        )
        lora, extras = text.extras(model, cache_salt=cache_salt, mm_items=mm_items)
        return self._score_prompt(TokenizedPrompt(ids, text.base_model(model), extras, lora), pods)

    def score_request(
        self, body: Mapping[str, Any], pods: Collection[str] | None = None
    ) -> dict[str, float]:
        """Scores for an OpenAI /v1/completions or /v1/chat/completions body (first prompt)."""
        from kvcache.tokenization.requests import prepare_request

        prompts = prepare_request(body, self.text)
        return self._score_prompt(prompts[0], pods)

    def statistics(self) -> dict[str, Any]:
        """Read-path counters, the index backend's statistics and, once text was tokenized, the
        tokenizer's (``tokenization``)."""
        with self._lock:
            reads = {
                "score_requests": self._requests,
                "degraded_lookups": self._degraded,
                "block_keys_computed": self._keys,
                "max_pod_hits": self._max_pod_hits,
                "lookup_latency": self._lookup_latency.snapshot(),
                "score_latency": self._score_latency.snapshot(),
            }
        stats = {
            "scheme": self.scheme.name,
            "block_size": self.scheme.block_size,
            "read_path": reads,
            "index": self.index.statistics(),
        }
        text = self._text  # never created here: that would load the tokenizer stack
        if text is not None:
            stats["tokenization"] = text.statistics()
        return stats
