"""The simulated engine's event wire: vLLM's exact bytes on a real ZMQ socket, with faults.

* `BatchEncoder` turns kvcache's event model (`kvcache.events.schema`) into the payload a given
  vLLM release sends. Each release's classes are rebuilt from a table of its field lists with
  msgspec's own struct machinery (`msgspec.defstruct`, the same options as vLLM's
  ``kv_events.py``), so the quirks come for free: array events carry every field (msgspec
  ignores ``omit_defaults`` for ``array_like``), map events drop ``None`` defaults but keep
  required fields as nil, the map header is sized from the class's field count (``map16`` in
  0.33). Checked byte for byte against the real vLLM 0.32 capture and the synthesized payloads
  of every layout in ``tests/data/events.json``.
* `ZmqPublisher` sends ``[topic, seq (8-byte big-endian), payload]`` like vLLM's
  ``ZmqEventPublisher`` (binds when the endpoint has ``*``/``::`` or is ipc/inproc, else
  connects), with fault injection: lost batches, redelivered batches, a constant delay with a
  held queue that simulated time releases (`release_due`), and `restart_sequence`.
* `ListSink` keeps batches in memory, for tests and offline runs.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

import msgspec
import zmq

from kvcache.errors import ConfigError
from kvcache.events.schema import (
    BLOCK_REMOVED_FIELDS,
    BLOCK_STORED_FIELDS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
)

__all__ = [
    "LAYOUTS",
    "BatchEncoder",
    "EventSink",
    "Layout",
    "ListSink",
    "SequencedSink",
    "WireLayout",
    "ZmqPublisher",
    "layout_for_version",
    "vllm_binds",
]

Layout: TypeAlias = Literal[
    "vllm-0.9.0-array",
    "vllm-0.10.1-array",
    "vllm-0.13-array",
    "vllm-0.16-array",
    "vllm-0.19-array",
    "vllm-0.21-array",
    "vllm-0.23-array",
    "vllm-0.25",
    "vllm-0.28",
    "vllm-0.29",
    "vllm-0.32",
    "vllm-0.33",
]
"""A vLLM wire layout, named after the last release that sends it."""


class WireLayout(msgspec.Struct, frozen=True):
    """One vLLM wire layout: event form, batch shape and the events' fields in order."""

    name: str
    versions: tuple[str, str]
    """First and last vLLM release with this layout (inclusive)."""
    array: bool
    """Events as ``[tag, field, ...]`` (vLLM <= 0.23) instead of ``{"type": tag, ...}``."""
    rank: bool
    """The batch carries ``data_parallel_rank`` (vLLM >= 0.9.1)."""
    stored: tuple[str, ...]
    stored_required: int
    """Leading BlockStored fields without a default (always written, even as nil)."""
    removed: tuple[str, ...]
    removed_required: int


# vLLM's fields in wire order; the schema's last stored field (cache_salt) is SGLang's only.
_STORED_ALL: Final = BLOCK_STORED_FIELDS[:-1]
_REMOVED_ALL: Final = BLOCK_REMOVED_FIELDS


def _layout(
    name: str, first: str, last: str, *, array: bool, stored: int, removed: int
) -> WireLayout:
    # Fields were only ever appended; medium (0.10.2) and lora_name (0.14) came in required.
    return WireLayout(
        name=name,
        versions=(first, last),
        array=array,
        rank=first != "0.9.0",
        stored=_STORED_ALL[:stored],
        stored_required=min(stored, 7),
        removed=_REMOVED_ALL[:removed],
        removed_required=min(removed, 2),
    )


LAYOUTS: Final[dict[str, WireLayout]] = {
    layout.name: layout
    for layout in (
        _layout("vllm-0.9.0-array", "0.9.0", "0.9.0", array=True, stored=5, removed=1),
        _layout("vllm-0.10.1-array", "0.9.1", "0.10.1.1", array=True, stored=5, removed=1),
        _layout("vllm-0.13-array", "0.10.2", "0.13.0", array=True, stored=6, removed=2),
        _layout("vllm-0.16-array", "0.14.0", "0.16.0", array=True, stored=7, removed=2),
        _layout("vllm-0.19-array", "0.17.0", "0.19.1", array=True, stored=8, removed=2),
        _layout("vllm-0.21-array", "0.20.0", "0.21.0", array=True, stored=9, removed=3),
        _layout("vllm-0.23-array", "0.22.0", "0.23.0", array=True, stored=11, removed=3),
        _layout("vllm-0.25", "0.24.0", "0.25.1", array=False, stored=11, removed=3),
        _layout("vllm-0.28", "0.26.0", "0.28.0", array=False, stored=12, removed=4),
        _layout("vllm-0.29", "0.29.0", "0.29.0", array=False, stored=13, removed=5),
        _layout("vllm-0.32", "0.30.0", "0.32.0", array=False, stored=14, removed=5),
        _layout("vllm-0.33", "0.33.0", "0.33.0", array=False, stored=15, removed=5),
    )
}
"""Every vLLM wire layout (vllm-wire-and-hashing reference, section 1.2)."""


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("+", maxsplit=1)[0].split(".")[:4])
    except ValueError:
        raise ConfigError("vllm_version", f"not a vLLM release number: {version!r}") from None


