"""`TracedIndex`: any `Index` with upstream's OpenTelemetry spans around lookup, add and evict.

Used only when tracing is enabled (see `kvcache.tracing`); the untraced service keeps the bare
backend, so the disabled path costs nothing. Everything else, including backend-specific
methods such as ``pod_counts`` or ``close``, is delegated unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvcache.blocks import KeyType, PodEntry
from kvcache.index.protocol import Index

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


def _tiers(entries: Sequence[PodEntry]) -> int:
    """Distinct non-empty device tiers among the entries (upstream's ``device_tier_count``)."""
    return len({entry.tier for entry in entries if entry.tier})


class TracedIndex:
    """Wraps ``index``; emits ``llm_d.kv_cache.index`` (lookup, lookup_runs),
    ``llm_d.kv_cache.index.add`` and ``llm_d.kv_cache.index.evict`` (evict, evict_many).

    ``tracer`` defaults to the global provider's ``kvcache.index`` tracer; a failing call marks
    its span as an error and re-raises.
    """

    def __init__(self, index: Index, tracer: Tracer | None = None) -> None:
        if tracer is None:
            from kvcache.tracing import INDEX_SCOPE
            from kvcache.tracing import tracer as global_tracer

            tracer = global_tracer(INDEX_SCOPE)
        self.inner = index
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"TracedIndex({self.inner!r})"

    def _lookup(self, request_keys: Sequence[int], pods: Collection[str] | None, runs: bool) -> Any:
        with self._tracer.start_as_current_span("llm_d.kv_cache.index") as span:
            span.set_attributes(
                {
                    "llm_d.kv_cache.index.lookup.block_count": len(request_keys),
                    "llm_d.kv_cache.lookup.pod_filter_count": len(pods or ()),
                }
            )
            if runs:
                result: Any = self.inner.lookup_runs(request_keys, pods)
                found = sum(length for _, length in result)
            else:
                result = self.inner.lookup(request_keys, pods)
                found = len(result)
            span.set_attributes(
                {
                    "llm_d.kv_cache.lookup.cache_hit": found > 0,
                    "llm_d.kv_cache.lookup.blocks_found": found,
                }
            )
            return result

    def lookup(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[frozenset[PodEntry]]:
        """`Index.lookup` in an ``llm_d.kv_cache.index`` span."""
        result: list[frozenset[PodEntry]] = self._lookup(request_keys, pods, False)
        return result

    def lookup_runs(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[tuple[frozenset[PodEntry], int]]:
        """`Index.lookup_runs` in an ``llm_d.kv_cache.index`` span (the scorer's lookup)."""
        result: list[tuple[frozenset[PodEntry], int]] = self._lookup(request_keys, pods, True)
        return result

    def add(
        self,
        engine_keys: Sequence[int] | None,
        request_keys: Sequence[int],
        entries: Iterable[PodEntry],
    ) -> list[int]:
        """`Index.add` in an ``llm_d.kv_cache.index.add`` span."""
        ents = tuple(entries)
        with self._tracer.start_as_current_span("llm_d.kv_cache.index.add") as span:
            span.set_attributes(
                {
                    "llm_d.kv_cache.index.add.engine_key_count": len(engine_keys or ()),
                    "llm_d.kv_cache.index.add.request_key_count": len(request_keys),
                    "llm_d.kv_cache.index.add.pod_entry_count": len(ents),
                    "llm_d.kv_cache.index.add.device_tier_count": _tiers(ents),
                }
            )
            return self.inner.add(engine_keys, request_keys, ents)

    @contextlib.contextmanager
    def _evict_span(self, key_type: KeyType, keys: int, ents: Sequence[PodEntry]) -> Iterator[None]:
        with self._tracer.start_as_current_span("llm_d.kv_cache.index.evict") as span:
            span.set_attributes(
                {
                    "llm_d.kv_cache.index.evict.key_type": key_type.value,
                    "llm_d.kv_cache.index.evict.key_count": keys,
                    "llm_d.kv_cache.index.evict.pod_entry_count": len(ents),
                    "llm_d.kv_cache.index.evict.device_tier_count": _tiers(ents),
                }
            )
            yield

    def evict(self, key: int, key_type: KeyType, entries: Iterable[PodEntry]) -> None:
        """`Index.evict` in an ``llm_d.kv_cache.index.evict`` span."""
        ents = tuple(entries)
        with self._evict_span(key_type, 1, ents):
            self.inner.evict(key, key_type, ents)

    def evict_many(
        self, keys: Sequence[int], key_type: KeyType, entries: Iterable[PodEntry]
    ) -> None:
        """`Index.evict_many` in one ``llm_d.kv_cache.index.evict`` span (``key_count`` keys)."""
        ents = tuple(entries)
        with self._evict_span(key_type, len(keys), ents):
            self.inner.evict_many(keys, key_type, ents)

    def clear(self, pod: str) -> int:
        """`Index.clear` (no upstream span)."""
        return self.inner.clear(pod)

    def request_key(self, engine_key: int) -> int:
        """`Index.request_key` (no upstream span)."""
        return self.inner.request_key(engine_key)

    def statistics(self) -> dict[str, Any]:
        """The wrapped backend's statistics."""
        return self.inner.statistics()
