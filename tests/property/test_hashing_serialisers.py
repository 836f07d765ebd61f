"""Hand-built preimages are byte-identical to cbor2 (canonical) and pickle protocol 5.

`kvcache.hashing` never calls cbor2 and calls pickle only for oversized blocks; these properties
are what licenses that. Tokens favour the encoders' boundary values.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from array import array
from typing import Any

import cbor2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.hashing import (
    ExtraKeyEra,
    LlmdScheme,
    MMItem,
    RequestExtras,
    SglangScheme,
    VllmScheme,
)
from kvcache.hashing.encoding import (
    _cbor_encode,
    _encode_blocks,
    _numpy_cbor,
    _numpy_pickle,
    _pickle_encode,
)

BOUNDARIES = [
    0,
    1,
    23,
    24,
    255,
    256,
    65535,
    65536,
    2**24,
    2**31 - 1,
    2**31,
    2**32 - 2,
    2**32 - 1,
]
token_ids = st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 2**32 - 1), st.integers(0, 300))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(max_size=12) | st.text(min_size=250, max_size=300)
identifiers = st.text(min_size=1, max_size=40) | st.text(min_size=256, max_size=280)


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[int], int, RequestExtras | None]:
    block_size = draw(st.integers(1, 70))
    # Sometimes long enough to take the vectorised (numpy) encoding path.
    size = draw(st.sampled_from([0, 1, 2, 5, 20]))
    n = draw(st.integers(0, size * block_size + block_size - 1) | st.integers(520, 1400))
    tokens = draw(st.lists(token_ids, min_size=n, max_size=n))
    if draw(st.booleans()):
        return tokens, block_size, None
    lora = draw(st.booleans())
    items: list[MMItem] = []
    for _ in range(draw(st.integers(0, 4))):
        offset = draw(st.integers(0, max(len(tokens), 1)))
        items.append(MMItem(draw(identifiers), offset, draw(st.integers(0, 3 * block_size))))
    extras = RequestExtras(
        lora_name=draw(texts) if lora else None,
        lora_id=draw(st.integers(0, 2**40)) if lora else None,
        lora_path=draw(texts) if lora else None,
        cache_salt=draw(st.none() | texts),
        mm_items=tuple(items),
    )
    return tokens, block_size, extras


def _reference_preimages(
    scheme: VllmScheme, tokens: list[int], extras: RequestExtras | None, cbor: bool
) -> list[bytes]:
    """(parent, tuple(tokens), extra_keys) through the real serialisers, chained."""
    bs = scheme.block_size
    n = len(tokens) // bs
    extra_keys = scheme.block_extra_keys(n, extras=extras)
    parent = scheme.none_hash
    out = []
    for i in range(n):
        obj = (parent, tuple(tokens[i * bs : (i + 1) * bs]), extra_keys[i])
        data = cbor2.dumps(obj, canonical=True) if cbor else pickle.dumps(obj, protocol=5)
        out.append(data)
        parent = scheme._new(data).digest()
    return out


@SETTINGS
@given(
    requests(), st.sampled_from(list(ExtraKeyEra)), st.sampled_from(["sha256_cbor", "xxhash_cbor"])
)
def test_cbor_preimages_match_cbor2(
    request: tuple[list[int], int, RequestExtras | None], era: ExtraKeyEra, algo: str
) -> None:
    tokens, block_size, extras = request
    scheme = VllmScheme(algo, seed="0", block_size=block_size, era=era)
    assert scheme.block_preimages(tokens, extras=extras) == _reference_preimages(
        scheme, tokens, extras, cbor=True
    )


@SETTINGS
@given(requests(), st.sampled_from(list(ExtraKeyEra)), st.sampled_from(["sha256", "xxhash"]))
def test_pickle_preimages_match_pickle(
    request: tuple[list[int], int, RequestExtras | None], era: ExtraKeyEra, algo: str
) -> None:
    tokens, block_size, extras = request
    scheme = VllmScheme(algo, seed="42", block_size=block_size, era=era)
    assert scheme.block_preimages(tokens, extras=extras) == _reference_preimages(
        scheme, tokens, extras, cbor=False
    )


@SETTINGS
@given(requests(), st.sampled_from(["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]))
def test_digests_hash_the_preimages(
    request: tuple[list[int], int, RequestExtras | None], algo: str
) -> None:
    tokens, block_size, extras = request
    scheme = VllmScheme(algo, seed="7", block_size=block_size)
    preimages = scheme.block_preimages(tokens, extras=extras)
    digests = scheme.block_digests(tokens, extras=extras)
    assert digests == [scheme._new(p).digest() for p in preimages]
    assert scheme.block_keys(tokens, extras=extras) == [
        int.from_bytes(d[-8:], "big") for d in digests
    ]


@SETTINGS
@given(requests(), st.sampled_from(list(ExtraKeyEra)), st.data())
def test_continuing_a_chain_matches_the_full_pass(
    request: tuple[list[int], int, RequestExtras | None], era: ExtraKeyEra, data: st.DataObject
) -> None:
    tokens, block_size, extras = request
    scheme = VllmScheme("sha256_cbor", seed="0", block_size=block_size, era=era)
    full = scheme.block_digests(tokens, extras=extras)
    k = data.draw(st.integers(0, len(full)))
    parent = full[k - 1] if k else None
    rest = scheme.block_digests(
        tokens[k * block_size :], parent=parent, extras=extras, first_block=k
    )
    assert rest == full[k:]
    n = len(full)
    assert (
        scheme.block_extra_keys(n - k, extras=extras, first_block=k)
        == (scheme.block_extra_keys(n, extras=extras)[k:])
    )


# Extra-key shaped values: what pickle and cbor2 see inside the extras tuple.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64) + 1, 2**64 - 1)
    | texts
    | st.binary(max_size=40)
    | st.binary(min_size=256, max_size=300)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5).map(tuple), max_leaves=12)


@SETTINGS
@given(values)
def test_cbor_encoder_matches_cbor2(value: Any) -> None:
    out: list[bytes] = []
    _cbor_encode(value, out)
    assert b"".join(out) == cbor2.dumps(value, canonical=True)


def _expected_pickle_body(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=5)
    assert data[:2] == b"\x80\x05"
    body = data[2:-1]
    if body[:1] == b"\x95":  # drop the frame header when present (bodies >= 4 bytes)
        assert int.from_bytes(body[1:9], "little") == len(body) - 9 + 1
        body = body[9:]
    return body


@SETTINGS
@given(values | st.integers() | st.integers(-(2**3000), 2**3000))
def test_pickle_encoder_matches_pickle(value: Any) -> None:
    out: list[bytes] = []
    _pickle_encode(value, {}, out)
    assert b"".join(out) == _expected_pickle_body(value)


@SETTINGS
@given(texts, st.integers(1, 4))
def test_pickle_encoder_memoises_by_identity(text: str, copies: int) -> None:
    shared = ("mm", text)
    value = tuple([shared] * copies + [("mm", text + "x")])
    out: list[bytes] = []
    _pickle_encode(value, {}, out)
    assert b"".join(out) == _expected_pickle_body(value)


def _packed(words: Any, masks: Any) -> bytes:
    """The selected bytes of little-endian words (what the vectorised encoders compact)."""
    raw = words.astype("<u8").tobytes()
    keep = masks.astype("<u8").tobytes()
    return bytes(b for b, k in zip(raw, keep, strict=True) if k)


@SETTINGS
@given(st.lists(token_ids, max_size=600))
def test_vectorised_token_encoders(tokens: list[int]) -> None:
    t = np.array(tokens, dtype=np.uint32)
    words, masks, widths = _numpy_cbor(t)
    assert _packed(words, masks) == b"".join(cbor2.dumps(x) for x in tokens)
    assert widths.tolist() == [len(cbor2.dumps(x)) for x in tokens]
    words, masks, widths = _numpy_pickle(t)
    # pickle.dumps(x) = PROTO 5, int opcode(s), STOP (no frame for <4-byte bodies, else 9 bytes)
    expected = [_expected_pickle_body(x) for x in tokens]
    assert _packed(words, masks) == b"".join(expected)
    assert widths.tolist() == [len(e) for e in expected]


@SETTINGS
@given(
    st.lists(token_ids, max_size=1500),
    st.integers(1, 40),
    st.booleans(),
    st.binary(max_size=9),
    st.binary(max_size=9) | st.lists(st.binary(max_size=12), min_size=200, max_size=200),
)
def test_block_layout(
    tokens: list[int], block_size: int, cbor: bool, lead: bytes, trail: bytes | list[bytes]
) -> None:
    """lead + tokens + trail per full block, identical on the numpy and pure-Python paths."""
    n = len(tokens) // block_size
    if isinstance(trail, list):
        trail = (trail * (n // 200 + 1))[:n]
    encode = cbor2.dumps if cbor else _expected_pickle_body
    blocks = []
    for i in range(n):
        tail = trail if isinstance(trail, bytes) else trail[i]
        body = b"".join(encode(x) for x in tokens[i * block_size : (i + 1) * block_size])
        blocks.append(lead + body + tail)
    data, ends = _encode_blocks(array("I", tokens), block_size, cbor, lead, trail)
    assert data == b"".join(blocks)
    assert ends == [sum(map(len, blocks[: i + 1])) for i in range(n)]


def _fnv(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


@SETTINGS
@given(
    st.lists(token_ids, max_size=700),
    st.integers(1, 40),
    st.text(max_size=10),
    st.text(max_size=30),
    st.lists(
        st.tuples(st.text(min_size=1, max_size=8), st.integers(0, 700), st.integers(0, 90)),
        max_size=3,
    ),
)
def test_llmd_keys_match_reference(
    tokens: list[int], block_size: int, seed: str, model: str, mm: list[tuple[str, int, int]]
) -> None:
    scheme = LlmdScheme(seed=seed, block_size=block_size)
    items = tuple(MMItem(i, o, n) for i, o, n in mm)
    parent = _fnv(cbor2.dumps([_fnv(seed.encode()), None, model], canonical=True))
    expected = []
    ordered = sorted(items, key=lambda item: item.offset)
    for b in range(len(tokens) // block_size):
        start, end = b * block_size, (b + 1) * block_size
        hits = [
            {"Hash": i.identifier}
            for i in ordered
            if i.offset < end and i.offset + i.length > start
        ]
        payload = [parent, tokens[start:end], hits or None]
        parent = _fnv(cbor2.dumps(payload, canonical=True))
        expected.append(parent)
    extras = RequestExtras(mm_items=items)
    assert scheme.block_keys(tokens, model=model, extras=extras) == expected


@SETTINGS
@given(st.lists(token_ids, max_size=300), st.integers(1, 20), st.none() | texts)
def test_sglang_matches_reference(tokens: list[int], page: int, salt: str | None) -> None:
    prior = b""
    if salt:  # an empty salt is no salt, as in vLLM
        prior = hashlib.sha256(b"sglang-cache-salt-v1\x00" + salt.encode()).digest()
    expected = []
    for start in range(0, len(tokens) - page + 1, page):
        chunk = tokens[start : start + page]
        prior = hashlib.sha256(prior + struct.pack(f"<{page}I", *chunk)).digest()
        expected.append(struct.unpack(">q", prior[:8])[0] & (2**64 - 1))
    extras = RequestExtras(cache_salt=salt)
    assert SglangScheme(page).block_keys(tokens, extras=extras) == expected
