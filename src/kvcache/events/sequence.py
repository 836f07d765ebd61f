"""Per-publisher sequence tracking: gaps (lost batches) and restarts (sequence went backwards).

vLLM numbers batches from 0 per publisher process with no epoch, so a sequence number that does
not move forward means the engine restarted and everything we knew about that pod is stale. The
one exception is the same batch delivered again (same sequence number and same timestamp: a
network-level duplicate or a replayed batch): it is skipped, not taken for a restart, because a
restarted engine stamps its batches with a new time.
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
    DUPLICATE = "duplicate"
    """The last batch again (same sequence number and timestamp): skip it."""


@dataclass(slots=True)
class StreamState:
    """What we know about one (pod, data-parallel rank) stream."""

    last_seq: int = -1
    last_ts: float | None = None
    batches: int = 0
    duplicates: int = 0
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

    def observe(self, pod: str, rank: int | None, seq: int, ts: float | None = None) -> SeqVerdict:
        """Record ``seq`` (and the batch's timestamp ``ts``, when known) for the stream and say
        how it relates to the previous batch."""
        state = self.streams.get((pod, rank))
        if state is None:
            state = self.streams[(pod, rank)] = StreamState()
        state.last_event_time = self.clock()
        if seq == state.last_seq and ts is not None and ts == state.last_ts:
            state.duplicates += 1
            return SeqVerdict.DUPLICATE
        state.batches += 1
        last = state.last_seq
        state.last_seq = seq
        state.last_ts = ts
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
