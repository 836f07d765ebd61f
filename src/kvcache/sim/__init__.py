"""Simulated vLLM fleet: engines that model vLLM's prefix cache and publish real KV events."""

from __future__ import annotations

from kvcache.sim.engine import PoolExhaustedError, SimEngine
from kvcache.sim.wire import (
    LAYOUTS,
    BatchEncoder,
    EventSink,
    Layout,
    ListSink,
    SequencedSink,
    ZmqPublisher,
    layout_for_version,
)

__all__ = [
    "LAYOUTS",
    "BatchEncoder",
    "EventSink",
    "Layout",
    "ListSink",
    "PoolExhaustedError",
    "SequencedSink",
    "SimEngine",
    "ZmqPublisher",
    "layout_for_version",
]
