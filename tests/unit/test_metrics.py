"""The Prometheus collector turns components' statistics into the documented families."""

from __future__ import annotations

from prometheus_client import generate_latest

from kvcache.metrics import build_registry


def test_shared_backend_health_families() -> None:
    stats = {
        "index": {
            "admitted_keys": 7,
            "evicts": 2,
            "evicted_keys": 1,
            "backlog_ops": 3,
            "resync_pods": ["a", "b"],
            "nodes_down": ["n1"],
        },
        "read_path": {"score_requests": 5, "max_pod_hits": 9, "degraded_lookups": 4},
    }
    text = generate_latest(build_registry(lambda: stats)).decode()
    for line in (
        "kvcache_index_admissions_total 7.0",
        "kvcache_index_evictions_total 3.0",
        "kvcache_index_lookup_requests_total 5.0",
        "kvcache_index_max_pod_hit_count_total 9.0",
        "kvcache_index_degraded_lookups_total 4.0",
        "kvcache_index_backlog_ops 3.0",
        "kvcache_index_resync_pods 2.0",
        "kvcache_index_nodes_down 1.0",
    ):
        assert line in text, line


def test_in_memory_backend_has_no_server_gauges() -> None:
    text = generate_latest(build_registry(lambda: {"index": {}, "read_path": {}})).decode()
    assert "kvcache_index_backlog_ops" not in text
    assert "kvcache_index_degraded_lookups_total 0.0" in text
