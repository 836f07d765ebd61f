"""EventApplier: identity fast path, dual-key fallback, alarms, copies, tiers, sequence."""

from __future__ import annotations

import pytest

from kvcache.blocks import PodEntry
from kvcache.events import apply as apply_module
from kvcache.events.apply import EventApplier, HashMode
from kvcache.events.schema import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    Message,
    Rejection,
)
from kvcache.hashing import VllmScheme
from kvcache.index.memory import MemoryIndex
from kvcache.scoring import LongestPrefixScorer

BS = 16
OURS = VllmScheme("sha256_cbor", seed="42", block_size=BS)
ENGINE_OTHER_SEED = VllmScheme("sha256_cbor", seed="0", block_size=BS)
TOKENS = list(range(1000, 1000 + 8 * BS))


def message(seq: int, *events: Event, pod: str = "p", rank: int | None = 0) -> Message:
    return Message(pod=pod, model="m", seq=seq, batch=EventBatch(1.0, list(events), rank))


def stored(
    scheme: VllmScheme, tokens: list[int], start_block: int = 0, **fields: object
) -> BlockStored:
    """A BlockStored exactly as the engine would publish blocks start_block.. of tokens."""
    keys = scheme.block_keys(tokens)
    parent = keys[start_block - 1] if start_block else None
    return BlockStored(
        keys[start_block:],
        parent,
        tokens[start_block * BS :],
        BS,
        **fields,  # type: ignore[arg-type]
    )


def score(index: MemoryIndex, tokens: list[int], scheme: VllmScheme = OURS) -> dict[str, float]:
    return LongestPrefixScorer().score(index.lookup(scheme.block_keys(tokens)))


def mode(applier: EventApplier) -> HashMode:
    """The pod's mode, read fresh (a function call keeps type narrowing out of the way)."""
    return applier.pods["p"].mode


@pytest.fixture
def index() -> MemoryIndex:
    return MemoryIndex()


def test_identity_mode_indexes_published_hashes(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[: 4 * BS])))
    applier.apply(message(1, stored(OURS, TOKENS, start_block=4)))
    assert mode(applier) is HashMode.IDENTITY
    assert score(index, TOKENS) == {"p": 8.0}
    assert applier.stats.blocks_stored == 8
    assert index.statistics()["engine_keys"] == 0  # no engine -> request map in identity mode


def test_consecutive_stores_in_a_message_are_one_index_add(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[:BS])))  # verifies
    adds = index.statistics()["adds"]
    keys = OURS.block_keys(TOKENS)
    events = [
        BlockStored([keys[i]], keys[i - 1], TOKENS[i * BS : (i + 1) * BS], BS) for i in (1, 2, 3)
    ]
    applier.apply(message(1, *events))
    assert index.statistics()["adds"] == adds + 1
    assert score(index, TOKENS) == {"p": 4.0}


def test_block_whose_parent_was_never_seen_still_indexes_in_identity(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[:BS])))
    applier.apply(message(1, stored(OURS, TOKENS, start_block=5)))  # blocks 1-4 never seen
    keys = OURS.block_keys(TOKENS)
    assert len(index.lookup(keys[5:])) == 3


def test_mismatch_falls_back_to_dual_keys_and_names_the_real_scheme(index: MemoryIndex) -> None:
    alarms: list[tuple[str, str]] = []
    applier = EventApplier(index, OURS, on_alarm=lambda pod, text: alarms.append((pod, text)))
    applier.apply(message(0, stored(ENGINE_OTHER_SEED, TOKENS[: 4 * BS])))
    applier.apply(message(1, stored(ENGINE_OTHER_SEED, TOKENS, start_block=4)))
    state = applier.pods["p"]
    assert state.mode is HashMode.DUAL
    assert state.matched_scheme == "sha256_cbor with seed '0', block size 16"
    assert len(alarms) == 1 and "sha256_cbor with seed '0'" in alarms[0][1]
    assert applier.stats.hash_mismatches == 1
    # Request keys come from the tokens, chained across events through the parent.
    assert score(index, TOKENS) == {"p": 8.0}
    # Removal names the engine's hash; the mapped request key loses the entry.
    engine_keys = ENGINE_OTHER_SEED.block_keys(TOKENS)
    applier.apply(message(2, BlockRemoved([engine_keys[2]], "GPU", None)))
    assert score(index, TOKENS) == {"p": 2.0}


