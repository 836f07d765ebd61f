"""Frames, topics, sequence numbers and batch shapes: rejections carry a reason, never raise."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvcache.events import (
    FRAME_REJECT_REASONS,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    EventBatch,
    FrameRejection,
    Message,
    ReplayEnd,
    decode_frames,
    decode_payload,
    decode_replay_frames,
    parse_topic,
)

TOPIC = b"kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B"
SEQ7 = (7).to_bytes(8, "big")
REMOVED = {"type": "BlockRemoved", "block_hashes": [42], "medium": "GPU"}


def payload(*batch: Any) -> bytes:
    return msgspec.msgpack.encode(list(batch))


GOOD = payload(1.5, [REMOVED], 0)


def rejected(result: object, reason: str) -> FrameRejection:
    assert isinstance(result, FrameRejection), result
    assert result.reason == reason, result
    assert result.reason in FRAME_REJECT_REASONS
    assert result.detail
    return result


# --- topics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "pod", "model"),
    [
        ("kv@10.0.0.7:8000@meta-llama/Llama-3.1-8B", "10.0.0.7:8000", "meta-llama/Llama-3.1-8B"),
        ("kv@[fd00::7]:8000@qwen", "[fd00::7]:8000", "qwen"),  # IPv6 pod ids are fine too
        ("kv@pod-a@tiny-llama", "pod-a", "tiny-llama"),
        # A model name containing '@' stays whole (upstream's 3-way split would drop it).
        ("kv@pod-a@org/model@v2", "pod-a", "org/model@v2"),
        ("kv@pod-a@@", "pod-a", "@"),
        ("kv@pod-a@", "pod-a", None),  # empty model: unknown
        ("kv@pod-a", "kv@pod-a", None),  # no model part: not the convention
        ("kv@@model", "kv@@model", None),  # empty pod: not usable as an id
        ("kv@", "kv@", None),
        ("", "", None),  # vLLM's default topic
        ("engine-3", "engine-3", None),
        ("KV@pod@model", "KV@pod@model", None),  # the prefix is case-sensitive
        ("vllm@pod@model", "vllm@pod@model", None),
        ("kv@pöd@módel", "pöd", "módel"),
    ],
)
def test_parse_topic(topic: str, pod: str, model: str | None) -> None:
    assert parse_topic(topic) == (pod, model)
    message = decode_frames([topic.encode(), SEQ7, GOOD])
    assert isinstance(message, Message)
    assert (message.pod, message.model, message.seq) == (pod, model, 7)


def test_non_utf8_topic_is_rejected() -> None:
    rejected(decode_frames([b"kv@\xff\xfe@m", SEQ7, GOOD]), "bad_topic")


def test_repeated_topics_are_parsed_consistently() -> None:
    """The topic cache must not mix up pods, even past its size limit."""
    for round_ in range(3):
        for i in range(1500):
            message = decode_frames([f"kv@pod-{i}@m{round_}".encode(), SEQ7, GOOD])
            assert isinstance(message, Message)
            assert (message.pod, message.model) == (f"pod-{i}", f"m{round_}")


# --- frame count and seq --------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_wrong_frame_count(count: int) -> None:
    frames = [TOPIC, SEQ7, GOOD, b"", b""][:count]
    rejected(decode_frames(frames), "frame_count")


@pytest.mark.parametrize("seq", [b"", b"\x00", b"\x00" * 7, b"\x00" * 9, b"\x00" * 16])
def test_seq_frame_must_be_8_bytes(seq: bytes) -> None:
    result = rejected(decode_frames([TOPIC, seq, GOOD]), "bad_seq")
    assert (result.pod, result.model, result.seq) == (
        "10.0.0.7:8000",
        "meta-llama/Llama-3.1-8B",
        None,
    )


@pytest.mark.parametrize("value", [0, 1, 255, 1 << 32, (1 << 63) + 5, REPLAY_END_SEQ])
def test_seq_is_unsigned_big_endian(value: int) -> None:
    message = decode_frames([TOPIC, value.to_bytes(8, "big"), GOOD])
    assert isinstance(message, Message)
    assert message.seq == value


def test_buffer_frames_are_accepted() -> None:
    expected = decode_frames([TOPIC, SEQ7, GOOD])
    assert isinstance(expected, Message)
    assert decode_frames([bytearray(TOPIC), memoryview(SEQ7), memoryview(GOOD)]) == expected
    assert decode_frames((TOPIC, bytearray(SEQ7), bytearray(GOOD))) == expected
    assert decode_frames([TOPIC, SEQ7, memoryview(b"xx" + GOOD)[2:]]) == expected


# --- payloads that are not a batch ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "bad_payload"),
        (b"\xc1", "bad_payload"),  # never-used msgpack opcode
        (b"not msgpack at all", "bad_payload"),  # a fixstr prefix then trailing garbage
        (b"\x93\xcb\x41", "bad_payload"),  # truncated float
        (GOOD[:-1], "bad_payload"),  # truncated: dp rank missing after a 3-array header
        (GOOD[: len(GOOD) // 2], "bad_payload"),
        (GOOD + b"\x00", "bad_payload"),  # trailing bytes
        (b"\xdd\xff\xff\xff\xff", "bad_payload"),  # array32 header claiming 4G elements
        # Nested far too deep: as the event list, inside it, and as an ignored trailing element.
        (b"\x93\xcb" + bytes(8) + b"\x91" * 100_000 + b"\xc0", "bad_payload"),
        (b"\x93\xcb" + bytes(8) + b"\x91\x91" + b"\x91" * 100_000 + b"\xc0", "bad_payload"),
        (b"\x94\xcb" + bytes(8) + b"\x90\x00" + b"\x91" * 100_000 + b"\xc0", "bad_payload"),
        (b"\x91" * 100_000 + b"\xc0", "bad_payload"),  # wrong shape, but also too deep
        (msgspec.msgpack.encode(None), "bad_batch"),
        (msgspec.msgpack.encode(12), "bad_batch"),
        (msgspec.msgpack.encode("BlockStored"), "bad_batch"),
        (payload(), "bad_batch"),
        (payload(1.5), "bad_batch"),
        (payload(None, []), "bad_batch"),  # ts must be a number
        (payload("1.5", []), "bad_batch"),
        (payload(True, []), "bad_batch"),
        (payload(1.5, None), "bad_batch"),  # events must be an array
        (payload(1.5, {"a": 1}), "bad_batch"),
        (payload(1.5, [], -1), "bad_batch"),  # negative dp rank
        (payload(1.5, [], "0"), "bad_batch"),
        (payload(1.5, [], 1.0), "bad_batch"),
        (msgspec.msgpack.encode({"events": []}), "bad_batch"),  # map batch without ts
        (msgspec.msgpack.encode({1: 2}), "bad_batch"),
    ],
)
def test_undecodable_payloads(raw: bytes, reason: str) -> None:
    result = rejected(decode_frames([TOPIC, SEQ7, raw]), reason)
    # Pod and seq survive, so the caller can log with context and keep tracking the sequence.
    assert (result.pod, result.seq) == ("10.0.0.7:8000", 7)
    assert len(result.detail) <= 200
    assert rejected(decode_payload(raw), reason).seq is None


# --- batch shapes ---------------------------------------------------------------------------


def batch_of(raw: bytes) -> EventBatch:
    batch = decode_payload(raw)
    assert isinstance(batch, EventBatch), batch
    assert batch.rejected == []
    return batch


def test_two_element_batch_has_no_rank() -> None:  # vLLM 0.9.0
    batch = batch_of(payload(1.5, [REMOVED]))
    assert (batch.ts, batch.dp_rank, batch.events) == (1.5, None, [BlockRemoved([42], "GPU")])


def test_nil_rank_and_other_ranks() -> None:
    assert batch_of(payload(1.5, [REMOVED], None)).dp_rank is None
    assert batch_of(payload(1.5, [REMOVED], 3)).dp_rank == 3
    assert batch_of(payload(1.5, [REMOVED], 1 << 40)).dp_rank == 1 << 40


def test_unknown_trailing_batch_elements_are_ignored() -> None:
    batch = batch_of(payload(1.5, [REMOVED], 2, "future", {"x": [1]}))
    assert (batch.dp_rank, len(batch.events)) == (2, 1)


def test_integer_and_float32_timestamps() -> None:
    assert batch_of(payload(1750000000, [REMOVED], 0)).ts == 1750000000.0
    float32 = b"\x93\xca" + (1.5).hex().encode()[:0] + bytes.fromhex("3fc00000") + b"\x90\x00"
    assert batch_of(float32).ts == 1.5


def test_empty_event_list() -> None:
    batch = batch_of(payload(1.5, [], 0))
    assert (batch.events, batch.rejected) == ([], [])


def test_long_event_lists_use_array16_and_array32_headers() -> None:
    for count in (15, 16, 65_535, 65_536):
        batch = batch_of(payload(1.5, [REMOVED] * count, 0))
        assert len(batch.events) + batch.merged == count
        removed = [e for e in batch.events if isinstance(e, BlockRemoved)]
        assert sum(len(e.block_hashes) for e in removed) == count  # every removal kept


def test_map_shaped_batch() -> None:
    """An unreleased vLLM variant encodes EventBatch as a map; SGLang would name the rank."""
    raw = msgspec.msgpack.encode(
        {"ts": 2.5, "events": [REMOVED, ["AllBlocksCleared"]], "data_parallel_rank": 4, "x": 0}
    )
    batch = batch_of(raw)
    assert (batch.ts, batch.dp_rank) == (2.5, 4)
    assert batch.events == [BlockRemoved([42], "GPU"), AllBlocksCleared()]
    sglang = msgspec.msgpack.encode({"ts": 2.5, "events": [], "attn_dp_rank": 1})
    assert batch_of(sglang).dp_rank == 1
    assert batch_of(msgspec.msgpack.encode({"ts": 2.5, "events": []})).dp_rank is None


def test_mixed_event_forms_in_one_batch() -> None:
    batch = batch_of(payload(1.5, [["BlockRemoved", [1]], REMOVED, {"type": "AllBlocksCleared"}]))
    assert batch.events == [BlockRemoved([1]), BlockRemoved([42], "GPU"), AllBlocksCleared()]


# --- replay replies -------------------------------------------------------------------------


def test_replay_with_topic_frame() -> None:
    live = decode_frames([TOPIC, SEQ7, GOOD])
    assert decode_replay_frames([b"", TOPIC, SEQ7, GOOD]) == live
    assert decode_replay_frames([b"", TOPIC, SEQ7, GOOD], topic="kv@ignored@x") == live


def test_replay_without_topic_frame() -> None:
    live = decode_frames([TOPIC, SEQ7, GOOD])
    assert decode_replay_frames([b"", SEQ7, GOOD], topic=TOPIC.decode()) == live


@pytest.mark.parametrize(
    "frames",
    [
        [b"", b"", b"\xff" * 8, b""],  # vLLM >= 0.26
        [b"", b"\xff" * 8, b""],  # before
        [b"", TOPIC, b"\xff" * 8, b""],
        [b"", b"\xff" * 8, GOOD],  # the seq alone decides
    ],
)
def test_replay_end_marker(frames: list[bytes]) -> None:
    assert decode_replay_frames(frames) == ReplayEnd()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "frame_count"),
        ([b""], "frame_count"),
        ([b"", GOOD], "frame_count"),
        ([b"", TOPIC, SEQ7, GOOD, b""], "frame_count"),
        ([b"x", TOPIC, SEQ7, GOOD], "bad_delimiter"),
        ([TOPIC, SEQ7, GOOD], "bad_delimiter"),  # a live message on the replay socket
        ([b"", TOPIC, b"\x00" * 4, GOOD], "bad_seq"),
        ([b"", b"\xff\xfe", SEQ7, GOOD], "bad_topic"),
        ([b"", TOPIC, SEQ7, b"\xc1"], "bad_payload"),
        ([b"", SEQ7, payload(1.5)], "bad_batch"),
    ],
)
def test_replay_rejections(frames: list[bytes], reason: str) -> None:
    rejected(decode_replay_frames(frames), reason)
