"""Identity-mode pods decode without token ids (TOKENS_OMITTED), and identity is still checked."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from kvcache.config import Config
from kvcache.events.apply import TOKENS_EVERY, EventApplier, HashMode
from kvcache.events.decode import decode_frames
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.schema import (
    TOKENS_OMITTED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    Message,
)
from kvcache.hashing import VllmScheme
from kvcache.index.memory import MemoryIndex
from kvcache.indexer import Indexer

BS = 16
OURS = VllmScheme("sha256_cbor", seed="42", block_size=BS)
OTHER = VllmScheme("sha256_cbor", seed="0", block_size=BS)
_encode = msgspec.msgpack.Encoder().encode


def frames(seq: int, *events: object, pod: str = "p:1") -> list[bytes]:
    """vLLM's wire form: an array batch ``[ts, [map-form event, ...], dp_rank]``."""
    return [f"kv@{pod}@m".encode(), seq.to_bytes(8, "big"), _encode([1.0 + seq, events, 0])]


def stored(scheme: VllmScheme, first: int, blocks: int = 2) -> BlockStored:
    tokens = list(range(first, first + blocks * BS))
    return BlockStored(scheme.block_keys(tokens), None, tokens, BS)


def test_skipped_tokens_are_checked_and_left_out_the_rest_is_identical() -> None:
    raw = frames(0, stored(OURS, 100), BlockStored([7], None, [], BS), stored(OURS, 900, 1))
    full = decode_frames(raw)
    lean = decode_frames(raw, skip_tokens=True)
    asked: list[str] = []

    def ask(pod: str) -> bool:
        asked.append(pod)
        return True

    by_pod = decode_frames(raw, skip_tokens=ask)
    assert isinstance(full, Message) and isinstance(lean, Message)
    assert asked == ["p:1"] and by_pod == lean
    kept, empty, other = lean.batch.events
    assert isinstance(kept, BlockStored) and kept.token_ids is TOKENS_OMITTED
    assert isinstance(empty, BlockStored) and empty.token_ids == []  # none on the wire: kept so
    assert empty.token_ids is not TOKENS_OMITTED
    assert isinstance(other, BlockStored) and other.token_ids is TOKENS_OMITTED
    for a, b in zip(full.batch.events, lean.batch.events, strict=True):
        assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
        assert msgspec.structs.replace(a, token_ids=[]) == msgspec.structs.replace(b, token_ids=[])


def test_bad_token_ids_are_still_rejected_when_skipping() -> None:
    bad = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, -5],
        "block_size": BS,
    }
    raw = [b"kv@p:1@m", (0).to_bytes(8, "big"), _encode([1.0, [bad], 0])]
    for skip in (False, True):
        message = decode_frames(raw, skip_tokens=skip)
        assert isinstance(message, Message)
        assert message.batch.events == [] and len(message.batch.rejected) == 1


def test_identity_pods_skip_tokens_but_one_message_in_n_is_verified() -> None:
    index = MemoryIndex()
    applier = EventApplier(index, OURS)
    assert not applier.skip_tokens_for("p:1")  # unknown pod: tokens needed to verify
    applier.apply(decode_frames(frames(0, stored(OURS, 100))))
    assert applier.pods["p:1"].mode is HashMode.IDENTITY
    decisions = [applier.skip_tokens_for("p:1") for _ in range(2 * TOKENS_EVERY)]
    assert decisions.count(False) == 2 and decisions[TOKENS_EVERY - 1] is False
    assert applier.pods["p:1"].verify_next


def test_a_changed_hash_space_is_caught_at_the_next_message_with_tokens() -> None:
    index = MemoryIndex()
    pipeline = IngestPipeline(index, OURS)
    pipeline.submit(frames(0, stored(OURS, 100)))
    applier = pipeline.appliers[0]

    def mode() -> HashMode:
        return applier.pods["p:1"].mode

    assert mode() is HashMode.IDENTITY
    # The engine now hashes with another seed (no restart seen): the next messages skip tokens,
    # the one that carries them is verified and the pod falls back to dual keys.
    for seq in range(1, TOKENS_EVERY + 1):
        pipeline.submit(frames(seq, stored(OTHER, 1000 + 100 * seq)))
        if mode() is HashMode.DUAL:
            break
    assert mode() is HashMode.DUAL
    assert seq == TOKENS_EVERY
    assert applier.stats.hash_mismatches == 1


