"""Key schemes against the shared vectors and real vLLM 0.32 captures, plus error handling."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
import pytest

from kvcache.errors import (
    ConfigError,
    ExtraKeysError,
    HashingError,
    InvalidTokenError,
    UnknownSchemeError,
)
from kvcache.hashing import (
    LEGACY_SCHEME_NAMES,
    SCHEME_NAMES,
    ExtraKeyEra,
    HashAlgorithm,
    KeyScheme,
    LlmdScheme,
    MMItem,
    RequestExtras,
    SglangScheme,
    VllmLegacy64Scheme,
    VllmScheme,
    digest_to_u64,
    make_scheme,
    vllm_version_profile,
)

DATA = Path(__file__).resolve().parent.parent / "data"
BLOCK_VECTORS: dict[str, Any] = json.loads((DATA / "block_hashes.json").read_text())
FNV_VECTORS: dict[str, Any] = json.loads((DATA / "request_keys_fnv64a.json").read_text())
CAPTURES = DATA / "captures"

# Vector files name eras after what changed; map them to ours.
ERA_OF_VECTOR = {"tagged": "tagged", "name": "name", "mm_offset": "offset", "int_id": "int_id"}
VLLM_CASES = [c for c in BLOCK_VECTORS["cases"] if c["inputs"]["algo"] != "sha256_cbor_64bit"]
LEGACY_CASES = [c for c in BLOCK_VECTORS["cases"] if c["inputs"]["algo"] == "sha256_cbor_64bit"]
SGLANG_CASES = BLOCK_VECTORS["sglang"]["cases"]
FNV_CASES = FNV_VECTORS["computed_request_key_vectors"]


def _extras_of(inputs: dict[str, Any]) -> RequestExtras:
    lora = inputs["lora"] or {}
    return RequestExtras(
        lora_name=lora.get("name"),
        lora_id=lora.get("int_id"),
        lora_path=lora.get("path"),
        cache_salt=inputs["cache_salt"],
        mm_items=tuple(
            MMItem(m["identifier"], m["offset"], m["length"]) for m in inputs["mm_features"]
        ),
    )


def _extra_keys_as_json(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_extra_keys_as_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# vLLM vectors
# ---------------------------------------------------------------------------------------------


def test_vector_file_has_every_case() -> None:
    assert len(VLLM_CASES) == 19
    assert len(LEGACY_CASES) == 1
    assert len(SGLANG_CASES) == 4
    assert len(FNV_CASES) == 6


def _vector_scheme(inputs: dict[str, Any], kernel: bool) -> VllmScheme:
    scheme = VllmScheme(
        inputs["algo"],
        seed=inputs["PYTHONHASHSEED"],
        block_size=inputs["block_size"],
        era=ERA_OF_VECTOR[inputs["extra_key_era"]],
        kernel=kernel,
    )
    # The compiled chain serves every SHA-256 case (those without extra keys go through it).
    assert scheme.kernel == (kernel and inputs["algo"].startswith("sha256"))
    return scheme


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "python"])
@pytest.mark.parametrize("case", VLLM_CASES, ids=lambda c: c["id"])
def test_vllm_vector(case: dict[str, Any], kernel: bool) -> None:
    inputs = case["inputs"]
    scheme = _vector_scheme(inputs, kernel)
    assert scheme.none_hash.hex() == case["none_hash"]["hex"]
    extras = _extras_of(inputs)
    tokens = inputs["token_ids"]

    preimages = scheme.block_preimages(tokens, extras=extras)
    digests = scheme.block_digests(tokens, extras=extras)
    keys = scheme.block_keys(tokens, extras=extras)
    extra_keys = scheme.block_extra_keys(len(case["blocks"]), extras=extras)
    assert len(keys) == case["num_full_blocks"] == len(case["blocks"])
    for block, preimage, digest, key, ek in zip(
        case["blocks"], preimages, digests, keys, extra_keys, strict=True
    ):
        assert preimage.hex() == block["preimage_hex"]
        assert digest.hex() == block["digest_hex"]
        assert key == block["u64"] == int(block["u64_hex"], 16)
        assert digest_to_u64(digest) == key
        assert _extra_keys_as_json(ek) == block["extra_keys_hashed"]
    if all(ek is None for ek in extra_keys):  # plain tokens: the whole kernel path
        assert scheme.block_keys(tokens) == keys
        assert scheme.block_key_array(np.array(tokens, dtype=np.uint32)).tolist() == keys


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "python"])
@pytest.mark.parametrize("case", VLLM_CASES, ids=lambda c: c["id"])
def test_vllm_vector_chain_continuation(case: dict[str, Any], kernel: bool) -> None:
    """Hashing from block k with the digest of block k-1 as parent gives the same digests."""
    inputs = case["inputs"]
    scheme = _vector_scheme(inputs, kernel)
    extras = _extras_of(inputs)
    tokens = inputs["token_ids"]
    bs = inputs["block_size"]
    full = scheme.block_digests(tokens, extras=extras)
    for k in range(1, len(full)):
        rest = scheme.block_digests(
            tokens[k * bs :], parent=full[k - 1], extras=extras, first_block=k
        )
        assert rest == full[k:]


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "python"])
def test_legacy_int_chain_vector(kernel: bool) -> None:
    (case,) = LEGACY_CASES
    inputs = case["inputs"]
    assert isinstance(make_scheme("sha256_cbor_64bit", seed="0"), VllmLegacy64Scheme)
    scheme = VllmLegacy64Scheme(
        seed=inputs["PYTHONHASHSEED"], block_size=inputs["block_size"], kernel=kernel
    )
    assert scheme.kernel == kernel
    assert scheme.none_hash == case["none_hash"]["int"]
    keys = scheme.block_keys(inputs["token_ids"])
    assert keys == [b["u64"] for b in case["blocks"]] == [b["hash_int"] for b in case["blocks"]]
    assert scheme.chain(inputs["token_ids"][16:], parent=keys[0]) == keys[1:]


def test_legacy_int_chain_needs_seed_and_is_not_a_profile() -> None:
    with pytest.raises(ConfigError, match="PYTHONHASHSEED"):
        make_scheme("sha256_cbor_64bit")
    with pytest.raises(ConfigError, match=r"0\.10\.2"):
        vllm_version_profile("0.10.1")
    assert "sha256_cbor_64bit" in LEGACY_SCHEME_NAMES


# ---------------------------------------------------------------------------------------------
# SGLang vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SGLANG_CASES, ids=lambda c: c["id"])
def test_sglang_vector(case: dict[str, Any]) -> None:
    inputs = case["inputs"]
    scheme = SglangScheme(inputs["page_size"])
    extras = RequestExtras(cache_salt=inputs["cache_salt"]) if inputs["cache_salt"] else None
    full_pages = [p for p in case["pages"] if p["page_len"] == inputs["page_size"]]
    digests = scheme.page_digests(inputs["token_ids"], extras=extras)
    assert [d.hex() for d in digests] == [p["digest_hex"] for p in full_pages]
    keys = scheme.block_keys(inputs["token_ids"], extras=extras)
    assert keys == [p["event_uint64_twos_complement"] for p in full_pages]
    assert keys == [p["event_int64"] & (2**64 - 1) for p in full_pages]
    if case["root_prior_hex"] is not None:
        first = bytes.fromhex(full_pages[0]["preimage_hex"])
        assert first.startswith(bytes.fromhex(case["root_prior_hex"]))


def test_sglang_continuation_and_refused_extras() -> None:
    tokens = list(range(1000, 1064))
    scheme = SglangScheme(16)
    full = scheme.page_digests(tokens)
    assert scheme.page_digests(tokens[32:], parent=full[1]) == full[2:]
    with pytest.raises(ExtraKeysError):
        scheme.block_keys(tokens, extras=RequestExtras(lora_name="a", lora_path="/a"))
    with pytest.raises(ExtraKeysError):
        scheme.block_keys(tokens, extras=RequestExtras(mm_items=(MMItem("x", 0, 4),)))
    with pytest.raises(HashingError):
        scheme.page_digests(tokens, parent=b"short")


# ---------------------------------------------------------------------------------------------
# llm-d FNV request keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FNV_CASES, ids=lambda c: f"{c['hash_seed']!r}-{c['model_name']}")
def test_fnv_request_key_vector(case: dict[str, Any]) -> None:
    scheme = LlmdScheme(seed=case["hash_seed"], block_size=case["block_size_tokens"])
    if "fnv64a_seed" in case:
        assert scheme.seed64 == case["fnv64a_seed"]
    if "model_root_hash" in case:
        assert scheme.root(case["model_name"]) == case["model_root_hash"]
    tokens = case["tokens"]
    if "extra_features_per_block" not in case:
        assert scheme.block_keys(tokens, model=case["model_name"]) == case["request_keys"]
        return
    per_block = [
        None if f is None else [m["Hash"] for m in f] for f in case["extra_features_per_block"]
    ]
    chained = scheme.chain(tokens, model=case["model_name"], block_extras=per_block)
    assert chained == case["request_keys"]
    assert scheme.block_keys(tokens, model=case["model_name"]) == case["request_keys_text_only"]
    # The same features derived from a placeholder range: block 2 = tokens [32, 48).
    (block,) = [i for i, f in enumerate(per_block) if f]
    bs = case["block_size_tokens"]
    item = MMItem(per_block[block][0], block * bs, bs)  # type: ignore[index]
    extras = RequestExtras(mm_items=(item,))
    assert scheme.block_keys(tokens, model=case["model_name"], extras=extras) == chained


def test_fnv_documented_constants() -> None:
    assert LlmdScheme(seed="").seed64 == 0xCBF29CE484222325
    assert LlmdScheme(seed="42").seed64 == 571532774284038691


def test_fnv_lora_name_replaces_model_and_salt_is_ignored() -> None:
    scheme = LlmdScheme(seed="42", block_size=4)
    tokens = list(range(1, 13))
    adapter = scheme.block_keys(tokens, model="Alice")
    via_lora = scheme.block_keys(
        tokens, model="base", extras=RequestExtras(lora_name="Alice", lora_id=3, cache_salt="s")
    )
    assert via_lora == adapter != scheme.block_keys(tokens, model="base")


def test_fnv_chain_parent_and_extras_length() -> None:
    scheme = LlmdScheme(seed="", block_size=4)
    tokens = list(range(1, 17))
    keys = scheme.block_keys(tokens, model="m")
    assert scheme.chain(tokens[8:], parent=keys[1]) == keys[2:]
    assert scheme.chain(tokens, model="m", block_extras=[None, [], None, None]) == keys
    with pytest.raises(ExtraKeysError, match="4 full blocks"):
        scheme.chain(tokens, model="m", block_extras=[None])
    with pytest.raises(HashingError):
        scheme.chain(tokens, parent=-5)


def test_fnv_mm_overlap_in_start_order() -> None:
    scheme = LlmdScheme(block_size=4)
    items = [MMItem("b", 6, 4), MMItem("a", 2, 3), MMItem("z", 12, 0)]
    assert scheme.mm_features(items, 4) == [["a"], ["a", "b"], ["b"], []]


# ---------------------------------------------------------------------------------------------
# Real vLLM 0.32 captures
# ---------------------------------------------------------------------------------------------


def _stored_events(batches: Iterator[list[Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        for event in batch[1]:
            if event["type"] == "BlockStored":
                yield event


def _check_capture(scheme: VllmScheme, events: list[dict[str, Any]]) -> int:
    """Recompute every stored hash from the event's tokens, chaining through its parent."""
    digest_of: dict[int, bytes] = {}
    checked = 0
    for event in events:
        assert event["block_size"] == scheme.block_size
        assert event["lora_name"] is None
        assert all(k is None for k in event.get("extra_keys") or [])
        parent_key = event["parent_block_hash"]
        parent = None if parent_key is None else digest_of[parent_key]
        digests = scheme.block_digests(event["token_ids"], parent=parent)
        keys = [digest_to_u64(d) for d in digests]
        assert keys == event["block_hashes"]
        digest_of.update(zip(keys, digests, strict=True))
        checked += len(keys)
    return checked


