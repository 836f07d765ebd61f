"""Library use: index two pods' blocks as their engines would publish them, then score a prompt.

    .venv/bin/python examples/library_indexer.py

No service, no sockets: an `Indexer` is the read path (token ids -> the engine's block keys ->
index lookup -> per-pod scores), and its `index` is what the event pipeline would fill.
"""

from __future__ import annotations

import json

from kvcache import Indexer, PodEntry, normalize_scores

BLOCK = 16  # vLLM's default block size, and the Indexer's


def main() -> None:
    """Index two pods, score a prompt against them and print the winner."""
    # vLLM's defaults: the pickle-based sha256, seed "vllm-none-hash" (PYTHONHASHSEED unset), 16
    # tokens per block. Pass a `kvcache.Config` when the engines run with other flags.
    indexer = Indexer()

    system = list(range(1000, 1000 + 4 * BLOCK))  # a 4-block system prompt shared by requests
    question = list(range(5000, 5000 + 4 * BLOCK))
    other_question = list(range(9000, 9000 + 4 * BLOCK))
    prompt = system + question  # the request to route: 8 full blocks

    # What each engine computed (and published in its BlockStored events) for the requests it
    # served. Keys are chained: a block's key depends on every token before it.
    pod_a_keys = indexer.block_keys(system + other_question)  # shares the system prompt only
    pod_b_keys = indexer.block_keys(prompt[: 6 * BLOCK])  # an earlier, shorter turn of it
    indexer.index.add(None, pod_a_keys, [PodEntry("10.0.0.7:8000")])
    indexer.index.add(None, pod_b_keys, [PodEntry("10.0.0.8:8000")])

    # Score = leading blocks of the prompt a pod holds (gpu blocks weigh 1.0, cpu 0.8).
    scores = indexer.score_tokens(prompt)
    candidates = ["10.0.0.7:8000", "10.0.0.8:8000", "10.0.0.9:8000"]  # .9 holds nothing
    normalized = normalize_scores(scores, candidates)  # min-max, as llm-d's scheduler does
    print("blocks in prompt:", len(indexer.block_keys(prompt)))
    print("scores:", json.dumps(scores))
    print("normalized:", json.dumps(normalized))
    print("best pod:", max(normalized, key=lambda pod: normalized[pod]))


if __name__ == "__main__":
    main()