def test_after_a_restart_the_next_message_carries_tokens() -> None:
    applier = EventApplier(MemoryIndex(), OURS)
    applier.apply(decode_frames(frames(0, stored(OURS, 100))))
    applier.apply(decode_frames(frames(1, stored(OURS, 300))))
    applier.apply(decode_frames(frames(0, stored(OURS, 500))))  # seq back to 0: a restart
    assert applier.stats.resets == 1
    assert not applier.skip_tokens_for("p:1")
    assert applier.pods["p:1"].verify_next


def test_after_a_gap_the_next_message_carries_tokens() -> None:
    """An engine replaced behind the same address (another seed) whose stream we join late
    shows as a gap, not a restart: the message after the gap is verified, not the 64th."""
    pipeline = IngestPipeline(MemoryIndex(), OURS)
    applier = pipeline.appliers[0]
    for seq in range(4):
        pipeline.submit(frames(seq, stored(OURS, 100 * seq)))

    def mode() -> HashMode:
        return applier.pods["p:1"].mode

    assert mode() is HashMode.IDENTITY
    pipeline.submit(frames(500, stored(OTHER, 1000)))  # decoded without tokens: not checked
    assert applier.stats.gaps == 1 and mode() is HashMode.IDENTITY
    pipeline.submit(frames(501, stored(OTHER, 2000)))
    assert mode() is HashMode.DUAL
    assert applier.stats.hash_mismatches == 1


def test_skipping_tokens_leaves_the_same_index_on_a_real_capture() -> None:
    lines = (
        Path(__file__).resolve().parents[2]
        / "data/captures/vllm-0.32-sha256-pickle-default/frames.jsonl"
    ).read_text()
    captured = [
        [bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines.splitlines()
    ]
    states = []
    skipped: list[bool] = []
    for skip in (True, False):
        indexer = Indexer(Config.from_mapping({"hashing": {"block_size": 32}}))
        pipeline = IngestPipeline(indexer.index, indexer.scheme)
        applier = pipeline.appliers[0]
        decide = applier.skip_tokens_for

        def spy(pod: str, decide: object = decide, skip: bool = skip) -> bool:
            answer = skip and decide(pod)  # type: ignore[operator]
            skipped.append(bool(answer))
            return bool(answer)

        applier.skip_tokens_for = spy  # type: ignore[method-assign]
        for message in captured * 3:  # thrice: later rounds look like restarts, then skip
            pipeline.submit(message)
        stats = indexer.index.statistics()
        states.append((stats["keys"], stats["entries"], pipeline.statistics()["resets"]))
    assert states[0] == states[1]
    assert sum(skipped) > len(captured)  # most messages of the skipping run had no token ids


def test_key_runs_apply_exactly_like_the_events_they_come_from() -> None:
    """Identity pods' messages decode to key runs (RunsMessage); the index, the copies of
    blocks stored twice and every counter end as with the event path."""
    a, b, c = stored(OURS, 100), stored(OURS, 300, 3), stored(OURS, 700, 1)
    twice = BlockStored(
        a.block_hashes + a.block_hashes[:1], None, a.token_ids + a.token_ids[:BS], BS
    )
    cpu = msgspec.structs.replace(b, medium="CPU", group_idx=1)
    gone = [BlockRemoved([key], "GPU", 0) for key in a.block_hashes]
    stream: list[list[Event]] = [
        [c],  # carries tokens: verifies identity
        [twice, b, cpu, BlockStored([], None, [1] * BS, BS)],
        [*gone, c, *gone[:1]],  # the extra copy of a's first block outlives one removal
        [b, AllBlocksCleared(), c, BlockRemoved([c.block_hashes[0]], None, None)],
        [a, a, BlockRemoved(b.block_hashes, "cpu", 1)],
    ]
    results = []
    for runs in (True, False):
        index = MemoryIndex()
        applier = EventApplier(index, OURS)
        kinds = []
        for seq, events in enumerate(stream):
            message = decode_frames(frames(seq, *events), skip_tokens=seq > 0, runs=runs)
            kinds.append(type(message).__name__)
            applier.apply(message)
        held = {
            key: sorted(map(str, entries))
            for key in {*a.block_hashes, *b.block_hashes, *c.block_hashes}
            for entries in index.lookup([key])
        }
        stats = applier.stats
        copies = dict(applier.pods["p:1"].copies)
        results.append(
            (held, copies, stats.blocks_stored, stats.blocks_removed, stats.clears,
             dict(stats.events_applied), dict(stats.events_rejected))
        )  # fmt: skip
        assert kinds == (["Message"] + ["RunsMessage"] * 4 if runs else ["Message"] * 5)
    assert results[0] == results[1]
    assert results[0][1]  # copies were tracked on both paths