def test_capture_sha256_pickle_default_seed() -> None:
    folder = CAPTURES / "vllm-0.32-sha256-pickle-default"
    meta = json.loads((folder / "meta.json").read_text())
    verify = json.loads((folder / "verify.json").read_text())
    assert meta["PYTHONHASHSEED"] is None
    assert meta["effective_config"]["prefix_caching_hash_algo"] == verify["algo"] == "sha256"
    batches = (json.loads(line)["batch"] for line in (folder / "decoded.jsonl").open())
    events = list(_stored_events(batches))
    scheme = make_scheme(
        "sha256", block_size=meta["effective_config"]["block_size"], vllm_version="0.32.0"
    )
    assert isinstance(scheme, VllmScheme)
    assert _check_capture(scheme, events) == verify["stored_block_hashes"] == 60


def test_capture_sha256_pickle_prompts_match_events() -> None:
    """Prefill of each full prompt yields the keys the engine announced for its prompt blocks."""
    folder = CAPTURES / "vllm-0.32-sha256-pickle-default"
    announced: set[int] = set()
    batches = (json.loads(line)["batch"] for line in (folder / "decoded.jsonl").open())
    for event in _stored_events(batches):
        announced.update(event["block_hashes"])
    scheme = make_scheme("sha256", block_size=32)
    prompts = [
        json.loads(line)["prompt_token_ids"]
        for line in (folder / "requests.jsonl").open()
        if json.loads(line)["kind"] == "generate"
    ]
    keys = [k for prompt in prompts for k in scheme.block_keys(prompt)]
    assert keys
    # Blocks evicted before being re-used are re-announced later, so every prompt block appears.
    assert set(keys) <= announced