def test_dual_mode_parent_unknown_is_counted_not_miskeyed(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(ENGINE_OTHER_SEED, TOKENS[:BS])))
    applier.apply(message(1, stored(ENGINE_OTHER_SEED, TOKENS, start_block=5)))
    assert applier.stats.blocks_skipped == {"parent_unknown": 3}
    assert score(index, TOKENS) == {"p": 1.0}


def test_dual_mode_with_larger_canonical_block_size_maps_many_to_one(index: MemoryIndex) -> None:
    ours = VllmScheme("sha256_cbor", seed="42", block_size=2 * BS)
    engine = ENGINE_OTHER_SEED  # block size 16: two engine blocks per request block
    applier = EventApplier(index, ours)
    applier.apply(message(0, stored(engine, TOKENS)))
    assert mode(applier) is HashMode.DUAL
    assert score(index, TOKENS, ours) == {"p": 4.0}
    engine_keys = engine.block_keys(TOKENS)
    applier.apply(message(1, BlockRemoved([engine_keys[5]], "GPU", None)))  # half of block 2
    assert score(index, TOKENS, ours) == {"p": 2.0}


def test_lora_events_are_never_used_to_verify(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    lora = stored(ENGINE_OTHER_SEED, TOKENS[:BS], lora_name="adapter")
    applier.apply(message(0, lora))
    assert mode(applier) is HashMode.UNVERIFIED
    applier.apply(message(1, stored(OURS, TOKENS[: 2 * BS])))
    assert mode(applier) is HashMode.IDENTITY
    assert applier.stats.hash_mismatches == 0


def test_sampled_reverification_catches_a_changed_hash_space(
    index: MemoryIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply_module, "REVERIFY_EVERY", 2)
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[:BS])))
    assert mode(applier) is HashMode.IDENTITY
    applier.apply(message(1, stored(ENGINE_OTHER_SEED, TOKENS[:BS])))  # second checkable: checked
    assert mode(applier) is HashMode.DUAL


def test_store_without_tokens_adds_a_tier_to_known_blocks(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[: 2 * BS])))
    keys = OURS.block_keys(TOKENS[: 2 * BS])
    applier.apply(message(1, BlockStored(keys, None, [], 0, medium="CPU")))
    applier.apply(message(2, BlockRemoved(keys, "GPU", None)))
    assert index.lookup(keys) == [frozenset({PodEntry("p", "cpu")})] * 2
    assert score(index, TOKENS[: 2 * BS]) == {"p": 1.6}


def test_second_copy_survives_the_first_removal(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    event = stored(OURS, TOKENS[:BS])
    applier.apply(message(0, event))
    applier.apply(message(1, event, event))  # stored again, twice in one message
    key = event.block_hashes[0]
    for seq in (2, 3):
        applier.apply(message(seq, BlockRemoved([key], "GPU", None)))
        assert index.lookup([key]) != []
    applier.apply(message(4, BlockRemoved([key], "GPU", None)))
    assert index.lookup([key]) == []
    applier.apply(message(5, BlockRemoved([key], "GPU", None)))  # duplicate removal: harmless


def test_dual_mode_stores_of_one_message_are_one_add_and_keep_copies(
    index: MemoryIndex,
) -> None:
    """Dual-mode stores of a message are applied together: a parent stored earlier in the same
    message still resolves, and a block stored twice (in the message, or again later) keeps a
    copy that outlives one removal, exactly as when each store was its own message."""
    first, rest = (
        stored(ENGINE_OTHER_SEED, TOKENS[: 3 * BS]),
        stored(ENGINE_OTHER_SEED, TOKENS, start_block=3),
    )
    engine_keys = ENGINE_OTHER_SEED.block_keys(TOKENS)
    adds: list[int] = []
    add = index.add

    def counting_add(*args: object, **kwargs: object) -> list[int]:
        adds.append(len(args[1]))  # type: ignore[arg-type]
        return add(*args, **kwargs)  # type: ignore[arg-type]

    index.add = counting_add  # type: ignore[method-assign]
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(ENGINE_OTHER_SEED, TOKENS[:BS])))  # verified: dual
    assert mode(applier) is HashMode.DUAL
    adds.clear()
    applier.apply(message(1, first, rest, first))  # `rest`'s parent is in `first`
    assert adds == [3 + 5 + 3]
    assert applier.stats.blocks_skipped == {}
    assert score(index, TOKENS) == {"p": 8.0}
    for seq in (2, 3):  # block 0 was stored three times, block 1 twice
        applier.apply(message(seq, BlockRemoved([engine_keys[1]], "GPU", None)))
        assert score(index, TOKENS) == {"p": 8.0 if seq == 2 else 1.0}
    applier.apply(message(4, BlockRemoved([engine_keys[0]], "GPU", None)))
    applier.apply(message(5, BlockRemoved([engine_keys[0]], "GPU", None)))
    assert score(index, TOKENS) == {"p": 1.0}
    applier.apply(message(6, BlockRemoved([engine_keys[0]], "GPU", None)))
    assert score(index, TOKENS) == {}


