"""One typed configuration tree with documented defaults.

Every component takes its own section. The tree is built from plain mappings (a parsed file, a
test) with `Config.from_mapping`, which rejects unknown keys and out-of-range values with the
path of the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from kvcache.errors import ConfigError

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


class IndexConfig(_Section, frozen=True):
    """Which backend holds the index. The choice is explicit; other sections are ignored."""

    backend: Literal["memory", "cost_aware"] = "memory"
    memory: MemoryIndexConfig = msgspec.field(default_factory=MemoryIndexConfig)
    cost_aware: CostAwareIndexConfig = msgspec.field(default_factory=CostAwareIndexConfig)


class ScoringConfig(_Section, frozen=True):
    """Longest-prefix scoring weights per device tier (unknown tiers weigh 1.0)."""

    tier_weights: dict[str, NonNegativeFloat] = msgspec.field(
        default_factory=lambda: {"gpu": 1.0, "cpu": 0.8}
    )


class EventsConfig(_Section, frozen=True):
    """The write path: where engines' KV events come from and how they are applied."""

    zmq_bind: list[str] = msgspec.field(default_factory=lambda: ["tcp://*:5557"])
    """Endpoints our SUB socket binds; engines connect to them (llm-d's central layout)."""
    zmq_connect: list[str] = msgspec.field(default_factory=list)
    """Engine PUB endpoints to dial (engines that bind, e.g. `tcp://*:5557` on each pod)."""
    topic_filter: str = ""
    """ZMQ topic prefix to subscribe to; "" takes every topic (vLLM's default topic is "")."""
    shards: PositiveInt = 2
    """Ingest workers; each pod is always applied by the same one, in arrival order."""
    queue_size: PositiveInt = 10_000
    """Messages buffered per shard; beyond it messages are dropped, counted and seen as a gap."""
    dp_rank_in_pod_id: bool = False
    """Index data-parallel ranks as separate pods ("<pod>@dp<rank>") when batches carry one."""


class HttpConfig(_Section, frozen=True):
    """The HTTP API."""

    host: str = "127.0.0.1"
    """Interface to listen on (loopback by default; use 0.0.0.0 in a cluster)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    """Larger request bodies are refused with 413."""


class Config(_Section, frozen=True):
    """The root of the configuration tree."""

    hashing: HashingConfig = msgspec.field(default_factory=HashingConfig)
    index: IndexConfig = msgspec.field(default_factory=IndexConfig)
    scoring: ScoringConfig = msgspec.field(default_factory=ScoringConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)

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
        """Load a JSON config file (unknown keys and bad values fail with the field path)."""
        try:
            with open(path, "rb") as handle:
                data = msgspec.json.decode(handle.read())
        except OSError as exc:
            raise ConfigError(path, f"cannot read config file: {exc.strerror}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(path, f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(path, "the config file must hold a JSON object")
        return cls.from_mapping(data)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data with every default filled in (the documented effective config)."""
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result
