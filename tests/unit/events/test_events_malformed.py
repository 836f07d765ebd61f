"""One malformed event is rejected with a reason naming the field; the rest of its batch applies."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvcache.events import (
    EVENT_REJECT_REASONS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    FrameRejection,
    decode_payload,
)
from kvcache.events.schema import BLOCK_REMOVED_FIELDS, BLOCK_STORED_FIELDS

# A vLLM 0.33 BlockStored with every field set (cache_salt is SGLang's, map form only).
STORED: dict[str, Any] = {
    "type": "BlockStored",
    "block_hashes": [11, 12],
    "parent_block_hash": 10,
    "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
    "block_size": 4,
    "lora_id": 3,
    "medium": "GPU",
    "lora_name": "sql-lora",
    "extra_keys": [["sql-lora"], None],
    "group_idx": 0,
    "kv_cache_spec_kind": "full_attention",
    "kv_cache_spec_sliding_window": None,
    "locality": "LOCAL",
    "ownership": "tier-2",
    "session_id": "s-1",
    "lookahead_token_ids": [[9], [10]],
    "cache_salt": "salt",
}
REMOVED: dict[str, Any] = {
    "type": "BlockRemoved",
    "block_hashes": [12],
    "medium": "GPU",
    "group_idx": 0,
    "locality": "LOCAL",
    "ownership": "tier-2",
}
GOOD_A: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": [1]}
GOOD_B: list[Any] = ["AllBlocksCleared"]


def as_array(event: dict[str, Any]) -> list[Any]:
    names = BLOCK_STORED_FIELDS if event["type"] == "BlockStored" else BLOCK_REMOVED_FIELDS
    return [event["type"], *(event.get(name) for name in names)]


def decode_events(events: list[Any]) -> EventBatch:
    batch = decode_payload(msgspec.msgpack.encode([1.0, events, 0]))
    assert isinstance(batch, EventBatch), batch
    for rejection in batch.rejected:
        assert rejection.reason in EVENT_REJECT_REASONS
        assert 0 < len(rejection.detail) <= 200
    return batch


def sandwich(bad: Any) -> tuple[str, str]:
    """Decode [good, bad, good]: the good ones survive; return the bad one's reason and detail."""
    batch = decode_events([GOOD_A, bad, GOOD_B])
    assert batch.events == [BlockRemoved([1]), AllBlocksCleared()]
    assert [r.index for r in batch.rejected] == [1]
    return batch.rejected[0].reason, batch.rejected[0].detail


# --- valid events in every form -------------------------------------------------------------


def test_full_map_event_decodes_every_field() -> None:
    batch = decode_events([STORED, REMOVED])
    assert batch.rejected == []
    expected_stored = BlockStored(**{k: v for k, v in STORED.items() if k != "type"})
    expected_removed = BlockRemoved(**{k: v for k, v in REMOVED.items() if k != "type"})
    assert batch.events == [expected_stored, expected_removed]


def test_full_array_event_decodes_like_the_map() -> None:
    assert decode_events([as_array(STORED), as_array(REMOVED)]) == decode_events([STORED, REMOVED])


def test_unknown_keys_and_trailing_positions_are_ignored() -> None:
    future_map = {**STORED, "speculative": True, "new_field": {"x": [1, 2]}}
    future_array = [*as_array(STORED), "p17", [1, 2], {"x": None}]
    cleared = ["AllBlocksCleared", "GPU", 0]
    cleared_map = {"type": "AllBlocksCleared", "medium": "GPU"}
    removed = [*as_array(REMOVED), "extra"]
    batch = decode_events([future_map, future_array, cleared, cleared_map, removed])
    assert batch.rejected == []
    assert batch.events == decode_events([STORED, STORED, GOOD_B, GOOD_B, REMOVED]).events


def test_fields_a_release_does_not_send_default_to_none() -> None:
    vllm_090 = ["BlockStored", [1], None, [1, 2], 2, None]  # 5 fields
    minimal_array = ["BlockStored", [1], None, [1, 2], 2]  # lora_id missing: tolerated
    sglang_0520 = {  # map, omit_defaults: medium / salt / session absent
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
    }
    batch = decode_events([vllm_090, minimal_array, sglang_0520, ["BlockRemoved", [1]]])
    expected = BlockStored([1], None, [1, 2], 2)
    assert batch.events == [expected, expected, expected, BlockRemoved([1])]