def test_group_and_medium_make_the_entry(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[:BS], medium="GPU", group_idx=1)))
    key = OURS.block_keys(TOKENS[:BS])
    assert index.lookup(key) == [frozenset({PodEntry("p", "gpu", False, 1)})]
    applier.apply(message(1, BlockRemoved(key, "GPU", 0)))  # other group: nothing removed
    assert index.lookup(key) != []
    applier.apply(message(2, BlockRemoved(key, "GPU", 1)))
    assert index.lookup(key) == []


def test_dp_rank_is_part_of_the_pod_when_configured(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS, dp_rank_in_pod_id=True)
    applier.apply(message(0, stored(OURS, TOKENS[:BS]), rank=1))
    applier.apply(message(0, stored(OURS, TOKENS[: 2 * BS]), rank=0))
    assert score(index, TOKENS) == {"p@dp0": 2.0, "p@dp1": 1.0}
    # Ranks are separate streams: rank 0 starting at seq 0 is no restart of rank 1.
    assert applier.stats.resets == 0


def test_restart_clears_and_gap_counts(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    applier.apply(message(0, stored(OURS, TOKENS[:BS])))
    applier.apply(message(4, stored(OURS, TOKENS[: 2 * BS], start_block=1)))
    assert applier.stats.gaps == 1
    assert score(index, TOKENS) == {"p": 2.0}
    applier.apply(message(0, AllBlocksCleared()))  # seq back to 0: a new engine process
    assert applier.stats.resets == 1
    assert score(index, TOKENS) == {}


def test_bad_events_are_counted_and_the_rest_applies(index: MemoryIndex) -> None:
    applier = EventApplier(index, OURS)
    good = stored(OURS, TOKENS[:BS])
    huge = BlockStored([5], None, [2**40] * BS, BS)  # decodes, but no engine has such a token
    batch = EventBatch(1.0, [huge, good], 0, [Rejection(2, "bad_token_ids", "not a list")])
    applier.apply(Message("p", "m", 0, batch))
    assert applier.stats.events_rejected == {"bad_token_ids": 1, "unapplicable": 1}
    assert score(index, TOKENS[:BS]) == {"p": 1.0}


def test_a_batch_delivered_twice_is_skipped_not_taken_for_a_restart() -> None:
    from kvcache.events.sequence import SequenceTracker, SeqVerdict

    tracker = SequenceTracker()
    assert tracker.observe("p", 0, 0, 1.0) is SeqVerdict.FIRST
    assert tracker.observe("p", 0, 0, 1.0) is SeqVerdict.DUPLICATE
    assert tracker.observe("p", 0, 1, 2.0) is SeqVerdict.NEXT
    assert tracker.observe("p", 0, 1, 2.0) is SeqVerdict.DUPLICATE
    # the same number with a new timestamp is a restarted engine
    assert tracker.observe("p", 0, 1, 9.0) is SeqVerdict.RESET
    assert tracker.observe("p", 0, 0, 9.5) is SeqVerdict.RESET
    assert tracker.streams[("p", 0)].duplicates == 2
