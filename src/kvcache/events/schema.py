"""KV-event data model: the decoded events we hand on, and the msgspec structs that read the wire.

* **Decoded model** (public): `BlockStored`, `BlockRemoved`, `AllBlocksCleared`, `EventBatch`,
  `Message` and the rejection records. Hashes are unsigned 64-bit ints whatever the wire
  carried, and the wire form (array or map, engine version) no longer shows.
* The three event classes double as the **map-form wire structs** (``{"type": tag, ...}``,
  vLLM >= 0.24 and SGLang >= 0.5.20): an event whose hashes are already u64 decodes straight
  into them, with every type and range check done by msgspec in C and no conversion step.
* **Wire structs** for everything else: hashes as ``int | bytes`` (int64 from SGLang and the
  builtin-hash era, raw digests with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``), read by name
  or positionally (``array_like``: vLLM <= 0.23, SGLang <= 0.5.19). Fields were only ever
  appended, so one positional order covers every array-era release; fields a release does not
  send default to ``None``. They are decode-only: vLLM writes required fields even when nil,
  these structs do not.

All structs are frozen and ``gc=False``: they hold no reference cycles, and skipping GC tracking
is measurably cheaper on the ingest path.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, TypeAlias

import msgspec

__all__ = [
    "ALL_BLOCKS_CLEARED_TAG",
    "BAD_BATCH",
    "BAD_DELIMITER",
    "BAD_EVENT",
    "BAD_HASH",
    "BAD_PAYLOAD",
    "BAD_SEQ",
    "BAD_TOPIC",
    "BLOCK_REMOVED_FIELDS",
    "BLOCK_REMOVED_TAG",
    "BLOCK_STORED_FIELDS",
    "BLOCK_STORED_TAG",
    "EVENT_REJECT_REASONS",
    "FRAME_COUNT",
    "FRAME_REJECT_REASONS",
    "REPLAY_END_SEQ",
    "TOKENS_OMITTED",
    "UNKNOWN_TYPE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Event",
    "EventBatch",
    "FrameRejection",
    "Message",
    "Rejection",
    "ReplayEnd",
]

BLOCK_STORED_TAG: Final = "BlockStored"
BLOCK_REMOVED_TAG: Final = "BlockRemoved"
ALL_BLOCKS_CLEARED_TAG: Final = "AllBlocksCleared"

REPLAY_END_SEQ: Final = (1 << 64) - 1
"""Sequence number of the replay end marker (−1 as a signed 8-byte value)."""

BLOCK_STORED_FIELDS: Final = (
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
    "cache_salt",
)
"""BlockStored fields in wire order (array position = index + 1, after the tag).

