"""Prometheus exposition: one collector that reads the components' statistics() at scrape time.

Nothing on the hot paths touches Prometheus objects; counters live in plain Python integers in
each component and are turned into metric families only when /metrics is scraped. `FAMILIES` is
the catalogue of every family (docs/observability.md shows it as `markdown_table()` renders it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from kvcache.histogram import LatencyHistogram

Stats = Callable[[], Mapping[str, Any]]
Kind = Literal["counter", "gauge", "histogram"]


class Family(NamedTuple):
    """One metric family: name (counters are exposed with ``_total``), kind, labels, meaning."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    source: str
    """Which component it comes from and when it is present."""
    help: str

    @property
    def exposed(self) -> str:
        """The sample name a scrape shows."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


_INDEX = "index"
_SHARED = "index (Redis/Valkey only)"
_MEMORY = "index (in-process only)"
_READ = "read path"
_INGEST = "ingest"
_TOKENS = "tokenization"
_HTTP = "HTTP API"

FAMILIES: tuple[Family, ...] = (
    # -- the index, upstream's names -----------------------------------------------------------
    Family("kvcache_index_admissions", "counter", (), _INDEX, "Request keys added to the index"),
    Family(
        "kvcache_index_evictions",
        "counter",
        (),
        _INDEX,
        "Evictions: evict calls (one key each from events) plus keys dropped for capacity",
    ),
    Family("kvcache_index_lookup_requests", "counter", (), _READ, "Scored lookups"),
    Family(
        "kvcache_index_lookup_hits",
        "counter",
        (),
        _READ,
        "Sum over lookups of the longest per-pod prefix hit (blocks)",
    ),
    Family(
        "kvcache_index_max_pod_hit_count",
        "counter",
        (),
        _READ,
        "Sum over lookups of the longest per-pod prefix hit (blocks; same as lookup_hits)",
    ),
    Family(
        "kvcache_index_lookup_latency_seconds",
        "histogram",
        (),
        _READ,
        "Index lookup latency of a scored request",
    ),
    # -- the index, ours -------------------------------------------------------------------------
    Family("kvcache_index_adds", "counter", (), _INDEX, "Index add calls"),
    Family("kvcache_index_clears", "counter", (), _INDEX, "Index clear calls (one pod each)"),
    Family(
        "kvcache_index_degraded_lookups",
        "counter",
        (),
        _READ,
        "Lookups a shared backend answered only in part (server slow or unreachable)",
    ),
    Family("kvcache_index_keys", "gauge", (), _MEMORY, "Block keys held"),
    Family("kvcache_index_entries", "gauge", (), _MEMORY, "(block key, pod entry) pairs held"),
    Family("kvcache_index_engine_keys", "gauge", (), _MEMORY, "Engine keys mapped (dual mode)"),
    Family("kvcache_index_bytes", "gauge", (), _MEMORY, "Bytes used by the index structures"),
    Family("kvcache_index_max_keys", "gauge", (), _MEMORY, "Block keys held at most"),
    # -- a shared index's health -----------------------------------------------------------------
    Family("kvcache_index_nodes", "gauge", (), _SHARED, "Server nodes serving slots"),
    Family("kvcache_index_nodes_down", "gauge", (), _SHARED, "Server nodes unreachable now"),
    Family(
        "kvcache_index_healthy",
        "gauge",
        (),
        _SHARED,
        "1 when every node answers and no write is queued or pod awaiting a resync",
    ),
    Family(
        "kvcache_index_backlog_ops",
        "gauge",
        (),
        _SHARED,
        "Writes queued while the server is unreachable",
    ),
    Family("kvcache_index_backlog_keys", "gauge", (), _SHARED, "Block keys of the queued writes"),
    Family(
        "kvcache_index_pending_evicts",
        "gauge",
        (),
        _SHARED,
        "Evictions batched for the next write round trip",
    ),
    Family(
        "kvcache_index_resync_pods",
        "gauge",
        (),
        _SHARED,
        "Pods to be rebuilt from their events once the server is back",
    ),
    Family("kvcache_index_outages", "counter", (), _SHARED, "Nodes found unreachable"),
    Family("kvcache_index_recoveries", "counter", (), _SHARED, "Returns to health after outages"),
    Family(
        "kvcache_index_resyncs",
        "counter",
        (),
        _SHARED,
        "Pods cleared after the backlog overflowed (rebuilt from their next events)",
    ),
    Family("kvcache_index_round_trips", "counter", (), _SHARED, "Pipelined server round trips"),
    Family(
        "kvcache_index_write_errors",
        "counter",
        (),
        _SHARED,
        "Write round trips the server refused (e.g. out of memory); retried later",
    ),
    Family(
        "kvcache_index_backlogged_ops",
        "counter",
        (),
        _SHARED,
        "Writes queued for a retry",
    ),
    Family(
        "kvcache_index_dropped_ops",
        "counter",
        (),
        _SHARED,
        "Queued writes dropped on a full backlog (their pods are resynced)",
    ),
    Family(
        "kvcache_index_degraded_request_keys",
        "counter",
        (),
        _SHARED,
        "Engine-key resolutions (parents of stored blocks) a node did not answer",
    ),
    Family("kvcache_index_redirects", "counter", (), _SHARED, "Cluster MOVED/ASK redirects"),
    Family("kvcache_index_script_loads", "counter", (), _SHARED, "Lua script (re)loads"),
    # -- read path -------------------------------------------------------------------------------
    Family(
        "kvcache_score_latency_seconds",
        "histogram",
        (),
        _READ,
        "Scoring latency of a token request: block keys, lookup and scorer",
    ),
    Family("kvcache_score_blocks", "counter", (), _READ, "Block keys computed by scored requests"),
    # -- ingest ----------------------------------------------------------------------------------
    Family("kvcache_events_messages_received", "counter", (), _INGEST, "ZMQ messages received"),
    Family(
        "kvcache_events_messages_applied", "counter", (), _INGEST, "Messages decoded and applied"
    ),
    Family("kvcache_events_applied", "counter", ("type",), _INGEST, "Events applied, by type"),
    Family(
        "kvcache_events_rejected",
        "counter",
        ("reason",),
        _INGEST,
        "Events (or, reason frame_*, whole messages) skipped, by reason",
    ),
    Family("kvcache_blocks_stored", "counter", (), _INGEST, "Blocks stored by events"),
    Family("kvcache_blocks_removed", "counter", (), _INGEST, "Blocks removed by events"),
    Family(
        "kvcache_blocks_skipped",
        "counter",
        ("reason",),
        _INGEST,
        "Stored blocks that could not be indexed, by reason",
    ),
    Family("kvcache_pod_clears", "counter", (), _INGEST, "AllBlocksCleared events applied"),
    Family("kvcache_sequence_gaps", "counter", (), _INGEST, "Sequence gaps (lost batches)"),
    Family("kvcache_publisher_resets", "counter", (), _INGEST, "Publisher restarts detected"),
    Family(
        "kvcache_duplicate_batches",
        "counter",
        (),
        _INGEST,
        "Batches delivered twice (same sequence number and timestamp), skipped",
    ),
    Family(
        "kvcache_hash_mismatches",
        "counter",
        (),
        _INGEST,
        "Events whose hashes our key scheme does not reproduce (dual-key mode)",
    ),
    Family(
        "kvcache_queue_overflow", "counter", (), _INGEST, "Messages dropped on a full shard queue"
    ),
    Family("kvcache_queue_depth", "gauge", (), _INGEST, "Messages waiting to be applied"),
    Family("kvcache_pods", "gauge", ("hash_mode",), _INGEST, "Pods by hash mode"),
    # -- tokenization ----------------------------------------------------------------------------
    Family(
        "kvcache_tokenization_requests",
        "counter",
        (),
        _TOKENS,
        "Tokenization calls finished on the worker pool",
    ),
    Family(
        "kvcache_tokenization_failures",
        "counter",
        (),
        _TOKENS,
        "Pool calls that raised (bad request, unknown model) or were cancelled",
    ),
    Family(
        "kvcache_tokenization_rejected",
        "counter",
        (),
        _TOKENS,
        "Calls refused because the pool's queue was full (HTTP 503)",
    ),
    Family(
        "kvcache_tokenization_timeouts",
        "counter",
        (),
        _TOKENS,
        "Calls past their deadline (HTTP 504)",
    ),
    Family(
        "kvcache_tokenization_in_flight",
        "gauge",
        (),
        _TOKENS,
        "Calls admitted to the pool and not finished (queued or running)",
    ),
    Family(
        "kvcache_tokenization_tokenization_latency_seconds",
        "histogram",
        (),
        _TOKENS,
        "Pool call latency, admission to completion (chat rendering and encoding)",
    ),
    Family(
        "kvcache_tokenization_tokenized_tokens",
        "counter",
        ("tokenizer",),
        _TOKENS,
        'Prompt tokens produced: tokenizer="cached" reused from the prefix store, "local" '
        "freshly encoded",
    ),
    Family(
        "kvcache_tokenization_prefix_store_lookups",
        "counter",
        ("result",),
        _TOKENS,
        "Prefix store lookups, result hit or miss",
    ),
    Family(
        "kvcache_tokenization_prefix_store_bytes", "gauge", (), _TOKENS, "Prefix store bytes used"
    ),
    Family("kvcache_tokenization_loaded_tokenizers", "gauge", (), _TOKENS, "Tokenizers loaded"),
    Family("kvcache_tokenization_tokenizer_loads", "counter", (), _TOKENS, "Tokenizer loads"),
    # -- the HTTP API ----------------------------------------------------------------------------
    Family(
        "kvcache_http_request_duration_seconds",
        "histogram",
        ("route", "status"),
        _HTTP,
        "From a request read in full to its response ready, by route (the path, /pods/{pod}, or "
        "unmatched) and status code; a request refused before it was read counts 0",
    ),
)

_BY_NAME = {family.name: family for family in FAMILIES}

# index statistics -> family, for plain counters and gauges a backend may or may not report
_INDEX_VALUES = {
    "adds": "kvcache_index_adds",
    "clears": "kvcache_index_clears",
    "keys": "kvcache_index_keys",
    "entries": "kvcache_index_entries",
    "engine_keys": "kvcache_index_engine_keys",
    "bytes": "kvcache_index_bytes",
    "max_keys": "kvcache_index_max_keys",
    "nodes": "kvcache_index_nodes",
    "backlog_ops": "kvcache_index_backlog_ops",
    "backlog_keys": "kvcache_index_backlog_keys",
    "pending_evicts": "kvcache_index_pending_evicts",
    "outages": "kvcache_index_outages",
    "recoveries": "kvcache_index_recoveries",
    "resyncs": "kvcache_index_resyncs",
    "round_trips": "kvcache_index_round_trips",
    "write_errors": "kvcache_index_write_errors",
    "backlogged_ops": "kvcache_index_backlogged_ops",
    "dropped_ops": "kvcache_index_dropped_ops",
    "degraded_request_keys": "kvcache_index_degraded_request_keys",
    "redirects": "kvcache_index_redirects",
    "script_loads": "kvcache_index_script_loads",
}
_INGEST_VALUES = {
    "received": "kvcache_events_messages_received",
    "messages": "kvcache_events_messages_applied",
    "blocks_stored": "kvcache_blocks_stored",
    "blocks_removed": "kvcache_blocks_removed",
    "clears": "kvcache_pod_clears",
    "gaps": "kvcache_sequence_gaps",
    "resets": "kvcache_publisher_resets",
    "duplicates": "kvcache_duplicate_batches",
    "hash_mismatches": "kvcache_hash_mismatches",
    "queue_overflow": "kvcache_queue_overflow",
    "queue_depth": "kvcache_queue_depth",
}


def _value(name: str, value: float) -> CounterMetricFamily | GaugeMetricFamily:
    family = _BY_NAME[name]
    if family.kind == "counter":
        return CounterMetricFamily(name, family.help, value=value)
    return GaugeMetricFamily(name, family.help, value=value)


def _labelled(name: str, values: Mapping[str, float]) -> CounterMetricFamily | GaugeMetricFamily:
    family = _BY_NAME[name]
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(name, family.help, labels=list(family.labels))
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)
    return metric


def _histogram(name: str, snapshot: Mapping[str, Any] | None) -> HistogramMetricFamily:
    snapshot = snapshot or LatencyHistogram().snapshot()
    family = HistogramMetricFamily(name, _BY_NAME[name].help)
    family.add_metric([], snapshot["buckets"], snapshot["sum"])
    return family


def _labelled_histograms(
    name: str, snapshots: Mapping[tuple[str, ...], Mapping[str, Any]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, _BY_NAME[name].help, labels=list(_BY_NAME[name].labels))
    for labels, snapshot in sorted(snapshots.items()):
        family.add_metric(list(labels), snapshot["buckets"], snapshot["sum"])
    return family


class KVCacheCollector(Collector):
    """Every family of `FAMILIES` whose source is present, built from current statistics."""

    def __init__(
        self,
        indexer_stats: Stats,
        ingest_stats: Stats | None = None,
        http_stats: Stats | None = None,
    ) -> None:
        self._indexer_stats = indexer_stats
        self._ingest_stats = ingest_stats
        self._http_stats = http_stats

    def collect(self) -> Iterator[Any]:
        """Build every family from the current statistics."""
        stats = self._indexer_stats()
        yield from _index_families(stats.get("index", {}), stats.get("read_path", {}))
        yield from _tokenization_families(stats.get("tokenization", {}))
        if self._ingest_stats is not None:
            yield from _ingest_families(self._ingest_stats())
        if self._http_stats is not None:
            requests = self._http_stats().get("requests", {})
            yield _labelled_histograms("kvcache_http_request_duration_seconds", requests)


def _index_families(index: Mapping[str, Any], reads: Mapping[str, Any]) -> Iterator[Any]:
    yield _value("kvcache_index_admissions", index.get("admitted_keys", 0))
    yield _value("kvcache_index_evictions", index.get("evicts", 0) + index.get("evicted_keys", 0))
    yield _value("kvcache_index_lookup_requests", reads.get("score_requests", 0))
    yield _value("kvcache_index_lookup_hits", reads.get("max_pod_hits", 0))
    yield _value("kvcache_index_max_pod_hit_count", reads.get("max_pod_hits", 0))
    yield _value("kvcache_index_degraded_lookups", reads.get("degraded_lookups", 0))
    yield _value("kvcache_score_blocks", reads.get("block_keys_computed", 0))
    yield _histogram("kvcache_index_lookup_latency_seconds", reads.get("lookup_latency"))
    yield _histogram("kvcache_score_latency_seconds", reads.get("score_latency"))
    for key, name in _INDEX_VALUES.items():
        if key in index:
            yield _value(name, index[key])
    if "nodes_down" in index:
        yield _value("kvcache_index_nodes_down", len(index["nodes_down"]))
        yield _value("kvcache_index_resync_pods", len(index.get("resync_pods", ())))
        yield _value("kvcache_index_healthy", 1 if index.get("healthy") else 0)


def _tokenization_families(stats: Mapping[str, Any]) -> Iterator[Any]:
    """Zeros until the first text request creates the tokenizer (families are always there)."""
    pool = stats.get("pool", {})
    store = stats.get("prefix_store", {})
    yield _value("kvcache_tokenization_requests", pool.get("completed", 0))
    yield _value("kvcache_tokenization_failures", pool.get("failed", 0))
    yield _value("kvcache_tokenization_rejected", pool.get("rejected", 0))
    yield _value("kvcache_tokenization_timeouts", pool.get("timeouts", 0))
    yield _value("kvcache_tokenization_in_flight", pool.get("in_flight", 0))
    yield _histogram("kvcache_tokenization_tokenization_latency_seconds", pool.get("latency"))
    yield _labelled(
        "kvcache_tokenization_tokenized_tokens",
        {"cached": store.get("reused_tokens", 0), "local": store.get("fresh_tokens", 0)},
    )
    yield _labelled(
        "kvcache_tokenization_prefix_store_lookups",
        {"hit": store.get("hits", 0), "miss": store.get("misses", 0)},
    )
    yield _value("kvcache_tokenization_prefix_store_bytes", store.get("bytes", 0))
    yield _value("kvcache_tokenization_loaded_tokenizers", len(stats.get("loaded_tokenizers", ())))
    yield _value("kvcache_tokenization_tokenizer_loads", stats.get("tokenizer_loads", 0))


def _ingest_families(stats: Mapping[str, Any]) -> Iterator[Any]:
    for key, name in _INGEST_VALUES.items():
        yield _value(name, stats.get(key, 0))
    yield _labelled("kvcache_events_applied", stats.get("events_applied", {}))
    rejected = dict(stats.get("events_rejected", {}))
    for reason, count in stats.get("frames_rejected", {}).items():
        rejected[f"frame_{reason}"] = rejected.get(f"frame_{reason}", 0) + count
    yield _labelled("kvcache_events_rejected", rejected)
    yield _labelled("kvcache_blocks_skipped", stats.get("blocks_skipped", {}))
    yield _labelled("kvcache_pods", stats.get("pods_by_hash_mode", {}))


def build_registry(
    indexer_stats: Stats, ingest_stats: Stats | None = None, http_stats: Stats | None = None
) -> CollectorRegistry:
    """A fresh registry holding only kvcache's collector (inject it where you expose metrics).

    ``indexer_stats`` is `Indexer.statistics` (index, read path and tokenization);
    ``ingest_stats`` the ingest pipeline's statistics plus ``received`` from the subscriber;
    ``http_stats`` `HttpApp.statistics` (read at scrape time, so it may name an app built with
    this registry).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KVCacheCollector(indexer_stats, ingest_stats, http_stats))
    return registry


def markdown_table() -> str:
    """The metrics table of docs/observability.md."""
    rows = [
        "| Name | Type | Labels | Source | Meaning |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        labels = ", ".join(f"`{label}`" for label in family.labels) or "–"
        rows.append(
            f"| `{family.exposed}` | {family.kind} | {labels} | {family.source} | {family.help} |"
        )
    return "\n".join(rows)
