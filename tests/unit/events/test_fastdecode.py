"""The compiled decoder fast path: what it takes, what it refuses, and that it changes nothing
but the merging of consecutive removals."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
from events_testdata import (
    PICKLE_CAPTURE,
    SERVE_CAPTURE,
    load_capture,
    vector_examples,
)

from kvcache.errors import ConfigError
from kvcache.events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    FrameRejection,
    Message,
    decode_frames,
    decode_payload,
)
from kvcache.events import decode as decode_module
from kvcache.events._fastdecode import scan
from kvcache.events.apply import EventApplier
from kvcache.hashing import VllmScheme
from kvcache.index.memory import MemoryIndex
from kvcache.testing.events import merge_removals

ENCODE = msgspec.msgpack.encode
TS = b"\xcb" + struct.pack(">d", 1.5)


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    previous = decode_module.set_fast_path(enabled)
    try:
        yield
    finally:
        decode_module.set_fast_path(previous)


def slow_payload(payload: bytes) -> EventBatch | FrameRejection:
    with fast_path(False):
        return decode_payload(payload)


def removed(key: int, medium: str | None = "GPU", group: int | None = 0) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": [key], "medium": medium, "group_idx": group}


def stored(keys: list[int], tokens: list[Any], **more: Any) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": keys,
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        **more,
    }


def test_the_extension_is_built_and_on_by_default() -> None:
    # CI builds the C extension (make install); a silent fallback would hide a broken build.
    assert decode_module.FAST_PATH_AVAILABLE
    assert decode_module.fast_path_enabled()
    assert decode_module.set_fast_path(False) is True
    assert not decode_module.fast_path_enabled()
    assert decode_module.set_fast_path(True) is False
    assert decode_module.fast_path_enabled()


def test_enabling_a_missing_fast_path_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "FAST_PATH_AVAILABLE", False)
    with pytest.raises(ConfigError, match="not built"):
        decode_module.set_fast_path(True)


def test_runs_of_removals_merge_until_a_field_or_another_event_differs() -> None:
    events = [
        removed(1),
        removed(2),
        removed(3),
        removed(4, medium="CPU"),
        removed(5, medium="CPU"),
        removed(6, group=1),
        {**removed(7, group=1), "locality": "local"},
        stored([10, 11], list(range(32))),
        removed(8, group=1),
        removed(9, group=None),
        removed(10, medium=None, group=None),
        {"type": "AllBlocksCleared"},
        removed(11),
        {**removed(12), "ownership": "shared", "locality": None},
        {**removed(13), "ownership": "shared"},
    ]
    payload = ENCODE([1.5, events, 0])
    fast = decode_payload(payload)
    slow = slow_payload(payload)
    assert isinstance(fast, EventBatch) and isinstance(slow, EventBatch)
    assert len(slow.events) == len(events) and slow.merged == 0
    assert [
        (type(e).__name__, e.block_hashes if isinstance(e, BlockRemoved) else None)
        for e in fast.events
    ] == [
        ("BlockRemoved", [1, 2, 3]),
        ("BlockRemoved", [4, 5]),
        ("BlockRemoved", [6]),
        ("BlockRemoved", [7]),  # locality differs
        ("BlockStored", None),
        ("BlockRemoved", [8]),
        ("BlockRemoved", [9]),
        ("BlockRemoved", [10]),
        ("AllBlocksCleared", None),
        ("BlockRemoved", [11]),
        ("BlockRemoved", [12, 13]),
    ]
    assert fast.merged == 4
    assert (fast.events, fast.merged) == merge_removals(slow.events)
    assert len(fast.events) + fast.merged == len(events)
    assert (fast.ts, fast.dp_rank, fast.rejected) == (1.5, 0, [])


def test_stored_events_keep_every_field() -> None:
    extra = [None, ["mm-hash", 3]]
    event = stored(
        [2**64 - 1, 5],
        [0, 1, 127, 128, 255, 256, 65535, 65536, 2**18 - 1, 2**18, 2**32, 2**64 - 1],
        lora_name="adapter",
        extra_keys=extra,
        group_idx=2,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=128,
        session_id="s",
        lookahead_token_ids=[[1, 2]],
        cache_salt="salt",
        unknown_field={"nested": [1, b"\x00", 2.5]},
    )
    payload = ENCODE([2.0, [event, event], None])
    fast = decode_payload(payload)
    assert fast == slow_payload(payload)
    assert isinstance(fast, EventBatch)
    first = fast.events[0]
    assert isinstance(first, BlockStored)
    assert first.token_ids == event["token_ids"]
    assert first.extra_keys == extra
    assert first.cache_salt == "salt"


def test_the_scan_reads_the_common_layout() -> None:
    payload = ENCODE([1.5, [removed(1), removed(2), stored([3], [7, 8])], 4])
    result = scan(payload)
    assert result is not None
    ts, rank, items, merged, others = result
    assert (ts, rank, merged) == (1.5, 4, 1)
    assert items == [([1, 2], "GPU", 0, None, None), [7, 8]]
    assert others is not None
    # The stored event goes to msgspec with its tokens left out.
    assert msgspec.msgpack.decode(others) == [{**stored([3], [7, 8]), "token_ids": []}]


@pytest.mark.parametrize(
    "payload",
    [
        ENCODE([1.5, []]),  # no rank
        b"\x93\xca" + struct.pack(">f", 0.25) + b"\x90\xc0",  # float32 ts, nil rank
        b"\xdc\x00\x03" + TS + b"\xdc\x00\x00\x00",  # array16 headers
        # a hash and a rank in signed encodings of non-negative values
        b"\x93"
        + TS
        + b"\x91\x82\xa4type\xacBlockRemoved\xacblock_hashes\x91\xd3"
        + (5).to_bytes(8, "big")
        + b"\xd0\x01",
        # "type" after the token ids, and unknown keys holding ext, bin and nested values
        ENCODE(
            [
                1.5,
                [
                    {
                        "token_ids": [1, 2],
                        "x": [msgspec.msgpack.Ext(5, b"abc"), {"k": b"\x00" * 300}],
                        **stored([9], [1, 2]),
                    },
                    {"block_hashes": [4], "type": "BlockRemoved", "y": msgspec.msgpack.Ext(1, b"")},
                ],
                0,
            ]
        ),
    ],
)
def test_uncommon_but_valid_encodings_decode_the_same(payload: bytes) -> None:
    assert scan(payload) is not None
    fast = decode_payload(payload)
    slow = slow_payload(payload)
    assert isinstance(fast, EventBatch) and isinstance(slow, EventBatch), (fast, slow)
    assert (fast.events, fast.merged) == merge_removals(slow.events)
    assert (fast.ts, fast.dp_rank) == (slow.ts, slow.dp_rank)


DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]

REFUSED = {
    "array-form events": ENCODE([1.5, [["BlockRemoved", [1], "GPU"]], 0]),
    "int64 hash": ENCODE([1.5, [removed(-5)], 0]),
    "bytes hash": ENCODE([1.5, [{"type": "BlockRemoved", "block_hashes": [b"\x01" * 8]}], 0]),
    "negative token": ENCODE([1.5, [stored([1], [1, -1])], 0]),
    "float token": ENCODE([1.5, [stored([1], [1, 1.0])], 0]),
    "no token ids": ENCODE([1.5, [{"type": "BlockStored", "block_hashes": [1]}], 0]),
    "int ts": ENCODE([1, [], 0]),
    "four fields": ENCODE([1.5, [], 0, 0]),
    "one field": ENCODE([1.5]),
    "map batch": ENCODE({"ts": 1.5, "events": []}),
    "bool rank": ENCODE([1.5, [], True]),
    "negative rank": ENCODE([1.5, [], -1]),
    "trailing bytes": ENCODE([1.5, [removed(1)], 0]) + b"\xc0",
    "unknown type": ENCODE([1.5, [{"type": "BlockMoved", "block_hashes": [1]}], 0]),
    "no type": ENCODE([1.5, [{"block_hashes": [1]}], 0]),
    "non-str type": ENCODE([1.5, [{"type": 1, "block_hashes": [1]}], 0]),
    "non-map event": ENCODE([1.5, [5], 0]),
    "non-str key": ENCODE([1.5, [{"type": "AllBlocksCleared", 1: 2}], 0]),
    "bool group": ENCODE([1.5, [{**removed(1), "group_idx": True}], 0]),
    "bytes medium": ENCODE([1.5, [{**removed(1), "medium": b"GPU"}], 0]),
    "int locality": ENCODE([1.5, [{**removed(1), "locality": 3}], 0]),
    "nil hashes": ENCODE([1.5, [{"type": "BlockRemoved", "block_hashes": None}], 0]),
    "duplicate hashes": b"\x93"
    + TS
    + b"\x91\x83\xa4type\xacBlockRemoved"
    + b"\xacblock_hashes\x91\x01\xacblock_hashes\x91\x02\x00",
    "invalid utf-8 medium": ENCODE([1.5, [removed(1, medium="GPUx")], 0]).replace(
        b"\xa4GPUx", b"\xa4GP\xff\xfe"
    ),
    "reserved byte": ENCODE([1.5, [{**removed(1), "z": None}], 0]).replace(
        b"\xa1z\xc0", b"\xa1z\xc1"
    ),
    "deep nesting": ENCODE([1.5, [{**removed(1), "z": DEEP}], 0]),
}


@pytest.mark.parametrize("payload", REFUSED.values(), ids=REFUSED.keys())
def test_the_scan_refuses_anything_else_and_the_slow_paths_decide(payload: bytes) -> None:
    assert scan(payload) is None
    assert decode_payload(payload) == slow_payload(payload)


def test_every_prefix_of_a_payload_is_refused_without_reading_past_it() -> None:
    payload = ENCODE([1.5, [stored([1, 2], list(range(300))), removed(3), removed(4)], 0])
    assert scan(payload) is not None
    for end in range(len(payload)):
        # A bytearray copy of exactly `end` bytes: a read past it would be a real overrun.
        assert scan(bytearray(payload[:end])) is None, end


def test_buffers_other_than_bytes() -> None:
    payload = ENCODE([1.5, [removed(1), removed(2)], 0])
    for buffer in (bytearray(payload), memoryview(payload), memoryview(b"xx" + payload)[2:]):
        assert decode_payload(buffer) == decode_payload(payload)
    assert scan(memoryview(payload)[::2]) is None  # not contiguous
    assert scan(5) is None  # not a buffer at all


def test_the_applier_counts_every_wire_event_and_block() -> None:
    scheme = VllmScheme("sha256_cbor", seed="42", block_size=16)
    tokens = list(range(64))
    keys = scheme.block_keys(tokens)
    events = [stored(keys, tokens), *(removed(k) for k in keys[2:]), removed(keys[1], "CPU")]
    frames = [b"kv@pod-a@m", (0).to_bytes(8, "big"), ENCODE([1.5, events, 0])]
    results = []
    for enabled in (True, False):
        with fast_path(enabled):
            message = decode_frames(frames)
        assert isinstance(message, Message)
        index = MemoryIndex()
        applier = EventApplier(index, scheme)
        applier.apply(message)
        stats = applier.stats
        results.append(
            (
                dict(stats.events_applied),
                stats.blocks_stored,
                stats.blocks_removed,
                index.lookup(keys),
            )
        )
    fast, slow = results
    assert fast == slow
    assert fast[0] == {"BlockStored": 1, "BlockRemoved": 3}
    assert fast[1:3] == (4, 3)


def test_vectors_decode_the_same_with_and_without_the_fast_path() -> None:
    taken = 0
    for example in vector_examples():
        taken += scan(example.frames[2]) is not None
        fast = decode_frames(example.frames)
        with fast_path(False):
            slow = decode_frames(example.frames)
        assert isinstance(fast, Message) and isinstance(slow, Message), example.name
        assert (fast.pod, fast.model, fast.seq) == (slow.pod, slow.model, slow.seq)
        assert (fast.batch.events, fast.batch.merged) == merge_removals(slow.batch.events)
        assert (fast.batch.ts, fast.batch.dp_rank, fast.batch.rejected) == (
            slow.batch.ts,
            slow.batch.dp_rank,
            slow.batch.rejected,
        )
    assert taken >= 10  # the map-form u64 layouts go the fast way


@pytest.mark.parametrize("directory", [PICKLE_CAPTURE, SERVE_CAPTURE], ids=lambda p: p.name)
def test_captures_decode_the_same_with_and_without_the_fast_path(directory: Any) -> None:
    folded = 0
    for captured in load_capture(directory):
        assert scan(captured.frames[2]) is not None, captured.n
        fast = decode_frames(captured.frames)
        with fast_path(False):
            slow = decode_frames(captured.frames)
        assert isinstance(fast, Message) and isinstance(slow, Message)
        assert (fast.batch.events, fast.batch.merged) == merge_removals(slow.batch.events)
        assert (fast.batch.ts, fast.batch.dp_rank, fast.seq) == (
            slow.batch.ts,
            slow.batch.dp_rank,
            slow.seq,
        )
        folded += fast.batch.merged
    if directory == PICKLE_CAPTURE:
        assert folded > 0  # vLLM's one-event-per-block removals do get merged
