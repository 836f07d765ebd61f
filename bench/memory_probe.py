"""Run in a fresh process: fill one index and print its RSS growth per (block, pod) pair as JSON.

python -m bench.memory_probe kvcache --blocks 10000000 --pods-per-block 1
python -m bench.memory_probe dynamo --blocks 2000000
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import numpy as np

from bench.stats import rss_bytes

BATCH = 512
PODS = 64


def _batches(blocks: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Distinct random u64 keys, generated up front as one compact array (8 B each); the
    # per-batch Python lists are built lazily below so they never all exist at once.
    keys = rng.integers(1, 2**64 - 1, size=blocks, dtype=np.uint64, endpoint=True)
    return [keys[i : i + BATCH] for i in range(0, blocks, BATCH)]  # type: ignore[misc]


def fill_kvcache(blocks: int, pods_per_block: int, backend: str) -> dict[str, float]:
    """RSS delta of a kvcache index holding ``blocks`` keys on ``pods_per_block`` pods each."""
    from kvcache.blocks import PodEntry
    from kvcache.index.cost_aware import CostAwareIndex
    from kvcache.index.memory import MemoryIndex

    batches = _batches(blocks, seed=1)
    entries = [PodEntry(f"10.0.0.{i}:8000") for i in range(PODS)]
    gc.collect()
    before = rss_bytes()
    index = MemoryIndex() if backend == "memory" else CostAwareIndex(budget_bytes="8GiB")
    for number, batch in enumerate(batches):
        keys = batch.tolist()  # type: ignore[attr-defined]
        for copy in range(pods_per_block):
            index.add(None, keys, [entries[(number + copy) % PODS]])
    gc.collect()
    delta = rss_bytes() - before
    pairs = blocks * pods_per_block
    return {"pairs": pairs, "rss_delta_bytes": delta, "bytes_per_pair": delta / pairs}


def fill_dynamo(blocks: int) -> dict[str, float]:
    """RSS delta of Dynamo's RadixTree holding ``blocks`` blocks (one chain per batch, 1 worker)."""
    os.environ.setdefault("DYN_LOG", "error")
    from dynamo.llm import RadixTree

    batches = _batches(blocks, seed=1)
    gc.collect()
    before = rss_bytes()
    tree = RadixTree()
    for number, batch in enumerate(batches):
        hashes = batch.tolist()  # type: ignore[attr-defined]
        stored = [{"block_hash": h, "tokens_hash": h} for h in hashes]
        event = {"event_id": number, "data": {"stored": {"parent_hash": None, "blocks": stored}}}
        tree.apply_event(number % PODS, json.dumps(event).encode())
    gc.collect()
    delta = rss_bytes() - before
    return {"pairs": blocks, "rss_delta_bytes": delta, "bytes_per_pair": delta / blocks}


def main() -> None:
    """CLI entry: print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=["kvcache", "kvcache-cost-aware", "dynamo"])
    parser.add_argument("--blocks", type=int, default=10_000_000)
    parser.add_argument("--pods-per-block", type=int, default=1)
    args = parser.parse_args()
    if args.target == "dynamo":
        result = fill_dynamo(args.blocks)
    else:
        backend = "memory" if args.target == "kvcache" else "cost_aware"
        result = fill_kvcache(args.blocks, args.pods_per_block, backend)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
