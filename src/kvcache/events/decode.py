"""ZMQ frames -> decoded KV-event batches, for every vLLM (0.9 - 0.33) and SGLang wire layout.

Nothing here raises on bad input: a frame problem yields a `FrameRejection`, a bad event a
`Rejection` inside an otherwise applied `EventBatch`.

A payload goes down the first of these paths that accepts it; each later one costs one more
decode attempt:

0. **Compiled scan** (`kvcache.events._fastdecode`, when built; `set_fast_path` turns it off).
   For the common vLLM >= 0.24 layout (map events, u64 hashes, float ts) a C scan of the
   payload reads the BlockRemoved events and the token ids itself, and leaves the rest of the
   BlockStored events to one msgspec call. Token ids are most of a batch: the scan takes them
   from a cache of int objects instead of allocating ~1,500 fresh ones per batch. It also
   **merges** consecutive BlockRemoved events with equal medium, group_idx, locality and
   ownership into one event whose hashes concatenate theirs in order (vLLM sends one event per
   evicted block, so the applier's loop sees one event instead of ~50); `EventBatch.merged`
   counts the events folded away. For an index the merged batch means the same evictions in
   the same order. Anything the scan is not sure msgspec would decode the same way (other hash
   forms, duplicate fields, unknown tags...) falls through to path 1.
   For a pod in identity mode (``decode_frames(..., skip_tokens=..., runs=True)``, which the
   ingest pipeline asks for) a sibling scan goes further: its hashes are the index keys, so
   the batch becomes a `RunsMessage`, runs of keys to add and to remove as native u64 bytes,
   with no event objects and no Python int per key. The stored events, stripped of hashes and
   tokens, still go through msgspec, so a payload is taken only when every event would decode.
1. **Direct.** A peek at the standard header (``[ts float64, [event, ...], rank]``) says the
   events are maps: decode the batch straight into the model classes. This is every vLLM >= 0.24
   batch with the default u64 hashes, and needs no Python per event at all.
2. **Whole batch, converting.** Map events with int64 or bytes hashes (SGLang, raw digests) and
   array events (vLLM <= 0.23, SGLang <= 0.5.19) decode into wire structs that accept any hash
   form; a short Python step normalises hashes to u64 and builds the model.
3. **Per event.** When 1 and 2 fail (a bad event, a map-shaped batch, mixed forms): the batch
   is decoded with its events left as `msgspec.Raw`, and each event on its own. A failing event
   is then diagnosed (`kvcache.events.diagnose`) to name the offending field; the others are
   kept.

All paths share the struct definitions and the hash conversion, so a valid event decodes to the
same value whichever path it takes, up to the merging of removals on path 0 (property tests
check both).

Topic convention ``kv@<pod>@<model>``: after the ``kv@`` prefix the pod id runs to the first
``@`` and the model is everything after it. Pod ids such as ``10.0.0.7:8000`` never contain
``@``, while model names may (``org/model@rev``); upstream splits on every ``@`` and loses such
topics. Any other topic (including vLLM's default ``""``) is used whole as the pod id, with no
model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, TypeAlias, cast, overload

import msgspec

from kvcache.blocks import U64_MASK
from kvcache.errors import ConfigError, InvalidBlockHashError
from kvcache.events.diagnose import clip, diagnose
from kvcache.events.schema import (
    BAD_BATCH,
    BAD_DELIMITER,
    BAD_HASH,
    BAD_PAYLOAD,
    BAD_SEQ,
    BAD_TOPIC,
    FRAME_COUNT,
    REPLAY_END_SEQ,
    TOKENS_OMITTED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    FrameRejection,
    Message,
    Rejection,
    ReplayEnd,
    RunsMessage,
    WireArrayAllBlocksCleared,
    WireArrayBlockRemoved,
    WireArrayBlockStored,
    WireArrayEvent,
    WireBatchArrayEvents,
    WireBatchMapEvents,
    WireBatchModelEvents,
    WireBatchRawEvents,
    WireMapAllBlocksCleared,
    WireMapBatchRawEvents,
    WireMapBlockRemoved,
    WireMapBlockStored,
    WireMapEvent,
)

try:
    from kvcache.events import _fastdecode
except ImportError:  # built without a C compiler: the msgspec paths serve alone
    _fastdecode = None  # type: ignore[assignment]

__all__ = [
    "FAST_PATH_AVAILABLE",
    "BytesLike",
    "decode_frames",
    "decode_payload",
    "decode_replay_frames",
    "fast_path_enabled",
    "hash_to_u64",
    "parse_topic",
    "set_fast_path",
]

FAST_PATH_AVAILABLE: Final = _fastdecode is not None
"""Whether the compiled decoder fast path was built (see `set_fast_path`)."""

BytesLike: TypeAlias = bytes | bytearray | memoryview

_INT64_MIN: Final = -(1 << 63)
_TOPIC_PREFIX: Final = "kv@"
_SEQ_LEN: Final = 8
_TOPIC_CACHE_LIMIT: Final = 1024
_FORM_UNKNOWN: Final = 0
_FORM_MAP: Final = 1
_FORM_ARRAY: Final = 2

# Everything msgspec (or a hostile payload) can throw at a decode call. RecursionError covers
# payloads nested deeper than the interpreter allows.
_DECODE_ERRORS: Final = (msgspec.MsgspecError, TypeError, ValueError, OverflowError, RecursionError)

_DIRECT_MAP_BATCH: Final = msgspec.msgpack.Decoder(WireBatchModelEvents)
_WHOLE_MAP_BATCH: Final = msgspec.msgpack.Decoder(WireBatchMapEvents)
_WHOLE_ARRAY_BATCH: Final = msgspec.msgpack.Decoder(WireBatchArrayEvents)
_RAW_ARRAY_BATCH: Final = msgspec.msgpack.Decoder(WireBatchRawEvents)
_RAW_MAP_BATCH: Final = msgspec.msgpack.Decoder(WireMapBatchRawEvents)
_MAP_EVENT: Final = msgspec.msgpack.Decoder(WireMapEvent)
_ARRAY_EVENT: Final = msgspec.msgpack.Decoder(WireArrayEvent)
_GENERIC: Final = msgspec.msgpack.Decoder()
_EVENT_LIST: Final = msgspec.msgpack.Decoder(list[Event])
_with_tokens: Final = msgspec.structs.replace

# The compiled scan in use, or None (not built, or turned off by set_fast_path); a one-slot
# list so that the switch needs no `global`.
_scan: Final[list[Callable[[Any], Any] | None]] = [
    _fastdecode.scan if FAST_PATH_AVAILABLE else None
]
_scan_runs: Final[list[Callable[[Any], Any] | None]] = [
    _fastdecode.scan_runs if FAST_PATH_AVAILABLE else None
]

# Parsed topics by raw frame: a pod sends the same topic on every message.
_topic_cache: dict[bytes, tuple[str, str | None]] = {}


def set_fast_path(enabled: bool) -> bool:
    """Turn the compiled fast path (path 0 above) on or off, process-wide.

    Returns the previous setting. Off, decoding is exactly the msgspec paths: no removal is
    merged. Raises `ConfigError` when asked to enable a fast path this install did not build.
    """
    if enabled and not FAST_PATH_AVAILABLE:
        raise ConfigError("fast_path", "the compiled decoder was not built in this install")
    previous = _scan[0] is not None
    _scan[0] = _fastdecode.scan if enabled else None
    _scan_runs[0] = _fastdecode.scan_runs if enabled else None
    return previous


def fast_path_enabled() -> bool:
    """Whether decoding tries the compiled fast path first."""
    return _scan[0] is not None


# --------------------------------------------------------------------------------------------
# Hashes and topics
# --------------------------------------------------------------------------------------------


def hash_to_u64(value: int | BytesLike) -> int:
    """Map a block hash as engines publish it to the unsigned 64-bit key.

    A uint64 is kept, an int64 is reinterpreted in two's complement, bytes give their last 8
    bytes read big-endian (shorter ones are left-padded with zeros). Raises
    `InvalidBlockHashError` for empty bytes, ints outside [-2**63, 2**64) and other types.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if _INT64_MIN <= value <= U64_MASK:
            return value & U64_MASK
        raise InvalidBlockHashError(f"int hash {value} is outside the int64/uint64 range")
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) == 0:
            raise InvalidBlockHashError("empty bytes hash")
        return int.from_bytes(value[-8:], "big")
    raise InvalidBlockHashError(f"a hash must be an int or bytes, not {type(value).__name__}")


