"""The Go original's config shape, translated into kvcache's tree.

llm-d configures the Go library with `{"indexerConfig", "kvEventsConfig",
"tokenProcessorConfig"}`, usually as the parameters of the scheduler plugin
`precise-prefix-cache-scorer`. `translate` maps every Go field that has a kvcache equivalent,
warns about each field it cannot honour, and refuses values that the Go original refuses too.
`RULES` is the mapping; docs/configuration.md prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvcache.errors import ConfigError

PLUGIN_TYPE = "precise-prefix-cache-scorer"
UPSTREAM_KEYS = frozenset(
    {
        "indexerConfig",
        "kvEventsConfig",
        "tokenProcessorConfig",
        "speculativeIndexing",
        "speculativeTTL",
    }
)
"""Top-level keys of the Go shape (the plugin's parameters)."""

UPSTREAM_SCHEME = "sha256_cbor"
"""hashing.scheme of a Go-shaped config: the algorithm llm-d deploys on its engines."""

_INDEX = "indexerConfig.kvBlockIndexConfig"
_POOL = "indexerConfig.tokenizersPoolConfig"
_EVENTS = "kvEventsConfig"
_DISCOVERY = "kvEventsConfig.podDiscoveryConfig"

# The Go original tries the index sections in this order and uses the first one present.
BACKEND_ORDER: tuple[tuple[str, str], ...] = (
    ("costAwareMemoryConfig", "cost_aware"),
    ("valkeyConfig", "redis"),
    ("redisConfig", "redis"),
    ("inMemoryConfig", "memory"),
)
_DEFAULT_ADDRESS = {
    "valkeyConfig": "valkey://127.0.0.1:6379",
    "redisConfig": "redis://127.0.0.1:6379",
}


@dataclass(frozen=True)
class Rule:
    """One Go field: its kvcache field ("" when there is none) and how it is taken."""

    go: str
    target: str
    note: str = ""
    quiet: tuple[Any, ...] = field(default=())
    """For fields without a target: values that change nothing, so need no warning."""
    warn: bool = True
    """For fields without a target: warn when present (False: equivalent behaviour)."""


RULES: tuple[Rule, ...] = (
    Rule(f"{_INDEX}.inMemoryConfig.size", "index.memory.size"),
    Rule(
        f"{_INDEX}.inMemoryConfig.podCacheSize",
        "index.memory.pod_cache_size",
        "Go's default is 10; left out, kvcache's 256 applies",
    ),
    Rule(
        f"{_INDEX}.costAwareMemoryConfig.size",
        "index.cost_aware.budget",
        'go-humanize sizes: "2GiB", "512MB" (powers of 1000), "42" = 42 bytes',
    ),
    Rule(f"{_INDEX}.valkeyConfig.address", "index.redis.url", "when valkeyConfig is the backend"),
    Rule(f"{_INDEX}.redisConfig.address", "index.redis.url", "when redisConfig is the backend"),
    Rule(f"{_INDEX}.valkeyConfig.backendType", "", "the server type is detected", warn=False),
    Rule(f"{_INDEX}.redisConfig.backendType", "", "the server type is detected", warn=False),
    Rule(f"{_INDEX}.valkeyConfig.enableRDMA", "", "RDMA is not supported", quiet=(False,)),
    Rule(f"{_INDEX}.redisConfig.enableRDMA", "", "RDMA is not supported", quiet=(False,)),
    Rule(f"{_INDEX}.enableMetrics", "", "metrics are always served at /metrics", warn=False),
    Rule(
        f"{_INDEX}.metricsLoggingInterval",
        "",
        "there is no periodic metrics log line; scrape /metrics",
        quiet=(0,),
    ),
    Rule(
        "indexerConfig.kvCacheBackendConfigs",
        "scoring.tier_weights",
        "`[{name, weight}]` becomes `{name: weight}`",
    ),
    Rule(f"{_POOL}.workersCount", "tokenization.workers"),
    Rule(f"{_POOL}.local.modelTokenizerMap", "tokenization.tokenizers"),
    Rule(f"{_POOL}.uds.modelTokenizerMap", "tokenization.tokenizers"),
    Rule(f"{_POOL}.local.autoDiscoveryDir", "tokenization.models_dir"),
    Rule(
        f"{_POOL}.local.autoDiscoveryTokenizerFileName",
        "",
        "kvcache looks for tokenizer.json only",
        quiet=("tokenizer.json",),
    ),
    Rule(f"{_POOL}.hf.enabled", "tokenization.allow_hub", "Go's default is true, kvcache's false"),
    Rule(f"{_POOL}.hf.huggingFaceToken", "", "set HF_TOKEN in the environment instead"),
    Rule(
        f"{_POOL}.hf.tokenizersCacheDir",
        "",
        "tokenizers fetched from the hub live in the Hugging Face cache (tokenization.hf_cache)",
    ),
    Rule(
        f"{_POOL}.modelName",
        "",
        "kvcache finds each request's tokenizer by its model name (tokenization.tokenizers, "
        "tokenization.models_dir)",
    ),
    Rule(f"{_POOL}.uds.socketFile", "", "kvcache tokenizes in process, without a sidecar"),
    Rule(f"{_POOL}.uds.useTCP", "", "kvcache tokenizes in process, without a sidecar"),
    Rule(
        f"{_POOL}.minPrefixOverlapRatio",
        "",
        "the prefix store is exact (tokenization.prefix_store_bytes)",
    ),
    Rule("indexerConfig.prefixStoreConfig.cacheSize", "", "see tokenization.prefix_store_bytes"),
    Rule("indexerConfig.prefixStoreConfig.blockSize", "", "see tokenization.prefix_store_bytes"),
    Rule(
        "tokenProcessorConfig.blockSizeTokens",
        "hashing.block_size",
        "must be > 0; 0 means blockSize, else 16",
    ),
    Rule(
        "tokenProcessorConfig.blockSize",
        "hashing.block_size",
        "deprecated; used when blockSizeTokens is 0 or absent",
    ),
    Rule(
        "tokenProcessorConfig.hashSeed",
        "hashing.seed",
        f'"" becomes null; hashing.scheme becomes `{UPSTREAM_SCHEME}` (see Keys above)',
    ),
    Rule("indexerConfig.tokenProcessorConfig.blockSize", "hashing.block_size", "the old location"),
    Rule("indexerConfig.tokenProcessorConfig.hashSeed", "hashing.seed", "the old location"),
    Rule(
        f"{_EVENTS}.zmqEndpoint",
        "events.zmq_bind",
        'bound; left out or "", nothing is bound (Go\'s default)',
    ),
    Rule(f"{_EVENTS}.topicFilter", "events.topic_filter", 'Go\'s default is "kv@", kvcache\'s ""'),
    Rule(f"{_EVENTS}.concurrency", "events.shards", "one shard is fastest in CPython"),
    Rule(
        f"{_EVENTS}.engineType",
        "",
        '"vllm", "sglang" or "": the decoder reads both layouts; anything else is an error',
        warn=False,
    ),
    Rule(
        f"{_EVENTS}.discoverPods",
        "discovery.enabled",
        "left out, true (Go's default)",
    ),
    Rule(f"{_DISCOVERY}.podLabelSelector", "discovery.label_selector"),
    Rule(f"{_DISCOVERY}.podNamespace", "discovery.namespace"),
    Rule(f"{_DISCOVERY}.socketPort", "discovery.socket_port"),
    Rule(
        "speculativeIndexing",
        "",
        "speculative entries belong to the router: kvcache.routing.Router(speculative_ttl=...)",
        quiet=(False,),
    ),
    Rule(
        "speculativeTTL",
        "",
        "speculative entries belong to the router: kvcache.routing.Router(speculative_ttl=...)",
    ),
)

_RULES = {rule.go: rule for rule in RULES}
_SECTIONS = frozenset(
    prefix
    for rule in RULES
    for prefix in (rule.go.rsplit(".", n)[0] for n in range(1, rule.go.count(".") + 1))
)


@dataclass
class Translation:
    """kvcache's tree as plain data, where each field came from, and what was not honoured."""

    data: dict[str, Any]
    native: dict[str, Any]
    """kvcache sections given next to the Go keys; they override the translation."""
    origins: dict[str, str]
    """`$.path` of a kvcache field -> the Go field it came from (for error messages)."""
    warnings: tuple[str, ...]


def is_upstream_shape(data: Mapping[str, Any]) -> bool:
    """The Go shape: its top-level keys, the scheduler plugin, or a whole EPP config."""
    return bool(
        data.keys() & UPSTREAM_KEYS
        or data.get("type") == PLUGIN_TYPE
        or data.get("kind") == "EndpointPickerConfig"
    )


def translate(data: Mapping[str, Any], native_keys: frozenset[str]) -> Translation:
    """kvcache's plain config data from a Go-shaped mapping (see the module docstring).

    Go fields left out take kvcache's defaults, except where events come from (`zmqEndpoint`,
    `discoverPods`), which takes Go's so that an existing deployment keeps its event source.
    """
    params = _parameters(data)
    native = {key: value for key, value in params.items() if key in native_keys}
    upstream = {key: value for key, value in params.items() if key not in native_keys}
    builder = _Builder()
    values = builder.collect(upstream, "")
    builder.index(values, upstream)
    builder.hashing(values)
    builder.events(values)
    builder.copy(values)
    return Translation(builder.data, native, builder.origins, tuple(builder.warnings))


def _parameters(data: Mapping[str, Any]) -> dict[str, Any]:
    """The plugin's parameters out of an EndpointPickerConfig or a plugin object."""
    if data.get("kind") == "EndpointPickerConfig":
        plugins = [
            plugin
            for plugin in data.get("plugins") or []
            if isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE
        ]
        if len(plugins) != 1:
            raise ConfigError(
                "plugins",
                f"expected one plugin of type {PLUGIN_TYPE} in the EndpointPickerConfig, "
                f"found {len(plugins)}",
            )
        data = plugins[0]
    if data.get("type") == PLUGIN_TYPE:
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ConfigError("parameters", "the plugin's parameters must be an object")
        return parameters
    return dict(data)


class _Builder:
    """Accumulates the translated tree, the origins of its fields and the warnings."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origins: dict[str, str] = {}
        self.warnings: list[str] = []
        self.used: set[str] = set()

    def put(self, target: str, value: Any, go: str | None) -> None:
        node = self.data
        *parents, name = target.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
        if go is not None:
            self.origins[f"$.{target}"] = go
            self.used.add(go)

    def collect(self, node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Go path -> value of every known leaf that is set; warns about unknown fields."""
        values: dict[str, Any] = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if value is None:
                continue  # Go reads null as "not set" for every field of this shape
            if path in _SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(path, f"expected an object, got {type(value).__name__}")
                values.update(self.collect(value, f"{path}."))
            elif path in _RULES:
                values[path] = value
            else:
                self.warnings.append(
                    f"{path}: ignored; not a field of the Go config as of llm-d-kv-cache 7be76e1"
                )
        return values

    def index(self, values: dict[str, Any], upstream: Mapping[str, Any]) -> None:
        """The backend, chosen as the Go original chooses it, and its Redis address."""
        sections = (upstream.get("indexerConfig") or {}).get("kvBlockIndexConfig") or {}
        present = [name for name, _ in BACKEND_ORDER if sections.get(name) is not None]
        if not present:
            return
        chosen = present[0]
        backend = dict(BACKEND_ORDER)[chosen]
        self.put("index.backend", backend, f"{_INDEX}.{chosen}")
        if len(present) > 1:
            self.warnings.append(
                f"{_INDEX} sets {', '.join(present)}: like the Go original, kvcache uses "
                f"{chosen} (the first of {', '.join(name for name, _ in BACKEND_ORDER)}); "
                f"the other backends are ignored (set index.backend to choose explicitly)"
            )
        if backend == "redis":
            go = f"{_INDEX}.{chosen}.address"
            self.put("index.redis.url", values.get(go) or _DEFAULT_ADDRESS[chosen], go)
        size = values.get(f"{_INDEX}.costAwareMemoryConfig.size")
        if size is not None:
            from kvcache.index.cost_aware import parse_size

            parse_size(size, f"{_INDEX}.costAwareMemoryConfig.size")
        self.used.update(f"{_INDEX}.{name}.address" for name in _DEFAULT_ADDRESS)

    def hashing(self, values: dict[str, Any]) -> None:
        """Block size and seed; the key scheme of llm-d's engines (sha256_cbor)."""
        self.put("hashing.scheme", UPSTREAM_SCHEME, None)
        new, old = "tokenProcessorConfig", "indexerConfig.tokenProcessorConfig"
        has_new = any(key.startswith(f"{new}.") for key in values)
        has_old = any(key.startswith(f"{old}.") for key in values)
        if has_new and has_old:
            self.warnings.append(f"{old} (the old location) is ignored: {new} is set")
            self.used.update(key for key in values if key.startswith(f"{old}."))
        prefix = old if has_old and not has_new else new
        tokens = values.get(f"{prefix}.blockSizeTokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens < 0:
            raise ConfigError(
                f"{prefix}.blockSizeTokens", f"blockSizeTokens must be greater than 0, got {tokens}"
            )
        for name in ("blockSizeTokens", "blockSize"):
            go = f"{prefix}.{name}"
            if values.get(go):  # 0 means "not set" in Go
                self.put("hashing.block_size", values[go], go)
                break
        self.used.update(f"{prefix}.{name}" for name in ("blockSizeTokens", "blockSize"))
        go = f"{prefix}.hashSeed"
        if go in values:
            self.put("hashing.seed", values[go] if values[go] != "" else None, go)

    def events(self, values: dict[str, Any]) -> None:
        """The event source as the Go original's defaults leave it, and the engine type."""
        go = f"{_EVENTS}.zmqEndpoint"
        endpoint = values.get(go)
        self.put("events.zmq_bind", [endpoint] if endpoint else [], go)
        go = f"{_EVENTS}.discoverPods"
        self.put("discovery.enabled", values.get(go, True), go)
        go = f"{_EVENTS}.engineType"
        engine = values.get(go, "")
        if engine not in ("", "vllm", "sglang"):
            raise ConfigError(go, f'unknown engine type {engine!r}; expected "vllm" or "sglang"')
        go = "indexerConfig.kvCacheBackendConfigs"
        if go in values:
            self.put("scoring.tier_weights", _tier_weights(values[go], go), go)

    def copy(self, values: dict[str, Any]) -> None:
        """Every remaining field: copied to its target, or warned about."""
        for go, value in values.items():
            if go in self.used:
                continue
            rule = _RULES[go]
            if rule.target == "tokenization.tokenizers" and isinstance(value, dict):
                # local and uds may both map models: keep both
                merged = self.data.get("tokenization", {}).get("tokenizers", {})
                self.put(rule.target, {**merged, **value}, go)
            elif rule.target:
                self.put(rule.target, value, go)
            elif rule.warn and value not in rule.quiet:
                self.warnings.append(f"{go}: ignored; {rule.note}")


def _tier_weights(value: Any, go: str) -> dict[str, Any]:
    if not isinstance(value, list):
        raise ConfigError(go, f"expected a list of {{name, weight}}, got {type(value).__name__}")
    weights: dict[str, Any] = {}
    for position, item in enumerate(value):
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "weight" in item):
            raise ConfigError(f"{go}[{position}]", "expected {name: string, weight: number}")
        weights[item["name"]] = item["weight"]
    return weights
