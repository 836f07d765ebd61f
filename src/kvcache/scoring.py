"""Longest-consecutive-prefix scoring (pure functions over lookup results)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from kvcache.blocks import CPU, GPU, PodEntry
from kvcache.errors import ConfigError

DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {GPU: 1.0, CPU: 0.8}


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

    @property
    def tier_weights(self) -> Mapping[str, float]:
        """The effective weights (lower-cased tier names)."""
        return dict(self._weights)

    def _best_weights(self, entries: Collection[PodEntry]) -> dict[str, float]:
        best: dict[str, float] = {}
        weights = self._weights
        for entry in entries:
            weight = weights.get(entry.tier, 1.0)
            if weight > best.get(entry.pod, -1.0):
                best[entry.pod] = weight
        return best

    def score(self, hits: Sequence[Collection[PodEntry]]) -> dict[str, float]:
        """Score a lookup result: ``hits[i]`` are the entries holding block ``i``.

        ``hits`` is normally the prefix an `Index.lookup` returned; an empty collection at any
        position ends every pod's run there.
        """
        if not hits:
            return {}
        scores: dict[str, float] = {}
        active: dict[str, float] = {}
        index = 0
        total = len(hits)
        # Runs of the identical collection object (backends intern equal entry sets) are
        # scored at once: a long shared prefix costs one step, not one step per block.
        while index < total:
            entries = hits[index]
            run_end = index + 1
            while run_end < total and hits[run_end] is entries:
                run_end += 1
            length = run_end - index
            best = self._best_weights(entries)
            if index == 0:
                active = best
                for pod, weight in best.items():
                    scores[pod] = weight * length
            else:
                for pod in list(active):
                    held = best.get(pod)
                    if held is None:
                        del active[pod]
                    else:
                        scores[pod] += held * length
            if not active:
                break
            index = run_end
        return dict(sorted(scores.items(), key=lambda item: (-item[1], item[0])))


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
