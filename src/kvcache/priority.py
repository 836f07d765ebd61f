"""Scoring before ingest: a gate that pauses bulk ingest while a latency-critical read runs.

On CPython an ingest thread and the scoring threads share one GIL (when `kvcache serve` reads
events on its HTTP event loop, the gate is off: ingest and requests already take turns there).
An ingest thread that releases the GIL often (every ZMQ receive) and takes it straight back
keeps a waiting scoring thread from ever asking for a switch: measured, `score_tokens` p99 went
from 0.8 ms idle to 500 ms under full-rate ingest. Readers mark themselves active; the ingest
loop, between two messages, waits (GIL released) until no read is active, for at most
``max_wait`` seconds, so ingest still progresses under a constant stream of reads. The engine's
socket buffers what arrives meanwhile. After a wait that ran out, ingest applies ``burst``
messages without yielding, so a saturated reader cannot stop ingest either (at 100% scoring
duty, ingest keeps ~15% of its rate)."""

from __future__ import annotations

import threading
from types import TracebackType


class ReadPriority:
    """Shared by the `Indexer` (readers) and the `IngestPipeline` (the writer)."""

    def __init__(self, max_wait: float = 0.005, burst: int = 16) -> None:
        self.max_wait = max_wait
        self.burst = burst
        self._credit = 0
        self._active = 0
        self._idle = threading.Condition(threading.Lock())
        self.waits = 0
        """Times ingest paused for a read (statistics)."""
        self._reading = _Reading(self)

    def reading(self) -> _Reading:
        """Mark a read in progress for the duration of the ``with`` block."""
        return self._reading

    def yield_to_readers(self) -> None:
        """Called by ingest between messages: wait while a read is active (bounded)."""
        if not self._active:  # unlocked read: a stale answer costs one message, no more
            return
        if self._credit:
            self._credit -= 1
            return
        with self._idle:
            if self._active:
                self.waits += 1
                if not self._idle.wait_for(lambda: not self._active, timeout=self.max_wait):
                    self._credit = self.burst


class _Reading:
    """The context manager `ReadPriority.reading` returns; one per gate, reentrant and shared by
    every reader (a class, not a generator: it runs twice per HTTP score)."""

    __slots__ = ("_gate",)

    def __init__(self, gate: ReadPriority) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        with gate._idle:
            gate._active += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        gate = self._gate
        with gate._idle:
            gate._active -= 1
            if not gate._active:
                gate._idle.notify_all()
