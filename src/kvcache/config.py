"""One typed configuration tree with documented defaults.

Every component takes its own section. The layers that fill the tree (a config file in
kvcache's shape or the Go original's, `KVCACHE_<SECTION>__<FIELD>` environment variables,
command-line overrides) are `kvcache.config_layers`. docs/configuration.md is generated from
the field docstrings below (`python -m kvcache.config_docs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from kvcache.discovery.config import DiscoveryConfig
from kvcache.errors import ConfigError
from kvcache.tracing import TracingConfig

log = logging.getLogger("kvcache.config")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0)]

SchemeName = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor", "sglang", "llmd-fnv64a"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: immutable, strict about unknown keys."""


class HashingConfig(_Section, frozen=True):
    """How token ids become block keys. Must match the engines' settings for identity mode."""

    scheme: SchemeName = "sha256"
    """Key scheme: vLLM's `--prefix-caching-hash-algo` (`sha256` is vLLM's default), SGLang's page
    chain (`sglang`) or llm-d's request keys (`llmd-fnv64a`)."""
    seed: str | None = None
    """The engines' PYTHONHASHSEED. None means vLLM's default rule (seed "vllm-none-hash",
    vLLM >= 0.29, sha256 algorithms only). For `llmd-fnv64a` None means the empty seed."""
    block_size: PositiveInt = 16
    """Tokens per block: vLLM's `--block-size` (16 by default; the CPU backend uses 32+)."""
    vllm_version: str = "0.32"
    """Selects the extra-key layout (LoRA, multimodal, cache salt) of that vLLM release."""


class MemoryIndexConfig(_Section, frozen=True):
    """The default in-process index, bounded by entry count."""

    size: PositiveInt = 100_000_000
    """Maximum number of block keys; the least recently used keys go first beyond it."""
    pod_cache_size: PositiveInt = 256
    """Maximum entries (pod, tier, group) per key. Upstream uses 10, which hides pods that share
    a hot prefix (a system prompt) in fleets of more than 10 pods."""


class CostAwareIndexConfig(_Section, frozen=True):
    """An in-process index with a hard memory budget."""

    budget: str | int = "2GiB"
    """Bytes the index may use: an int or a size such as "512MiB", "2GB", "1.5Gi"."""


class RedisIndexConfig(_Section, frozen=True):
    """The shared index in Redis or Valkey (see docs/redis.md), standalone or cluster."""

    url: str = "redis://127.0.0.1:6379"
    """redis://, rediss:// (TLS), valkey://, valkeys://, unix:// or host:port; user, password
    and db as in any Redis URL. A cluster is detected from the server."""
    timeout_ms: Annotated[float, msgspec.Meta(gt=0.0)] = 50.0
    """Longest a lookup waits for the server; beyond it scoring returns a degraded result."""
    write_timeout_ms: Annotated[float, msgspec.Meta(gt=0.0)] = 1000.0
    """Longest a write round trip waits before the writes are queued for a retry."""
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    """Blocks not stored again within this expire (entries of vanished pods age out)."""
    key_prefix: str = "kvc"
    """Prefix of every key, so several indexes can share a server."""
    backlog_keys: PositiveInt = 1_000_000
    """Block keys of writes queued during an outage; past it the pods are resynced."""


class IndexConfig(_Section, frozen=True):
    """Which backend holds the index. The choice is explicit; other sections are ignored."""

    backend: Literal["memory", "cost_aware", "redis"] = "memory"
    """The backend used: `memory`, `cost_aware` or `redis` (Redis or Valkey)."""
    memory: MemoryIndexConfig = msgspec.field(default_factory=MemoryIndexConfig)
    cost_aware: CostAwareIndexConfig = msgspec.field(default_factory=CostAwareIndexConfig)
    redis: RedisIndexConfig = msgspec.field(default_factory=RedisIndexConfig)


