"""Every layout and example of events.json decodes to its documented meaning."""

from __future__ import annotations

import pytest
from events_testdata import VectorExample, expected_events, load_events_json, vector_examples

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Message,
    decode_frames,
    decode_payload,
)

EXAMPLES = vector_examples()
IDS = [example.name for example in EXAMPLES]

# u64 keys of the two blocks of block_hashes.json case seed0_sha256_cbor_bs16, which the
# store_remove_clear, hybrid_group and bytes_hashes examples publish.
SEED0_BLOCK_0 = 1203150624764141730
SEED0_BLOCK_1 = 15071564531837125655
# The SGLang examples publish these signed int64 page hashes.
SGLANG_PAGE_0 = -5046917035329454592
SGLANG_PAGE_1 = 1234567890123456789
MM_ID = "a3f1c0ffee00112233445566778899aabbccddeeff00112233445566778899aa"


def _decode(example: VectorExample) -> Message:
    message = decode_frames(example.frames)
    assert isinstance(message, Message), message
    assert message.batch.rejected == []
    return message


def _stored(message: Message, index: int = 0) -> BlockStored:
    event = message.batch.events[index]
    assert isinstance(event, BlockStored)
    return event


def _removed(message: Message, index: int) -> BlockRemoved:
    event = message.batch.events[index]
    assert isinstance(event, BlockRemoved)
    return event


def _has(example: VectorExample, field: str) -> bool:
    return field in example.layout["block_stored_fields"]