The first 15 follow vLLM 0.33. ``cache_salt`` is SGLang-only and only ever sent in map form;
it sits last so that it can never shadow a vLLM position.
"""

BLOCK_REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx", "locality", "ownership")
"""BlockRemoved fields in wire order (vLLM 0.33; SGLang sends the first two)."""

# Frame-level rejection reasons (`FrameRejection.reason`).
FRAME_COUNT: Final = "frame_count"
BAD_SEQ: Final = "bad_seq"
BAD_TOPIC: Final = "bad_topic"
BAD_DELIMITER: Final = "bad_delimiter"
BAD_PAYLOAD: Final = "bad_payload"
BAD_BATCH: Final = "bad_batch"
FRAME_REJECT_REASONS: Final = frozenset(
    {FRAME_COUNT, BAD_SEQ, BAD_TOPIC, BAD_DELIMITER, BAD_PAYLOAD, BAD_BATCH}
)

# Event-level rejection reasons (`Rejection.reason`); plus one "bad_<field>" per field.
UNKNOWN_TYPE: Final = "unknown_type"
BAD_EVENT: Final = "bad_event"
BAD_HASH: Final = "bad_hash"
EVENT_REJECT_REASONS: Final = frozenset(
    {UNKNOWN_TYPE, BAD_EVENT, BAD_HASH}
    | {f"bad_{name}" for name in BLOCK_STORED_FIELDS + BLOCK_REMOVED_FIELDS}
)
"""Every value `Rejection.reason` can take (a closed set, safe as a metric label)."""

# --------------------------------------------------------------------------------------------
# Decoded model
# --------------------------------------------------------------------------------------------

# msgpack ints never exceed 2**64 - 1, so ge=0 is all it takes to pin a value to u64.
_UInt: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
# A hash on the wire: u64 (vLLM >= 0.10.2 default), int64 (builtin-hash era, SGLang) or the raw
# digest (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
_WireHash: TypeAlias = int | bytes


class BlockStored(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag=BLOCK_STORED_TAG):
    """Blocks that entered a pod's prefix cache.

    ``block_hashes`` and ``parent_block_hash`` are u64 keys whatever the wire carried (u64,
    int64 or digest bytes). ``token_ids`` spans all blocks of the event; do not assume it is
    ``len(block_hashes) * block_size`` long (sliding-window groups skip hashes, offload
    placeholders carry no tokens). Like the other event classes it is also the map-form wire
    struct: msgspec encodes it as ``{"type": "BlockStored", ...}``.
    """

    block_hashes: list[_UInt]
    parent_block_hash: _UInt | None
    token_ids: list[_UInt]
    block_size: _UInt
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: _UInt | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[_UInt]] | None = None
    cache_salt: str | None = None


TOKENS_OMITTED: Final[list[int]] = []
"""The ``token_ids`` of a `BlockStored` whose token ids the decoder was asked to skip
(``decode_frames(..., skip_tokens=True)``: the ingest pipeline does it for pods in identity mode,
whose keys need no tokens). Compare by identity (``is``); never mutate it. An event that
carried no token ids on the wire keeps an ordinary empty list."""


class BlockRemoved(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag=BLOCK_REMOVED_TAG):
    """Blocks evicted from a pod, in eviction order.

    vLLM sends one hash per event. The decoder may fold a run of consecutive removals with
    equal ``medium``, ``group_idx``, ``locality`` and ``ownership`` into one event whose
    ``block_hashes`` concatenate theirs in order (see `EventBatch.merged`): for an index it is
    the same sequence of evictions.
    """

    block_hashes: list[_UInt]
    medium: str | None = None
    group_idx: _UInt | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(
    msgspec.Struct, frozen=True, gc=False, tag_field="type", tag=ALL_BLOCKS_CLEARED_TAG
):
    """The pod reset its whole prefix cache."""


Event: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """One event of a batch that was skipped; the rest of the batch still applies."""

    index: int
    """Position of the event in the batch's event list."""
    reason: str
    """One of `EVENT_REJECT_REASONS`."""
    detail: str
    """Human-readable, bounded in length (safe to log)."""


class EventBatch(msgspec.Struct, frozen=True, gc=False):
    """One engine step's worth of events, in publish order.

    Consecutive `BlockRemoved` events of one medium, group, locality and ownership may arrive
    merged into one (the decoder's compiled fast path does it); ``merged`` counts the wire
    events folded away, so ``len(events) + merged + len(rejected)`` is the number the engine
    sent.
    """

    ts: float
    events: list[Event]
    dp_rank: int | None = None
    """Data-parallel rank; ``None`` when the batch does not carry one (vLLM 0.9.0)."""
    rejected: list[Rejection] = msgspec.field(default_factory=list)
    merged: int = 0
    """Wire BlockRemoved events folded into the one before them (0 when nothing was merged)."""


class Message(msgspec.Struct, frozen=True, gc=False):
    """A decoded ZMQ message: who sent it, its sequence number and its batch."""

    pod: str
    model: str | None
    seq: int
    batch: EventBatch


STORE_RUN: Final = 0
REMOVE_RUN: Final = 1
CLEAR: Final = 2

KeyRun: TypeAlias = tuple[int, str | None, int | None, bytes | None, bool]
"""``(kind, medium, group_idx, keys, repeats)``: `STORE_RUN` / `REMOVE_RUN` with the run's
keys as native-endian u64 bytes and whether a stored key occurs twice; `CLEAR` with
``(None, None, None, False)``."""


class RunsMessage(msgspec.Struct, frozen=True, gc=False):
    """A message of a pod in identity mode as the applier needs it: runs of keys, no events.

    The decoder's compiled fast path makes these (``decode_frames(..., runs=True)``) when the
    pod's hashes are already known to be its index keys: consecutive BlockStored events of one
    medium and group become one run of keys to add, consecutive BlockRemoved events one run to
    evict. Nothing about the batch is lost that identity mode uses; everything else in it was
    validated exactly as for a `Message`.
    """

    pod: str
    model: str | None
    seq: int
    ts: float
    dp_rank: int | None
    runs: list[KeyRun]
    stored_events: int
    """BlockStored events in the batch (those without hashes included)."""
    removed_events: int