def parse_topic(topic: str) -> tuple[str, str | None]:
    """Split a topic into ``(pod, model)``.

    ``kv@<pod>@<model>`` gives the pod up to the first ``@`` after the prefix and the rest as the
    model (which may itself contain ``@``; an empty model is ``None``). Any other topic, or one
    with an empty pod, is the pod id as a whole, with model ``None``.
    """
    if topic.startswith(_TOPIC_PREFIX):
        pod, sep, model = topic[len(_TOPIC_PREFIX) :].partition("@")
        if sep and pod:
            return pod, model or None
    return topic, None


def _pod_and_model(frame: BytesLike) -> tuple[str, str | None]:
    # Raises UnicodeDecodeError for a non-UTF-8 topic.
    key = frame if frame.__class__ is bytes else bytes(frame)
    parsed = _topic_cache.get(key)
    if parsed is None:
        parsed = parse_topic(key.decode())
        if len(_topic_cache) >= _TOPIC_CACHE_LIMIT:
            _topic_cache.clear()
        _topic_cache[key] = parsed
    return parsed


def _u64_list(values: list[Any], field: str) -> list[int]:
    # `values` holds ints and/or bytes (typed as Any: no runtime cast on the hot path).
    if not values:
        return values
    try:
        # One C-level pass settles the common cases. All ints: the minimum tells whether any is
        # negative. All bytes: the minimum is b"" exactly when some digest is empty. Mixed
        # ints and bytes raise TypeError and take the per-element path.
        low = min(values)
    except TypeError:
        pass
    else:
        if low.__class__ is int:
            return values if low >= 0 else [v & U64_MASK for v in values]
        if low:
            return [int.from_bytes(v[-8:], "big") for v in values]
    converted = []
    for position, value in enumerate(values):
        try:
            converted.append(hash_to_u64(value))
        except InvalidBlockHashError as exc:
            raise InvalidBlockHashError(f"{field}[{position}]: {exc}") from None
    return converted


