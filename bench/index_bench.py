"""Block index measurements: memory per pair, lookup latency, add throughput, LRU quality.

Each function returns a flat dict of numbers. Memory figures are RSS deltas, so run
`memory_per_pair` in a fresh interpreter (the CLI does)::

    python -m bench.index_bench memory --blocks 10000000 --pods-per-block 1
    python -m bench.index_bench lookup | add | lru | ops | all
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.stats import percentile, rss_bytes, time_calls
from kvcache.blocks import KeyType, PodEntry
from kvcache.index import CostAwareIndex, Index, MemoryIndex

PODS = [PodEntry(f"10.0.{i // 256}.{i % 256}:8000") for i in range(64)]


def _make(backend: str) -> Index:
    return MemoryIndex() if backend == "memory" else CostAwareIndex("8GiB")


def _keys(n: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64)


def memory_per_pair(
    blocks: int = 10_000_000,
    pods_per_block: int = 1,
    backend: str = "memory",
    mapping: str = "none",
    batch: int = 512,
) -> dict[str, float]:
    """RSS growth per (block, pod) pair after indexing ``blocks`` keys on ``pods_per_block`` pods.

    ``mapping``: "none" (add(None, ...)), "identity" (engine keys = request keys) or "dual"
    (distinct engine keys, 1:1: the dual-key fallback's engine map is included).
    """
    keys = _keys(blocks, 1)
    gc.collect()
    before = rss_bytes()
    index = _make(backend)
    for number, start in enumerate(range(0, blocks, batch)):
        chunk = keys[start : start + batch]
        request = chunk.tolist()
        engine = {"none": None, "identity": request, "dual": (chunk ^ np.uint64(1)).tolist()}
        for copy in range(pods_per_block):
            index.add(engine[mapping], request, [PODS[(number + copy) % len(PODS)]])
    del keys
    gc.collect()
    grown = rss_bytes() - before
    stats = index.statistics()
    pairs = blocks * pods_per_block
    return {
        "pairs": pairs,
        "rss_delta_bytes": grown,
        "bytes_per_pair": grown / pairs,
        "reported_bytes_per_pair": stats["bytes"] / pairs,
        "slots": stats["slots"],
    }


def lookup_latency(
    keys: int = 1_000_000, prefix: int = 512, repeats: int = 2000, backend: str = "memory"
) -> dict[str, float]:
    """Lookup of a ``prefix``-key chain in an index of ``keys`` keys over 64 pods (µs).

    The index holds ``keys // prefix`` chains, each on 1-4 random pods (a shared prefix
    structure); queries hit a whole chain, or stop halfway (a miss in the middle), or are
    filtered to 2 pods.
    """
    rng = np.random.default_rng(2)
    index = _make(backend)
    chains = _keys(-(-keys // prefix) * prefix, 3).reshape(-1, prefix)
    for chain in chains:
        holders = rng.choice(len(PODS), size=rng.integers(1, 5), replace=False)
        index.add(None, chain.tolist(), [PODS[i] for i in holders])
    queries = [chains[i].tolist() for i in rng.integers(0, len(chains), 64)]
    broken = [[*q[: prefix // 2], 12345, *q[prefix // 2 + 1 :]] for q in queries]
    pods = [PODS[0].pod, PODS[1].pod]
    out: dict[str, float] = {"keys": float(keys), "prefix": float(prefix)}
    for name, qs, wanted in (
        ("full_hit", queries, None),
        ("half_hit", broken, None),
        ("filtered_2_pods", queries, pods),
    ):
        samples = time_calls(_cycle(index, qs, wanted), repeats)
        out[f"{name}_p50_us"] = percentile(samples, 0.5) * 1e6
        out[f"{name}_p99_us"] = percentile(samples, 0.99) * 1e6
    return out


def _cycle(index: Index, queries: list[list[int]], pods: list[str] | None) -> Callable[[], object]:
    """A call that looks up the next query each time (round robin)."""
    state = [0]

    def call() -> object:
        state[0] += 1
        return index.lookup(queries[state[0] % len(queries)], pods)

    return call


def add_throughput(
    batch_sizes: tuple[int, ...] = (1, 16, 32, 128, 512),
    keys: int = 400_000,
    backend: str = "memory",
) -> dict[str, float]:
    """Keys/s and µs per call of add() with one entry: fresh keys, re-adds, dual-key mapping."""
    out: dict[str, float] = {}
    for size in batch_sizes:
        n = max(size * 20, keys // max(1, 512 // size))  # small batches: fewer keys
        batches = [b.tolist() for b in np.array_split(_keys(n, 4), max(1, n // size))]
        for label, engine in (("fresh", False), ("readd", False), ("dual", True)):
            index = _make(backend)
            if label == "readd":
                for b in batches:
                    index.add(None, b, [PODS[0]])
            entry = [PODS[1]]
            start = time.perf_counter()
            for b in batches:
                index.add([k ^ 1 for k in b] if engine else None, b, entry)
            elapsed = time.perf_counter() - start
            out[f"batch{size}_{label}_keys_per_s"] = n / elapsed
            out[f"batch{size}_{label}_us_per_call"] = elapsed / len(batches) * 1e6
    return out


def scalar_ops(keys: int = 200_000, repeats: int = 2000) -> dict[str, float]:
    """µs per call of the single-key operations, and of clear(pod) at ``keys`` keys."""
    index = MemoryIndex()
    chunk = _keys(keys, 5)
    for i, start in enumerate(range(0, keys, 512)):
        b = chunk[start : start + 512].tolist()
        index.add([k ^ 1 for k in b], b, [PODS[i % 8], PODS[8 + i % 8]])
    pool = chunk.tolist()
    out: dict[str, float] = {}
    it = iter(range(10**9))
    calls: dict[str, Callable[[], object]] = {
        "request_key": lambda: index.request_key(pool[next(it) % keys] ^ 1),
        "evict_engine": lambda: index.evict(pool[next(it) % keys] ^ 1, KeyType.ENGINE, [PODS[3]]),
        "evict_request": lambda: index.evict(pool[next(it) % keys], KeyType.REQUEST, [PODS[4]]),
        "lookup_1_key": lambda: index.lookup([pool[next(it) % keys]]),
    }
    for name, call in calls.items():
        out[f"{name}_p50_us"] = percentile(time_calls(call, repeats), 0.5) * 1e6
    t0 = time.perf_counter()
    index.clear(PODS[0].pod)
    out["clear_ms"] = (time.perf_counter() - t0) * 1e3
    return out


class ExactLRU:
    """Baseline: request key -> frozenset in an OrderedDict, exact LRU by key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[int, frozenset[PodEntry]] = OrderedDict()

    def add(self, keys: list[int], entry: PodEntry) -> None:
        data = self.data
        for k in keys:
            cur = data.get(k)
            data[k] = frozenset((entry,)) if cur is None else cur | {entry}
            data.move_to_end(k)
        while len(data) > self.size:
            data.popitem(last=False)

    def lookup(self, keys: list[int]) -> int:
        data = self.data
        n = 0
        for k in keys:
            if k not in data:
                break
            data.move_to_end(k)
            n += 1
        return n