def test_capture_serve_sha256_cbor_seed0() -> None:
    folder = CAPTURES / "vllm-0.32-serve-sha256cbor"
    decoder = msgspec.msgpack.Decoder()
    batches = (
        decoder.decode(bytes.fromhex(json.loads(line)["frames_hex"][2]))
        for line in (folder / "frames.jsonl").open()
    )
    events = list(_stored_events(batches))
    scheme = make_scheme("sha256_cbor", seed="0", block_size=32, vllm_version="0.32")
    assert isinstance(scheme, VllmScheme)
    assert _check_capture(scheme, events) == 4

    # The same keys straight from the completions' prompt and output tokens.
    responses = [json.loads(line)["response"] for line in (folder / "requests.jsonl").open()]
    responses.append(json.loads((folder / "after_reset_response.json").read_text()))
    stored = [k for e in events for k in e["block_hashes"]]
    first, last = responses[0]["choices"][0], responses[-1]["choices"][0]
    assert scheme.block_keys(first["prompt_token_ids"] + first["token_ids"])[:2] == stored[:2]
    assert scheme.block_keys(last["prompt_token_ids"] + last["token_ids"])[:2] == stored[2:]


# ---------------------------------------------------------------------------------------------
# Behaviour: extras, chaining, token containers, large inputs
# ---------------------------------------------------------------------------------------------


