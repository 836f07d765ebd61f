"""The compiled decoder fast path against msgspec's paths on generated vLLM map-form batches.

Valid batches must decode to the model the generator states, with consecutive removals of equal
(medium, group_idx, locality, ownership) merged; anything mutated must decode exactly as the
msgspec paths decode it, merged or not, and never raise. The identity-mode scan into key runs
(`RunsMessage`) must say what the msgspec decode of the same payload means to an identity-mode
applier, and take only payloads that decode whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from kvcache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    FrameRejection,
    Message,
    decode_frames,
    decode_payload,
)
from kvcache.events import decode as decode_module
from kvcache.events._fastdecode import scan, scan_runs
from kvcache.events.schema import STORE_RUN, RunsMessage
from kvcache.testing.events import identity_runs, join_runs, merge_removals

U64 = (1 << 64) - 1
SETTINGS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
ABSENT: Any = object()  # a field left out of the map


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    previous = decode_module.set_fast_path(enabled)
    try:
        yield
    finally:
        decode_module.set_fast_path(previous)


def decode_both(payload: bytes) -> tuple[EventBatch | FrameRejection, EventBatch | FrameRejection]:
    with fast_path(True):
        fast = decode_payload(payload)
    with fast_path(False):
        slow = decode_payload(payload)
    return fast, slow


# --- generated valid batches -----------------------------------------------------------------

u64s = st.integers(0, U64)
# Token ids across every msgpack int width, mostly vocabulary-sized.
tokens = st.integers(0, 300_000) | st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, U64])
small_str = st.text(max_size=6)
# A handful of values each, so that consecutive removals often share all four.
mediums = st.sampled_from([ABSENT, None, "GPU", "CPU"])
groups = st.sampled_from([ABSENT, None, 0, 1])
localities = st.sampled_from([ABSENT, ABSENT, None, "local"])
ownerships = st.sampled_from([ABSENT, ABSENT, None, "shared"])
unknown_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats()
    | small_str
    | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(small_str, inner, max_size=3),
    max_leaves=8,
)


def present(value: Any) -> Any:
    return None if value is ABSENT else value


@st.composite
def wire_map(draw: st.DrawFn, fields: dict[str, Any]) -> dict[str, Any]:
    """The map as an engine might send it: fields absent, reordered, unknown keys added."""
    items = [(name, value) for name, value in fields.items() if value is not ABSENT]
    if draw(st.integers(0, 4)) == 0:
        items = draw(st.permutations(items))
    if draw(st.integers(0, 5)) == 0:
        extra = draw(st.dictionaries(small_str.map(lambda s: "x_" + s), unknown_values, max_size=2))
        items += list(extra.items())
    return dict(items)


@st.composite
def removed_event(draw: st.DrawFn) -> tuple[dict[str, Any], Event]:
    hashes = draw(st.lists(u64s, min_size=0, max_size=3))
    if draw(st.booleans()):  # as vLLM sends them: most neighbours merge
        medium, group, locality, ownership = "GPU", 0, ABSENT, ABSENT
    else:
        medium, group = draw(mediums), draw(groups)
        locality, ownership = draw(localities), draw(ownerships)
    fields = {
        "type": "BlockRemoved",
        "block_hashes": hashes,
        "medium": medium,
        "group_idx": group,
        "locality": locality,
        "ownership": ownership,
    }
    model = BlockRemoved(
        hashes, present(medium), present(group), present(locality), present(ownership)
    )
    return draw(wire_map(fields)), model


@st.composite
def stored_event(draw: st.DrawFn) -> tuple[dict[str, Any], Event]:
    optional: dict[str, st.SearchStrategy[Any]] = {
        "lora_id": st.none() | st.integers(-5, 5),
        "medium": st.none() | st.sampled_from(["GPU", "CPU"]),
        "lora_name": st.none() | small_str,
        "extra_keys": st.none() | st.lists(st.none() | st.lists(small_str, max_size=2), max_size=3),
        "group_idx": st.none() | st.integers(0, 3),
        "kv_cache_spec_kind": st.none() | small_str,
        "kv_cache_spec_sliding_window": st.none() | st.integers(0, 4096),
        "locality": st.none() | small_str,
        "ownership": st.none() | small_str,
        "session_id": st.none() | small_str,
        "lookahead_token_ids": st.none() | st.lists(st.lists(tokens, max_size=3), max_size=2),
        "cache_salt": st.none() | small_str,
    }
    fields: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": draw(st.lists(u64s, max_size=4)),
        "parent_block_hash": draw(st.none() | u64s),
        "token_ids": draw(st.lists(tokens, max_size=40)),
        "block_size": draw(st.integers(0, 64)),
    }
    for name, strategy in optional.items():
        fields[name] = draw(strategy) if draw(st.booleans()) else ABSENT
    model = BlockStored(**{k: present(v) for k, v in fields.items() if k != "type"})
    return draw(wire_map(fields)), model


@st.composite
def cleared_event(draw: st.DrawFn) -> tuple[dict[str, Any], Event]:
    return draw(wire_map({"type": "AllBlocksCleared"})), AllBlocksCleared()


event_lists = st.lists(
    st.one_of(removed_event(), removed_event(), stored_event(), cleared_event()), max_size=12
)


@st.composite
def valid_batches(draw: st.DrawFn) -> tuple[bytes, list[Event], float, int | None]:
    pairs = draw(event_lists)
    ts = draw(st.floats(allow_nan=False))
    wire = [w for w, _ in pairs]
    if draw(st.booleans()):
        rank = draw(st.none() | st.integers(0, U64))
        payload = msgspec.msgpack.encode([ts, wire, rank])
    else:
        rank = None
        payload = msgspec.msgpack.encode([ts, wire])
    return payload, [m for _, m in pairs], ts, rank


@SETTINGS
@given(valid_batches())
def test_valid_batches_decode_to_the_stated_model_with_removals_merged(
    batch: tuple[bytes, list[Event], float, int | None],
) -> None:
    payload, expected, ts, rank = batch
    assert scan(payload) is not None
    fast, slow = decode_both(payload)
    assert isinstance(fast, EventBatch) and isinstance(slow, EventBatch)
    assert slow.events == expected and slow.merged == 0
    assert (fast.events, fast.merged) == merge_removals(expected)
    assert (fast.ts, fast.dp_rank, fast.rejected) == (ts, rank, [])
    assert len(fast.events) + fast.merged == len(expected)
    target(fast.merged)  # steer towards long merged runs


# --- mutated batches -------------------------------------------------------------------------


def same_up_to_merging(
    fast: EventBatch | FrameRejection, slow: EventBatch | FrameRejection
) -> bool:
    if fast == slow:
        return True  # the scan refused: the msgspec paths decided alone
    if not (isinstance(fast, EventBatch) and isinstance(slow, EventBatch)):
        return False
    if slow.rejected or fast.rejected:
        return False  # the scan only ever takes batches msgspec decodes whole
    same_floats = fast.ts == slow.ts or (fast.ts != fast.ts and slow.ts != slow.ts)  # NaN
    return (
        same_floats
        and fast.dp_rank == slow.dp_rank
        and (fast.events, fast.merged) == merge_removals(slow.events)
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    payload, _, _, _ = draw(valid_batches())
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif data:
            del data[at : at + draw(st.integers(1, 9))]
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_batches_decode_as_the_msgspec_paths_decode_them(payload: bytes) -> None:
    fast, slow = decode_both(payload)
    assert same_up_to_merging(fast, slow), (fast, slow)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_after_a_standard_header(tail: bytes) -> None:
    for payload in (tail, b"\x93\xcb" + bytes(8) + tail, b"\x93\xcb" + bytes(8) + b"\x91" + tail):
        scan(payload)  # must not crash or read out of bounds
        fast, slow = decode_both(payload)
        assert same_up_to_merging(fast, slow), (fast, slow)


# --- identity mode: key runs -------------------------------------------------------------------


def decode_runs_both(
    payload: bytes,
) -> tuple[Message | RunsMessage | FrameRejection, Message | FrameRejection]:
    frames = [b"kv@10.0.0.1:8000@m", (7).to_bytes(8, "big"), payload]
    with fast_path(True):
        fast = decode_frames(frames, skip_tokens=True, runs=True)
    with fast_path(False):
        slow = decode_frames(frames)
    return fast, slow


def assert_runs_mean_the_batch(fast: RunsMessage, slow: Message | FrameRejection) -> None:
    assert isinstance(slow, Message) and not slow.batch.rejected, slow
    events = slow.batch.events
    assert all(e.token_ids for e in events if isinstance(e, BlockStored))
    runs = [(kind, medium, group, run_keys(keys)) for kind, medium, group, keys, _ in fast.runs]
    assert join_runs(runs) == identity_runs(events)
    for kind, keys, repeats in runs_with_keys(fast):
        if kind == STORE_RUN:
            assert repeats == (len(set(keys)) != len(keys))
    assert fast.stored_events == sum(isinstance(e, BlockStored) for e in events)
    assert fast.removed_events == sum(isinstance(e, BlockRemoved) for e in events)
    ts = slow.batch.ts
    assert fast.ts == ts or (math.isnan(fast.ts) and math.isnan(ts))
    assert (fast.pod, fast.model, fast.seq, fast.dp_rank) == (
        slow.pod,
        slow.model,
        slow.seq,
        slow.batch.dp_rank,
    )


def run_keys(keys: bytes | None) -> list[int]:
    """A run's keys (native u64 bytes) as ints; a clear has none."""
    return np.frombuffer(keys, np.uint64).tolist() if keys else []


