"""The field tables, the model, the wire structs and the diagnosis checks all agree."""

from __future__ import annotations

import msgspec
import pytest

import kvcache.events
from kvcache.events import (
    EVENT_REJECT_REASONS,
    FRAME_REJECT_REASONS,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    decode_payload,
    schema,
)
from kvcache.events import diagnose as diagnose_module


def _names(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    return tuple(field.name for field in msgspec.structs.fields(struct))


@pytest.mark.parametrize(
    "struct", [BlockStored, schema.WireArrayBlockStored, schema.WireMapBlockStored], ids=str
)
def test_block_stored_field_order(struct: type[msgspec.Struct]) -> None:
    assert _names(struct) == schema.BLOCK_STORED_FIELDS


@pytest.mark.parametrize(
    "struct", [BlockRemoved, schema.WireArrayBlockRemoved, schema.WireMapBlockRemoved], ids=str
)
def test_block_removed_field_order(struct: type[msgspec.Struct]) -> None:
    assert _names(struct) == schema.BLOCK_REMOVED_FIELDS


def test_vllm_positions_match_the_reference_order() -> None:
    """vLLM 0.33 BlockStored / BlockRemoved order; SGLang's cache_salt only ever in maps."""
    assert schema.BLOCK_STORED_FIELDS[:15] == (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
        "locality",
        "ownership",
        "session_id",
        "lookahead_token_ids",
    )
    assert schema.BLOCK_STORED_FIELDS[15:] == ("cache_salt",)


def test_required_fields() -> None:
    for struct in (BlockStored, schema.WireArrayBlockStored, schema.WireMapBlockStored):
        required = [f.name for f in msgspec.structs.fields(struct) if f.required]
        assert required == ["block_hashes", "parent_block_hash", "token_ids", "block_size"]
    for removed in (BlockRemoved, schema.WireArrayBlockRemoved, schema.WireMapBlockRemoved):
        assert [f.name for f in msgspec.structs.fields(removed) if f.required] == ["block_hashes"]


def test_diagnosis_checks_cover_every_field_in_order() -> None:
    stored = diagnose_module._STORED_CHECKS
    removed = diagnose_module._REMOVED_CHECKS
    assert tuple(name for name, _, _ in stored) == schema.BLOCK_STORED_FIELDS
    assert tuple(name for name, _, _ in removed) == schema.BLOCK_REMOVED_FIELDS
    for checks, struct in ((stored, BlockStored), (removed, BlockRemoved)):
        required = {f.name for f in msgspec.structs.fields(struct) if f.required}
        assert {name for name, is_required, _ in checks if is_required} == required


def test_reason_sets() -> None:
    assert {"unknown_type", "bad_event", "bad_hash", "bad_group_idx"} <= EVENT_REJECT_REASONS
    assert all(f"bad_{name}" in EVENT_REJECT_REASONS for name in schema.BLOCK_STORED_FIELDS)
    assert {
        "frame_count",
        "bad_seq",
        "bad_topic",
        "bad_delimiter",
        "bad_payload",
        "bad_batch",
    } == FRAME_REJECT_REASONS
    assert int.from_bytes(b"\xff" * 8, "big") == REPLAY_END_SEQ


def test_model_encodes_as_vllm_map_form_and_round_trips() -> None:
    """The model classes double as map-form wire structs: encoding gives {"type": tag, ...}."""
    events: list[Event] = [
        BlockStored([1, (1 << 64) - 1], None, [5, 6], 1, medium="GPU", group_idx=0),
        BlockRemoved([2], "GPU"),
        AllBlocksCleared(),
    ]
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(events))
    assert [event["type"] for event in wire] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    batch = decode_payload(msgspec.msgpack.encode([1.0, events, 2]))
    assert batch == EventBatch(1.0, events, 2)


def test_model_is_frozen() -> None:
    stored = BlockStored([1], None, [1], 1)
    with pytest.raises(AttributeError):
        stored.block_size = 2  # type: ignore[misc]


def test_public_names_resolve() -> None:
    for name in kvcache.events.__all__:
        assert getattr(kvcache.events, name) is not None
