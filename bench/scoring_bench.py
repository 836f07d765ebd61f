"""score_tokens latency for an 8k-token prompt on a 1M-block, 64-pod index; Dynamo alongside."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from bench.hashing_bench import prompt
from bench.stats import median, percentile, time_calls
from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.indexer import Indexer

PODS = 64
FILLER_BLOCKS = 1_000_000
SCHEME = "sha256_cbor"


def _pod(number: int) -> str:
    return f"10.0.{number // 256}.{number % 256}:8000"


def build_indexer(filler_blocks: int = FILLER_BLOCKS) -> tuple[Indexer, list[int], list[int]]:
    """An indexer holding ``filler_blocks`` random blocks plus the test prompt's blocks.

    Pod ``i`` holds the first ``8 * i`` blocks of the prompt, so the 64 pods have 64 different
    prefix lengths (0..504 of 512) and the lookup walks the whole prompt.
    """
    config = Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": "42"}})
    indexer = Indexer(config)
    rng = np.random.default_rng(3)
    filler = rng.integers(1, 2**64 - 1, size=filler_blocks, dtype=np.uint64)
    for start in range(0, filler_blocks, 512):
        keys = filler[start : start + 512].tolist()
        indexer.index.add(None, keys, [PodEntry(_pod((start // 512) % PODS))])
    tokens = prompt()
    keys = indexer.block_keys(tokens)
    for pod in range(PODS):
        if pod:
            indexer.index.add(None, keys[: 8 * pod], [PodEntry(_pod(pod))])
    return indexer, tokens, keys


def _dynamo_lookup(tokens: list[int], filler_blocks: int, repeats: int) -> dict[str, float]:
    """Dynamo's RadixTree with the same prefix layout: find_matches over the 512 local hashes."""
    os.environ.setdefault("DYN_LOG", "error")
    from dynamo.llm import RadixTree, compute_block_hash_for_seq

    tree = RadixTree()
    rng = np.random.default_rng(3)
    filler = rng.integers(1, 2**63 - 1, size=filler_blocks, dtype=np.uint64)
    for number, start in enumerate(range(0, filler_blocks, 512)):
        hashes = filler[start : start + 512].tolist()
        blocks = [{"block_hash": h, "tokens_hash": h} for h in hashes]
        event = {"event_id": number, "data": {"stored": {"parent_hash": None, "blocks": blocks}}}
        tree.apply_event(number % PODS, json.dumps(event).encode())
    local = compute_block_hash_for_seq(tokens, 16)
    for pod in range(1, PODS):
        blocks = [{"block_hash": i + 1, "tokens_hash": h} for i, h in enumerate(local[: 8 * pod])]
        event = {
            "event_id": 10**7 + pod,
            "data": {"stored": {"parent_hash": None, "blocks": blocks}},
        }
        tree.apply_event(PODS + pod, json.dumps(event).encode())
    found = tree.find_matches(local).scores
    assert len(found) == PODS - 1, found
    lookup = time_calls(lambda: tree.find_matches(local), repeats)
    with_hashing = time_calls(
        lambda: tree.find_matches(compute_block_hash_for_seq(tokens, 16)), repeats
    )
    return {
        "lookup_p50_us": median(lookup) * 1e6,
        "lookup_p99_us": percentile(lookup, 0.99) * 1e6,
        "hash_and_lookup_p50_us": median(with_hashing) * 1e6,
    }


def run(repeats: int = 500, filler_blocks: int = FILLER_BLOCKS) -> dict[str, Any]:
    """p50/p99 of score_tokens and of its parts, and the same-run Dynamo figures."""
    indexer, tokens, keys = build_indexer(filler_blocks)
    scores = indexer.score_tokens(tokens)
    assert len(scores) == PODS - 1 and scores[_pod(63)] == 504.0, scores
    full = time_calls(lambda: indexer.score_tokens(tokens), repeats)
    hashing = time_calls(lambda: indexer.block_keys(tokens), repeats)
    lookup = time_calls(lambda: indexer.scorer.score(indexer.index.lookup(keys)), repeats)
    result: dict[str, Any] = {
        "index_blocks": filler_blocks + 512,
        "pods": PODS,
        "scheme": SCHEME,
        "score_tokens_p50_ms": median(full) * 1e3,
        "score_tokens_p99_ms": percentile(full, 0.99) * 1e3,
        "hashing_p50_ms": median(hashing) * 1e3,
        "lookup_and_score_p50_us": median(lookup) * 1e6,
        "lookup_and_score_p99_us": percentile(lookup, 0.99) * 1e6,
    }
    try:
        dynamo = _dynamo_lookup(tokens, filler_blocks, repeats)
    except ImportError as exc:  # the bench extra installs it; say so rather than crash
        result["dynamo"] = {"error": f"ai-dynamo-runtime not importable: {exc}"}
    else:
        result["dynamo"] = dynamo
        result["lookup_speedup_vs_dynamo"] = (
            dynamo["lookup_p50_us"] / (result["lookup_and_score_p50_us"])
        )
    return result
