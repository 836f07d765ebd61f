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


def test_every_catalogued_family_with_its_declared_type() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from kvcache.histogram import LatencyHistogram
    from kvcache.metrics import FAMILIES

    histogram = LatencyHistogram()
    histogram.observe(0.00002)
    histogram.observe(3.0)
    index: dict[str, object] = {
        "admitted_keys": 1,
        "adds": 1,
        "clears": 1,
        "keys": 1,
        "entries": 1,
        "engine_keys": 1,
        "bytes": 1,
        "max_keys": 1,
        **dict.fromkeys(("nodes", "backlog_ops", "backlog_keys", "pending_evicts"), 1),
        "nodes_down": [],
        "resync_pods": [],
        "healthy": True,
    }
    for family in FAMILIES:  # the shared index's counters are reported under their own names
        if family.kind == "counter" and "Redis" in family.source:
            index[family.name.removeprefix("kvcache_index_")] = 1
    indexer = {
        "index": index,
        "read_path": {"lookup_latency": histogram.snapshot()},
        "tokenization": {"pool": {"latency": histogram.snapshot()}},
    }
    http = {"requests": {("/score_tokens", "200"): histogram.snapshot()}}
    text = generate_latest(build_registry(lambda: indexer, dict, lambda: http)).decode()
    exposed = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert exposed == {family.name: family.kind for family in FAMILIES}
    assert 'kvcache_index_lookup_latency_seconds_bucket{le="2.5e-05"} 1.0' in text
    assert 'kvcache_index_lookup_latency_seconds_bucket{le="2.5"} 1.0' in text
    assert 'kvcache_index_lookup_latency_seconds_bucket{le="5.0"} 2.0' in text
    assert "kvcache_index_lookup_latency_seconds_count 2.0" in text
    assert "kvcache_index_healthy 1.0" in text
    route = 'route="/score_tokens",status="200"'
    assert f'kvcache_http_request_duration_seconds_bucket{{le="5.0",{route}}} 2.0' in text
