"""A vLLM server's load, read from its Prometheus ``/metrics`` page (for `kvcache.routing`)."""

from __future__ import annotations

import math
from typing import TypedDict

WAITING_METRIC = "vllm:num_requests_waiting"
RUNNING_METRIC = "vllm:num_requests_running"
KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class VllmLoad(TypedDict):
    """The `PodLoad` fields read from a vLLM /metrics page: ``PodLoad(pod, **load)``."""

    waiting: int
    running: int
    kv_usage: float


def scrape_vllm_metrics(
    text: str, *, model_name: str | None = None, engine: str | None = None
) -> VllmLoad:
    """The load fields of a vLLM ``/metrics`` page (Prometheus text): ``PodLoad(pod, **load)``.

    Reads ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
    ``vllm:kv_cache_usage_perc`` (or, from older vLLM, ``vllm:gpu_cache_usage_perc``). Samples
    may carry ``model_name`` and ``engine`` labels (one per data-parallel engine of the server);
    ``model_name``/``engine`` select one, otherwise queues are summed and the KV usage is the
    highest (the fullest engine saturates first). Needs ``prometheus-client`` (kvcache[service]).
    Raises ValueError when the text is not Prometheus exposition or lacks one of the metrics.
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {WAITING_METRIC, RUNNING_METRIC, *KV_USAGE_METRICS}
    values: dict[str, list[float]] = {name: [] for name in wanted}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in wanted:
                    continue
                labels = sample.labels
                if model_name is not None and labels.get("model_name") != model_name:
                    continue
                if engine is not None and labels.get("engine") != engine:
                    continue
                values[sample.name].append(float(sample.value))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from exc
    usage_name = next((name for name in KV_USAGE_METRICS if values[name]), None)
    missing = [name for name in (WAITING_METRIC, RUNNING_METRIC) if not values[name]]
    if usage_name is None:
        missing.append(" or ".join(KV_USAGE_METRICS))
    if missing:
        selector = "" if model_name is None and engine is None else " for the selected labels"
        raise ValueError(f"vLLM metrics missing{selector}: {', '.join(missing)}")
    assert usage_name is not None
    for name in (WAITING_METRIC, RUNNING_METRIC, usage_name):
        bad = [v for v in values[name] if not (math.isfinite(v) and v >= 0.0)]
        if bad:
            raise ValueError(f"{name}: expected finite values >= 0, got {bad[0]}")
    return VllmLoad(
        waiting=round(sum(values[WAITING_METRIC])),
        running=round(sum(values[RUNNING_METRIC])),
        # Float noise of vLLM's 1 - free/total may step just past 1.
        kv_usage=min(1.0, max(values[usage_name])),
    )
