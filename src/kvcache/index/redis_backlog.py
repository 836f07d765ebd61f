"""Writes to the Redis/Valkey index queued while it is unreachable: in order, bounded, resynced.

While a node is down (or earlier writes still wait), writes queue here and are replayed in
order once every node answers. The bound is in keys. A write past it is lost, and with it the
index's knowledge of the pods it names: their queued writes (all from before the loss) are
dropped, and the pods are marked for resync: cleared once the server is back, before the
backlog is replayed, so that the writes queued after the loss rebuild them from a clean state.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from kvcache.blocks import KeyType, PodEntry

log = logging.getLogger("kvcache.index.redis")


@dataclass(slots=True)
class Add:
    """`Index.add` of request keys (and engine keys, in dual mode) for ``entries``."""

    engine_keys: NDArray[np.uint64] | None
    request_keys: NDArray[np.uint64]
    entries: tuple[PodEntry, ...]

    def size(self) -> int:
        """Keys it writes (what the backlog bound counts)."""
        return int(self.request_keys.size)


@dataclass(slots=True)
class Evict:
    """`Index.evict` of one key."""

    key: int
    key_type: KeyType
    entries: tuple[PodEntry, ...]

    def size(self) -> int:
        """Keys it writes."""
        return 1


@dataclass(slots=True)
class Clear:
    """`Index.clear` of one pod."""

    pod: str
    entries: tuple[PodEntry, ...] = ()

    def size(self) -> int:
        """Counted as one key."""
        return 1


Op = Add | Evict | Clear


def pods_of(op: Op) -> set[str]:
    """The pods whose entries ``op`` changes."""
    return {op.pod} if isinstance(op, Clear) else {e.pod for e in op.entries}


def without(op: Op, pods: set[str]) -> Op | None:
    """``op`` without the entries of ``pods`` (None when nothing is left)."""
    if isinstance(op, Clear):
        return None if op.pod in pods else op
    if not any(e.pod in pods for e in op.entries):
        return op
    entries = tuple(e for e in op.entries if e.pod not in pods)
    if not entries:
        return None
    if isinstance(op, Add):
        return Add(op.engine_keys, op.request_keys, entries)
    return Evict(op.key, op.key_type, entries)


class Backlog:
    """The queue itself; the caller serialises every call (the index's write lock).

    ``count(name, n)`` receives the ``backlogged_ops`` and ``dropped_ops`` counts.
    """

    def __init__(self, limit: int, count: Callable[[str, int], None]) -> None:
        self.limit = limit
        self.keys = 0
        """Keys queued (bounded by ``limit``)."""
        self.resync: set[str] = set()
        """Pods that lost a write: cleared when the server is back, before the replay."""
        self._ops: deque[Op] = deque()
        self._queued_pods: Counter[str] = Counter()  # queued ops per pod
        self._count = count

    def __len__(self) -> int:
        return len(self._ops)

    @property
    def waiting(self) -> bool:
        """Whether a write must queue rather than apply: earlier writes or a resync wait (a
        write applied now would overtake them, or be wiped by the resync's clear)."""
        return bool(self._ops) or bool(self.resync)

    def queue(self, ops: Iterable[Op]) -> None:
        """Append ``ops`` in order; a write past the bound marks its pods for resync."""
        for op in ops:
            if self.keys + op.size() > self.limit:
                pods = pods_of(op)
                if not pods <= self.resync:
                    log.warning("index backlog full: pods %s will be resynced", sorted(pods))
                self.resync |= pods
                self._count("dropped_ops", 1)
                if any(self._queued_pods[p] for p in pods):
                    self._purge(pods)
                continue
            self._ops.append(op)
            self.keys += op.size()
            self._queued_pods.update(pods_of(op))
            self._count("backlogged_ops", 1)

    def head(self, n: int) -> list[Op]:
        """The first ``n`` queued writes (left queued until `applied`)."""
        return [self._ops[i] for i in range(min(n, len(self._ops)))]

    def applied(self, n: int) -> None:
        """The first ``n`` queued writes are in the server: drop them."""
        for _ in range(n):
            op = self._ops.popleft()
            self.keys -= op.size()
            self._queued_pods.subtract(pods_of(op))

    def _purge(self, pods: set[str]) -> None:
        """Drop the queued writes of ``pods`` (their entries, from writes of several pods)."""
        kept: deque[Op] = deque()
        for queued in self._ops:
            rest = without(queued, pods)
            if rest is None:
                self._count("dropped_ops", 1)
            else:
                kept.append(rest)
        self._ops = kept
        self.keys = sum(op.size() for op in kept)
        self._queued_pods = Counter(p for op in kept for p in pods_of(op))
