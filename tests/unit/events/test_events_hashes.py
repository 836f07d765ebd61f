"""Block hashes in every wire form map to the same u64 key (uint64, int64, digest bytes)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvcache.errors import InvalidBlockHashError, KVCacheError
from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_payload,
    hash_to_u64,
)

U64_MAX = (1 << 64) - 1
DIGEST = bytes.fromhex("ba9d2acc027826b21054fa57c2860a16fa3da5ac9fd1734210b2731e605b20a2")
DIGEST_KEY = 0x10B2731E605B20A2  # its last 8 bytes, big-endian


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (0, 0),
        (1, 1),
        ((1 << 63) - 1, (1 << 63) - 1),
        (1 << 63, 1 << 63),  # u64 >= 2**63 stays as is
        (U64_MAX, U64_MAX),
        (-1, U64_MAX),  # int64: two's complement
        (-(1 << 63), 1 << 63),
        (-5046917035329454592, 13399827038380097024),  # an SGLang page hash
        (DIGEST, DIGEST_KEY),  # 32-byte sha256 digest: last 8 bytes
        (DIGEST[:16], int.from_bytes(DIGEST[8:16], "big")),  # 16-byte xxh3-128 digest
        (DIGEST[-8:], DIGEST_KEY),  # exactly 8 bytes
        (b"\x01\x02\x03", 0x010203),  # shorter: left-padded with zeros
        (b"\x00", 0),
        (b"\xff" * 8, U64_MAX),
        (bytearray(DIGEST), DIGEST_KEY),
        (memoryview(DIGEST), DIGEST_KEY),
    ],
)
def test_hash_to_u64(value: Any, key: int) -> None:
    assert hash_to_u64(value) == key


@pytest.mark.parametrize(
    "value", [b"", bytearray(), 1 << 64, -(1 << 63) - 1, True, False, 1.0, "12", None, [1]]
)
def test_hash_to_u64_rejects(value: Any) -> None:
    with pytest.raises(InvalidBlockHashError) as caught:
        hash_to_u64(value)
    assert isinstance(caught.value, KVCacheError)
    assert isinstance(caught.value, ValueError)


def _stored_event(hashes: list[Any], parent: Any = None) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": list(range(len(hashes) * 4)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
    }


def _as_array(event: dict[str, Any]) -> list[Any]:
    if event["type"] == "BlockStored":
        names = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"]
    else:
        names = ["block_hashes"]
    return [event["type"], *(event.get(name) for name in names), event.get("medium")]


def _decode(events: list[Any]) -> EventBatch:
    batch = decode_payload(msgspec.msgpack.encode([1.0, events, 0]))
    assert isinstance(batch, EventBatch), batch
    return batch


HASH_FORMS: list[tuple[str, list[Any], list[int]]] = [
    ("u64", [5, 1 << 63, U64_MAX], [5, 1 << 63, U64_MAX]),
    ("int64", [-1, 7, -(1 << 63)], [U64_MAX, 7, 1 << 63]),
    (
        "bytes",
        [DIGEST, DIGEST[:16], b"\x01\x02\x03"],
        [DIGEST_KEY, int.from_bytes(DIGEST[8:16], "big"), 0x010203],
    ),
    ("mixed", [DIGEST, -1, 9], [DIGEST_KEY, U64_MAX, 9]),
    ("empty", [], []),
]


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize(("label", "wire", "keys"), HASH_FORMS, ids=[f[0] for f in HASH_FORMS])
def test_block_hash_forms_in_events(
    form: str, label: str, wire: list[Any], keys: list[int]
) -> None:
    stored = _stored_event(wire)
    removed = {"type": "BlockRemoved", "block_hashes": wire, "medium": "GPU"}
    events: list[Any] = [stored, removed]
    if form == "array":
        events = [_as_array(event) for event in events]
    batch = _decode(events)
    assert batch.rejected == []
    first, second = batch.events
    assert isinstance(first, BlockStored) and isinstance(second, BlockRemoved)
    assert first.block_hashes == keys
    assert second.block_hashes == keys


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize(
    ("parent", "key"),
    [
        (None, None),
        (0, 0),
        (U64_MAX, U64_MAX),
        (-2, U64_MAX - 1),
        (DIGEST, DIGEST_KEY),
        (b"\x07", 7),
    ],
)
def test_parent_hash_forms(form: str, parent: Any, key: int | None) -> None:
    event: Any = _stored_event([1], parent)
    batch = _decode([_as_array(event) if form == "array" else event])
    stored = batch.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.parent_block_hash == key


@pytest.mark.parametrize("form", ["map", "array"])
def test_empty_bytes_hash_rejects_only_its_event(form: str) -> None:
    events: list[Any] = [
        _stored_event([1, b"", 3]),
        _stored_event([4]),
        {"type": "BlockRemoved", "block_hashes": [b"\x01", b""]},
        _stored_event([5], parent=b""),
        {"type": "BlockRemoved", "block_hashes": [6]},
    ]
    if form == "array":
        events = [_as_array(event) for event in events]
    batch = _decode(events)
    assert [(r.index, r.reason) for r in batch.rejected] == [
        (0, "bad_hash"),
        (2, "bad_hash"),
        (3, "bad_hash"),
    ]
    assert "block_hashes[1]" in batch.rejected[0].detail
    assert "block_hashes[1]" in batch.rejected[1].detail
    assert "parent_block_hash" in batch.rejected[2].detail
    assert [type(e) for e in batch.events] == [BlockStored, BlockRemoved]
    assert [e.block_hashes for e in batch.events if not isinstance(e, AllBlocksCleared)] == [
        [4],
        [6],
    ]


def test_model_hashes_are_plain_u64_ints() -> None:
    batch = _decode([_stored_event([-1, DIGEST], parent=-3)])
    stored = batch.events[0]
    assert isinstance(stored, BlockStored)
    assert all(type(h) is int and 0 <= h <= U64_MAX for h in stored.block_hashes)
    assert stored.parent_block_hash == U64_MAX - 2
