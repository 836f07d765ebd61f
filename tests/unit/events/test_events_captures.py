"""Real vLLM 0.32 frames (live and replayed) decode completely and match a plain msgpack read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from events_testdata import (
    PICKLE_CAPTURE,
    SERVE_CAPTURE,
    CapturedMessage,
    generic_events,
    load_capture,
)

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    FrameRejection,
    Message,
    ReplayEnd,
    decode_frames,
    decode_replay_frames,
)
from kvcache.events.decode import set_fast_path
from kvcache.testing.events import merge_removals


def _decode_all(messages: list[CapturedMessage]) -> list[Message]:
    decoded = []
    for captured in messages:
        message = decode_frames(captured.frames)
        assert isinstance(message, Message), (captured.n, message)
        assert message.batch.rejected == [], captured.n
        decoded.append(message)
    return decoded


def _census(messages: list[Message]) -> tuple[Counter[str], int]:
    kinds: Counter[str] = Counter()
    hashes = 0
    for message in messages:
        kinds["BlockRemoved"] += message.batch.merged  # removals folded into the one before
        for event in message.batch.events:
            kinds[type(event).__name__] += 1
            if isinstance(event, BlockStored | BlockRemoved):
                hashes += len(event.block_hashes)
    return kinds, hashes


@pytest.mark.parametrize("directory", [PICKLE_CAPTURE, SERVE_CAPTURE], ids=lambda p: p.name)
def test_every_capture_frame_matches_plain_msgpack(directory: Path) -> None:
    captured = load_capture(directory)
    for raw, message in zip(captured, _decode_all(captured), strict=True):
        ts, events, rank = generic_events(raw.frames[2])
        assert (message.batch.events, message.batch.merged) in (
            (events, 0),  # the msgspec paths
            merge_removals(events),  # the compiled fast path merges removal runs
        )
        assert (message.batch.ts, message.batch.dp_rank) == (ts, rank)
        assert (message.pod, message.model, message.seq) == ("pod-a", "tiny-llama", raw.seq)
        assert raw.topic == "kv@pod-a@tiny-llama"


def test_pickle_capture_census() -> None:
    """Counts stated in the captures README: 26 messages, seq 0..25, 25/32/1 events, 92 keys.

    Decoded without the compiled fast path: these are facts about the wire events, and the fast
    path merges runs of single-block removals."""
    previous = set_fast_path(False)
    try:
        messages = _decode_all(load_capture(PICKLE_CAPTURE))
    finally:
        set_fast_path(previous)
    assert [m.seq for m in messages] == list(range(26))
    kinds, hashes = _census(messages)
    assert kinds == {"BlockStored": 25, "BlockRemoved": 32, "AllBlocksCleared": 1}
    assert hashes == 92
    stored_keys = [
        h
        for m in messages
        for e in m.batch.events
        if isinstance(e, BlockStored)
        for h in e.block_hashes
    ]
    assert len(stored_keys) == 60
    everything = stored_keys + [
        h
        for m in messages
        for e in m.batch.events
        if isinstance(e, BlockRemoved)
        for h in e.block_hashes
    ]
    # Half the keys are >= 2**63 (msgpack uint64): a signed decoder would get them wrong.
    assert sum(h >= 1 << 63 for h in everything) == 43
    assert all(0 <= h < 1 << 64 for h in everything)
    assert {m.batch.dp_rank for m in messages} == {0}
    for message in messages:
        for event in message.batch.events:
            if isinstance(event, BlockStored):
                assert event.block_size == 32
                assert event.medium == "GPU"
                assert event.group_idx == 0
                assert event.kv_cache_spec_kind == "full_attention"
                assert event.extra_keys == [None] * len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert len(event.block_hashes) == 1  # vLLM evicts one block per event
                assert (event.medium, event.group_idx) == ("GPU", 0)


def test_serve_capture_census() -> None:
    """seq 0: BlockStored of 2 blocks; seq 1: AllBlocksCleared then BlockStored of 2 blocks."""
    messages = _decode_all(load_capture(SERVE_CAPTURE))
    assert [m.seq for m in messages] == [0, 1]
    first, second = (m.batch.events for m in messages)
    assert [type(e) for e in first] == [BlockStored]
    assert [type(e) for e in second] == [AllBlocksCleared, BlockStored]
    for stored in (first[0], second[1]):
        assert isinstance(stored, BlockStored)
        assert len(stored.block_hashes) == 2
        assert stored.parent_block_hash is None
    assert _census(messages) == (Counter(BlockStored=2, AllBlocksCleared=1), 4)


def test_replay_frames_decode_like_the_live_ones() -> None:
    live = _decode_all(load_capture(PICKLE_CAPTURE))
    replay = load_capture(PICKLE_CAPTURE, "replay_frames.jsonl")
    assert len(replay) == len(live) + 1
    replayed = [decode_replay_frames(r.frames) for r in replay]
    assert replayed[:-1] == live
    assert isinstance(replayed[-1], ReplayEnd)
    assert replay[-1].frames == [b"", b"", b"\xff" * 8, b""]


def test_pre_026_replay_shape_takes_the_topic_from_the_caller() -> None:
    """Before vLLM 0.26 a reply is [b"", seq, payload]: no topic frame."""
    live = load_capture(PICKLE_CAPTURE)
    for captured, expected in zip(live, _decode_all(live), strict=True):
        _topic, seq, payload = captured.frames
        assert decode_replay_frames([b"", seq, payload], topic=captured.topic) == expected
        anonymous = decode_replay_frames([b"", seq, payload])
        assert isinstance(anonymous, Message)
        assert (anonymous.pod, anonymous.model) == ("", None)
    assert isinstance(decode_replay_frames([b"", b"\xff" * 8, b""]), ReplayEnd)


def test_replay_reply_without_delimiter_is_rejected() -> None:
    captured = load_capture(PICKLE_CAPTURE, "replay_frames.jsonl")[0]
    result = decode_replay_frames([*captured.frames[1:], b""])
    assert isinstance(result, FrameRejection)
    assert result.reason == "bad_delimiter"