def _random_tokens(n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    edges = [0, 23, 24, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]
    return [rng.choice(edges) if rng.random() < 0.2 else rng.randrange(200_000) for _ in range(n)]


@pytest.mark.parametrize("name", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
def test_numpy_and_python_paths_agree(name: str) -> None:
    """Prompts above and below the vectorised-encoding threshold chain identically."""
    scheme = VllmScheme(name, seed="1", block_size=16, kernel=False)
    tokens = _random_tokens(4096 + 5)
    digests = scheme.block_digests(tokens)
    assert len(digests) == 256
    # Hash in small slices (pure-Python path), each continuing from the previous digest.
    parent: bytes | None = None
    pieces: list[bytes] = []
    for k in range(0, 256, 4):
        part = scheme.block_digests(tokens[k * 16 : (k + 4) * 16], parent=parent, first_block=k)
        pieces.extend(part)
        parent = part[-1]
    assert pieces == digests


@pytest.mark.parametrize("name", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor", "sglang"])
def test_token_containers_are_equivalent(name: str) -> None:
    scheme = make_scheme(name, seed="3", block_size=8)
    assert isinstance(scheme, VllmScheme | SglangScheme)
    tokens = _random_tokens(700)
    expected = scheme.block_keys(tokens)
    assert scheme.block_keys(tuple(tokens)) == expected
    assert scheme.block_keys(array("I", tokens)) == expected
    assert scheme.block_keys(np.array(tokens, dtype=np.int64)) == expected
    assert scheme.block_keys(np.array(tokens, dtype=np.uint32)) == expected
    numpy_scalars = cast("list[int]", [np.int64(t) for t in tokens[:64]])
    assert scheme.block_keys(numpy_scalars) == expected[:8]


def test_partial_block_ignored_and_empty() -> None:
    for name in SCHEME_NAMES:
        scheme = make_scheme(name, seed="0", block_size=16)
        assert scheme.block_keys([]) == []
        assert scheme.block_keys(list(range(15))) == []
        assert len(scheme.block_keys(list(range(47)))) == 2
        assert scheme.block_keys(list(range(47))) == scheme.block_keys(list(range(32)))


def test_large_block_falls_back_to_pickle_framing() -> None:
    """Blocks whose pickle exceeds one 64 KiB frame still match pickle.dumps byte for byte."""
    bs = 20_000
    tokens = [2**32 - 1 - i for i in range(bs)]
    scheme = VllmScheme("sha256", block_size=bs)
    (preimage,) = scheme.block_preimages(tokens)
    assert preimage == pickle.dumps((scheme.none_hash, tuple(tokens), None), protocol=5)
    (digest,) = scheme.block_digests(tokens)
    assert digest == hashlib.sha256(preimage).digest()


@pytest.mark.parametrize(
    ("name", "block_size", "n"),
    [("sha256_cbor", 300, 1000), ("sha256", 300, 1000), ("xxhash_cbor", 70_000, 70_001)],
)
def test_large_block_sizes_match_reference_serialisers(name: str, block_size: int, n: int) -> None:
    """Array heads 0x99/0x9a and long pickle frames, on the vectorised path."""
    import cbor2

    scheme = VllmScheme(name, seed="5", block_size=block_size)
    tokens = _random_tokens(n, seed=block_size)
    parent = scheme.none_hash
    for k, preimage in enumerate(scheme.block_preimages(tokens)):
        obj = (parent, tuple(tokens[k * block_size : (k + 1) * block_size]), None)
        cbor = name.endswith("_cbor")
        assert preimage == (cbor2.dumps(obj, canonical=True) if cbor else pickle.dumps(obj, 5))
        parent = scheme.block_digests(tokens[k * block_size :], parent=parent)[0]


def test_lora_key_per_era() -> None:
    extras = RequestExtras(lora_name="sql", lora_id=7, lora_path="/a/sql")
    expected = {
        "int_id": (7,),
        "name": ("sql",),
        "offset": ("sql",),
        "tagged": (("lora", "sql", "/a/sql"),),
    }
    for era, keys in expected.items():
        scheme = VllmScheme("sha256_cbor", seed="0", block_size=4, era=era)
        assert scheme.block_extra_keys(3, extras=extras) == [keys] * 3


def test_lora_missing_field_for_era() -> None:
    with pytest.raises(ExtraKeysError, match="lora_id"):
        VllmScheme("sha256", era="int_id").block_keys(
            list(range(16)), extras=RequestExtras(lora_name="x")
        )
    with pytest.raises(ExtraKeysError, match="lora_path"):
        VllmScheme("sha256").block_keys(list(range(16)), extras=RequestExtras(lora_name="x"))
    with pytest.raises(ExtraKeysError, match="lora_name"):
        VllmScheme("sha256", era="name").block_keys(
            list(range(16)), extras=RequestExtras(lora_id=1)
        )


def test_salt_only_in_first_block_and_falsy_salt_ignored() -> None:
    scheme = VllmScheme("sha256_cbor", seed="0", block_size=4)
    salted = scheme.block_extra_keys(3, extras=RequestExtras(cache_salt="t"))
    assert salted == [(("cache_salt", "t"),), None, None]
    assert scheme.block_extra_keys(2, extras=RequestExtras(cache_salt="t"), first_block=1) == [
        None,
        None,
    ]
    tokens = list(range(12))
    assert scheme.block_keys(tokens, extras=RequestExtras(cache_salt="")) == scheme.block_keys(
        tokens
    )


def test_mm_scan_matches_vllm_edge_rules() -> None:
    """Item ending on a block boundary, zero-length items, and the pre/post-0.19 test."""
    items = (MMItem("a", 2, 6), MMItem("z", 8, 0), MMItem("b", 9, 2))
    extras = RequestExtras(mm_items=items)
    tagged = VllmScheme("sha256_cbor", seed="0", block_size=4, era="tagged")
    assert tagged.block_extra_keys(4, extras=extras) == [
        (("mm", "a", 2),),
        (("mm", "a", -2),),
        (("mm", "b", 1),),  # 0.19+: the zero-length item at 8 counts as passed
        None,
    ]
    legacy = VllmScheme("sha256_cbor", seed="0", block_size=4, era="name")
    assert legacy.block_extra_keys(4, extras=extras) == [("a",), ("a",), ("z", "b"), None]
    # Unsorted input is ordered by placeholder offset, as vLLM's features are.
    shuffled = RequestExtras(mm_items=(items[2], items[0], items[1]))
    assert tagged.block_extra_keys(4, extras=shuffled) == tagged.block_extra_keys(4, extras=extras)


def test_first_block_places_mm_offsets_in_request_coordinates() -> None:
    scheme = VllmScheme("sha256", block_size=4)
    extras = RequestExtras(mm_items=(MMItem("img", 5, 6),), lora_name="l", lora_path="/l")
    full = scheme.block_extra_keys(4, extras=extras)
    assert scheme.block_extra_keys(2, extras=extras, first_block=2) == full[2:]


def test_pickle_binget_for_repeated_tags() -> None:
    scheme = VllmScheme("sha256", block_size=4)
    extras = RequestExtras(mm_items=(MMItem("p", 0, 1), MMItem("q", 1, 1)))
    (preimage,) = scheme.block_preimages([1, 2, 3, 4], extras=extras)
    assert preimage.count(b"\x8c\x02mm") == 1
    assert b"h\x02" in preimage  # second "mm" fetched from memo slot 2 (0 parent, 1 tokens)
    keys = scheme.block_extra_keys(1, extras=extras)[0]
    assert preimage == pickle.dumps((scheme.none_hash, (1, 2, 3, 4), keys), protocol=5)


def test_parent_validation() -> None:
    scheme = VllmScheme("sha256", block_size=4)
    tokens = [1, 2, 3, 4]
    assert scheme.block_digests(tokens, parent=b"") == scheme.block_digests(tokens)
    with pytest.raises(HashingError, match="32"):
        scheme.block_digests(tokens, parent=b"\x00" * 16)
    with pytest.raises(HashingError, match="first_block"):
        scheme.block_digests(tokens, first_block=-1)


def test_schemes_satisfy_protocol_and_names() -> None:
    for name in SCHEME_NAMES:
        scheme = make_scheme(name, seed="0", block_size=32)
        assert isinstance(scheme, KeyScheme)
        assert scheme.name == name
        assert scheme.block_size == 32
    assert [a.value for a in HashAlgorithm] == list(SCHEME_NAMES[:4])
    assert make_scheme("llmd-fnv64a").block_keys(list(range(16)), model="test-model") == (
        LlmdScheme(seed="").block_keys(list(range(16)), model="test-model")
    )


# ---------------------------------------------------------------------------------------------
# Versions, factory and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "era"),
    [
        ("0.10.2", ExtraKeyEra.INT_ID),
        ("0.11", ExtraKeyEra.INT_ID),
        ("0.11.0", ExtraKeyEra.INT_ID),
        ("0.11.1", ExtraKeyEra.NAME),
        ("0.18.1", ExtraKeyEra.NAME),
        ("0.19.0rc1", ExtraKeyEra.OFFSET),
        ("0.30.0", ExtraKeyEra.OFFSET),
        ("0.31", ExtraKeyEra.TAGGED),
        ("0.32", ExtraKeyEra.TAGGED),
        ("0.32.0", ExtraKeyEra.TAGGED),
        ("v0.33.0+cpu", ExtraKeyEra.TAGGED),
        ("0.11.1.post1", ExtraKeyEra.NAME),
        ("0.10.2.dev3", ExtraKeyEra.INT_ID),
        ("1.0.0", ExtraKeyEra.TAGGED),
    ],
)
def test_vllm_version_profile(version: str, era: ExtraKeyEra) -> None:
    assert vllm_version_profile(version) is era


@pytest.mark.parametrize(
    "version", ["", "latest", "0", "0.x", "1.2.3.4.5", "0.32 0", "0.32-1", "0.9.2", "0.10.1.1"]
)
def test_bad_or_unsupported_version(version: str) -> None:
    with pytest.raises(ConfigError) as info:
        vllm_version_profile(version)
    assert info.value.field == "vllm_version"


def test_make_scheme_version_rules() -> None:
    old = make_scheme("sha256_cbor", seed="0", vllm_version="0.18")
    assert isinstance(old, VllmScheme)
    assert old.era is ExtraKeyEra.NAME
    with pytest.raises(ConfigError, match="PYTHONHASHSEED"):
        make_scheme("sha256", vllm_version="0.28.1")
    with pytest.raises(ConfigError, match=r"0\.13"):
        make_scheme("xxhash", seed="0", vllm_version="0.12.0")
    assert make_scheme("sha256", vllm_version="0.29.0").block_keys(list(range(16)))


def test_unknown_scheme() -> None:
    with pytest.raises(UnknownSchemeError, match="nope"):
        make_scheme("nope")
    with pytest.raises(UnknownSchemeError):
        VllmScheme("md5")
    with pytest.raises(UnknownSchemeError):
        VllmScheme("sha256", era="ancient")


@pytest.mark.parametrize("name", ["xxhash", "xxhash_cbor"])
def test_xxhash_without_seed(name: str) -> None:
    with pytest.raises(ConfigError, match="PYTHONHASHSEED") as info:
        make_scheme(name)
    assert info.value.field == "seed"


def test_sha_without_seed_uses_vllm_default() -> None:
    assert VllmScheme("sha256").none_hash == VllmScheme("sha256", seed="vllm-none-hash").none_hash


@pytest.mark.parametrize("name", SCHEME_NAMES)
@pytest.mark.parametrize(
    ("tokens", "index"),
    [
        ([1, 2, -1, 4], 2),
        ([1, 2, 3, 2**32], 3),
        ([1, "2", 3], 1),
        ([1.0, 2], 0),
        ([1, 2, None], 2),
    ],
)
def test_invalid_tokens(name: str, tokens: list[Any], index: int) -> None:
    scheme = make_scheme(name, seed="0", block_size=2)
    with pytest.raises(InvalidTokenError, match=f"index {index}"):
        scheme.block_keys(tokens)


def test_invalid_token_containers() -> None:
    scheme = VllmScheme("sha256_cbor", block_size=2)
    with pytest.raises(InvalidTokenError, match="index 1"):
        scheme.block_keys(np.array([1, -3, 4], dtype=np.int64))
    with pytest.raises(InvalidTokenError, match="dtype"):
        scheme.block_keys(np.array([1.0, 2.0]))
    with pytest.raises(InvalidTokenError, match="1-D"):
        scheme.block_keys(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InvalidTokenError):
        scheme.block_keys(b"\x01\x00\x00\x00\x02\x00\x00\x00")
    with pytest.raises(InvalidTokenError, match="iterable"):
        scheme.block_keys(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_size", [0, -1, 1.5, True, "16"])
def test_bad_block_size(block_size: Any) -> None:
    for name in SCHEME_NAMES:
        with pytest.raises(ConfigError, match="block_size"):
            make_scheme(name, seed="0", block_size=block_size)


def test_extras_validation() -> None:
    with pytest.raises(ExtraKeysError):
        MMItem("x", -1, 2)
    with pytest.raises(ExtraKeysError):
        MMItem(3, 0, 2)  # type: ignore[arg-type]
    with pytest.raises(ExtraKeysError):
        RequestExtras(lora_id="1")  # type: ignore[arg-type]
    with pytest.raises(ExtraKeysError):
        RequestExtras(mm_items=("x",))  # type: ignore[arg-type]
    listed = RequestExtras(mm_items=[MMItem("x", 0, 1)])  # type: ignore[arg-type]
    assert listed.mm_items == (MMItem("x", 0, 1),)


def test_digest_to_u64() -> None:
    assert digest_to_u64(bytes(range(32))) == int.from_bytes(bytes(range(24, 32)), "big")
    assert digest_to_u64(b"\x01\x02") == 0x0102
    with pytest.raises(HashingError):
        digest_to_u64(b"")
