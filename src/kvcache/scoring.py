"""Longest-consecutive-prefix scoring (pure functions over lookup results)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

from kvcache.blocks import CPU, GPU, PodEntry
from kvcache.errors import ConfigError

DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {GPU: 1.0, CPU: 0.8}
_PROFILE_CACHE_LIMIT = 65_536


class _Profile(NamedTuple):
    pods: frozenset[str]
    weights: dict[str, float]
    uniform: float | None
    """The weight every pod of the set has, when they all have the same one."""


class LongestPrefixScorer:
    """Scores each pod by the weighted number of consecutive blocks it holds from block 0.

    Each block counts with the weight of the best tier the pod holds it on (unknown tiers weigh
    1.0). Pods that miss block 0 are absent from the result; a pod stops accumulating at its
    first missing block. Results are ordered by score (highest first), then by pod id.
    """

    strategy = "LongestPrefix"

    def __init__(self, tier_weights: Mapping[str, float] | None = None) -> None:
        weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        for tier, weight in weights.items():
            if not weight >= 0.0:  # also rejects NaN
                raise ConfigError(f"scoring.tier_weights.{tier}", f"must be >= 0, got {weight}")
        self._weights = {tier.lower(): float(w) for tier, w in weights.items()}
        self._profiles: dict[frozenset[PodEntry], _Profile] = {}
        self._steps: dict[
            tuple[frozenset[str], frozenset[str]], tuple[frozenset[str], tuple[str, ...]]
        ] = {}

    @property
    def tier_weights(self) -> Mapping[str, float]:
        """The effective weights (lower-cased tier names)."""
        return dict(self._weights)

    def _profile(self, entries: Collection[PodEntry]) -> _Profile:
        """Pods of an entry set, each with the weight of its best tier (memoised per set)."""
        frozen = entries if isinstance(entries, frozenset) else None
        if frozen is not None:
            cached = self._profiles.get(frozen)
            if cached is not None:
                return cached
        best: dict[str, float] = {}
        weights = self._weights
        for entry in entries:
            weight = weights.get(entry.tier, 1.0)
            if weight > best.get(entry.pod, -1.0):
                best[entry.pod] = weight
        values = set(best.values())
        uniform = values.pop() if len(values) == 1 else None
        profile = _Profile(frozenset(best), best, uniform)
        if frozen is not None:
            if len(self._profiles) >= _PROFILE_CACHE_LIMIT:
                self._profiles.clear()
            self._profiles[frozen] = profile
        return profile

    def score(self, hits: Sequence[Collection[PodEntry]]) -> dict[str, float]:
        """Score a lookup result: ``hits[i]`` are the entries holding block ``i``.

        ``hits`` is normally the prefix an `Index.lookup` returned; an empty collection at any
        position ends every pod's run there. Consecutive identical objects form one run.
        """
        runs: list[tuple[Collection[PodEntry], int]] = []
        previous: Collection[PodEntry] | None = None
        for entries in hits:
            if entries is previous:
                runs[-1] = (entries, runs[-1][1] + 1)
            else:
                runs.append((entries, 1))
                previous = entries
        return self.score_runs(runs)

    def counts_blocks(self, runs: Sequence[tuple[Collection[PodEntry], int]]) -> bool:
        """Whether `score_runs` of ``runs`` is each pod's plain block count: every pod's best
        tier weighs 1.0 in every run (the usual gpu-only case), so one pass serves both."""
        return all(self._profile(entries).uniform == 1.0 for entries, _ in runs)

    def score_runs(self, runs: Sequence[tuple[Collection[PodEntry], int]]) -> dict[str, float]:
        """Score a run-length encoded lookup (`Index.lookup_runs`): (entries, blocks) per run."""
        if not runs:
            return {}
        scores: dict[str, float] = {}
        # Every pod joins at block 0, so a pod's score is the weight accumulated by all pods
        # while it was active (``common``) plus its own corrections for blocks where its best
        # tier weighed differently from the run's uniform weight. A run costs a dict lookup,
        # however many pods are active.
        common = 0.0
        extra: dict[str, float] = {}
        active: frozenset[str] = frozenset()
        steps = self._steps
        for index, (entries, length) in enumerate(runs):
            profile = self._profile(entries)
            if index == 0:
                active = profile.pods
            elif active is not profile.pods:
                # (active pods, pods of this run) -> (still active, dropped out): memoised, as
                # the same prefixes are scored again and again.
                step = steps.get((active, profile.pods))
                if step is None:
                    step = (active & profile.pods, tuple(active - profile.pods))
                    if len(steps) >= _PROFILE_CACHE_LIMIT:
                        steps.clear()
                    steps[(active, profile.pods)] = step
                active, dropped = step
                for pod in dropped:
                    scores[pod] = common + extra.get(pod, 0.0)
                if not active:
                    break
            if profile.uniform is not None:
                common += profile.uniform * length
            else:
                for pod in active:
                    extra[pod] = extra.get(pod, 0.0) + profile.weights[pod] * length
        for pod in active:
            scores[pod] = common + extra.get(pod, 0.0)
        # Rounding hides float noise that depends on how blocks happened to form runs.
        rounded = [(pod, round(value, 9)) for pod, value in scores.items()]
        return dict(sorted(rounded, key=lambda item: (-item[1], item[0])))


def normalize_scores(
    scores: Mapping[str, float], candidates: Collection[str] | None = None
) -> dict[str, float]:
    """Min-max normalise scores to [0, 1] as llm-d's scheduler does.

    All equal scores become 1.0. With ``candidates``, pods without a score get 0.0.
    """
    result: dict[str, float] = {}
    if scores:
        low = min(scores.values())
        high = max(scores.values())
        span = high - low
        for pod, value in scores.items():
            result[pod] = 1.0 if span == 0 else (value - low) / span
    if candidates is not None:
        for pod in candidates:
            result.setdefault(pod, 0.0)
    return dict(sorted(result.items(), key=lambda item: (-item[1], item[0])))
