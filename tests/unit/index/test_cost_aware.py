"""CostAwareIndex: the shared conformance suite plus the byte budget."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource

import numpy as np
import pytest

from kvcache.blocks import PodEntry
from kvcache.errors import ConfigError
from kvcache.index import CostAwareIndex, Index, parse_size
from kvcache.testing.conformance import IndexConformance

A = PodEntry("pod-a")
MiB = 1 << 20


class TestCostAwareConformance(IndexConformance):
    @pytest.fixture
    def index(self) -> Index:
        return CostAwareIndex("4MiB")


def rss_bytes() -> int:
    """Resident set size, after handing freed heap pages back to the OS where glibc allows.

    Without the trim, transient scan buffers freed long ago can stay resident as allocator
    cache; the budget is about the memory the index holds.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure as is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42),
        (42, 42),
        ("42 MB", 42_000_000),
        ("42M", 42_000_000),
        ("42mb", 42_000_000),
        ("42Mi", 42 * MiB),
        ("42 MiB", 42 * MiB),
        ("2GiB", 2 << 30),
        ("2 GB", 2_000_000_000),
        ("1.5GiB", 3 << 29),
        ("512k", 512_000),
        ("512KiB", 512 << 10),
        ("1TB", 10**12),
        (" 7 B ", 7),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "42 XB", "-1", "0", "1e9", "4 2MB", True, 0, -5])
def test_parse_size_rejects_garbage(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert info.value.field == "budget_bytes"


def test_budget_must_fit_the_minimum() -> None:
    with pytest.raises(ConfigError):
        CostAwareIndex("100KiB")
    with pytest.raises(ConfigError):
        CostAwareIndex("1MiB", engine_map_fraction=1.5)


@pytest.mark.parametrize("budget", ["256KiB", "1MiB", "4MB"])
def test_tables_grow_up_to_the_budget(budget: str) -> None:
    index = CostAwareIndex(budget)
    stats = index.statistics()
    assert stats["bytes"] < 0.3 * stats["budget_bytes"]  # starts small
    capacity = stats["max_keys"]
    for start in range(0, 2 * capacity, 1000):
        index.add(None, list(range(start, start + 1000)), [A])
    stats = index.statistics()
    assert stats["slots"] == stats["max_slots"]
    # the main table took its share (the engine map is unused here; small tables round down
    # to a power of two), and everything stays within the budget
    assert 0.25 * stats["budget_bytes"] <= stats["bytes"] <= stats["budget_bytes"]


def test_only_the_newest_keys_survive_overflow() -> None:
    index = CostAwareIndex("256KiB")
    capacity = index.statistics()["max_keys"]
    for start in range(0, 10 * capacity, 100):
        index.add(None, list(range(start, start + 100)), [A])
    stats = index.statistics()
    assert stats["keys"] <= capacity
    assert stats["bytes"] <= stats["budget_bytes"]
    assert stats["evicted_keys"] >= 9 * capacity
    newest = list(range(10 * capacity - 100, 10 * capacity))
    assert index.lookup(newest) == [frozenset({A})] * 100
    assert index.lookup([0]) == []


def test_many_distinct_entry_sets_stay_in_budget() -> None:
    index = CostAwareIndex("256KiB")
    pods = [PodEntry(f"pod-{i}") for i in range(40)]
    rng = np.random.default_rng(3)
    for key in range(20_000):
        chosen = rng.choice(len(pods), size=4, replace=False)
        index.add(None, [key], [pods[i] for i in chosen])  # mostly unique sets
    stats = index.statistics()
    assert stats["bytes"] <= stats["budget_bytes"]
    assert stats["keys"] > 0
    assert index.lookup([19_999]) != []


def test_mappings_are_bounded_by_the_budget() -> None:
    index = CostAwareIndex("256KiB")
    for k in range(0, 40_000, 50):
        index.add(list(range(k + 10**6, k + 10**6 + 50)), list(range(k, k + 50)), [A])
        index.add([k + 2 * 10**6], list(range(k, k + 50)), [A])  # 1:many runs
    stats = index.statistics()
    assert stats["engine_keys"] <= stats["max_engine_keys"]
    assert stats["bytes"] <= stats["budget_bytes"]
    assert index.request_key(39_999 + 10**6) == 39_999
    assert index.request_key(39_950 + 2 * 10**6) == 39_999


def test_resident_memory_stays_within_budget() -> None:
    """Fill far beyond the budget; the RSS growth stays under the budget plus slack."""
    budget = 16 * MiB
    rng = np.random.default_rng(1)
    pods = [PodEntry(f"10.0.0.{i}:8000") for i in range(16)]
    before = rss_bytes()
    index = CostAwareIndex(budget)
    batches = 2 * index.statistics()["max_keys"] // 512
    for i in range(batches):
        keys = rng.integers(0, 2**64, 512, dtype=np.uint64)
        engine = keys if i % 2 else keys ^ np.uint64(1)  # identity and dual-key mappings
        index.add(engine, keys, [pods[i % 16], pods[(i * 7) % 16]])  # type: ignore[arg-type]
    grown = rss_bytes() - before
    stats = index.statistics()
    assert stats["evicted_keys"] > 0 and stats["evicted_mappings"] > 0
    assert stats["bytes"] <= budget
    assert grown <= budget + 4 * MiB, f"RSS grew {grown / MiB:.1f} MiB for {budget / MiB} MiB"
