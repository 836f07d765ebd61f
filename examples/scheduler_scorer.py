"""A scheduler-side scorer: KV-cache scores from a kvcache service, combined with pod load.

This is the role of llm-d's precise prefix-cache scorer in its scheduler: ask the indexer how much
of the prompt each candidate pod caches, normalise (min-max over the pods that got a score, every
scored pod 1.0 when all are equal, 0.0 for pods without a score), then let the scheduler add it
to its other scorers by weight. Here the other scorer is a queue-depth scorer (shorter queue is
better), and the pod with the highest weighted sum wins.

    kvcache serve &   # or examples/offline_events.py; then:
    echo '[1, 2, 3, ...]' | .venv/bin/python examples/scheduler_scorer.py \
        --url http://127.0.0.1:8080 --pod 10.0.0.7:8000=3 --pod 10.0.0.8:8000=0

Only the standard library is used on the scheduler side. The scoring functions are pure, so they
are unit-tested without a service (tests/integration/test_examples.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Mapping, Sequence


def normalize(scores: Mapping[str, float], candidates: Sequence[str]) -> dict[str, float]:
    """Min-max over the scored candidates; all equal -> 1.0; candidates without a score -> 0.0."""
    scored = {pod: scores[pod] for pod in candidates if pod in scores}
    if not scored:
        return dict.fromkeys(candidates, 0.0)
    low, high = min(scored.values()), max(scored.values())
    span = high - low
    return {
        pod: (1.0 if span == 0 else (scored[pod] - low) / span) if pod in scored else 0.0
        for pod in candidates
    }


def load_scores(queue_depth: Mapping[str, float], candidates: Sequence[str]) -> dict[str, float]:
    """Inverse min-max of the load: the least loaded pod 1.0, the most loaded 0.0.

    A pod whose load is unknown scores 0.0 (treated as the worst), so it is not preferred
    blindly; all equal loads score 1.0, like `normalize`.
    """
    inverted = {pod: -queue_depth[pod] for pod in candidates if pod in queue_depth}
    return normalize(inverted, candidates)


def combine(
    weighted: Sequence[tuple[float, Mapping[str, float]]], candidates: Sequence[str]
) -> dict[str, float]:
    """The scheduler's sum of ``weight * score`` over its scorers (a missing score counts 0)."""
    return {
        pod: sum(weight * scores.get(pod, 0.0) for weight, scores in weighted) for pod in candidates
    }


def pick(totals: Mapping[str, float]) -> str:
    """The pod with the highest total; ties go to the first pod id (deterministic)."""
    if not totals:
        raise ValueError("no candidate pods")
    return min(totals, key=lambda pod: (-totals[pod], pod))


def fetch_scores(
    url: str, token_ids: Sequence[int], candidates: Sequence[str], model: str = ""
) -> dict[str, float]:
    """Raw KV-cache scores from ``POST /score_tokens`` (pod -> weighted leading blocks)."""
    body = json.dumps({"token_ids": list(token_ids), "model": model, "pods": list(candidates)})
    request = urllib.request.Request(
        f"{url.rstrip('/')}/score_tokens",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        scores: dict[str, float] = json.load(response)["scores"]
    return scores


def _pod_load(text: str) -> tuple[str, float]:
    pod, sep, depth = text.rpartition("=")
    if not sep or not pod:
        raise argparse.ArgumentTypeError(f"expected POD=QUEUE_DEPTH, got {text!r}")
    return pod, float(depth)


def main(argv: Sequence[str] | None = None) -> None:
    """Read the prompt's token ids (a JSON array) on stdin, score the pods, print the choice."""
    parser = argparse.ArgumentParser(description="Pick a pod by KV-cache score and load.")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the kvcache service")
    parser.add_argument("--model", default="")
    parser.add_argument(
        "--pod",
        type=_pod_load,
        action="append",
        required=True,
        metavar="POD=QUEUE_DEPTH",
        help="a candidate pod and its waiting requests (repeatable)",
    )
    parser.add_argument("--kv-weight", type=float, default=2.0)
    parser.add_argument("--load-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    token_ids: list[int] = json.load(sys.stdin)
    candidates = [pod for pod, _ in args.pod]
    queue_depth = dict(args.pod)

    raw = fetch_scores(args.url, token_ids, candidates, args.model)
    kv = normalize(raw, candidates)
    load = load_scores(queue_depth, candidates)
    totals = combine([(args.kv_weight, kv), (args.load_weight, load)], candidates)
    for pod in candidates:
        print(
            f"{pod}: cached={raw.get(pod, 0.0):g} kv={kv[pod]:.2f} "
            f"queue={queue_depth[pod]:g} load={load[pod]:.2f} total={totals[pod]:.2f}"
        )
    print("picked:", pick(totals))


if __name__ == "__main__":
    main()