def test_sglang_map_fields() -> None:
    sglang_0523 = {
        "type": "BlockStored",
        "block_hashes": [-5, 6],
        "parent_block_hash": -7,
        "token_ids": [1, 2],
        "block_size": 1,
        "lora_id": None,
        "medium": "CPU_PINNED",
        "cache_salt": "tenant-a",
        "session_id": "sess",
        "lora_name": "adapter",
    }
    (stored,) = decode_events([sglang_0523]).events
    assert isinstance(stored, BlockStored)
    mask = (1 << 64) - 1
    assert stored.block_hashes == [-5 & mask, 6]
    assert stored.parent_block_hash == -7 & mask
    assert (stored.medium, stored.cache_salt, stored.session_id, stored.lora_name) == (
        "CPU_PINNED",
        "tenant-a",
        "sess",
        "adapter",
    )
    assert stored.extra_keys is None and stored.group_idx is None


def test_offload_placeholder_without_tokens() -> None:
    placeholder = {**STORED, "token_ids": [], "block_size": 0, "medium": "CPU"}
    (stored,) = decode_events([placeholder]).events
    assert isinstance(stored, BlockStored)
    assert (stored.token_ids, stored.block_size, stored.medium) == ([], 0, "CPU")


def test_token_ids_up_to_u64() -> None:
    big = {**STORED, "token_ids": [0, 1 << 32, (1 << 64) - 1]}
    (stored,) = decode_events([big]).events
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == [0, 1 << 32, (1 << 64) - 1]


# --- one bad field ---------------------------------------------------------------------------

MISSING = object()

STORED_CASES: list[tuple[str, Any]] = [
    ("block_hashes", MISSING),
    ("block_hashes", None),
    ("block_hashes", 5),
    ("block_hashes", "abc"),
    ("block_hashes", [1, "2"]),
    ("block_hashes", [1.5]),
    ("block_hashes", [None]),
    ("block_hashes", [[1]]),
    ("parent_block_hash", MISSING),
    ("parent_block_hash", "10"),
    ("parent_block_hash", 1.0),
    ("parent_block_hash", [10]),
    ("token_ids", MISSING),
    ("token_ids", None),
    ("token_ids", [1, -1]),
    ("token_ids", [1, 2.0]),
    ("token_ids", [True]),
    ("token_ids", b"\x01\x02"),
    ("block_size", MISSING),
    ("block_size", None),
    ("block_size", -1),
    ("block_size", 16.0),
    ("block_size", "16"),
    ("lora_id", "3"),
    ("lora_id", 3.5),
    ("medium", 1),
    ("medium", ["GPU"]),
    ("lora_name", 7),
    ("extra_keys", "x"),
    ("extra_keys", ["x"]),
    ("extra_keys", [1, None]),
    ("group_idx", -1),
    ("group_idx", "0"),
    ("group_idx", 0.0),
    ("kv_cache_spec_kind", 1),
    ("kv_cache_spec_sliding_window", "4096"),
    ("kv_cache_spec_sliding_window", 1.5),
    ("locality", 0),
    ("ownership", b"x"),
    ("session_id", 9),
    ("lookahead_token_ids", "x"),
    ("lookahead_token_ids", [1]),
    ("lookahead_token_ids", [[-1]]),
    ("cache_salt", 5),
]