def lru_hit_rates(
    prefixes: int = 20_000,
    length: int = 64,
    capacity_fraction: float = 0.2,
    requests: int = 20_000,
    zipf: float = 1.1,
) -> dict[str, float]:
    """Prefix hit rate and cost of exact LRU vs the approximate LRU on a Zipf workload.

    ``prefixes`` chains of ``length`` keys; each request picks a chain by Zipf rank, looks it
    up (hits = keys found in order) and then adds it (the engine cached it). The index holds
    ``capacity_fraction`` of all keys.
    """
    rng = np.random.default_rng(6)
    chains = _keys(prefixes * length, 7).reshape(prefixes, length)
    picks = (rng.zipf(zipf, requests * 2) - 1) % prefixes
    picks = rng.permutation(prefixes)[picks[:requests]]  # popular chains spread over the ids
    size = int(prefixes * length * capacity_fraction)
    entry = PODS[0]
    out: dict[str, float] = {"capacity_keys": float(size)}
    exact = ExactLRU(size)
    approx = MemoryIndex(size=size)

    def approx_lookup(chain: list[int]) -> int:
        return len(approx.lookup(chain))

    def approx_add(chain: list[int]) -> None:
        approx.add(None, chain, [entry])

    def exact_add(chain: list[int]) -> None:
        exact.add(chain, entry)

    variants: list[tuple[str, Callable[[list[int]], int], Callable[[list[int]], None]]] = [
        ("exact_lru", exact.lookup, exact_add),
        ("approx_lru", approx_lookup, approx_add),
    ]
    for name, lookup, add in variants:
        gc.collect()
        before = rss_bytes()
        hits = 0
        t0 = time.perf_counter()
        for p in picks:
            chain = chains[p].tolist()
            hits += lookup(chain)
            add(chain)
        elapsed = time.perf_counter() - t0
        out[f"{name}_hit_rate"] = hits / (requests * length)
        out[f"{name}_us_per_request"] = elapsed / requests * 1e6
        out[f"{name}_rss_delta_mb"] = (rss_bytes() - before) / 2**20
    return out


def main() -> None:
    """CLI: print one JSON object per requested section."""
    parser = argparse.ArgumentParser()
    parser.add_argument("section", choices=["memory", "lookup", "add", "ops", "lru", "all"])
    parser.add_argument("--blocks", type=int, default=10_000_000)
    parser.add_argument("--pods-per-block", type=int, default=1)
    parser.add_argument("--backend", choices=["memory", "cost_aware"], default="memory")
    parser.add_argument("--mapping", choices=["none", "identity", "dual"], default="none")
    args = parser.parse_args()
    sections: dict[str, Callable[[], dict[str, float]]] = {
        "memory": lambda: memory_per_pair(
            args.blocks, args.pods_per_block, args.backend, args.mapping
        ),
        "lookup": lambda: lookup_latency(backend=args.backend),
        "add": lambda: add_throughput(backend=args.backend),
        "ops": scalar_ops,
        "lru": lru_hit_rates,
    }
    chosen = [s for s in sections if s != "memory"] if args.section == "all" else [args.section]
    for name in chosen:
        print(json.dumps({name: sections[name]()}))


if __name__ == "__main__":
    main()