class ScoringConfig(_Section, frozen=True):
    """Longest-prefix scoring weights per device tier (unknown tiers weigh 1.0)."""

    tier_weights: dict[str, NonNegativeFloat] = msgspec.field(
        default_factory=lambda: {"gpu": 1.0, "cpu": 0.8}
    )
    """Weight of a block per tier (the engine's lower-cased medium); a pod's score sums the
    weight of its best tier for each leading block. Replaced as a whole, not merged."""


class EventsConfig(_Section, frozen=True):
    """The write path: where engines' KV events come from and how they are applied."""

    zmq_bind: list[str] = msgspec.field(default_factory=lambda: ["tcp://*:5557"])
    """Endpoints our SUB socket binds; engines connect to them (llm-d's central layout)."""
    zmq_connect: list[str] = msgspec.field(default_factory=list)
    """Engine PUB endpoints to dial (engines that bind, e.g. `tcp://*:5557` on each pod)."""
    topic_filter: str = ""
    """ZMQ topic prefix to subscribe to; "" takes every topic (vLLM's default topic is "")."""
    shards: PositiveInt = 1
    """Ingest workers; each pod is always applied by the same one, in arrival order. One is
    fastest in CPython (measured: two shards ingest 1.1-2.2x slower, as they contend for the
    GIL); more only isolate pods from each other's bursts. With one shard and an in-process
    index, `kvcache serve` reads the events on its HTTP event loop; more shards keep a receive
    thread."""
    queue_size: PositiveInt = 10_000
    """Messages buffered per shard; beyond it messages are dropped, counted and seen as a gap."""
    dp_rank_in_pod_id: bool = False
    """Index data-parallel ranks as separate pods ("<pod>@dp<rank>") when batches carry one."""


class HttpConfig(_Section, frozen=True):
    """The HTTP API."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default; use 0.0.0.0 in a cluster)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    """Port to listen on (0 picks a free port)."""
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    token: str | None = None
    """Bearer token required on every route but /healthz, /readyz and /metrics (HTTP and gRPC);
    None disables auth. Prefer the KVCACHE_HTTP__TOKEN environment variable to a file."""
    max_tokens: PositiveInt = 1 << 20
    """Most tokens a scoring request may carry (after tokenization); more get 400."""
    max_pods: PositiveInt = 10_000
    """Most candidate pods a request may name; more get 400."""
    keepalive_timeout_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    """An idle keep-alive connection is closed after this long (also a body that stops
    arriving, and a client that stops reading its answers). Above Go's default client idle
    timeout (90 s), so a Go caller drops an idle connection before kvcache closes it and never
    sends a request on a closing one."""
    head_timeout_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    """A request's head must arrive whole within this long of its first byte (slowloris)."""
    shutdown_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.0)] = 20.0
    """On SIGTERM, requests in progress get this long to finish before connections close
    (then ingest drains): within Kubernetes' default 30 s grace period."""


class GrpcConfig(_Section, frozen=True):
    """The gRPC API (indexer.v1.IndexerService, docs/grpc.md); off unless a port is set.

    It shares the HTTP section's bearer token."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default; use 0.0.0.0 in a cluster)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """None: no gRPC listener; 0 picks a free port."""
    max_workers: PositiveInt = 8
    """Threads serving RPCs."""
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    """Larger request messages are refused with RESOURCE_EXHAUSTED."""


class LoraAdapterConfig(_Section, frozen=True):
    """A LoRA adapter served under its own model name (requests name the adapter as model)."""

    base_model: str
    """The base model whose tokenizer the adapter's requests use."""
    path: str | None = None
    """The adapter path given to vLLM (`--lora-modules name=path`): vLLM >= 0.31 hashes it."""