def _parent_u64(value: int | bytes | None) -> int | None:
    if value is None or (value.__class__ is int and value >= 0):
        return value
    try:
        return hash_to_u64(value)
    except InvalidBlockHashError as exc:
        raise InvalidBlockHashError(f"parent_block_hash: {exc}") from None


# --------------------------------------------------------------------------------------------
# Wire structs -> decoded model
# --------------------------------------------------------------------------------------------


def _stored(wire: Any) -> BlockStored:
    # `wire` is a WireMapBlockStored or WireArrayBlockStored (same field names).
    return BlockStored(
        _u64_list(wire.block_hashes, "block_hashes"),
        _parent_u64(wire.parent_block_hash),
        wire.token_ids,
        wire.block_size,
        wire.lora_id,
        wire.medium,
        wire.lora_name,
        wire.extra_keys,
        wire.group_idx,
        wire.kv_cache_spec_kind,
        wire.kv_cache_spec_sliding_window,
        wire.locality,
        wire.ownership,
        wire.session_id,
        wire.lookahead_token_ids,
        wire.cache_salt,
    )


def _removed(wire: Any) -> BlockRemoved:
    # `wire` is a WireMapBlockRemoved or WireArrayBlockRemoved.
    return BlockRemoved(
        _u64_list(wire.block_hashes, "block_hashes"),
        wire.medium,
        wire.group_idx,
        wire.locality,
        wire.ownership,
    )