def layout_for_version(version: str) -> str:
    """The layout name a vLLM release (``"0.27.1"``) sends; ConfigError outside 0.9.0-0.33."""
    wanted = _version_tuple(version)
    for layout in LAYOUTS.values():
        first, last = (_version_tuple(v) for v in layout.versions)
        if first <= wanted[: len(first)] and wanted[: len(last)] <= last:
            return layout.name
    raise ConfigError("vllm_version", f"no known KV-event layout for vLLM {version}")


def _event_class(
    tag: str, fields: tuple[str, ...], required: int, array: bool
) -> type[msgspec.Struct]:
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (field, Any) if position < required else (field, Any, None)
        for position, field in enumerate(fields)
    ]
    # vLLM's KVCacheEvent: omit_defaults, gc=False, tag=True (the class name); array_like <= 0.23.
    return msgspec.defstruct(
        tag, spec, omit_defaults=True, gc=False, tag=True, array_like=array, module=__name__
    )


class BatchEncoder:
    """Encodes kvcache events as one vLLM release's ``KVEventBatch`` payload, byte for byte."""

    def __init__(self, layout: str = "vllm-0.32") -> None:
        if layout not in LAYOUTS:
            raise ConfigError("layout", f"unknown wire layout {layout!r}; one of {list(LAYOUTS)}")
        self.layout = spec = LAYOUTS[layout]
        self._stored = _event_class("BlockStored", spec.stored, spec.stored_required, spec.array)
        self._removed = _event_class(
            "BlockRemoved", spec.removed, spec.removed_required, spec.array
        )
        self._cleared = _event_class("AllBlocksCleared", (), 0, spec.array)
        batch_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            ("ts", float),
            ("events", list[Any]),
        ]
        if spec.rank:
            batch_fields.append(("data_parallel_rank", Any, None))
        self._batch = msgspec.defstruct(
            "KVEventBatch",
            batch_fields,
            array_like=True,
            omit_defaults=True,
            gc=False,
            module=__name__,
        )
        self._encoder = msgspec.msgpack.Encoder()

    def wire_event(self, event: Event) -> msgspec.Struct:
        """The release's own struct for ``event`` (fields it does not have are left out)."""
        if isinstance(event, BlockStored):
            return self._stored(*(getattr(event, name) for name in self.layout.stored))
        if isinstance(event, BlockRemoved):
            return self._removed(*(getattr(event, name) for name in self.layout.removed))
        if isinstance(event, AllBlocksCleared):
            return self._cleared()
        raise TypeError(f"not a KV event: {event!r}")

    def encode(self, events: Sequence[Event], ts: float, dp_rank: int | None = 0) -> bytes:
        """The msgpack payload frame of one batch."""
        wire = [self.wire_event(event) for event in events]
        batch = self._batch(ts, wire, dp_rank) if self.layout.rank else self._batch(ts, wire)
        return self._encoder.encode(batch)


class EventSink(Protocol):
    """Where a simulated engine publishes each engine step's events (one call per batch)."""

    def publish(self, events: list[Event]) -> None:
        """Publish one non-empty batch."""
        ...


@runtime_checkable
class SequencedSink(EventSink, Protocol):
    """A sink with a publisher sequence, which a process restart sets back to 0."""

    def restart_sequence(self) -> None:
        """The next batch is seq 0 again, as from a freshly started vLLM process."""
        ...


class ListSink:
    """Keeps every published batch in memory (tests, offline runs)."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self.restarts = 0

    def publish(self, events: list[Event]) -> None:
        """Record one batch."""
        self.batches.append(list(events))

    def restart_sequence(self) -> None:
        """Count a publisher restart."""
        self.restarts += 1

    @property
    def events(self) -> list[Event]:
        """Every event in publish order."""
        return [event for batch in self.batches for event in batch]


def vllm_binds(endpoint: str) -> bool:
    """vLLM's rule: its PUB binds on ``*``/``::`` and ipc/inproc endpoints, else connects."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(name, f"must be a probability in [0, 1], got {value!r}")
    return float(value)


