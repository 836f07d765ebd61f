"""Longest-prefix scorer: the upstream-asserted examples plus ordering and normalisation."""

from __future__ import annotations

import math

import pytest

from kvcache.blocks import PodEntry
from kvcache.errors import ConfigError
from kvcache.scoring import LongestPrefixScorer, normalize_scores

A_GPU = PodEntry("A", "gpu")
A_CPU = PodEntry("A", "cpu")
B_GPU = PodEntry("B", "gpu")


def test_prefix_of_three_with_mixed_tiers_counts_best_tier() -> None:
    scorer = LongestPrefixScorer({"gpu": 1.0, "cpu": 0.5})
    # A holds blocks 0..2 (block 2 on gpu and cpu); B holds only later blocks.
    hits = [{A_GPU}, {A_GPU}, {A_GPU, A_CPU}]
    assert scorer.score(hits) == {"A": 3.0}


def test_cpu_only_block_weighs_less() -> None:
    scorer = LongestPrefixScorer({"gpu": 1.0, "cpu": 0.5})
    assert scorer.score([{A_GPU}, {A_GPU}, {A_CPU}]) == {"A": 2.5}


def test_default_weights_gpu_then_cpu() -> None:
    assert LongestPrefixScorer().score([{A_GPU}, {A_CPU}]) == {"A": pytest.approx(1.8)}


def test_prefix_break_stops_a_pod_for_good() -> None:
    scorer = LongestPrefixScorer()
    hits = [{A_GPU, B_GPU}, {A_GPU}, {A_GPU, B_GPU}]
    assert scorer.score(hits) == {"A": 3.0, "B": 1.0}


def test_pod_missing_block_zero_is_absent() -> None:
    assert LongestPrefixScorer().score([{A_GPU}, {A_GPU, B_GPU}]) == {"A": 2.0}


def test_unknown_tier_weighs_one_and_tiers_are_case_insensitive_in_config() -> None:
    scorer = LongestPrefixScorer({"GPU": 0.5})
    assert scorer.score([{PodEntry("A", "gpu")}, {PodEntry("A", "nvme")}]) == {"A": 1.5}


def test_empty_hits_and_early_exit() -> None:
    scorer = LongestPrefixScorer()
    assert scorer.score([]) == {}
    assert scorer.score([set(), {A_GPU}]) == {}


def test_interned_runs_score_like_distinct_sets() -> None:
    shared = frozenset({A_GPU, B_GPU})
    runs = [shared] * 5 + [frozenset({A_GPU})] * 3
    copies = [set(s) for s in runs]
    scorer = LongestPrefixScorer()
    assert scorer.score(runs) == scorer.score(copies) == {"A": 8.0, "B": 5.0}


def test_result_order_is_score_desc_then_pod() -> None:
    entries = {PodEntry(p) for p in ("c", "a", "b")}
    result = LongestPrefixScorer().score([entries, {PodEntry("b")}])
    assert list(result) == ["b", "a", "c"]


def test_groups_and_speculative_count_once_per_pod() -> None:
    hits = [{PodEntry("A", group=0), PodEntry("A", group=1), PodEntry("A", speculative=True)}]
    assert LongestPrefixScorer().score(hits) == {"A": 1.0}


@pytest.mark.parametrize("weight", [-1.0, math.nan])
def test_invalid_weight_is_a_config_error(weight: float) -> None:
    with pytest.raises(ConfigError, match=r"tier_weights\.gpu"):
        LongestPrefixScorer({"gpu": weight})


def test_normalize_min_max_and_candidates() -> None:
    assert normalize_scores({"a": 4.0, "b": 2.0, "c": 3.0}) == {"a": 1.0, "c": 0.5, "b": 0.0}
    assert normalize_scores({"a": 2.0, "b": 2.0}) == {"a": 1.0, "b": 1.0}
    assert normalize_scores({"a": 3.0}, candidates=["a", "z"]) == {"a": 1.0, "z": 0.0}
    assert normalize_scores({}, candidates=["x"]) == {"x": 0.0}


def test_counts_blocks_only_when_every_best_tier_weighs_one() -> None:
    scorer = LongestPrefixScorer({"gpu": 1.0, "cpu": 0.5})
    gpu_only = [(frozenset({A_GPU, B_GPU}), 3), (frozenset({A_GPU}), 2)]
    assert scorer.counts_blocks(gpu_only)
    assert scorer.score_runs(gpu_only) == {"A": 5.0, "B": 3.0}  # the block counts themselves
    # A block A holds on gpu and cpu still weighs 1.0 for A; one B holds on cpu only does not.
    assert scorer.counts_blocks([(frozenset({A_GPU, A_CPU}), 2)])
    assert not scorer.counts_blocks([(frozenset({A_GPU, PodEntry("B", "cpu")}), 2)])
    assert scorer.counts_blocks([])
