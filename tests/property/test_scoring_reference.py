"""The run-length scorer equals a block-by-block reference on random lookup results."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.blocks import PodEntry
from kvcache.scoring import LongestPrefixScorer

WEIGHTS = {"gpu": 1.0, "cpu": 0.8, "disk": 0.25}

entries = st.builds(
    PodEntry,
    pod=st.sampled_from(["a", "b", "c", "d"]),
    tier=st.sampled_from(["gpu", "cpu", "disk", "nvme"]),
    group=st.sampled_from([None, 0, 1]),
)
entry_sets = st.frozensets(entries, max_size=6)


def reference(hits: list[frozenset[PodEntry]]) -> dict[str, float]:
    """Block by block, exactly as the upstream scorer is specified."""
    scores: dict[str, float] = {}
    active: set[str] = set()
    for position, block in enumerate(hits):
        best: dict[str, float] = {}
        for entry in block:
            best[entry.pod] = max(best.get(entry.pod, -1.0), WEIGHTS.get(entry.tier, 1.0))
        if position == 0:
            active = set(best)
            scores = dict(best)
        else:
            active &= set(best)
            for pod in active:
                scores[pod] += best[pod]
        if not active:
            break
    return scores


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(entry_sets, st.integers(1, 5)), max_size=12))
def test_matches_reference(runs: list[tuple[frozenset[PodEntry], int]]) -> None:
    # Repeat the same object to form runs, as an interning index returns them.
    hits = [block for block, length in runs for _ in range(length)]
    got = LongestPrefixScorer(WEIGHTS).score(hits)
    want = reference(hits)
    assert set(got) == set(want)
    for pod, value in want.items():
        assert math.isclose(got[pod], value, rel_tol=1e-9, abs_tol=1e-9)
    # Copies (not the interned objects, not even frozensets) score the same.
    copies = LongestPrefixScorer(WEIGHTS).score([set(b) for b in hits])
    assert copies.keys() == got.keys()
    assert all(math.isclose(copies[p], got[p], rel_tol=1e-9) for p in got)
