"""Latency histograms as plain counters, turned into Prometheus families only at scrape time.

Components keep one per measured stage and snapshot it in their ``statistics()``; the collector
in `kvcache.metrics` reads the snapshot. No Prometheus object is touched on a hot path.
"""

from __future__ import annotations

import bisect
from typing import Any

PROMETHEUS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10)
"""Prometheus' default bounds (seconds)."""
FINE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025)
"""Bounds below the defaults: lookups and scoring take microseconds."""
LATENCY_BUCKETS = FINE_BUCKETS + PROMETHEUS_BUCKETS


class LatencyHistogram:
    """Counts per bucket and a sum. Not locked: the owner observes and snapshots under its lock."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation (upper bounds are inclusive, as in Prometheus)."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [(le, cumulative count)...], "sum": s, "count": n}``; last le "+Inf"."""
        cumulative = 0
        buckets: list[tuple[str, int]] = []
        for bound, count in zip((*self._bounds, None), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound is None else repr(float(bound)), cumulative))
        return {"buckets": buckets, "sum": self._sum, "count": cumulative}
