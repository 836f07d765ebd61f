"""Stateful property test: the in-process backends against a plain-dict model of the protocol.

No capacity pressure: the model is the exact semantics of `Index` (protocol.py) with the
engine-key map overwritten by the last add, as in the upstream in-memory backend.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvcache.blocks import CPU, GPU, KeyType, PodEntry
from kvcache.errors import UnknownKeyError
from kvcache.index import CostAwareIndex, Index, MemoryIndex
from kvcache.index.table import unmix1

# a small key space so that operations collide; plus the keys stored in the reserved rows
KEYS = st.sampled_from([*range(12), unmix1(0), unmix1(1), (1 << 64) - 1])
PODS = ["pod-a", "pod-b", "pod-c"]
ENTRIES = st.builds(
    PodEntry,
    st.sampled_from(PODS),
    st.sampled_from([GPU, CPU]),
    st.booleans(),
    st.sampled_from([None, 0]),
)
ENTRY_LISTS = st.lists(ENTRIES, min_size=1, max_size=3)


def ratio_mapping(engine: list[int], request: list[int]) -> dict[int, list[int]]:
    """Engine key -> request keys by the protocol's ratio rule (later pairs win on repeats)."""
    n = max(len(engine), len(request))
    out: dict[int, list[int]] = {}
    runs: dict[int, list[int]] = {}
    for i in range(n):
        e = engine[i * len(engine) // n]
        r = request[i * len(request) // n]
        runs.setdefault(i * len(engine) // n, []).append(r)
        out[e] = runs[i * len(engine) // n]
    return out


class IndexModel(RuleBasedStateMachine):
    make: Callable[[], Index]

    @initialize()
    def setup(self) -> None:
        self.index = type(self).make()
        self.data: dict[int, set[PodEntry]] = {}
        self.emap: dict[int, list[int]] = {}

    def _remove(self, key: int, entries: set[PodEntry]) -> None:
        held = self.data.get(key)
        if held is not None:
            held -= entries
            if not held:
                del self.data[key]

    @rule(
        engine=st.none() | st.lists(KEYS, min_size=1, max_size=5, unique=True),
        request=st.lists(KEYS, min_size=1, max_size=6),
        entries=ENTRY_LISTS,
    )
    def add(self, engine: list[int] | None, request: list[int], entries: list[PodEntry]) -> None:
        repeated = [r for r in dict.fromkeys(request) if set(entries) <= self.data.get(r, set())]
        assert self.index.add(engine, request, entries) == repeated
        for r in request:
            self.data.setdefault(r, set()).update(entries)
        if engine is not None:
            self.emap.update(ratio_mapping(engine, request))

    @rule(keys=st.lists(KEYS, max_size=8), pods=st.none() | st.lists(st.sampled_from(PODS)))
    def lookup(self, keys: list[int], pods: list[str] | None) -> None:
        expected = []
        for k in keys:
            held = {e for e in self.data.get(k, ()) if not pods or e.pod in pods}
            if not held:
                break
            expected.append(frozenset(held))
        assert self.index.lookup(keys, pods) == expected

    @rule(key=KEYS, entries=ENTRY_LISTS)
    def evict_request(self, key: int, entries: list[PodEntry]) -> None:
        self.index.evict(key, KeyType.REQUEST, entries)
        self._remove(key, set(entries))

    @rule(key=KEYS, entries=ENTRY_LISTS)
    def evict_engine(self, key: int, entries: list[PodEntry]) -> None:
        self.index.evict(key, KeyType.ENGINE, entries)
        self._evict_engine(key, set(entries))

    @rule(keys=st.lists(KEYS, max_size=6), entries=ENTRY_LISTS)
    def evict_engines(self, keys: list[int], entries: list[PodEntry]) -> None:
        """A removal run: the same as evicting the keys one by one, in order."""
        self.index.evict_many(keys, KeyType.ENGINE, entries)
        for key in keys:
            self._evict_engine(key, set(entries))

    def _evict_engine(self, key: int, entries: set[PodEntry]) -> None:
        targets = self.emap.get(key)
        if targets is None:
            return
        for r in targets:
            self._remove(r, entries)
        if all(r not in self.data for r in targets):
            del self.emap[key]

    @rule(key=KEYS, pod=st.sampled_from(PODS))
    def evict_pod_everywhere(self, key: int, pod: str) -> None:
        """Evict every entry of a pod from one key, the way a pod's BlockRemoved would."""
        held = [e for e in self.data.get(key, ()) if e.pod == pod]
        if held:
            self.index.evict(key, KeyType.REQUEST, held)
            self._remove(key, set(held))

    @rule(pod=st.sampled_from([*PODS, "pod-unknown"]))
    def clear(self, pod: str) -> None:
        removed = self.index.clear(pod)
        expected = 0
        for k in list(self.data):
            mine = {e for e in self.data[k] if e.pod == pod}
            expected += len(mine)
            self._remove(k, mine)
        assert removed == expected

    @rule(key=KEYS)
    def request_key(self, key: int) -> None:
        if key in self.emap:
            assert self.index.request_key(key) == self.emap[key][-1]
        else:
            with pytest.raises(UnknownKeyError):
                self.index.request_key(key)

    @invariant()
    def pairs_are_counted(self) -> None:
        if hasattr(self, "index"):
            stats = self.index.statistics()
            assert stats["entries"] == sum(len(s) for s in self.data.values())


class MemoryIndexModel(IndexModel):
    make = staticmethod(lambda: MemoryIndex(pod_cache_size=None))


class NumpyMemoryIndexModel(IndexModel):
    """The numpy paths, which serve where the C kernels were not built."""

    make = staticmethod(lambda: MemoryIndex(pod_cache_size=None, kernels=False))


class CostAwareIndexModel(IndexModel):
    make = staticmethod(lambda: CostAwareIndex("1MiB"))


_settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryIndexModel = _settings(MemoryIndexModel).TestCase
TestNumpyMemoryIndexModel = _settings(NumpyMemoryIndexModel).TestCase
TestCostAwareIndexModel = _settings(CostAwareIndexModel).TestCase
