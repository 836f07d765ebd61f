"""Per-publisher sequence tracking: gaps (lost batches) and restarts (sequence went backwards).

vLLM numbers batches from 0 per publisher process with no epoch, so a sequence number that does
not move forward means the engine restarted and everything we knew about that pod is stale.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class SeqVerdict(enum.Enum):
    """What a new sequence number means for the stream it belongs to."""

    FIRST = "first"
    """The first batch we see from this publisher."""
    NEXT = "next"
    """Exactly the successor of the last one."""
    GAP = "gap"
    """Some batches were lost between the last one and this one."""
    RESET = "reset"
    """The publisher restarted (or was replaced): drop what we know about it first."""


@dataclass(slots=True)
class StreamState:
    """What we know about one (pod, data-parallel rank) stream."""

    last_seq: int = -1
    batches: int = 0
    gaps: int = 0
    lost_batches: int = 0
    resets: int = 0
    last_event_time: float = 0.0
    last_gap: tuple[int, int] | None = None
    """The last missing range, inclusive."""


@dataclass
class SequenceTracker:
    """Classifies each arriving batch of a stream; one tracker per ingest shard (not shared)."""

    clock: Callable[[], float] = time.time
    streams: dict[tuple[str, int | None], StreamState] = field(default_factory=dict)

    def observe(self, pod: str, rank: int | None, seq: int) -> SeqVerdict:
        """Record ``seq`` for the stream and say how it relates to the previous one."""
        state = self.streams.get((pod, rank))
        if state is None:
            state = self.streams[(pod, rank)] = StreamState()
        state.batches += 1
        state.last_event_time = self.clock()
        last = state.last_seq
        state.last_seq = seq
        if last < 0:
            return SeqVerdict.FIRST
        if seq == last + 1:
            return SeqVerdict.NEXT
        if seq > last + 1:
            state.gaps += 1
            state.lost_batches += seq - last - 1
            state.last_gap = (last + 1, seq - 1)
            return SeqVerdict.GAP
        state.resets += 1
        return SeqVerdict.RESET

    def forget(self, pod: str) -> None:
        """Drop every stream of a pod (it left the fleet)."""
        for key in [key for key in self.streams if key[0] == pod]:
            del self.streams[key]