def _with(event: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    changed = dict(event)
    if value is MISSING:
        del changed[field]
    else:
        changed[field] = value
    return changed


@pytest.mark.parametrize(("field", "value"), STORED_CASES, ids=repr)
def test_bad_block_stored_field_map(field: str, value: Any) -> None:
    reason, detail = sandwich(_with(STORED, field, value))
    assert reason == f"bad_{field}"
    assert detail.startswith(f"{field}: ")
    if value is MISSING:
        assert detail == f"{field}: missing"


ARRAY_CASES = [c for c in STORED_CASES if c[0] != "cache_salt" and c[1] is not MISSING]


@pytest.mark.parametrize(("field", "value"), ARRAY_CASES, ids=repr)
def test_bad_block_stored_field_array(field: str, value: Any) -> None:
    reason, detail = sandwich(as_array(_with(STORED, field, value)))
    assert reason == f"bad_{field}"
    assert detail.startswith(f"{field}: ")


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_short_block_stored_array(length: int) -> None:
    """Fewer than the 4 required fields: the first missing one is named."""
    reason, detail = sandwich(as_array(STORED)[:length])  # the tag and length - 1 fields
    first_missing = BLOCK_STORED_FIELDS[length - 1]
    assert (reason, detail) == (f"bad_{first_missing}", f"{first_missing}: missing")


REMOVED_CASES: list[tuple[str, Any]] = [
    ("block_hashes", MISSING),
    ("block_hashes", None),
    ("block_hashes", [-1.0]),
    ("medium", 3),
    ("group_idx", -2),
    ("locality", 1),
    ("ownership", 1),
]


@pytest.mark.parametrize(("field", "value"), REMOVED_CASES, ids=repr)
def test_bad_block_removed_field(field: str, value: Any) -> None:
    bad = _with(REMOVED, field, value)
    assert sandwich(bad)[0] == f"bad_{field}"
    if value is not MISSING:
        assert sandwich(as_array(bad))[0] == f"bad_{field}"


def test_negative_group_idx_is_its_own_reason() -> None:
    assert sandwich({**STORED, "group_idx": -1}) == (
        "bad_group_idx",
        "group_idx: expected a non-negative int, got -1",
    )


def test_first_bad_field_in_wire_order_is_reported() -> None:
    both = {**STORED, "group_idx": -1, "token_ids": [-1]}
    assert sandwich(both)[0] == "bad_token_ids"


# --- events that are not events --------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (["BlockUpdated", [1]], "unknown_type"),
        ({"type": "BlockUpdated", "block_hashes": [1]}, "unknown_type"),
        (["blockstored", [1], None, [], 0], "unknown_type"),  # tags are case-sensitive
        ({"type": ""}, "unknown_type"),
        (None, "bad_event"),
        (5, "bad_event"),
        ("BlockStored", "bad_event"),
        (b"BlockStored", "bad_event"),
        (1.5, "bad_event"),
        ([], "bad_event"),
        ([None, [1]], "bad_event"),
        ([1, [1]], "bad_event"),
        ([["BlockStored"], [1]], "bad_event"),
        ({}, "bad_event"),
        ({"block_hashes": [1]}, "bad_event"),
        ({"type": 1}, "bad_event"),
        ({"type": None, "block_hashes": [1]}, "bad_event"),
        ({"type": "BlockRemoved", "block_hashes": [1], 5: 6}, "bad_event"),  # non-string key
    ],
    ids=repr,
)
def test_not_an_event(event: Any, reason: str) -> None:
    assert sandwich(event)[0] == reason


def test_unknown_type_detail_is_clipped() -> None:
    reason, detail = sandwich({"type": "X" * 10_000})
    assert reason == "unknown_type"
    assert len(detail) <= 200 and detail.endswith("...")


def test_deeply_nested_garbage_event_is_isolated() -> None:
    """Within the interpreter's recursion limit, deep garbage costs only its own event."""
    deep = b"\x91" * 500 + b"\xc0"
    good = msgspec.msgpack.encode(GOOD_A)
    raw = b"\x93\xcb" + bytes(8) + b"\x93" + good + deep + good + b"\x00"
    batch = decode_payload(raw)
    assert isinstance(batch, EventBatch)
    assert batch.events == [BlockRemoved([1]), BlockRemoved([1])]
    assert [(r.index, r.reason) for r in batch.rejected] == [(1, "bad_event")]
    # Legitimately nested values (extra_keys holds arbitrary arrays) are fine.
    deep_keys = {**STORED, "extra_keys": [[[[[[[[[[[[["deep"]]]]]]]]]]]], None]}
    assert decode_events([deep_keys]).rejected == []


def test_garbage_nested_beyond_the_recursion_limit_rejects_the_frame() -> None:
    deep = b"\x91" * 5_000 + b"\xc0"
    good = msgspec.msgpack.encode(GOOD_A)
    raw = b"\x93\xcb" + bytes(8) + b"\x92" + good + deep + b"\x00"
    result = decode_payload(raw)
    assert isinstance(result, FrameRejection)
    assert result.reason == "bad_payload"


def test_many_bad_events_each_rejected_once() -> None:
    events: list[Any] = []
    for i in range(50):
        events.append({"type": "BlockRemoved", "block_hashes": [i]})
        events.append({"type": "BlockRemoved", "block_hashes": [-1.5]} if i % 2 else ["Nope"])
    batch = decode_events(events)
    assert [e.block_hashes for e in batch.events if isinstance(e, BlockRemoved)] == [
        [i] for i in range(50)
    ]
    assert [r.index for r in batch.rejected] == list(range(1, 100, 2))
    assert {r.reason for r in batch.rejected} == {"bad_block_hashes", "unknown_type"}