def _cleared(wire: Any) -> AllBlocksCleared:
    return AllBlocksCleared()


# Wire class -> converter (a dict lookup beats isinstance chains on the hot path). Converters
# raise InvalidBlockHashError.
_CONVERTERS: Final[dict[type, Callable[[Any], Event]]] = {
    WireMapBlockStored: _stored,
    WireArrayBlockStored: _stored,
    WireMapBlockRemoved: _removed,
    WireArrayBlockRemoved: _removed,
    WireMapAllBlocksCleared: _cleared,
    WireArrayAllBlocksCleared: _cleared,
}


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _is_map_header(byte: int) -> bool:
    return 0x80 <= byte <= 0x8F or byte in {0xDE, 0xDF}


def _peek_event_form(payload: BytesLike) -> int:
    """Form of the first event under a standard header ``[ts f64, [event, ...`` (or unknown)."""
    try:
        if (payload[0] != 0x93 and payload[0] != 0x92) or payload[1] != 0xCB:
            return _FORM_UNKNOWN
        header = payload[10]
        if 0x91 <= header <= 0x9F:
            first = payload[11]
        elif header == 0xDC:
            first = payload[13]
        elif header == 0xDD:
            first = payload[15]
        else:
            return _FORM_UNKNOWN
    except IndexError:
        return _FORM_UNKNOWN
    if _is_map_header(first):
        return _FORM_MAP
    if 0x90 <= first <= 0x9F or first in {0xDC, 0xDD}:
        return _FORM_ARRAY
    return _FORM_UNKNOWN


def _fast_batch(
    scan: Callable[..., Any], payload: BytesLike, skip_tokens: bool
) -> EventBatch | None:
    """Path 0: the compiled scan, or None to go on with msgspec's paths."""
    scanned = scan(payload, skip_tokens)
    if scanned is None:
        return None
    ts, rank, items, merged, others = scanned
    # The BlockStored (token_ids left empty: the scan built those lists) and AllBlocksCleared
    # events, in order, decoded in one call.
    try:
        rest = iter(_EVENT_LIST.decode(others) if others is not None else ())
    except _DECODE_ERRORS:
        return None  # e.g. an int64 hash in a BlockStored: the batch takes the other paths
    events: list[Event] = []
    for item in items:
        kind = item.__class__
        if kind is tuple:  # a run of removals
            events.append(BlockRemoved(*item))
        elif kind is list:  # the token ids of the next BlockStored
            events.append(_with_tokens(next(rest), token_ids=item))
        elif item is Ellipsis:  # the next BlockStored's token ids, checked and skipped
            events.append(_with_tokens(next(rest), token_ids=TOKENS_OMITTED))
        else:  # AllBlocksCleared
            events.append(next(rest))
    return EventBatch(ts, events, rank, [], merged)


def _decode_batch(payload: BytesLike, skip_tokens: bool = False) -> EventBatch | tuple[str, str]:
    scan = _scan[0]
    if scan is not None:
        fast = _fast_batch(scan, payload, skip_tokens)
        if fast is not None:
            return fast
    form = _peek_event_form(payload)
    if form == _FORM_MAP:
        try:
            direct = _DIRECT_MAP_BATCH.decode(payload)
        except _DECODE_ERRORS:
            pass  # int64 / bytes hashes, or a bad event: try the converting paths
        else:
            return EventBatch(direct.ts, direct.events, direct.data_parallel_rank, [])
        decoder: msgspec.msgpack.Decoder[Any] = _WHOLE_MAP_BATCH
    elif form == _FORM_ARRAY:
        decoder = _WHOLE_ARRAY_BATCH
    else:
        return _decode_batch_per_event(payload)
    try:
        whole = decoder.decode(payload)
    except _DECODE_ERRORS:
        return _decode_batch_per_event(payload)  # isolate the bad event(s)
    events: list[Event] = []
    rejected: list[Rejection] = []
    convert = _CONVERTERS
    for index, wire in enumerate(whole.events):
        try:
            events.append(convert[wire.__class__](wire))
        except InvalidBlockHashError as exc:
            rejected.append(Rejection(index, BAD_HASH, clip(str(exc))))
    return EventBatch(whole.ts, events, whole.data_parallel_rank, rejected)


