"""Hashing an 8k-token prompt with every key scheme, against a plain-hashlib floor.

vLLM's SHA-256 schemes run the compiled chain kernel when it is built; for those the figures
also give the Python (hashlib) path and the kernel on a uint32 array, the form the HTTP service
hands it.
"""

from __future__ import annotations

import hashlib
import random
from functools import partial
from typing import Any

import cbor2
import numpy as np

from bench.stats import median, time_calls
from kvcache.hashing import SCHEME_NAMES, VllmScheme, make_scheme
from kvcache.hashing.vllm import KERNEL_AVAILABLE

PROMPT_TOKENS = 8192
BLOCK_SIZE = 16
VOCAB = 128_256  # a Llama-3-sized vocabulary: token ids need up to 5 CBOR bytes


def prompt(seed: int = 7, length: int = PROMPT_TOKENS) -> list[int]:
    """A reproducible random prompt."""
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def _floor_seconds(tokens: list[int], repeats: int) -> float:
    """hashlib.sha256 alone over the sha256_cbor preimages (built beforehand with cbor2)."""
    parent = bytes(32)
    preimages = []
    for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        block = tuple(tokens[start : start + BLOCK_SIZE])
        preimages.append(cbor2.dumps((parent, block, None), canonical=True))
    sha256 = hashlib.sha256

    def run() -> None:
        for data in preimages:
            sha256(data).digest()

    return median(time_calls(run, repeats))


def run(repeats: int = 200) -> dict[str, Any]:
    """Median milliseconds per 8k-token prompt for each scheme, and the ratio to the floor."""
    tokens = prompt()
    floor = _floor_seconds(tokens, repeats)
    results: dict[str, Any] = {
        "prompt_tokens": PROMPT_TOKENS,
        "block_size": BLOCK_SIZE,
        "floor_hashlib_sha256_ms": floor * 1e3,
        "chain_kernel": KERNEL_AVAILABLE,
        "schemes": {},
    }
    u32 = np.array(tokens, dtype=np.uint32)
    for name in SCHEME_NAMES:
        seed = "0" if name.startswith("xxhash") else None
        scheme = make_scheme(name, seed=seed, block_size=BLOCK_SIZE)
        seconds = median(time_calls(partial(scheme.block_keys, tokens, model="m"), repeats))
        figure: dict[str, Any] = {"ms": seconds * 1e3, "x_floor": seconds / floor}
        if isinstance(scheme, VllmScheme) and scheme.kernel:
            python = VllmScheme(name, seed=seed, block_size=BLOCK_SIZE, kernel=False)
            figure["python_ms"] = median(time_calls(partial(python.block_keys, tokens), repeats))
            figure["python_ms"] *= 1e3
            array_keys = partial(scheme.block_key_array, u32)
            figure["u32_array_ms"] = median(time_calls(array_keys, repeats)) * 1e3
        results["schemes"][name] = figure
    return results
