"""Timing and memory primitives shared by every benchmark section."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def time_calls(func: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        func()
    gc.collect()
    gc.disable()
    try:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            func()
            samples.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of the samples."""
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[rank]


def median(samples: list[float]) -> float:
    """Median of the samples."""
    return statistics.median(samples)
