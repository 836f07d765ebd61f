"""Fuzzing the KV-event decoder: whatever arrives, it returns a result and never raises.

Also checks the bookkeeping invariants a caller relies on: every input event is either decoded
or rejected exactly once, in order, and a valid event decodes to the same value whether its
batch takes the fast path or the per-event path.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.events import (
    EVENT_REJECT_REASONS,
    FRAME_REJECT_REASONS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    FrameRejection,
    Message,
    ReplayEnd,
    decode_frames,
    decode_payload,
    decode_replay_frames,
)
from kvcache.testing.events import merge_removals

EVENTS_JSON = Path(__file__).resolve().parents[1] / "data" / "events.json"
U64 = (1 << 64) - 1
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


@cache
def vector_frames() -> list[list[bytes]]:
    data = json.loads(EVENTS_JSON.read_text())
    frames = []
    for layout in data["layouts"]:
        for example in layout["examples"]:
            f = example["frames"]
            topic = f["topic_utf8"].encode()
            frames.append([topic, bytes.fromhex(f["seq_hex"]), bytes.fromhex(f["payload_hex"])])
    return frames


def check_result(result: object) -> None:
    """The contract every decode call must satisfy, whatever the input."""
    assert isinstance(result, Message | FrameRejection), result
    if isinstance(result, FrameRejection):
        assert result.reason in FRAME_REJECT_REASONS
        assert len(result.detail) <= 200
        return
    check_batch(result.batch)


def check_batch(batch: EventBatch) -> None:
    indices = [r.index for r in batch.rejected]
    assert indices == sorted(set(indices))
    for rejection in batch.rejected:
        assert rejection.reason in EVENT_REJECT_REASONS
        assert len(rejection.detail) <= 200
    assert batch.dp_rank is None or batch.dp_rank >= 0
    for event in batch.events:
        if isinstance(event, BlockStored | BlockRemoved):
            assert all(type(h) is int and 0 <= h <= U64 for h in event.block_hashes)
            assert event.group_idx is None or event.group_idx >= 0
        if isinstance(event, BlockStored):
            parent = event.parent_block_hash
            assert parent is None or 0 <= parent <= U64
            assert all(type(t) is int and t >= 0 for t in event.token_ids)
            assert event.block_size >= 0


# --- arbitrary input -------------------------------------------------------------------------

ints = st.integers(min_value=-(1 << 63), max_value=U64)
scalars = (
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12) | st.binary(max_size=40)
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=12) | ints, inner, max_size=6)
    ),
    max_leaves=40,
)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_payload(payload: bytes) -> None:
    check_result(decode_frames([b"kv@p@m", bytes(8), payload]))
    check_result(decode_frames([b"kv@p@m", bytes(8), b"\x93\xcb" + bytes(8) + payload]))


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6), st.text(max_size=10))
def test_random_frames(frames: list[bytes], topic: str) -> None:
    check_result(decode_frames(frames))
    replay = decode_replay_frames(frames, topic=topic)
    if not isinstance(replay, ReplayEnd):
        check_result(replay)


@FUZZ
@given(anything)
def test_random_msgpack_structure(value: Any) -> None:
    payload = msgspec.msgpack.encode(value)
    check_result(decode_frames([b"kv@p@m", bytes(8), payload]))


@FUZZ
@given(
    st.floats() | ints | anything,
    st.lists(anything, max_size=8),
    st.none() | ints | anything,
    st.lists(anything, max_size=2),
)
def test_random_batch_shaped_structure(ts: Any, events: list[Any], rank: Any, tail: Any) -> None:
    payload = msgspec.msgpack.encode([ts, events, rank, *tail])
    result = decode_frames([b"kv@p@m", bytes(8), payload])
    check_result(result)
    if isinstance(result, Message):
        batch = result.batch
        assert len(batch.events) + len(batch.rejected) == len(events)


# --- events close to valid -------------------------------------------------------------------

wire_hashes = ints | st.binary(min_size=0, max_size=33)
almost_stored_fields: dict[str, st.SearchStrategy[Any]] = {
    "block_hashes": st.lists(wire_hashes, max_size=4) | anything,
    "parent_block_hash": st.none() | wire_hashes | anything,
    "token_ids": st.lists(ints, max_size=8) | anything,
    "block_size": ints | anything,
    "lora_id": st.none() | ints | anything,
    "medium": st.none() | st.sampled_from(["GPU", "CPU", "cpu", "DISK"]) | anything,
    "lora_name": st.none() | st.text(max_size=8),
    "extra_keys": st.none() | st.lists(st.none() | st.lists(anything, max_size=3), max_size=3),
    "group_idx": st.none() | ints,
    "kv_cache_spec_kind": st.none() | st.text(max_size=8) | anything,
}
TAGS = st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]) | st.text(max_size=8)


@st.composite
def almost_events(draw: st.DrawFn) -> Any:
    tag = draw(TAGS)
    fields = {
        name: draw(strategy)
        for name, strategy in almost_stored_fields.items()
        if draw(st.integers(0, 9)) > 0  # now and then a field goes missing
    }
    if draw(st.booleans()):
        return {"type": tag, **fields}
    return [tag, *fields.values()]


@FUZZ
@given(st.lists(almost_events(), max_size=8), st.sampled_from([0, 1, None]))
def test_almost_valid_events(events: list[Any], rank: int | None) -> None:
    result = decode_payload(msgspec.msgpack.encode([1.5, events, rank]))
    assert isinstance(result, EventBatch), result
    check_batch(result)
    assert len(result.events) + len(result.rejected) == len(events)
    assert result.dp_rank == rank


# --- mutations of real frames ----------------------------------------------------------------


@st.composite
def mutated_frames(draw: st.DrawFn) -> list[bytes]:
    frames = list(draw(st.sampled_from(vector_frames())))
    which = draw(st.sampled_from([2, 2, 2, 1, 0]))  # mostly the payload
    data = bytearray(frames[which])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif data:
            del data[at : at + draw(st.integers(1, 9))]
    frames[which] = bytes(data)
    return frames


@FUZZ
@given(mutated_frames())
def test_mutated_vector_frames(frames: list[bytes]) -> None:
    check_result(decode_frames(frames))
    replay = decode_replay_frames([b"", *frames])
    if not isinstance(replay, ReplayEnd):
        check_result(replay)


# --- valid events: path equivalence ----------------------------------------------------------

u64s = st.integers(0, U64)
valid_hash = u64s | st.integers(-(1 << 63), -1) | st.binary(min_size=1, max_size=32)


def expected_key(value: int | bytes) -> int:
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    return value % (1 << 64)


@st.composite
def valid_event(draw: st.DrawFn) -> tuple[Any, Event]:
    """A valid event in a random wire form, and the model it must decode to."""
    kind = draw(st.sampled_from(["stored", "removed", "cleared"]))
    as_map = draw(st.booleans())
    if kind == "cleared":
        wire: Any = {"type": "AllBlocksCleared"} if as_map else ["AllBlocksCleared"]
        return wire, AllBlocksCleared()
    hashes = draw(st.lists(valid_hash, max_size=5))
    medium = draw(st.none() | st.sampled_from(["GPU", "CPU"]))
    group = draw(st.none() | st.integers(0, 3))
    if kind == "removed":
        model: Event = BlockRemoved([expected_key(h) for h in hashes], medium, group)
        wire_fields: list[Any] = [hashes, medium, group]
        names = ["block_hashes", "medium", "group_idx"]
        tag = "BlockRemoved"
    else:
        parent = draw(st.none() | valid_hash)
        tokens = draw(st.lists(st.integers(0, U64), max_size=12))
        size = draw(st.integers(0, 64))
        extra = draw(st.none() | st.lists(st.none() | st.lists(st.text(max_size=4)), max_size=3))
        model = BlockStored(
            [expected_key(h) for h in hashes],
            None if parent is None else expected_key(parent),
            tokens,
            size,
            None,
            medium,
            None,
            extra,
            group,
        )
        wire_fields = [hashes, parent, tokens, size, None, medium, None, extra, group]
        names = [
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
            "group_idx",
        ]
        tag = "BlockStored"
    if as_map:
        return {"type": tag, **dict(zip(names, wire_fields, strict=True))}, model
    return [tag, *wire_fields], model


@FUZZ
@given(st.lists(valid_event(), max_size=8), st.data())
def test_valid_events_decode_the_same_on_every_path(
    pairs: list[tuple[Any, Event]], data: st.DataObject
) -> None:
    wire = [w for w, _ in pairs]
    expected = [m for _, m in pairs]
    clean = decode_payload(msgspec.msgpack.encode([1.5, wire, 0]))
    assert isinstance(clean, EventBatch)
    assert clean.rejected == []
    # the compiled fast path merges runs of removals; the msgspec paths do not
    assert (clean.events, clean.merged) in ((expected, 0), merge_removals(expected))

    # A broken event anywhere forces the per-event path: the valid ones must not change.
    at = data.draw(st.integers(0, len(wire)))
    broken = data.draw(st.sampled_from([None, 5, [], ["Nope"], {"type": "BlockStored"}]))
    mixed = decode_payload(msgspec.msgpack.encode([1.5, [*wire[:at], broken, *wire[at:]], 0]))
    assert isinstance(mixed, EventBatch)
    assert mixed.events == expected  # the per-event path never merges
    assert [r.index for r in mixed.rejected] == [at]
