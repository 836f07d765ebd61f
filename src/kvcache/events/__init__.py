"""KV-cache events from vLLM and SGLang: the decoded model and the wire decoder.

``decode_frames`` turns one ZMQ message into a `Message` (or a `FrameRejection`); bad events
inside a good message become `Rejection` records of its `EventBatch`. Nothing raises on input.
"""

from __future__ import annotations

from kvcache.events.decode import (
    BytesLike,
    decode_frames,
    decode_payload,
    decode_replay_frames,
    hash_to_u64,
    parse_topic,
)
from kvcache.events.schema import (
    EVENT_REJECT_REASONS,
    FRAME_REJECT_REASONS,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    FrameRejection,
    Message,
    Rejection,
    ReplayEnd,
)

__all__ = [
    "EVENT_REJECT_REASONS",
    "FRAME_REJECT_REASONS",
    "REPLAY_END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "BytesLike",
    "Event",
    "EventBatch",
    "FrameRejection",
    "Message",
    "Rejection",
    "ReplayEnd",
    "decode_frames",
    "decode_payload",
    "decode_replay_frames",
    "hash_to_u64",
    "parse_topic",
]
