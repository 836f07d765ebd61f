"""Golden inputs for the event decoder tests: the events.json vectors and the vLLM captures.

Expected values are built here from the vectors' own generic decode and field lists, without
the decoder under test, so that the comparison is independent of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import msgspec

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, Event

DATA = Path(__file__).resolve().parents[2] / "data"
EVENTS_JSON = DATA / "events.json"
CAPTURES = DATA / "captures"
PICKLE_CAPTURE = CAPTURES / "vllm-0.32-sha256-pickle-default"
SERVE_CAPTURE = CAPTURES / "vllm-0.32-serve-sha256cbor"

MASK = (1 << 64) - 1


@dataclass(frozen=True)
class VectorExample:
    """One example batch of one layout in events.json."""

    layout: dict[str, Any]
    example: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.layout['layout']}/{self.example['label']}"

    @property
    def frames(self) -> list[bytes]:
        f = self.example["frames"]
        return [
            f["topic_utf8"].encode(),
            bytes.fromhex(f["seq_hex"]),
            bytes.fromhex(f["payload_hex"]),
        ]

    @property
    def generic(self) -> list[Any]:
        """The batch as the vector file decodes it (bytes shown as {"bytes_hex": ...})."""
        value: list[Any] = self.example["decoded_generic_msgpack"]
        return value


@cache
def load_events_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(EVENTS_JSON.read_text())
    return data


def vector_examples() -> list[VectorExample]:
    return [
        VectorExample(layout, example)
        for layout in load_events_json()["layouts"]
        for example in layout["examples"]
    ]


def expected_hash(value: Any) -> int:
    """Independent u64 mapping of a hash (int, bytes, or events.json's {"bytes_hex": ...})."""
    if isinstance(value, dict):
        value = bytes.fromhex(value["bytes_hex"])
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:].rjust(8, b"\0"), "big")
    assert isinstance(value, int)
    return value % (1 << 64)


def expected_event(raw: Any, stored_fields: list[str], removed_fields: list[str]) -> Event:
    """The decoded model for one generically decoded event (array or map form)."""
    if isinstance(raw, list):
        tag = raw[0]
        names = {"BlockStored": stored_fields, "BlockRemoved": removed_fields}.get(tag, [])
        # The vectors carry exactly the layout's fields: positions map 1:1 to names.
        assert len(raw) - 1 == len(names), (tag, raw, names)
        fields = dict(zip(names, raw[1:], strict=True))
    else:
        fields = {key: value for key, value in raw.items() if key != "type"}
        tag = raw["type"]
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    fields["block_hashes"] = [expected_hash(h) for h in fields["block_hashes"]]
    if tag == "BlockRemoved":
        return BlockRemoved(**fields)
    assert tag == "BlockStored", tag
    if fields.get("parent_block_hash") is not None:
        fields["parent_block_hash"] = expected_hash(fields["parent_block_hash"])
    return BlockStored(**fields)


def expected_events(example: VectorExample) -> list[Event]:
    stored = example.layout["block_stored_fields"]
    removed = example.layout["block_removed_fields"]
    return [expected_event(raw, stored, removed) for raw in example.generic[1]]


@dataclass(frozen=True)
class CapturedMessage:
    """One line of a capture's frames.jsonl."""

    n: int
    topic: str
    seq: int
    frames: list[bytes]


def load_capture(directory: Path, name: str = "frames.jsonl") -> list[CapturedMessage]:
    messages = []
    for line in (directory / name).read_text().splitlines():
        record = json.loads(line)
        messages.append(
            CapturedMessage(
                n=record.get("n", -1),
                topic=record.get("topic", ""),
                seq=record.get("seq", -1),
                frames=[bytes.fromhex(frame) for frame in record["frames_hex"]],
            )
        )
    return messages


def generic_events(payload: bytes) -> tuple[float, list[Event], int | None]:
    """Decode a captured map-form payload with plain msgpack, independently of the decoder."""
    batch = msgspec.msgpack.decode(payload)
    ts, raw_events = batch[0], batch[1]
    rank = batch[2] if len(batch) > 2 else None
    events = [expected_event(raw, [], []) for raw in raw_events]
    return ts, events, rank