class ZmqPublisher:
    """One simulated pod's KV-event publisher on a real ZMQ socket.

    Each `publish` is one vLLM engine-step batch: it takes the next sequence number whatever
    happens to it, so a dropped batch shows up downstream as a gap, as a lost message would.
    Faults, each decided per batch from ``rng``:

    * ``drop_rate``: the batch is never sent;
    * ``duplicate_rate``: the identical message (same seq, same bytes) is sent twice, like a
      batch delivered again (a replay overlapping the live stream);
    * ``delay_s``: every batch is held and only sent once `release_due` is called with a time
      at least ``delay_s`` after its publish time (``clock``; pass the simulation's clock).
      Order is kept.

    The socket is an XPUB: identical to vLLM's PUB on the wire, but it sees subscriptions, so
    `wait_subscribed` can tell when a subscriber will actually receive what is sent (a PUB
    silently drops everything before that).
    """

    def __init__(
        self,
        endpoint: str,
        topic: str,
        *,
        layout: Layout | str = "vllm-0.32",
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        delay_s: float = 0.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        timestamp: Callable[[], float] = time.time,
        dp_rank: int = 0,
        bind: bool | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.encoder = BatchEncoder(layout)
        self.topic = topic
        self.endpoint = endpoint
        self.drop_rate = _check_rate("drop_rate", drop_rate)
        self.duplicate_rate = _check_rate("duplicate_rate", duplicate_rate)
        if delay_s < 0:
            raise ConfigError("delay_s", f"must be >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)
        self.rng = rng if rng is not None else random.Random(0)
        self.clock = clock
        self.timestamp = timestamp
        self.dp_rank = dp_rank
        self._topic = topic.encode("utf-8")
        self._seq = 0
        self._held: deque[tuple[float, list[bytes], int]] = deque()
        self.published = 0
        """Batches handed to `publish` (each took a sequence number)."""
        self.sent = 0
        """Messages put on the socket, duplicates included."""
        self.dropped = 0
        self.duplicated = 0
        self.subscribed = False
        self._context = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop silently: faults are explicit
        binds = vllm_binds(endpoint) if bind is None else bind
        try:
            if binds:
                self._socket.bind(endpoint)
                self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ConfigError("endpoint", f"cannot open {endpoint!r}: {exc}") from None

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._seq

    @property
    def held(self) -> int:
        """Messages waiting for their delay to pass."""
        return len(self._held)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until a subscriber's subscription reached this socket (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.subscribed:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                return self.subscribed
            while self._socket.poll(0, zmq.POLLIN):
                if self._socket.recv()[:1] == b"\x01":
                    self.subscribed = True
        return True

    def publish(self, events: list[Event]) -> None:
        """Encode one engine step's batch and send it (or drop, duplicate or hold it)."""
        if not events:
            return  # vLLM publishes only non-empty batches
        seq = self._seq
        self._seq += 1
        self.published += 1
        payload = self.encoder.encode(events, self.timestamp(), self.dp_rank)
        frames = [self._topic, seq.to_bytes(8, "big"), payload]
        # Draw both decisions every time, so one fault rate does not shift the other's stream.
        drop = self.rng.random() < self.drop_rate
        duplicate = self.rng.random() < self.duplicate_rate
        if drop:
            self.dropped += 1
            return
        copies = 2 if duplicate else 1
        self.duplicated += copies - 1
        if self.delay_s > 0 or self._held:
            self._held.append((self.clock() + self.delay_s, frames, copies))
            return
        self._send(frames, copies)

    def release_due(self, now: float | None = None) -> int:
        """Send every held message whose due time is <= ``now`` (default: ``clock()``)."""
        now = self.clock() if now is None else now
        released = 0
        while self._held and self._held[0][0] <= now:
            _, frames, copies = self._held.popleft()
            self._send(frames, copies)
            released += 1
        return released

    def release_all(self) -> int:
        """Send every held message now."""
        released = len(self._held)
        while self._held:
            _, frames, copies = self._held.popleft()
            self._send(frames, copies)
        return released

    def restart_sequence(self) -> None:
        """A process restart: numbering starts again at 0, held messages die with the process."""
        self.dropped += len(self._held)
        self._held.clear()
        self._seq = 0

    def statistics(self) -> dict[str, int]:
        """Counters: published batches, messages sent, dropped, duplicated, held."""
        return {
            "published": self.published,
            "sent": self.sent,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "held": len(self._held),
            "next_seq": self._seq,
        }

    def close(self) -> None:
        """Close the socket (held messages are not sent)."""
        self._socket.close(linger=0)

    def __enter__(self) -> ZmqPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, frames: list[bytes], copies: int) -> None:
        for _ in range(copies):
            self._socket.send_multipart(frames)
            self.sent += 1
