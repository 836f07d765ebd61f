"""The compiled main-table kernels against the numpy paths they replace."""

from __future__ import annotations

import random

import numpy as np

from kvcache.blocks import CPU, KeyType, PodEntry
from kvcache.index.memory import KERNELS_AVAILABLE, MemoryIndex
from kvcache.index.table import unmix1

PODS = [PodEntry(f"pod-{i}") for i in range(4)] + [PodEntry("pod-0", CPU)]


def test_kernels_are_built_and_used_by_default() -> None:
    # CI builds the C extension (make install); a silent fallback would hide a broken build.
    assert KERNELS_AVAILABLE
    assert MemoryIndex().kernels
    assert not MemoryIndex(kernels=False).kernels


def test_kernels_and_numpy_agree_through_growth_and_tombstone_purges() -> None:
    rng = random.Random(3)
    fast, slow = MemoryIndex(kernels=True), MemoryIndex(kernels=False)
    live: list[int] = []
    special = [unmix1(0), unmix1(1)]  # keys stored in the reserved rows
    for step in range(300):
        entry = rng.choice(PODS)
        batch = [rng.randrange(1 << 64) for _ in range(rng.randrange(1, 120))]
        if step % 50 == 0:
            batch += special
        if live and rng.random() < 0.3:
            batch += rng.sample(live, min(len(live), 10))  # re-stores: reported as repeats
        batch += batch[:3]  # keys repeated inside one call
        assert sorted(fast.add(None, batch, [entry])) == sorted(slow.add(None, batch, [entry]))
        live += batch
        if rng.random() < 0.6:
            gone = rng.sample(live, min(len(live), rng.randrange(1, 200)))
            fast.evict_many(gone, KeyType.REQUEST, [entry])
            slow.evict_many(gone, KeyType.REQUEST, [entry])
    a, b = fast.statistics(), slow.statistics()
    assert (a["keys"], a["entries"]) == (b["keys"], b["entries"])
    assert a["slots"] > 1024  # the table grew
    for key in set(live):
        assert fast.lookup([key]) == slow.lookup([key])
    probe = list(dict.fromkeys(live))[:500]
    assert fast.lookup_runs(probe) == slow.lookup_runs(probe)


def test_kernels_respect_the_key_budget_and_keep_the_newest_batch() -> None:
    index = MemoryIndex(size=1000, kernels=True)
    rng = np.random.default_rng(5)
    last: list[int] = []
    for _ in range(40):
        last = rng.integers(1, 1 << 63, size=90, dtype=np.uint64).tolist()
        index.add(None, last, [PODS[0]])
        assert index.statistics()["keys"] <= 1000
    assert index.lookup(last) == [frozenset({PODS[0]})] * len(last)
    assert index.statistics()["evicted_keys"] >= 40 * 90 - 1000
