"""Our key scheme's chain, continued from blocks an engine published, and the vLLM scheme a
pod's hashes match when they are not ours.

The applier re-keys a dual-mode pod's events from their token ids, and verifies an identity
pod by recomputing its hashes: both continue our chain from the event's parent, whose chain
state (a digest, or a key for the llm-d scheme) `KeyChain` remembers for recent blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcache.errors import KVCacheError
from kvcache.events.schema import BlockStored
from kvcache.hashing import HashAlgorithm, KeyScheme, LlmdScheme, SglangScheme, VllmScheme

__all__ = ["CHAIN_STATE_LIMIT", "KeyChain", "detect_scheme"]

# How many digests of our own chain are kept to continue chains from known parents.
CHAIN_STATE_LIMIT = 1 << 20


class KeyChain:
    """Continue our scheme's chain from a known block: keys plus the state to go on from."""

    def __init__(self, scheme: KeyScheme) -> None:
        self.scheme = scheme
        self.states: dict[int, Any] = {}

    def extend(self, tokens: Sequence[int], parent_key: int | None, model: str) -> list[int] | None:
        """Keys of the full blocks of ``tokens`` after ``parent_key`` (None: chain start).

        Returns None when the parent's chain state is unknown (it cannot be resolved).
        """
        scheme = self.scheme
        parent_state: Any = None
        if parent_key is not None:
            parent_state = self.states.get(parent_key)
            if parent_state is None:
                return None
        if isinstance(scheme, VllmScheme):
            digests = scheme.block_digests(tokens, parent=parent_state, first_block=1)
            keys = [int.from_bytes(d[-8:], "big") for d in digests]
            self._remember(keys, digests)
        elif isinstance(scheme, SglangScheme):
            digests = scheme.page_digests(tokens, parent=parent_state)
            keys = [int.from_bytes(d[:8], "big") for d in digests]
            self._remember(keys, digests)
        elif isinstance(scheme, LlmdScheme):
            keys = scheme.chain(tokens, parent=parent_state, model=model)
            self._remember(keys, keys)
        else:  # a user-supplied scheme: no chain continuation, only chain starts
            if parent_key is not None:
                return None
            keys = scheme.block_keys(tokens, model=model)
        return keys

    def _remember(self, keys: Sequence[int], states: Sequence[Any]) -> None:
        store = self.states
        if len(store) + len(keys) > CHAIN_STATE_LIMIT:
            # Drop the oldest half (dicts keep insertion order): cheap, and chains are mostly
            # continued from recent blocks.
            for key in list(store)[: len(store) // 2]:
                del store[key]
        store.update(zip(keys, states, strict=True))


def _candidate_schemes(block_size: int, configured: KeyScheme) -> list[tuple[str, KeyScheme]]:
    """vLLM schemes worth trying when a pod's hashes do not match ours."""
    seeds: list[str | None] = [None, "0", "42"]
    seed = getattr(configured, "seed", None)
    if isinstance(seed, str) and seed not in seeds:
        seeds.append(seed)
    found: list[tuple[str, KeyScheme]] = []
    for algorithm in HashAlgorithm:
        for candidate_seed in seeds:
            if candidate_seed is None and algorithm.value.startswith("xxhash"):
                continue
            label = f"{algorithm.value} with seed {candidate_seed or 'vllm-none-hash'!r}"
            scheme = VllmScheme(algorithm, seed=candidate_seed, block_size=block_size)
            found.append((label, scheme))
    found.append(("sglang page hashes", SglangScheme(block_size=block_size)))
    return found


def detect_scheme(event: BlockStored, configured: KeyScheme) -> str | None:
    """The vLLM scheme (or SGLang's) that reproduces a chain-start event's hashes, named for
    the hash-space alarm; None when the event cannot tell or nothing matches."""
    if event.parent_block_hash is not None or not event.block_size:
        return None
    usable = len(event.token_ids) // event.block_size * event.block_size
    if usable == 0:
        return None
    tokens = event.token_ids[:usable]
    for label, scheme in _candidate_schemes(event.block_size, configured):
        try:
            if scheme.block_keys(tokens) == list(event.block_hashes):
                return f"{label}, block size {event.block_size}"
        except KVCacheError:
            continue
    return None
