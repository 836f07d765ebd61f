"""The shared behaviour suite every `Index` backend must pass (requires pytest).

Subclass `IndexConformance` in a test module and provide an ``index`` fixture that returns a
fresh, empty backend; pytest then collects every ``test_*`` method for it::

    import pytest
    from kvcache.testing.conformance import IndexConformance

    class TestMyBackend(IndexConformance):
        @pytest.fixture
        def index(self) -> Index:
            return MyBackend(...)

The cases reproduce upstream's shared ``index_test`` suite and the edge behaviour of the
reference (upstream-behaviour.md §2.3, §5.5, §9) in terms of our protocol: ``lookup`` returns
the entry sets of the longest prefix of keys that have a (matching) entry. Behaviour that
legitimately differs between backends (re-mapping an engine key, capacity eviction) is left to
each backend's own tests.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from kvcache.blocks import CPU, GPU, KeyType, PodEntry
from kvcache.errors import IndexOperationError, UnknownKeyError
from kvcache.index.protocol import Index

__all__ = ["IndexConformance"]

A = PodEntry("pod-a")
B = PodEntry("pod-b")
C = PodEntry("pod-c")
A_CPU = PodEntry("pod-a", CPU)
A_SPEC = PodEntry("pod-a", GPU, speculative=True)
A_G0 = PodEntry("pod-a", GPU, group=0)
A_G1 = PodEntry("pod-a", GPU, group=1)

ENGINE = KeyType.ENGINE
REQUEST = KeyType.REQUEST

MAX_KEY = (1 << 64) - 1


def sets(*entries: tuple[PodEntry, ...]) -> list[frozenset[PodEntry]]:
    """Expected lookup result: one frozenset per key."""
    return [frozenset(e) for e in entries]


class IndexConformance:
    """Base class of the conformance suite; subclasses provide the ``index`` fixture."""

    @pytest.fixture
    def index(self) -> Index:
        raise NotImplementedError("subclass IndexConformance and provide an `index` fixture")

    # ------------------------------------------------------------------ add / lookup

    def test_add_then_lookup(self, index: Index) -> None:
        index.add([1, 2, 3], [11, 12, 13], [A])
        assert index.lookup([11, 12, 13]) == sets((A,), (A,), (A,))

    def test_add_returns_keys_that_already_held_the_entries(self, index: Index) -> None:
        assert index.add(None, [1, 2], [A]) == []
        assert index.add(None, [2, 3], [A]) == [2]
        assert index.add(None, [3], [A]) == [3]
        assert index.add(None, [3], [B]) == []
        assert sorted(index.add([7, 8, 9], [1, 2, 4], [A])) == [1, 2]
        # Only keys holding *every* given entry count as repeats.
        assert index.add(None, [1, 3], [A, B]) == [3]

    def test_lookup_runs_is_lookup_run_length_encoded(self, index: Index) -> None:
        index.add(None, [1, 2, 3, 4, 5, 6], [A])
        index.add(None, [1, 2, 3], [B])
        index.add(None, [5], [B])
        for pods in (None, ["pod-a"], ["pod-b"], ["pod-a", "pod-b"], ["nobody"]):
            expanded = [
                entries
                for entries, count in index.lookup_runs([1, 2, 3, 4, 5, 6, 7], pods)
                for _ in range(count)
            ]
            assert expanded == index.lookup([1, 2, 3, 4, 5, 6, 7], pods)
        assert index.lookup_runs([1, 2, 3, 4, 5], None) == [
            (frozenset({A, B}), 3),
            (frozenset({A}), 1),
            (frozenset({A, B}), 1),
        ]
        assert index.lookup_runs([], None) == []

    def test_add_without_engine_keys(self, index: Index) -> None:
        index.add(None, [11, 12], [A, B])
        assert index.lookup([11, 12]) == sets((A, B), (A, B))

    def test_lookup_empty_index_and_empty_keys(self, index: Index) -> None:
        assert index.lookup([1, 2, 3]) == []
        index.add(None, [1], [A])
        assert index.lookup([]) == []

    def test_lookup_returns_frozensets_of_entries(self, index: Index) -> None:
        index.add(None, [5], [A_G1])
        [got] = index.lookup([5])
        assert isinstance(got, frozenset)
        [entry] = got
        assert entry == A_G1
        assert (entry.pod, entry.tier, entry.speculative, entry.group) == ("pod-a", GPU, False, 1)

    def test_lookup_stops_at_first_key_without_entries(self, index: Index) -> None:
        index.add(None, [1, 2, 4, 5], [A])
        assert index.lookup([1, 2, 3, 4, 5]) == sets((A,), (A,))
        assert index.lookup([3, 1, 2]) == []

    def test_lookup_keeps_per_key_sets(self, index: Index) -> None:
        index.add(None, [1, 2, 3], [A])
        index.add(None, [1, 2], [B])
        index.add(None, [1], [C])
        assert index.lookup([1, 2, 3, 4]) == sets((A, B, C), (A, B), (A,))

    def test_extreme_keys(self, index: Index) -> None:
        index.add([MAX_KEY], [0], [A])
        index.add([0], [MAX_KEY], [B])
        assert index.lookup([0, MAX_KEY]) == sets((A,), (B,))
        assert index.request_key(MAX_KEY) == 0
        assert index.request_key(0) == MAX_KEY

    def test_many_keys_round_trip(self, index: Index) -> None:
        keys = [random.Random(7).getrandbits(64) for _ in range(3000)]
        for i in range(0, len(keys), 100):
            index.add(None, keys[i : i + 100], [A])
        assert len(index.lookup(keys)) == len(keys)

    # ------------------------------------------------------------------ duplicates

    def test_same_pod_different_tier_is_two_entries(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.add([1], [11], [A_CPU])
        assert index.lookup([11]) == sets((A, A_CPU))

    def test_same_entry_is_deduplicated(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.add([1], [11], [A])
        index.add(None, [11], [A, A])
        assert index.lookup([11]) == sets((A,))

    def test_speculative_and_confirmed_coexist(self, index: Index) -> None:
        index.add(None, [11], [A_SPEC])
        index.add([1], [11], [A])
        assert index.lookup([11]) == sets((A, A_SPEC))

    # ------------------------------------------------------------------ pod filter

    def test_filter_one_pod(self, index: Index) -> None:
        index.add(None, [1, 2], [A, B, A_CPU])
        assert index.lookup([1, 2], ["pod-a"]) == sets((A, A_CPU), (A, A_CPU))

    def test_filter_two_pods(self, index: Index) -> None:
        index.add(None, [1, 2], [A, B, C])
        assert index.lookup([1, 2], {"pod-a", "pod-c"}) == sets((A, C), (A, C))

    def test_filter_unknown_pod_is_empty(self, index: Index) -> None:
        index.add(None, [1, 2], [A, B])
        assert index.lookup([1, 2], ["pod-z"]) == []

    def test_filter_stops_at_first_key_without_matching_entry(self, index: Index) -> None:
        index.add(None, [1, 2, 3], [A])
        index.add(None, [2], [B])
        assert index.lookup([1, 2, 3], ["pod-a"]) == sets((A,), (A,), (A,))
        assert index.lookup([1, 2, 3], ["pod-b"]) == []
        index.add(None, [1], [B])
        assert index.lookup([1, 2, 3], ["pod-b"]) == sets((B,), (B,))

    def test_empty_filter_means_no_filter(self, index: Index) -> None:
        index.add(None, [1], [A, B])
        assert index.lookup([1], []) == index.lookup([1]) == sets((A, B))

    # ------------------------------------------------------------------ eviction

    def test_evict_is_exact_match(self, index: Index) -> None:
        p3, p3_cpu = PodEntry("pod3"), PodEntry("pod3", CPU)
        index.add([1], [11], [p3, p3_cpu, A])
        index.evict(1, ENGINE, [p3_cpu])
        assert index.lookup([11]) == sets((p3, A))

    def test_evict_entry_not_present_is_noop(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.evict(1, ENGINE, [A_CPU])
        index.evict(1, ENGINE, [A_SPEC])
        index.evict(11, REQUEST, [B])
        assert index.lookup([11]) == sets((A,))

    def test_evict_unknown_keys_is_noop(self, index: Index) -> None:
        index.evict(404, ENGINE, [A])
        index.evict(404, REQUEST, [A])
        index.add([1], [11], [A])
        index.evict(404, ENGINE, [A])
        assert index.lookup([11]) == sets((A,))

    def test_evict_last_entry_removes_key(self, index: Index) -> None:
        index.add([1, 2], [11, 12], [A])
        index.evict(1, ENGINE, [A])
        assert index.lookup([11, 12]) == []
        assert index.lookup([12]) == sets((A,))

    def test_evict_one_of_three_one_to_one(self, index: Index) -> None:
        index.add([1, 2, 3], [11, 12, 13], [A])
        index.evict(2, ENGINE, [A])
        assert index.lookup([11, 12, 13]) == sets((A,))
        assert index.lookup([13]) == sets((A,))
        assert index.request_key(1) == 11
        assert index.request_key(3) == 13
        with pytest.raises(UnknownKeyError):
            index.request_key(2)

    def test_evict_request_key_directly(self, index: Index) -> None:
        index.add([1], [11], [A, B])
        index.evict(11, REQUEST, [A])
        assert index.lookup([11]) == sets((B,))

    def test_request_key_evict_of_speculative_keeps_confirmed(self, index: Index) -> None:
        index.add(None, [11], [A_SPEC])
        index.add([1], [11], [A])
        index.evict(11, REQUEST, [A_SPEC])
        assert index.lookup([11]) == sets((A,))
        assert index.request_key(1) == 11

    def test_gpu_evict_keeps_cpu_entry_and_mapping(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.add(None, [11], [A_CPU])  # offload: the cpu copy arrives without engine keys
        index.evict(1, ENGINE, [A])
        assert index.lookup([11]) == sets((A_CPU,))
        assert index.request_key(1) == 11
        index.evict(1, ENGINE, [A_CPU])
        assert index.lookup([11]) == []
        with pytest.raises(UnknownKeyError):
            index.request_key(1)

    def test_evict_several_entries_at_once(self, index: Index) -> None:
        index.add([1], [11], [A, A_CPU, B])
        index.evict(1, ENGINE, [A, A_CPU])
        assert index.lookup([11]) == sets((B,))

    def test_evict_many_request_keys(self, index: Index) -> None:
        index.add(None, [11, 12, 13, 14], [A, B])
        index.add(None, [15], [A])
        index.evict_many([12, 404, 15, 12], REQUEST, [A])  # unknown and repeated keys: no-ops
        assert index.lookup([11, 12, 13, 14], ["pod-a"]) == sets((A,))
        assert index.lookup([13, 14], ["pod-a"]) == sets((A,), (A,))
        assert index.lookup([12]) == sets((B,))
        assert index.lookup([15]) == []
        index.evict_many([], REQUEST, [A])
        assert index.lookup([11]) == sets((A, B))

    def test_evict_many_engine_keys(self, index: Index) -> None:
        index.add([1, 2, 3], [11, 12, 13], [A])
        index.add([4], [4], [A])  # an identity mapping
        index.evict_many([3, 4, 404], ENGINE, [A])
        assert index.lookup([11, 12, 13]) == sets((A,), (A,))
        assert index.lookup([4]) == []
        assert index.request_key(1) == 11
        with pytest.raises(UnknownKeyError):
            index.request_key(3)

    def test_evict_many_equals_evict_one_by_one(self, index: Index) -> None:
        rng = random.Random(7)
        keys = [rng.randrange(1 << 64) for _ in range(300)] + [0, 1, MAX_KEY]
        index.add(None, keys, [A, B])
        index.add(None, keys[:100], [A_CPU])
        gone = rng.sample(keys, 150)
        index.evict_many(gone, REQUEST, [A, A_CPU])
        for key in keys:
            expected = (
                {B}
                | (set() if key in gone else {A})
                | ({A_CPU} if key in keys[:100] and key not in gone else set())
            )
            assert index.lookup([key]) == [frozenset(expected)]

    def test_evict_many_validates_before_evicting(self, index: Index) -> None:
        index.add(None, [11, 12], [A])
        for bad in (-1, 1 << 64, "7"):
            with pytest.raises(IndexOperationError) as info:
                index.evict_many([11, bad], REQUEST, [A])  # type: ignore[list-item]
            assert repr(bad) in str(info.value)
        with pytest.raises(IndexOperationError):
            index.evict_many([11], REQUEST, [])
        assert index.lookup([11, 12]) == sets((A,), (A,))

    # ------------------------------------------------------------------ engine mapping

    def test_one_to_one_mapping(self, index: Index) -> None:
        index.add([1, 2, 3], [11, 12, 13], [A])
        assert [index.request_key(k) for k in (1, 2, 3)] == [11, 12, 13]

    def test_identity_mapping(self, index: Index) -> None:
        index.add([11, 12], [11, 12], [A])
        assert index.request_key(11) == 11
        index.evict(12, ENGINE, [A])
        assert index.lookup([11, 12]) == sets((A,))
        with pytest.raises(UnknownKeyError):
            index.request_key(12)

    def test_many_to_one_mapping(self, index: Index) -> None:
        index.add([1, 2, 3, 4], [11], [A])
        assert [index.request_key(k) for k in (1, 2, 3, 4)] == [11] * 4
        index.evict(3, ENGINE, [A])  # any of the engine keys evicts the request key
        assert index.lookup([11]) == []

    def test_many_to_one_uneven(self, index: Index) -> None:
        index.add([1, 2, 3], [11, 12], [A])
        assert [index.request_key(k) for k in (1, 2, 3)] == [11, 11, 12]

    def test_one_to_many_mapping(self, index: Index) -> None:
        index.add([1], [11, 12, 13, 14], [A])
        assert index.request_key(1) == 14  # the last mapped request key
        assert index.lookup([11, 12, 13, 14]) == sets((A,), (A,), (A,), (A,))
        index.evict(1, ENGINE, [A])
        for k in (11, 12, 13, 14):
            assert index.lookup([k]) == []
        with pytest.raises(UnknownKeyError):
            index.request_key(1)

    def test_one_to_many_two_engine_keys(self, index: Index) -> None:
        index.add([1, 2], [11, 12, 13, 14], [A])
        assert (index.request_key(1), index.request_key(2)) == (12, 14)
        index.evict(1, ENGINE, [A])
        assert index.lookup([11]) == index.lookup([12]) == []
        assert index.lookup([13, 14]) == sets((A,), (A,))

    def test_one_to_many_uneven(self, index: Index) -> None:
        index.add([1, 2], [11, 12, 13], [A])
        assert (index.request_key(1), index.request_key(2)) == (12, 13)

    def test_one_to_many_mapping_survives_partial_evict(self, index: Index) -> None:
        index.add([1], [11, 12], [A])
        index.add(None, [12], [A_CPU])
        index.evict(1, ENGINE, [A])
        assert index.lookup([11]) == []
        assert index.lookup([12]) == sets((A_CPU,))
        assert index.request_key(1) == 12
        index.evict(1, ENGINE, [A_CPU])
        with pytest.raises(UnknownKeyError):
            index.request_key(1)

    def test_speculative_without_engine_keys_is_visible_but_unmapped(self, index: Index) -> None:
        index.add(None, [11], [A_SPEC])
        assert index.lookup([11]) == sets((A_SPEC,))
        with pytest.raises(UnknownKeyError):
            index.request_key(11)

    def test_request_key_unknown_raises(self, index: Index) -> None:
        with pytest.raises(UnknownKeyError):
            index.request_key(12345)

    def test_unknown_key_error_is_an_index_operation_error(self, index: Index) -> None:
        with pytest.raises(IndexOperationError):
            index.request_key(12345)

    # ------------------------------------------------------------------ groups

    def test_groups_coexist(self, index: Index) -> None:
        index.add([1], [11], [A_G0])
        index.add([1], [11], [A_G1])
        assert index.lookup([11]) == sets((A_G0, A_G1))

    def test_evict_one_group(self, index: Index) -> None:
        index.add([1], [11], [A_G0, A_G1])
        index.evict(1, ENGINE, [A_G0])
        assert index.lookup([11]) == sets((A_G1,))
        assert index.request_key(1) == 11

    def test_evict_last_group(self, index: Index) -> None:
        index.add([1], [11], [A_G0, A_G1])
        index.evict(1, ENGINE, [A_G0])
        index.evict(1, ENGINE, [A_G1])
        assert index.lookup([11]) == []

    def test_group_and_ungrouped_are_distinct(self, index: Index) -> None:
        index.add([1], [11], [A, A_G0])
        index.evict(1, ENGINE, [A])
        assert index.lookup([11]) == sets((A_G0,))

    # ------------------------------------------------------------------ clear

    def test_clear_basic(self, index: Index) -> None:
        index.add([1, 2], [11, 12], [A])
        assert index.clear("pod-a") == 2
        assert index.lookup([11]) == []
        assert index.lookup([12]) == []

    def test_clear_isolates_pods(self, index: Index) -> None:
        index.add([1, 2], [11, 12], [A, B])
        index.add(None, [13], [B])
        assert index.clear("pod-a") == 2
        assert index.lookup([11, 12, 13]) == sets((B,), (B,), (B,))

    def test_clear_all_tiers_groups_and_speculative(self, index: Index) -> None:
        index.add([1], [11], [A, A_CPU, A_SPEC, A_G0, A_G1, B])
        assert index.clear("pod-a") == 5
        assert index.lookup([11]) == sets((B,))

    def test_clear_then_re_add(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.clear("pod-a")
        index.add([1], [11], [A])
        assert index.lookup([11]) == sets((A,))
        assert index.request_key(1) == 11

    def test_clear_unknown_pod(self, index: Index) -> None:
        assert index.clear("nobody") == 0
        index.add(None, [11], [A])
        assert index.clear("nobody") == 0
        assert index.lookup([11]) == sets((A,))

    def test_clear_leaves_engine_mapping(self, index: Index) -> None:
        index.add([1], [11], [A])
        index.clear("pod-a")
        assert index.lookup([11]) == []
        assert index.request_key(1) == 11

    def test_clear_prefix_by_pod_filter(self, index: Index) -> None:
        index.add(None, [1, 2, 3], [A, B])
        index.clear("pod-b")
        assert index.lookup([1, 2, 3], ["pod-b"]) == []
        assert index.lookup([1, 2, 3], ["pod-a"]) == sets((A,), (A,), (A,))

    # ------------------------------------------------------------------ validation

    def test_add_without_request_keys_fails(self, index: Index) -> None:
        with pytest.raises(IndexOperationError):
            index.add(None, [], [A])
        with pytest.raises(IndexOperationError):
            index.add([1], [], [A])

    def test_add_without_entries_fails(self, index: Index) -> None:
        with pytest.raises(IndexOperationError):
            index.add([1], [11], [])
        assert index.lookup([11]) == []

    def test_evict_without_entries_fails(self, index: Index) -> None:
        index.add([1], [11], [A])
        with pytest.raises(IndexOperationError):
            index.evict(1, ENGINE, [])
        with pytest.raises(IndexOperationError):
            index.evict(11, REQUEST, [])
        assert index.lookup([11]) == sets((A,))

    @pytest.mark.parametrize("bad", [-1, 1 << 64, 1.5, "7", None])
    def test_invalid_keys_fail(self, index: Index, bad: object) -> None:
        calls: list[Callable[[], object]] = [
            lambda: index.add(None, [1, bad], [A]),  # type: ignore[list-item]
            lambda: index.add([bad], [1], [A]),  # type: ignore[list-item]
            lambda: index.lookup([1, bad]),  # type: ignore[list-item]
            lambda: index.evict(bad, ENGINE, [A]),  # type: ignore[arg-type]
            lambda: index.evict(bad, REQUEST, [A]),  # type: ignore[arg-type]
            lambda: index.request_key(bad),  # type: ignore[arg-type]
        ]
        for call in calls:
            with pytest.raises(IndexOperationError) as info:
                call()
            assert repr(bad) in str(info.value)
        assert index.lookup([1]) == []

    def test_statistics_is_a_dict(self, index: Index) -> None:
        index.add([1], [11], [A])
        stats = index.statistics()
        assert isinstance(stats, dict)

    # ------------------------------------------------------------------ concurrency

    def test_concurrent_mixed_operations(self, index: Index) -> None:
        """Writers per pod shard plus readers: no error, no deadlock, consistent at the end."""
        errors: list[BaseException] = []
        pods = [PodEntry(f"pod-{i}") for i in range(6)]
        shared = list(range(1000, 1200))

        def writer(n: int) -> None:
            rng = random.Random(n)
            entry, scratch = pods[n], pods[n + 3]
            own = [n * 10_000 + i for i in range(200)]
            try:
                for i in range(0, 200, 20):
                    index.add(own[i : i + 20], own[i : i + 20], [entry])
                    index.add(None, shared[i : i + 20], [entry, scratch])
                    if rng.random() < 0.5:
                        index.evict(own[i], ENGINE, [entry])
                        index.add([own[i]], [own[i]], [entry])
                    if rng.random() < 0.3:
                        index.clear(f"pod-{(n + 1) % 3 + 3}")  # another writer's scratch pod
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def reader(n: int) -> None:
            rng = random.Random(100 + n)
            try:
                for _ in range(200):
                    start = rng.randrange(0, 180)
                    index.lookup(shared[start : start + 20])
                    index.lookup(shared, [f"pod-{rng.randrange(6)}"])
                    index.statistics()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        threads += [threading.Thread(target=reader, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert errors == []
        for n in range(3):
            own = [n * 10_000 + i for i in range(200)]
            assert index.lookup(own, [f"pod-{n}"]) == [frozenset({pods[n]})] * 200
            assert all(index.request_key(k) == k for k in own)
        got = index.lookup(shared)
        assert len(got) == len(shared)
        assert all({"pod-0", "pod-1", "pod-2"} <= {e.pod for e in s} for s in got)
