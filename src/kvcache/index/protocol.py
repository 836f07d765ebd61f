"""The narrow `Index` protocol every backend implements (memory, cost-aware, Redis, Valkey).

Semantics (see docs/design.md, "Index"):

* ``add(engine_keys, request_keys, entries)`` writes every entry under every request key. With
  ``engine_keys`` it also records the engine-to-request mapping by ratio: with
  ``n = max(len(E), len(R))`` position ``i`` pairs ``E[i*len(E)//n]`` with ``R[i*len(R)//n]``
  (equal lengths 1:1, more engine keys many:1, more request keys 1:many); the last add wins
  for an engine key's mapping. Re-adding an entry is idempotent for the index and refreshes
  recency; ``add`` returns the request keys that already held every given entry before the
  call (a key repeated in the call at most once; order unspecified), so the write
  path can count a second physical copy of a block (vLLM stores one hash twice when it
  recomputes a block) instead of losing the block at its first removal.
* ``lookup(request_keys, pods)`` walks the keys from the first one and returns, per key, the
  entries that match the pod filter, **stopping at the first key without a matching entry**: the
  result is always a prefix of ``request_keys``. The scorer only ever needs that prefix. An
  empty or None ``pods`` means no filter; ``lookup([])`` is ``[]``.
* ``evict(key, key_type, entries)`` removes exactly those entries. An engine key is resolved to
  its request keys; its mapping is dropped once all of them are empty. Unknown keys are a no-op.
* ``evict_many(keys, key_type, entries)`` is ``evict`` of each key in order, in one call: engines
  remove blocks one event per block, and a batch avoids a per-key call on the ingest path.
* ``clear(pod)`` removes every entry of the pod on every tier and group.
* ``request_key(engine_key)`` is the last request key mapped to an engine key.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from kvcache.blocks import KeyType, PodEntry


@runtime_checkable
class Index(Protocol):
    """Where blocks live: request key -> set of pod entries, plus the engine-key map."""

    def add(
        self,
        engine_keys: Sequence[int] | None,
        request_keys: Sequence[int],
        entries: Iterable[PodEntry],
    ) -> list[int]:
        """Record that every entry holds every request key; returns the keys that already did.

        Raises IndexOperationError on empty keys or entries.
        """
        ...

    def lookup(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[frozenset[PodEntry]]:
        """Entries per key for the longest prefix of keys that has at least one (matching) entry.

        Equal sets may be returned as the same object; callers may rely on identity only as a
        cache hint, never for correctness.
        """
        ...

    def lookup_runs(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[tuple[frozenset[PodEntry], int]]:
        """`lookup`, run-length encoded: (entries, number of consecutive keys) per run.

        The scorer works on runs, so a 512-key prefix held by the same pods is one step.
        """
        ...

    def evict(self, key: int, key_type: KeyType, entries: Iterable[PodEntry]) -> None:
        """Remove exactly these entries from the key (engine keys resolve through the map)."""
        ...

    def evict_many(
        self, keys: Sequence[int], key_type: KeyType, entries: Iterable[PodEntry]
    ) -> None:
        """`evict` of each key in turn (one call, one lock, no per-key round trip).

        Raises InvalidKeyError, before evicting anything, if any key is not a u64.
        """
        ...

    def clear(self, pod: str) -> int:
        """Remove every entry of ``pod``; returns how many (key, entry) pairs were removed."""
        ...

    def request_key(self, engine_key: int) -> int:
        """The last request key mapped to ``engine_key``; raises UnknownKeyError if unmapped."""
        ...

    def statistics(self) -> dict[str, Any]:
        """Counters and sizes for metrics and ``Indexer.statistics()``."""
        ...
