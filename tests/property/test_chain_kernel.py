"""The compiled block-key chain (kvcache.hashing._chain) against hashlib, cbor2 and pickle.

Every property runs on both SHA-256 compressions: the SHA-extension one (where the CPU has it)
and the portable one, forced through ``use_sha_ni``. References are built independently of
kvcache's encoders: ``cbor2.dumps(..., canonical=True)`` / ``pickle.dumps(..., protocol=5)`` of
``(parent, tuple(block), None)`` hashed with hashlib, as vLLM itself computes them.
"""

from __future__ import annotations

import hashlib
import pickle
from array import array
from collections.abc import Iterator
from typing import Any

import cbor2
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.errors import InvalidTokenError
from kvcache.hashing import VllmLegacy64Scheme, VllmScheme, digest_to_u64, make_scheme
from kvcache.hashing import _chain as kernel
from kvcache.hashing.vllm import KERNEL_AVAILABLE

EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
token = st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1), st.integers(0, 300_000))
tokens_st = st.lists(token, max_size=300)
block_size_st = st.one_of(st.integers(1, 5), st.integers(6, 40), st.just(16))
parent_st = st.one_of(st.none(), st.binary(min_size=32, max_size=32))
# The SHA-path fixture only selects a compression: sharing it across examples is intended.
SHARED_FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(params=["sha_ni", "portable"])
def sha_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test on one SHA-256 compression, then restores the default."""
    wanted = request.param == "sha_ni"
    try:
        active = kernel.use_sha_ni(wanted)
        assert active == (wanted and kernel.SHA_NI_SUPPORTED)
        yield request.param
    finally:
        kernel.use_sha_ni(True)


def _reference_digests(
    algorithm: str, tokens: list[int], block_size: int, parent: bytes
) -> list[bytes]:
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        obj = (parent, tuple(tokens[start : start + block_size]), None)
        if algorithm == "sha256_cbor":
            preimage = cbor2.dumps(obj, canonical=True)
        else:
            preimage = pickle.dumps(obj, protocol=5)
        parent = hashlib.sha256(preimage).digest()
        out.append(parent)
    return out


def test_kernel_is_built_and_used() -> None:
    assert KERNEL_AVAILABLE
    assert VllmScheme("sha256_cbor").kernel
    assert VllmScheme("sha256").kernel
    assert not VllmScheme("sha256", kernel=False).kernel
    assert not VllmScheme("xxhash", seed="1").kernel  # xxhash stays in Python
    assert VllmLegacy64Scheme(seed="0").kernel


@settings(max_examples=150, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(data=st.binary(max_size=600))
def test_sha256_equals_hashlib(sha_path: str, data: bytes) -> None:
    assert kernel.sha256(data) == hashlib.sha256(data).digest()


@pytest.mark.parametrize("length", [0, 55, 56, 63, 64, 65, 119, 120, 128, 1000])
def test_sha256_padding_boundaries(sha_path: str, length: int) -> None:
    data = bytes(range(256)) * 4
    assert kernel.sha256(data[:length]) == hashlib.sha256(data[:length]).digest()


@settings(max_examples=120, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(
    algorithm=st.sampled_from(["sha256", "sha256_cbor"]),
    tokens=tokens_st,
    block_size=block_size_st,
    parent=parent_st,
)
def test_chain_equals_reference_serialisers(
    sha_path: str, algorithm: str, tokens: list[int], block_size: int, parent: bytes | None
) -> None:
    scheme = VllmScheme(algorithm, seed="7", block_size=block_size, kernel=True)
    python = VllmScheme(algorithm, seed="7", block_size=block_size, kernel=False)
    expected = _reference_digests(algorithm, tokens, block_size, parent or scheme.none_hash)
    digests = scheme.block_digests(tokens, parent=parent)
    assert digests == expected == python.block_digests(tokens, parent=parent)
    keys = [digest_to_u64(d) for d in expected]
    if parent is None:
        assert scheme.block_keys(tokens) == keys == python.block_keys(tokens)
        array_keys = scheme.block_key_array(np.array(tokens, dtype=np.uint32))
        assert array_keys.dtype == np.uint64
        assert array_keys.tolist() == keys


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(tokens=tokens_st, block_size=block_size_st, parent=st.integers(0, 2**64 - 1))
def test_legacy_int_chain_equals_reference(
    sha_path: str, tokens: list[int], block_size: int, parent: int
) -> None:
    scheme = VllmLegacy64Scheme(seed="9", block_size=block_size, kernel=True)
    python = VllmLegacy64Scheme(seed="9", block_size=block_size, kernel=False)
    expected = []
    value = parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tuple(tokens[start : start + block_size])
        digest = hashlib.sha256(cbor2.dumps((value, block, None), canonical=True)).digest()
        value = int.from_bytes(digest[-8:], "big")
        expected.append(value)
    got = scheme.chain(tokens, parent=parent or None)
    assert got == python.chain(tokens, parent=parent or None)
    if parent:
        assert got == expected


def _containers(tokens: list[int]) -> list[Any]:
    wide = np.array(tokens, dtype=np.uint64)
    return [
        tokens,
        tuple(tokens),
        [bool(t) if t < 2 else t for t in tokens],  # bool is an int, as for array('I')
        array("I", tokens),
        array("Q", tokens),
        np.array(tokens, dtype=np.uint32),
        np.array(tokens, dtype=np.int64),
        wide,
        wide[::-1][::-1],  # a view: still contiguous
        np.repeat(wide, 2)[::2],  # strided: converted by Python first
        np.array(tokens, dtype=">u4"),  # foreign byte order: converted by Python first
        np.array(tokens, dtype=np.uint32).astype(np.int32, casting="unsafe")[:0],  # empty
        range(len(tokens)),
    ]


def test_token_containers(sha_path: str) -> None:
    tokens = [EDGES[i % len(EDGES)] if i % 3 else i * 977 % 200_000 for i in range(333)]
    small = [t % 30_000 for t in tokens]
    for algorithm in ("sha256", "sha256_cbor"):
        scheme = VllmScheme(algorithm, seed="3", block_size=16, kernel=True)
        python = VllmScheme(algorithm, seed="3", block_size=16, kernel=False)
        expected = python.block_keys(tokens)
        for container in _containers(tokens)[:-2]:
            assert scheme.block_keys(container) == expected, type(container)
        assert scheme.block_keys(_containers(tokens)[-2]) == []
        assert scheme.block_keys(range(333)) == python.block_keys(list(range(333)))
        for dtype in (np.uint16, np.int16, np.int32, np.uint8):
            narrow: npt.NDArray[np.integer[Any]] = np.array(small, dtype=np.uint64).astype(dtype)
            assert scheme.block_keys(narrow) == python.block_keys(narrow.tolist()), dtype


def test_bad_tokens_keep_python_errors() -> None:
    scheme = VllmScheme("sha256_cbor", block_size=2, kernel=True)
    cases: list[tuple[Any, str]] = [
        ([1, 2, -1, 4], "index 2"),
        ([1, 2, 3, 2**32], "index 3"),
        ([1, 2, 3, 2**70], "index 3"),
        ([1, "2", 3], "index 1"),
        ((1, 2.0), "index 1"),
        (np.array([1, -3, 4], dtype=np.int64), "index 1"),
        (np.array([1, 2**32], dtype=np.uint64), "index 1"),
        (np.array([5, -1], dtype=np.int32), "index 1"),
        (np.array([1.0, 2.0]), "dtype"),
        (np.zeros((2, 2), dtype=np.int64), "1-D"),
        (b"\x01\x00\x00\x00\x02\x00\x00\x00", "sequence of ints"),
        (memoryview(array("I", [1, 2])), "sequence of ints"),
    ]
    for tokens, message in cases:
        with pytest.raises(InvalidTokenError, match=message):
            scheme.block_keys(tokens)
        with pytest.raises(InvalidTokenError, match=message):
            scheme.block_key_array(tokens)


def test_kernel_refuses_what_python_must_check() -> None:
    """The raw kernel raises plain errors (Python turns them into named ones), never hashes."""
    parent = bytes(32)
    with pytest.raises(TypeError):
        kernel.keys(b"\x01\x00\x00\x00", 1, kernel.MODE_CBOR, parent)
    with pytest.raises(TypeError):
        kernel.keys(iter([1, 2]), 1, kernel.MODE_CBOR, parent)
    with pytest.raises(TypeError):
        kernel.keys([1, np.int64(2)], 1, kernel.MODE_CBOR, parent)  # __index__: Python's job
    with pytest.raises(ValueError, match="2\\*\\*32"):
        kernel.keys([1, -2], 1, kernel.MODE_CBOR, parent)
    with pytest.raises(ValueError, match="parent"):
        kernel.keys([1], 1, kernel.MODE_CBOR, b"short")
    with pytest.raises(ValueError, match="block_size"):
        kernel.keys([1], 0, kernel.MODE_CBOR, parent)
    with pytest.raises(ValueError, match="mode"):
        kernel.keys([1], 1, 99, parent)
    with pytest.raises(ValueError, match="digests"):
        kernel.digests([1], 1, kernel.MODE_CBOR_INT, 5)  # type: ignore[arg-type]


def test_oversized_pickle_blocks_stay_in_python() -> None:
    """Blocks that may not fit one pickle frame are pickle's job, kernel or not."""
    scheme = VllmScheme("sha256", block_size=20_000, kernel=True)
    assert not scheme.kernel
    tokens = [2**32 - 1 - i for i in range(20_000)]
    expected = _reference_digests("sha256", tokens, 20_000, scheme.none_hash)
    assert scheme.block_digests(tokens) == expected


def test_make_scheme_uses_kernel_for_sha() -> None:
    scheme = make_scheme("sha256_cbor", seed="42", block_size=16)
    assert isinstance(scheme, VllmScheme)
    assert scheme.kernel


def test_keys_from_several_threads_equal_the_serial_keys() -> None:
    """Long chains hash with the GIL released: threads running them at once must each get
    their own prompt's keys (the output and scratch buffers are per call)."""
    import threading

    scheme = VllmScheme("sha256_cbor", seed="7", block_size=16, kernel=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 2**32, 4096, dtype=np.uint32) for _ in range(8)]
    expected = [scheme.block_key_array(p).tolist() for p in prompts]
    assert len(expected[0]) == 256  # over the no-GIL threshold
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for n in range(40):
            which = (offset + n) % len(prompts)
            if scheme.block_key_array(prompts[which]).tolist() != expected[which]:
                wrong.append(which)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