def _malformed(error: BaseException) -> tuple[str, str]:
    if isinstance(error, RecursionError):
        return BAD_PAYLOAD, "msgpack nested too deeply"
    return BAD_PAYLOAD, clip(str(error))


def _classify_batch_error(payload: BytesLike, error: msgspec.ValidationError) -> tuple[str, str]:
    """``bad_batch`` for well-formed msgpack of the wrong shape, else ``bad_payload``.

    Typed decoding stops at the first schema mismatch, before it would notice that the rest is
    not msgpack at all (random bytes often start with a valid scalar).
    """
    try:
        _GENERIC.decode(payload)
    except _DECODE_ERRORS as malformed:
        return _malformed(malformed)
    return BAD_BATCH, clip(str(error))


def _decode_batch_per_event(payload: BytesLike) -> EventBatch | tuple[str, str]:
    if len(payload) == 0:
        return BAD_PAYLOAD, "empty payload"
    try:
        if _is_map_header(payload[0]):
            shaped = _RAW_MAP_BATCH.decode(payload)
            ts, raws = shaped.ts, shaped.events
            rank = shaped.data_parallel_rank
            if rank is None:
                rank = shaped.attn_dp_rank
        else:
            batch = _RAW_ARRAY_BATCH.decode(payload)
            ts, raws, rank = batch.ts, batch.events, batch.data_parallel_rank
    except msgspec.ValidationError as exc:
        return _classify_batch_error(payload, exc)
    except _DECODE_ERRORS as exc:
        return _malformed(exc)

    events: list[Event] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(raws):
        try:
            decoder = _MAP_EVENT if _is_map_header(memoryview(raw)[0]) else _ARRAY_EVENT
            wire = decoder.decode(raw)
        except _DECODE_ERRORS as exc:
            reason, detail = diagnose(raw, exc)
            rejected.append(Rejection(index, reason, detail))
            continue
        try:
            events.append(_CONVERTERS[wire.__class__](wire))
        except InvalidBlockHashError as exc:
            rejected.append(Rejection(index, BAD_HASH, clip(str(exc))))
    return EventBatch(ts, events, rank, rejected)


def _as_buffer(frame: Any) -> BytesLike:
    # zmq.Frame (copy=False) and other buffer objects: index and slice through a memoryview.
    if frame.__class__ is bytes or isinstance(frame, bytearray | memoryview):
        return cast(BytesLike, frame)
    return memoryview(frame)


def decode_payload(payload: BytesLike) -> EventBatch | FrameRejection:
    """Decode one msgpack batch payload (no topic, no seq)."""
    result = _decode_batch(_as_buffer(payload))
    if result.__class__ is EventBatch:
        return result
    reason, detail = cast("tuple[str, str]", result)
    return FrameRejection(reason, detail)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def _runs_message(
    scan_runs: Callable[[Any], Any], pod: str, model: str | None, seq: int, payload: BytesLike
) -> RunsMessage | None:
    """The compiled scan into key runs (identity mode), or None to decode events as usual."""
    scanned = scan_runs(payload)
    if scanned is None:
        return None
    ts, rank, runs, stored, removed, others = scanned
    if others is not None:
        # The stored events without their hashes and tokens: msgspec checks the other fields
        # exactly as it would for the event path (which then rejects what it refuses).
        try:
            _EVENT_LIST.decode(others)
        except _DECODE_ERRORS:
            return None
    return RunsMessage(pod, model, seq, ts, rank, runs, stored, removed)