def test_vector_file_covers_every_layout() -> None:
    layouts = [layout["layout"] for layout in load_events_json()["layouts"]]
    assert layouts == [f"vllm-{letter}" for letter in "ABCDEFGHIJKL"] + [
        "sglang-0.4.7",
        "sglang-0.5.9",
        "sglang-0.5.20",
        "sglang-0.5.23",
    ]
    assert len(EXAMPLES) == 49  # 1+1+2+3+4+4 + 5 x 6 (G-L) + 4 SGLang


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_decodes_to_the_vector_generic_decode(example: VectorExample) -> None:
    """Field by field, including every default a layout does not send."""
    message = _decode(example)
    generic = example.generic
    frames = example.example["frames"]
    assert message.seq == frames["seq"]
    assert message.batch.ts == generic[0]
    assert message.batch.dp_rank == (generic[2] if len(generic) > 2 else None)
    assert message.batch.events == expected_events(example)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_topic_frame(example: VectorExample) -> None:
    message = _decode(example)
    topic = example.example["frames"]["topic_utf8"]
    if topic:
        assert topic == "kv@vllm-pod-0@Qwen/Qwen3-8B"
        assert (message.pod, message.model) == ("vllm-pod-0", "Qwen/Qwen3-8B")
    else:  # SGLang's default topic: the pod must come from the endpoint, not the frame
        assert (message.pod, message.model) == ("", None)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_same_result_on_the_per_event_path(example: VectorExample) -> None:
    """Append a broken event: the batch then goes down the per-event path, same values."""
    payload = example.frames[2]
    clean = decode_payload(payload)
    count = len(example.generic[1])
    # Rewrite the fixarray header of the event list to hold one more element: a nil.
    header_at = 10
    assert payload[0] in (0x92, 0x93) and payload[1] == 0xCB
    assert payload[header_at] == 0x90 + count
    rest = payload[header_at + 1 :]
    if len(example.generic) > 2:
        events_end = len(rest) - 1  # the dp rank is a one-byte fixint in every example
        assert rest[events_end] < 0x80
    else:
        events_end = len(rest)
    broken = (
        payload[:header_at]
        + bytes([0x90 + count + 1])
        + rest[:events_end]
        + b"\xc0"
        + rest[events_end:]
    )
    mixed = decode_payload(broken)
    assert isinstance(clean, EventBatch) and isinstance(mixed, EventBatch)
    assert mixed.events == clean.events
    assert (mixed.ts, mixed.dp_rank) == (clean.ts, clean.dp_rank)
    assert [(r.index, r.reason) for r in mixed.rejected] == [(count, "bad_event")]


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.example["label"] == "store_remove_clear"], ids=str
)
def test_store_remove_clear_meaning(example: VectorExample) -> None:
    message = _decode(example)
    events = message.batch.events
    assert [type(event) for event in events] == [BlockStored, BlockRemoved, AllBlocksCleared]
    stored, removed = _stored(message), _removed(message, 1)
    assert message.seq == 0
    assert message.batch.ts == 1750000000.25
    assert stored.parent_block_hash is None
    assert stored.block_size == 16
    assert len(stored.token_ids) == 32
    if example.layout["engine"] == "vllm":
        assert stored.block_hashes == [SEED0_BLOCK_0, SEED0_BLOCK_1]
        assert removed.block_hashes == [SEED0_BLOCK_1]  # "BlockRemoved of block 1"
        # vLLM 0.9.0 sends [ts, events] only: rank 0 in the meaning, absent on the wire.
        expected_rank = None if example.layout["layout"] == "vllm-A" else 0
        assert message.batch.dp_rank == expected_rank
    else:
        assert stored.block_hashes == [SGLANG_PAGE_0 + (1 << 64), SGLANG_PAGE_1]
        assert removed.block_hashes == [SGLANG_PAGE_1]
        assert message.batch.dp_rank == 0
    if _has(example, "medium"):
        assert stored.medium == removed.medium == "GPU"
    else:
        assert stored.medium is removed.medium is None
    if _has(example, "group_idx"):
        assert stored.group_idx == removed.group_idx == 0
    if _has(example, "kv_cache_spec_kind"):
        assert stored.kv_cache_spec_kind == "full_attention"
        assert stored.kv_cache_spec_sliding_window is None
    if _has(example, "extra_keys"):
        assert stored.extra_keys == [None, None]  # plain text: one nil per block


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.example["label"] == "lora_continuation"], ids=str
)
def test_lora_continuation_meaning(example: VectorExample) -> None:
    message = _decode(example)
    stored = _stored(message)
    assert len(message.batch.events) == 1
    assert message.batch.dp_rank == 1
    assert stored.parent_block_hash is not None  # continues a cached first block
    assert len(stored.block_hashes) == 1
    assert len(stored.token_ids) == 16
    assert (stored.lora_id, stored.lora_name) == (1, "sql-lora")
    if _has(example, "extra_keys"):
        assert stored.extra_keys == [["sql-lora"]]
    else:
        assert stored.extra_keys is None


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.example["label"] == "multimodal_extra_keys"], ids=str
)
def test_multimodal_meaning(example: VectorExample) -> None:
    stored = _stored(_decode(example))
    assert len(stored.block_hashes) == 4
    assert len(stored.token_ids) == 64
    assert stored.parent_block_hash is None
    assert stored.extra_keys == [
        [[MM_ID, 5]],
        [[MM_ID, -11], ["user-uuid-image-2", 14]],  # an item started in the previous block
        None,
        None,
    ]


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.example["label"] == "hybrid_group"], ids=str
)
def test_hybrid_group_meaning(example: VectorExample) -> None:
    message = _decode(example)
    stored, removed = _stored(message), _removed(message, 1)
    assert stored.block_hashes == removed.block_hashes == [SEED0_BLOCK_0]
    assert stored.group_idx == removed.group_idx == 1
    assert stored.kv_cache_spec_kind == "sliding_window"
    assert stored.kv_cache_spec_sliding_window == 4096


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.example["label"] == "bytes_hashes"], ids=str
)
def test_bytes_hashes_meaning(example: VectorExample) -> None:
    """Raw 32-byte digests map to the same u64 keys as the int form of the same store."""
    stored = _stored(_decode(example))
    raw_event = example.generic[1][0]
    digests = raw_event[1] if isinstance(raw_event, list) else raw_event["block_hashes"]
    assert all(len(bytes.fromhex(d["bytes_hex"])) == 32 for d in digests)
    assert stored.block_hashes == [SEED0_BLOCK_0, SEED0_BLOCK_1]
    same_layout = next(
        e
        for e in EXAMPLES
        if e.layout is example.layout and e.example["label"] == "store_remove_clear"
    )
    assert stored == _stored(_decode(same_layout))


def test_array_and_map_eras_agree_on_the_same_store() -> None:
    """vLLM 0.23 (array) and 0.24 (map) publish the same store: the decoded events are equal."""
    by_name = {example.name: example for example in EXAMPLES}
    for label in ("store_remove_clear", "lora_continuation", "multimodal_extra_keys"):
        array_era = _decode(by_name[f"vllm-G/{label}"]).batch.events
        map_era = _decode(by_name[f"vllm-H/{label}"]).batch.events
        assert array_era == map_era, label
