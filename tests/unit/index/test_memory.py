"""MemoryIndex: the shared conformance suite plus count bounds, recency and internals."""

from __future__ import annotations

import numpy as np
import pytest

from kvcache.blocks import CPU, KeyType, PodEntry
from kvcache.errors import ConfigError, InvalidKeyError, UnknownKeyError
from kvcache.index import Index, MemoryIndex
from kvcache.index.table import unmix1
from kvcache.testing.conformance import IndexConformance

A, B, C = PodEntry("pod-a"), PodEntry("pod-b"), PodEntry("pod-c")


class TestMemoryConformance(IndexConformance):
    @pytest.fixture(params=[True, False], ids=["kernels", "numpy"])
    def index(self, request: pytest.FixtureRequest) -> Index:
        return MemoryIndex(kernels=request.param)


def present(index: MemoryIndex, keys: list[int]) -> list[int]:
    return [k for k in keys if index.lookup([k])]


def test_is_an_index() -> None:
    assert isinstance(MemoryIndex(), Index)


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 0}, {"pod_cache_size": 0}, {"engine_map_size": 0}, {"evict_fraction": 0.9}],
)
def test_bad_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        MemoryIndex(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- count bounds and LRU


def test_size_two_keeps_the_last_two_keys() -> None:
    index = MemoryIndex(size=2, evict_fraction=0)
    for k in (1, 2, 3):
        index.add([k], [k], [A])
    assert present(index, [1, 2, 3]) == [2, 3]
    assert index.statistics()["evicted_keys"] == 1


def test_lookup_refreshes_recency() -> None:
    index = MemoryIndex(size=2, evict_fraction=0)
    index.add(None, [1], [A])
    index.add(None, [2], [A])
    index.lookup([1])
    index.add(None, [3], [A])
    assert present(index, [1, 2, 3]) == [1, 3]


def test_re_add_refreshes_recency_and_keeps_entries() -> None:
    index = MemoryIndex(size=2, evict_fraction=0)
    index.add(None, [1], [A])
    index.add(None, [2], [A])
    index.add(None, [1, 3], [B])  # 1 exists: only one new key, so only 2 goes
    assert present(index, [1, 2, 3]) == [1, 3]
    assert index.lookup([1]) == [frozenset({A, B})]


def test_batch_larger_than_size_keeps_its_newest_keys() -> None:
    index = MemoryIndex(size=3)
    index.add(list(range(10, 20)), list(range(10)), [A])
    assert present(index, list(range(10))) == [7, 8, 9]
    assert index.request_key(19) == 9
    with pytest.raises(UnknownKeyError):
        index.request_key(10)  # mapped to a key that never made it in


def test_capacity_evicts_in_batches() -> None:
    index = MemoryIndex(size=1000, evict_fraction=0.1)
    index.add(None, list(range(1000)), [A])
    index.add(None, [5000], [A])
    stats = index.statistics()
    assert stats["keys"] == 1000 - 100
    assert stats["entries"] == stats["keys"]
    assert stats["evicted_keys"] == 101


def test_approximate_lru_keeps_hot_keys() -> None:
    index = MemoryIndex(size=2000)
    hot = list(range(100))
    index.add(None, hot, [A])
    for start in range(1000, 21_000, 200):
        index.add(None, list(range(start, start + 200)), [A])
        index.lookup(hot)  # hot prefix in constant use
    assert index.lookup(hot) == [frozenset({A})] * 100
    assert index.statistics()["keys"] <= 2000
    assert present(index, list(range(1000, 1200))) == []  # cold and old: gone


def test_pod_cache_size_two_keeps_the_last_two_entries() -> None:
    index = MemoryIndex(pod_cache_size=2)
    for entry in (A, B, C):
        index.add(None, [1], [entry])
    assert index.lookup([1]) == [frozenset({B, C})]
    index.add(None, [2], [A, B, C])
    assert index.lookup([2]) == [frozenset({B, C})]
    assert index.statistics()["entries"] == 4


def test_pod_cache_unbounded() -> None:
    index = MemoryIndex(pod_cache_size=None)
    entries = [PodEntry(f"pod-{i}") for i in range(50)]
    index.add(None, [1], entries)
    assert index.lookup([1]) == [frozenset(entries)]


def test_engine_map_is_bounded() -> None:
    index = MemoryIndex(engine_map_size=100, evict_fraction=0)
    for k in range(300):
        index.add([k + 1000], [k], [A])
    stats = index.statistics()
    assert stats["engine_keys"] <= 100
    assert stats["evicted_mappings"] >= 200
    assert index.request_key(1299) == 299
    with pytest.raises(UnknownKeyError):
        index.request_key(1000)
    assert index.lookup([0]) == [frozenset({A})]  # the request keys themselves stay


# ---------------------------------------------------------------------- mapping internals


def test_identity_mappings_use_no_engine_rows() -> None:
    index = MemoryIndex()
    keys = list(range(100, 200))
    index.add(keys, keys, [A])
    assert index.statistics()["engine_keys"] == 0
    assert index.request_key(150) == 150


def test_re_adding_an_engine_key_overwrites_its_mapping() -> None:
    index = MemoryIndex()
    index.add([1], [11], [A])
    index.add([1], [12], [A])
    assert index.request_key(1) == 12
    index.evict(1, KeyType.ENGINE, [A])
    assert index.lookup([11]) == [frozenset({A})]  # no longer reachable through engine key 1
    assert index.lookup([12]) == []


def test_identity_mapping_replaced_by_dual_mapping() -> None:
    index = MemoryIndex()
    index.add([5], [5], [A])
    index.add([5], [6], [B])
    assert index.request_key(5) == 6
    index.evict(5, KeyType.ENGINE, [B])
    assert index.lookup([5, 6]) == [frozenset({A})]
    index.add([7], [70, 71], [A])
    index.add([7], [7], [A])
    assert index.request_key(7) == 7
    assert index.statistics()["engine_keys"] == 0


def test_mapping_outlives_emptied_identity_key() -> None:
    index = MemoryIndex()
    index.add([5], [5], [A])
    index.evict(5, KeyType.REQUEST, [A])
    assert index.lookup([5]) == []
    assert index.request_key(5) == 5  # like upstream: only an engine eviction drops it
    index.add(None, [5], [B])
    assert index.lookup([5]) == [frozenset({B})]
    index.evict(5, KeyType.ENGINE, [B])
    with pytest.raises(UnknownKeyError):
        index.request_key(5)


def test_keys_stored_in_reserved_rows() -> None:
    special = [unmix1(0), unmix1(1)]
    index = MemoryIndex()
    index.add(special, special, [A])
    index.add(None, [1, *special], [B])
    assert index.lookup(special) == [frozenset({A, B})] * 2
    assert index.request_key(special[1]) == special[1]
    index.evict(special[0], KeyType.ENGINE, [A, B])
    assert index.lookup(special) == []
    assert index.clear("pod-b") == 2
    assert index.lookup(special[1:]) == [frozenset({A})]
    assert index.statistics()["keys"] == 1


def test_numpy_key_arrays_are_accepted() -> None:
    index = MemoryIndex()
    keys = np.arange(10, 20, dtype=np.uint64)
    index.add(keys, keys, [A])  # type: ignore[arg-type]
    assert len(index.lookup(np.arange(10, 20, dtype=np.int64))) == 10  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        index.lookup(np.array([1, -1]))  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        index.lookup(np.array([1.0]))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- statistics and memory


def test_statistics_count_keys_and_pairs() -> None:
    index = MemoryIndex()
    index.add([1, 2, 3], [11, 12, 13], [A, B])
    index.add(None, [11, 11, 12], [C])  # a duplicated key counts once
    stats = index.statistics()
    assert (stats["keys"], stats["entries"], stats["engine_keys"]) == (3, 8, 3)
    index.evict(1, KeyType.ENGINE, [A])
    index.evict(12, KeyType.REQUEST, [A, B, C])
    assert index.statistics()["entries"] == 4
    assert index.clear("pod-b") == 2
    stats = index.statistics()
    assert (stats["keys"], stats["entries"]) == (2, 2)
    assert stats["bytes"] > 0 and stats["backend"] == "memory"


def test_pairs_stay_exact_under_random_churn() -> None:
    rng = np.random.default_rng(11)
    pods = [PodEntry(f"pod-{i}", tier) for i in range(5) for tier in ("gpu", CPU)]
    index = MemoryIndex(pod_cache_size=None)
    model: dict[int, set[PodEntry]] = {}
    for _ in range(400):
        keys = rng.integers(0, 300, rng.integers(1, 40)).tolist()
        entry = pods[rng.integers(len(pods))]
        if rng.random() < 0.6:
            index.add(None, keys, [entry])
            for k in keys:
                model.setdefault(k, set()).add(entry)
        elif rng.random() < 0.9:
            for k in keys[:3]:
                index.evict(k, KeyType.REQUEST, [entry])
                model.get(k, set()).discard(entry)
        else:
            index.clear(entry.pod)
            for s in model.values():
                s -= {e for e in s if e.pod == entry.pod}
        model = {k: s for k, s in model.items() if s}
    assert index.statistics()["entries"] == sum(len(s) for s in model.values())
    assert index.statistics()["keys"] == len(model)
    for k, s in model.items():
        assert index.lookup([k]) == [frozenset(s)]


def test_unused_entry_sets_are_collected() -> None:
    index = MemoryIndex()
    pods = [PodEntry(f"pod-{i}") for i in range(100)]
    key = 0
    for i in range(100):
        for j in range(i + 1, 100):
            key += 1
            index.add(None, [key], [pods[i], pods[j]])  # 4950 distinct sets
    assert index.statistics()["entry_sets"] > 4000
    for pod in pods:
        index.clear(pod.pod)
    assert index.statistics()["keys"] == 0
    index.add(None, [1], [A])
    assert index.statistics()["entry_sets"] < 100
    assert index.statistics()["set_collections"] >= 1


def test_lookup_returns_shared_set_objects() -> None:
    index = MemoryIndex()
    index.add(None, list(range(100)), [A, B])
    got = index.lookup(list(range(100)))
    assert all(s is got[0] for s in got)
    filtered = index.lookup(list(range(100)), ["pod-a"])
    assert all(s is filtered[0] for s in filtered)


def test_sampled_eviction_on_large_tables() -> None:
    """Above 65536 live keys eviction samples a clock threshold and sweeps: still LRU-like."""
    size = 100_000
    index = MemoryIndex(size=size)
    hot = list(range(10**9, 10**9 + 256))
    index.add(None, hot, [A])
    for start in range(0, 400_000, 2000):
        index.add(
            list(range(start + 10**7, start + 10**7 + 2000)), list(range(start, start + 2000)), [A]
        )
        if start % 20_000 == 0:
            index.lookup(hot)
    stats = index.statistics()
    assert size - size // 128 <= stats["keys"] <= size
    assert stats["entries"] == stats["keys"]
    assert index.lookup(hot) == [frozenset({A})] * 256
    assert present(index, list(range(0, 200_000, 997))) == []  # the old half is gone
    recent = list(range(400_000 - 50_000, 400_000, 101))
    assert len(present(index, recent)) == len(recent)
    assert index.request_key(10**7 + 399_999) == 399_999
