"""Prometheus exposition: one collector that reads the components' statistics() at scrape time.

Nothing on the hot paths touches Prometheus objects; counters live in plain Python integers in
each component and are turned into metric families only when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

Stats = Callable[[], Mapping[str, Any]]


class KVCacheCollector(Collector):
    """Metric families for the index (upstream `kvcache_index_*` names), read path and ingest."""

    def __init__(self, indexer_stats: Stats, ingest_stats: Stats | None = None) -> None:
        self._indexer_stats = indexer_stats
        self._ingest_stats = ingest_stats

    def collect(self) -> Iterator[Any]:
        """Build every family from the current statistics."""
        stats = self._indexer_stats()
        index = stats.get("index", {})
        reads = stats.get("read_path", {})
        yield _counter(
            "kvcache_index_admissions",
            "Request keys added to the index",
            index.get("admitted_keys", 0),
        )
        yield _counter(
            "kvcache_index_evictions",
            "Evictions: evict calls (one entry each from events) plus keys dropped for capacity",
            index.get("evicts", 0) + index.get("evicted_keys", 0),
        )
        yield _counter(
            "kvcache_index_lookup_requests", "Index lookups", reads.get("score_requests", 0)
        )
        yield _counter(
            "kvcache_index_lookup_hits",
            "Sum over lookups of the longest per-pod prefix hit (blocks)",
            reads.get("max_pod_hits", 0),
        )
        yield _counter(
            "kvcache_index_max_pod_hit_count",
            "Sum over lookups of the longest per-pod prefix hit (blocks)",
            reads.get("max_pod_hits", 0),
        )
        yield _counter(
            "kvcache_index_degraded_lookups",
            "Lookups a shared backend answered only in part (server slow or unreachable)",
            reads.get("degraded_lookups", 0),
        )
        if "backlog_ops" in index:
            yield GaugeMetricFamily(
                "kvcache_index_backlog_ops",
                "Writes queued while the shared index server is unreachable",
                value=index["backlog_ops"],
            )
            yield GaugeMetricFamily(
                "kvcache_index_resync_pods",
                "Pods to be rebuilt from their events once the server is back",
                value=len(index.get("resync_pods", ())),
            )
            yield GaugeMetricFamily(
                "kvcache_index_nodes_down",
                "Shared index server nodes currently unreachable",
                value=len(index.get("nodes_down", ())),
            )
        latency = reads.get("lookup_latency")
        if latency is not None:
            family = HistogramMetricFamily(
                "kvcache_index_lookup_latency_seconds", "Lookup plus scoring latency"
            )
            family.add_metric([], latency["buckets"], latency["sum"])
            yield family
        for name, doc in (
            ("keys", "Block keys held"),
            ("entries", "(block, pod entry) pairs held"),
            ("bytes", "Bytes used by the index structures"),
        ):
            if name in index:
                yield GaugeMetricFamily(f"kvcache_index_{name}", doc, value=index[name])
        if self._ingest_stats is not None:
            yield from _ingest_families(self._ingest_stats())


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _ingest_families(stats: Mapping[str, Any]) -> Iterator[Any]:
    yield _counter(
        "kvcache_events_messages_received", "ZMQ messages received", stats.get("received", 0)
    )
    yield _labelled(
        "kvcache_events_applied", "Events applied", "type", stats.get("events_applied", {})
    )
    rejected = dict(stats.get("events_rejected", {}))
    for reason, count in stats.get("frames_rejected", {}).items():
        rejected[f"frame_{reason}"] = rejected.get(f"frame_{reason}", 0) + count
    yield _labelled("kvcache_events_rejected", "Events or messages skipped", "reason", rejected)
    yield _counter(
        "kvcache_blocks_stored", "Blocks stored by events", stats.get("blocks_stored", 0)
    )
    yield _counter(
        "kvcache_blocks_removed", "Blocks removed by events", stats.get("blocks_removed", 0)
    )
    yield _labelled(
        "kvcache_blocks_skipped",
        "Stored blocks that could not be indexed",
        "reason",
        stats.get("blocks_skipped", {}),
    )
    yield _counter("kvcache_pod_clears", "AllBlocksCleared applied", stats.get("clears", 0))
    yield _counter("kvcache_sequence_gaps", "Sequence gaps (lost batches)", stats.get("gaps", 0))
    yield _counter("kvcache_publisher_resets", "Publisher restarts", stats.get("resets", 0))
    yield _counter(
        "kvcache_hash_mismatches",
        "Events whose hashes our key scheme does not reproduce",
        stats.get("hash_mismatches", 0),
    )
    yield _counter(
        "kvcache_queue_overflow", "Messages dropped on a full queue", stats.get("queue_overflow", 0)
    )
    yield GaugeMetricFamily(
        "kvcache_queue_depth", "Messages waiting to be applied", value=stats.get("queue_depth", 0)
    )
    modes = GaugeMetricFamily("kvcache_pods", "Pods by hash mode", labels=["hash_mode"])
    for mode, count in sorted(stats.get("pods_by_hash_mode", {}).items()):
        modes.add_metric([mode], count)
    yield modes


def build_registry(indexer_stats: Stats, ingest_stats: Stats | None = None) -> CollectorRegistry:
    """A fresh registry holding only kvcache's collector (inject it where you expose metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KVCacheCollector(indexer_stats, ingest_stats))
    return registry