class TokenizationConfig(_Section, frozen=True):
    """The read path from text: tokenizers, chat templates, prefix store, worker pool."""

    tokenizers: dict[str, str] = msgspec.field(default_factory=dict)
    """Model name -> tokenizer directory or `tokenizer.json` path. Wins over discovery."""
    models_dir: str | None = "/mnt/models"
    """Root searched for `tokenizer.json` files (`models--org--name` -> `org/name`, otherwise the
    directory relative to the root). A missing directory is skipped."""
    hf_cache: str | None = None
    """Hugging Face hub cache (`models--org--name/snapshots/...`); None means the HF_HUB_CACHE /
    HF_HOME environment or `~/.cache/huggingface/hub`."""
    allow_hub: bool = False
    """Fetch tokenizers missing locally from the Hugging Face hub (never when HF_HUB_OFFLINE)."""
    cache_size: PositiveInt = 20
    """Loaded tokenizers kept (least recently used go first)."""
    workers: PositiveInt = 4
    """Threads that tokenize off the event loop (the Rust tokenizer releases the GIL)."""
    queue_size: PositiveInt = 1024
    """Requests waiting for a worker beyond which new ones are refused."""
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0
    """Per-request tokenization deadline."""
    prefix_store_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024
    """Memory budget of the prefix store (0 disables it)."""
    max_model_len: PositiveInt | None = None
    """The engines' `--max-model-len`: needed for `truncate_prompt_tokens: -1` and for vLLM's
    length checks; None skips them."""
    chat_template: str | None = None
    """The engines' `--chat-template` (a file path or a literal template) used for every model."""
    default_chat_template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    """The engines' `--default-chat-template-kwargs`."""
    trust_request_chat_template: bool = False
    """The engines' `--trust-request-chat-template`: else bodies carrying a template fail."""
    lora_adapters: dict[str, LoraAdapterConfig] = msgspec.field(default_factory=dict)
    """Adapter name -> base model (and path): their requests hash under the adapter's keys."""


class LoggingConfig(_Section, frozen=True):
    """Log lines of the service (stderr)."""

    format: Literal["text", "json"] = "text"
    """`text`: one human-readable line per record; `json`: one JSON object per line with `ts`,
    `level`, `logger`, `message` and the record's context (pod, seq, rank...)."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level written."""


class Config(_Section, frozen=True):
    """The root of the configuration tree."""

    hashing: HashingConfig = msgspec.field(default_factory=HashingConfig)
    index: IndexConfig = msgspec.field(default_factory=IndexConfig)
    scoring: ScoringConfig = msgspec.field(default_factory=ScoringConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    grpc: GrpcConfig = msgspec.field(default_factory=GrpcConfig)
    tokenization: TokenizationConfig = msgspec.field(default_factory=TokenizationConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate a tree from plain data; raises ConfigError naming the field."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            # msgspec reports "<problem> - at `$.path`"; keep the path as the field.
            message, _, where = str(exc).partition(" - at `")
            raise ConfigError(where.rstrip("`") or "$", message) from None

    @classmethod
    def from_file(cls, path: str) -> Config:
        """Load a JSON or YAML file, in kvcache's shape or the Go original's.

        Fields of the Go shape that kvcache cannot honour are logged as warnings.
        """
        from kvcache.config_layers import load  # the layers build on this module's tree

        loaded = load(path, environ={})
        for warning in loaded.warnings:
            log.warning("%s", warning)
        return loaded.config

    def to_mapping(self) -> dict[str, Any]:
        """Plain data with every default filled in (the documented effective config)."""
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result

    def redacted_mapping(self) -> dict[str, Any]:
        """`to_mapping` with secrets replaced by "***" (safe to print or log)."""
        from kvcache.config_layers import MASK, SECRET_FIELDS, URL_FIELDS, parent, redact_url

        data = self.to_mapping()
        for path in SECRET_FIELDS:
            holder = parent(data, path)
            if holder.get(path[-1]) is not None:
                holder[path[-1]] = MASK
        for path in URL_FIELDS:
            holder = parent(data, path)
            holder[path[-1]] = redact_url(holder[path[-1]])
        return data