def runs_with_keys(message: RunsMessage) -> list[tuple[int, list[int], bool]]:
    return [(kind, run_keys(keys), repeats) for kind, _, _, keys, repeats in message.runs]


def assert_like_the_event_path(
    payload: bytes, fast: Message | RunsMessage | FrameRejection
) -> None:
    """A payload the runs scan refused decodes exactly as without it."""
    frames = [b"kv@10.0.0.1:8000@m", (7).to_bytes(8, "big"), payload]
    with fast_path(True):
        assert fast == decode_frames(frames, skip_tokens=True)


@SETTINGS
@given(valid_batches())
def test_valid_batches_become_key_runs_when_every_store_carries_tokens(
    batch: tuple[bytes, list[Event], float, int | None],
) -> None:
    payload, expected, _, _ = batch
    fast, slow = decode_runs_both(payload)
    tokens_everywhere = all(e.token_ids for e in expected if isinstance(e, BlockStored))
    assert isinstance(fast, RunsMessage) == tokens_everywhere
    if isinstance(fast, RunsMessage):
        assert_runs_mean_the_batch(fast, slow)
        target(float(len(fast.runs)))
    else:
        assert_like_the_event_path(payload, fast)


@SETTINGS
@given(mutated())
def test_mutated_batches_become_key_runs_only_when_they_decode_whole(payload: bytes) -> None:
    fast, slow = decode_runs_both(payload)
    if isinstance(fast, RunsMessage):
        assert_runs_mean_the_batch(fast, slow)
    else:
        assert_like_the_event_path(payload, fast)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_become_key_runs_they_do_not_mean(tail: bytes) -> None:
    for payload in (tail, b"\x93\xcb" + bytes(8) + tail, b"\x93\xcb" + bytes(8) + b"\x91" + tail):
        scan_runs(payload)  # must not crash or read out of bounds
        fast, slow = decode_runs_both(payload)
        if isinstance(fast, RunsMessage):
            assert_runs_mean_the_batch(fast, slow)
        else:
            assert_like_the_event_path(payload, fast)


def test_repeated_stored_keys_are_flagged_per_run() -> None:
    def stored(hashes: list[int]) -> dict[str, Any]:
        return {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": [1] * 16 * len(hashes),
            "block_size": 16,
        }

    removed = {"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU"}
    payload = msgspec.msgpack.encode(
        [1.0, [stored([0, 5]), stored([0]), removed, stored([7, 8]), stored([9, 2**64 - 1])], 0]
    )
    fast, slow = decode_runs_both(payload)
    assert isinstance(fast, RunsMessage)
    assert_runs_mean_the_batch(fast, slow)
    assert [(kind, keys, repeats) for kind, keys, repeats in runs_with_keys(fast)] == [
        (0, [0, 5, 0], True),  # key 0 twice: the zero key is tracked apart from free slots
        (1, [5], False),
        (0, [7, 8, 9, 2**64 - 1], False),
    ]
    many = [*range(1, 3000), 1500]  # past the scan's on-stack set
    payload = msgspec.msgpack.encode([1.0, [stored(many)], 0])
    fast, _ = decode_runs_both(payload)
    assert isinstance(fast, RunsMessage) and fast.runs[0][4] is True