def _message(
    pod: str,
    model: str | None,
    seq_frame: BytesLike,
    payload: BytesLike,
    skip_tokens: bool | Callable[[str], bool] = False,
    *,
    runs: bool = False,
) -> Message | RunsMessage | FrameRejection:
    if len(seq_frame) != _SEQ_LEN:
        detail = f"seq frame has {len(seq_frame)} bytes, expected {_SEQ_LEN}"
        return FrameRejection(BAD_SEQ, detail, pod, model)
    seq = int.from_bytes(seq_frame, "big")
    skip = skip_tokens if skip_tokens.__class__ is bool else skip_tokens(pod)  # type: ignore[operator]
    if skip and runs and (scan_runs := _scan_runs[0]) is not None:
        fast = _runs_message(scan_runs, pod, model, seq, payload)
        if fast is not None:
            return fast
    result = _decode_batch(payload, bool(skip))
    if result.__class__ is EventBatch:
        return Message(pod, model, seq, result)
    reason, detail = cast("tuple[str, str]", result)
    return FrameRejection(reason, detail, pod, model, seq)


@overload
def decode_frames(
    frames: Sequence[Any],
    *,
    skip_tokens: bool | Callable[[str], bool] = False,
    runs: Literal[False] = False,
) -> Message | FrameRejection: ...


@overload
def decode_frames(
    frames: Sequence[Any], *, skip_tokens: bool | Callable[[str], bool] = False, runs: bool
) -> Message | RunsMessage | FrameRejection: ...


def decode_frames(
    frames: Sequence[Any],
    *,
    skip_tokens: bool | Callable[[str], bool] = False,
    runs: bool = False,
) -> Message | RunsMessage | FrameRejection:
    """Decode a live message ``[topic, seq (8 bytes big-endian), msgpack payload]``.

    ``frames`` items are bytes-like (bytes, bytearray, memoryview, zmq.Frame). ``skip_tokens``
    (or a function of the pod id saying so) lets the compiled fast path check the token ids of
    stored events without building them: those events get `TOKENS_OMITTED` as ``token_ids``
    (the ingest pipeline asks for it for pods in identity mode, whose keys need no tokens).
    Other paths ignore it. With ``runs`` too, such a message comes as a `RunsMessage` when the
    compiled fast path takes it (the applier's identity mode needs nothing else).
    """
    if len(frames) != 3:
        return FrameRejection(FRAME_COUNT, f"expected 3 frames, got {len(frames)}")
    try:
        pod, model = _pod_and_model(_as_buffer(frames[0]))
    except UnicodeDecodeError:
        return FrameRejection(BAD_TOPIC, "topic frame is not valid UTF-8")
    seq_frame, payload = _as_buffer(frames[1]), _as_buffer(frames[2])
    return _message(pod, model, seq_frame, payload, skip_tokens, runs=runs)


def decode_replay_frames(
    frames: Sequence[Any], topic: str = ""
) -> Message | ReplayEnd | FrameRejection:
    """Decode one reply from the replay ROUTER socket, as a DEALER receives it.

    Shapes: ``[b"", topic, seq, payload]`` (vLLM >= 0.26, SGLang >= 0.5.22) and
    ``[b"", seq, payload]`` (earlier; ``topic`` supplies pod and model, as the reply does not
    carry them). A seq of 0xffffffffffffffff is the end marker and yields `ReplayEnd`.
    """
    if len(frames) not in (3, 4):
        return FrameRejection(FRAME_COUNT, f"expected 3 or 4 replay frames, got {len(frames)}")
    buffers = [_as_buffer(frame) for frame in frames]
    if len(buffers[0]) != 0:
        return FrameRejection(BAD_DELIMITER, "replay reply does not start with an empty frame")
    seq_frame, payload = buffers[-2], buffers[-1]
    if len(seq_frame) == _SEQ_LEN and int.from_bytes(seq_frame, "big") == REPLAY_END_SEQ:
        return ReplayEnd()
    if len(buffers) == 3:
        pod, model = parse_topic(topic)
    else:
        try:
            pod, model = _pod_and_model(buffers[1])
        except UnicodeDecodeError:
            return FrameRejection(BAD_TOPIC, "topic frame is not valid UTF-8")
    return cast("Message | FrameRejection", _message(pod, model, seq_frame, payload))