class FrameRejection(msgspec.Struct, frozen=True, gc=False):
    """A whole message that could not be decoded.

    ``pod``, ``model`` and ``seq`` are filled in as far as they were parsed, so that the caller
    can log with context and keep sequence tracking going past an undecodable payload.
    """

    reason: str
    """One of `FRAME_REJECT_REASONS`."""
    detail: str
    pod: str | None = None
    model: str | None = None
    seq: int | None = None


class ReplayEnd(msgspec.Struct, frozen=True, gc=False):
    """The end marker of a replay reply stream."""


# --------------------------------------------------------------------------------------------
# Wire structs (decode side)
# --------------------------------------------------------------------------------------------


class _StoredFields(msgspec.Struct, frozen=True, gc=False):
    # Required set = what every release since vLLM 0.9.0 / SGLang 0.4.6 sends. lora_id is also
    # always sent, but nothing downstream depends on it, so a missing one is not worth a drop.
    block_hashes: list[_WireHash]
    parent_block_hash: _WireHash | None
    token_ids: list[_UInt]
    block_size: _UInt
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: _UInt | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[_UInt]] | None = None
    cache_salt: str | None = None


class _RemovedFields(msgspec.Struct, frozen=True, gc=False):
    block_hashes: list[_WireHash]
    medium: str | None = None
    group_idx: _UInt | None = None
    locality: str | None = None
    ownership: str | None = None


class _ClearedFields(msgspec.Struct, frozen=True, gc=False):
    pass


# Array form: [tag, field1, field2, ...]; trailing positions we do not know are ignored.
class WireArrayBlockStored(_StoredFields, frozen=True, array_like=True, tag=BLOCK_STORED_TAG):
    """BlockStored as ``[tag, block_hashes, parent_block_hash, ...]``."""


class WireArrayBlockRemoved(_RemovedFields, frozen=True, array_like=True, tag=BLOCK_REMOVED_TAG):
    """BlockRemoved as ``[tag, block_hashes, medium, ...]``."""


class WireArrayAllBlocksCleared(
    _ClearedFields, frozen=True, array_like=True, tag=ALL_BLOCKS_CLEARED_TAG
):
    """AllBlocksCleared as ``[tag]`` (anything after the tag is ignored)."""


# Map form: {"type": tag, field: value, ...}; unknown keys are ignored.
class WireMapBlockStored(_StoredFields, frozen=True, tag_field="type", tag=BLOCK_STORED_TAG):
    """BlockStored as ``{"type": "BlockStored", ...}``."""


class WireMapBlockRemoved(_RemovedFields, frozen=True, tag_field="type", tag=BLOCK_REMOVED_TAG):
    """BlockRemoved as ``{"type": "BlockRemoved", ...}``."""


class WireMapAllBlocksCleared(
    _ClearedFields, frozen=True, tag_field="type", tag=ALL_BLOCKS_CLEARED_TAG
):
    """AllBlocksCleared as ``{"type": "AllBlocksCleared"}``."""


WireArrayEvent: TypeAlias = WireArrayBlockStored | WireArrayBlockRemoved | WireArrayAllBlocksCleared
WireMapEvent: TypeAlias = WireMapBlockStored | WireMapBlockRemoved | WireMapAllBlocksCleared
WireStored: TypeAlias = WireArrayBlockStored | WireMapBlockStored
WireRemoved: TypeAlias = WireArrayBlockRemoved | WireMapBlockRemoved


class WireBatchRawEvents(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """``[ts, events, dp_rank?]`` with events left undecoded, for per-event isolation."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: _UInt | None = None


class WireMapBatchRawEvents(msgspec.Struct, frozen=True, gc=False):
    """A map-shaped batch (an unreleased vLLM variant drops ``array_like`` from EventBatch).

    ``attn_dp_rank`` is SGLang's name for the same field, accepted in case SGLang follows.
    """

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: _UInt | None = None
    attn_dp_rank: _UInt | None = None


class WireBatchModelEvents(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Fastest path: map-form events with u64 hashes, decoded straight into the model."""

    ts: float
    events: list[Event]
    data_parallel_rank: _UInt | None = None


class WireBatchMapEvents(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Whole-batch path for map-form events with int64 or bytes hashes."""

    ts: float
    events: list[WireMapEvent]
    data_parallel_rank: _UInt | None = None


class WireBatchArrayEvents(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Whole-batch path for array-form events (vLLM <= 0.23, SGLang <= 0.5.19)."""

    ts: float
    events: list[WireArrayEvent]
    data_parallel_rank: _UInt | None = None
