"""The simulated engine's wire: vLLM's exact bytes, over real ZMQ into a real kvcache, with faults.

* Byte-exactness: the payloads of the real vLLM 0.32 captures, and the synthesized payloads of
  every vLLM layout in tests/data/events.json (cross-checked there against vLLM's own classes),
  re-encode to the same bytes; a ZmqPublisher replaying the capture puts the captured frames on
  the socket.
* End to end: a SimEngine publishes through a ZmqPublisher to kvcache's Subscriber and
  IngestPipeline (real sockets on loopback); kvcache's index for the pod then equals the engine's
  cache, in identity mode.
* Faults: a dropped batch is a gap, a restart is a reset that clears the pod, a delayed batch
  waits for simulated time, a redelivered batch changes nothing.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvcache.config import Config
from kvcache.errors import ConfigError
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.schema import (
    BLOCK_REMOVED_FIELDS,
    BLOCK_STORED_FIELDS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
)
from kvcache.events.subscriber import Subscriber
from kvcache.indexer import Indexer
from kvcache.sim.engine import SimEngine
from kvcache.sim.wire import (
    LAYOUTS,
    BatchEncoder,
    ListSink,
    ZmqPublisher,
    layout_for_version,
    vllm_binds,
)

DATA = Path(__file__).resolve().parents[2] / "data"
CAPTURES = DATA / "captures"
_BATCH = msgspec.msgpack.Decoder(tuple[float, list[Event], int])


def _capture_frames(folder: str) -> list[list[bytes]]:
    lines = (CAPTURES / folder / "frames.jsonl").read_text().splitlines()
    return [[bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines]


# -- byte-exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder", ["vllm-0.32-sha256-pickle-default", "vllm-0.32-serve-sha256cbor"]
)
def test_capture_payloads_reencode_byte_for_byte(folder: str) -> None:
    encoder = BatchEncoder("vllm-0.32")
    frames = _capture_frames(folder)
    for message in frames:
        ts, events, rank = _BATCH.decode(message[2])
        assert encoder.encode(events, ts, rank) == message[2]
    assert len(frames) in (26, 2)


def test_publisher_puts_the_captured_frames_on_the_socket() -> None:
    folder = "vllm-0.32-sha256-pickle-default"
    frames = _capture_frames(folder)
    decoded = [_BATCH.decode(message[2]) for message in frames]
    stamps = iter(ts for ts, _, _ in decoded)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    publisher = ZmqPublisher(
        f"tcp://127.0.0.1:{port}", "kv@pod-a@tiny-llama", timestamp=lambda: next(stamps)
    )
    try:
        # A bound SUB sends its subscription once its owner thread touches it: poll both.
        deadline = time.monotonic() + 10
        while not publisher.wait_subscribed(0.01):
            assert time.monotonic() < deadline
            sub.poll(10)
        for _, events, _ in decoded:
            publisher.publish(events)
        received = []
        for _ in frames:
            assert sub.poll(10_000)
            received.append(sub.recv_multipart())
    finally:
        publisher.close()
        sub.close(linger=0)
    assert received == frames  # topic, 8-byte big-endian seq 0..25, payload: all identical


def _version_range(layout: str) -> str:
    first, last = LAYOUTS[layout].versions
    return first if first == last else f"{first} .. {last}"


def _event_from_generic(raw: Any, stored: list[str], removed: list[str]) -> Event:
    """An event from plain msgpack (array or map form), read by the layout's field lists."""
    if isinstance(raw, dict):
        tag = raw.pop("type")
        fields = raw
    else:
        tag, values = raw[0], raw[1:]
        names = stored if tag == "BlockStored" else removed if tag == "BlockRemoved" else []
        assert len(values) == len(names)  # array form carries every field of its release
        fields = dict(zip(names, values, strict=True))
    if tag == "BlockStored":
        assert set(fields) <= set(BLOCK_STORED_FIELDS)
        return BlockStored(**fields)
    if tag == "BlockRemoved":
        assert set(fields) <= set(BLOCK_REMOVED_FIELDS)
        return BlockRemoved(**fields)
    assert tag == "AllBlocksCleared" and not fields
    return AllBlocksCleared()


def test_every_vllm_layout_matches_the_synthesized_vectors() -> None:
    vectors = json.loads((DATA / "events.json").read_text())
    by_versions = {_version_range(name): name for name in LAYOUTS}
    covered: set[str] = set()
    checked = 0
    for spec in vectors["layouts"]:
        if spec["engine"] != "vllm":
            continue
        name = by_versions[spec["vllm_versions"]]
        layout = LAYOUTS[name]
        assert list(layout.stored) == spec["block_stored_fields"]
        assert list(layout.removed) == spec["block_removed_fields"]
        assert layout.array == spec["event_encoding"].startswith("positional array")
        assert layout.rank == ("data_parallel_rank" in spec["batch_encoding"])
        encoder = BatchEncoder(name)
        for example in spec["examples"]:
            if example["label"] == "bytes_hashes":
                continue  # raw-digest hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): not simulated
            payload = bytes.fromhex(example["frames"]["payload_hex"])
            batch = msgspec.msgpack.decode(payload)
            events = [
                _event_from_generic(raw, spec["block_stored_fields"], spec["block_removed_fields"])
                for raw in batch[1]
            ]
            rank = batch[2] if len(batch) == 3 else None
            assert encoder.encode(events, batch[0], rank) == payload, (name, example["label"])
            checked += 1
        covered.add(name)
    assert covered == set(LAYOUTS)
    assert checked == 35  # 45 examples, 10 of them with raw-digest hashes


def test_layout_names_versions_and_bad_settings() -> None:
    assert layout_for_version("0.32.0") == "vllm-0.32"
    assert layout_for_version("0.30.1") == "vllm-0.32"
    assert layout_for_version("0.27.1") == "vllm-0.28"
    assert layout_for_version("0.23.0") == "vllm-0.23-array"
    assert layout_for_version("0.10.1.1") == "vllm-0.10.1-array"
    assert layout_for_version("0.9.0") == "vllm-0.9.0-array"
    assert layout_for_version("0.33.0+cpu") == "vllm-0.33"
    for bad in ("0.34.0", "0.8.5", "latest"):
        with pytest.raises(ConfigError):
            layout_for_version(bad)
    with pytest.raises(ConfigError):
        BatchEncoder("vllm-9")
    with pytest.raises(ConfigError):
        ZmqPublisher("tcp://127.0.0.1:1", "t", drop_rate=1.5)
    with pytest.raises(ConfigError):
        ZmqPublisher("tcp://127.0.0.1:1", "t", delay_s=-1)
    with pytest.raises(ConfigError):
        ZmqPublisher("not-an-endpoint", "t")
    assert vllm_binds("tcp://*:5557") and vllm_binds("ipc:///tmp/x")
    assert not vllm_binds("tcp://127.0.0.1:5557")


# -- end to end over real ZMQ ---------------------------------------------------------------------

BS = 16
SCHEME = {"scheme": "sha256_cbor", "seed": "42", "block_size": BS}


class _Tee:
    """Publishes to the real publisher and keeps a copy of every batch."""

    def __init__(self, publisher: ZmqPublisher) -> None:
        self.publisher = publisher
        self.copy = ListSink()

    def publish(self, events: list[Event]) -> None:
        self.copy.publish(events)
        self.publisher.publish(events)

    def restart_sequence(self) -> None:
        self.copy.restart_sequence()
        self.publisher.restart_sequence()

    def stored_keys(self) -> set[int]:
        return {k for e in self.copy.events if isinstance(e, BlockStored) for k in e.block_hashes}


class _Kvcache:
    """kvcache's real write path: Subscriber bound on loopback -> IngestPipeline -> index."""

    def __init__(self) -> None:
        self.indexer = Indexer(Config.from_mapping({"hashing": SCHEME}))
        self.pipeline = IngestPipeline(self.indexer.index, self.indexer.scheme, shards=2)
        self.subscriber = Subscriber(self.pipeline.submit, bind=["tcp://127.0.0.1:0"])

    def __enter__(self) -> _Kvcache:
        self.pipeline.start()
        self.subscriber.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.subscriber.stop()
        self.pipeline.stop()

    @property
    def endpoint(self) -> str:
        return self.subscriber.bound[0]

    def wait_messages(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pipeline.statistics()["messages"] < count:
            assert time.monotonic() < deadline, "kvcache did not receive every message"
            time.sleep(0.005)
        assert self.pipeline.drain()

    def indexed(self, pod: str, keys: set[int]) -> set[int]:
        return {key for key in keys if self.indexer.index.lookup([key], [pod])}

    def stream(self, pod: str) -> dict[str, Any]:
        state: dict[str, Any] = self.pipeline.pod_states()[pod]["streams"]["0"]
        return state


def _engine(publisher: ZmqPublisher, pod: str) -> tuple[SimEngine, _Tee]:
    tee = _Tee(publisher)
    scheme = Indexer(Config.from_mapping({"hashing": SCHEME})).scheme
    return SimEngine(pod, block_size=BS, num_blocks=48, scheme=scheme, sink=tee), tee


def _workload(seed: int, count: int) -> Iterator[tuple[list[int], list[int]]]:
    """Shared system prompts + distinct questions + outputs: hits, decode blocks, evictions."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(BS * n)] for n in (3, 5, 8)]
    for _ in range(count):
        question = [rng.randrange(50_000) for _ in range(rng.randrange(5, 90))]
        outputs = [rng.randrange(50_000) for _ in range(rng.randrange(1, 40))]
        yield rng.choice(systems) + question, outputs


def _run(engine: SimEngine, requests: Iterator[tuple[list[int], list[int]]], tag: str) -> None:
    running: list[tuple[str, list[int]]] = []
    for number, (prompt, outputs) in enumerate(requests):
        if len(running) == 2 or not engine.can_start(prompt):
            request_id, out = running.pop(0)
            engine.finish(request_id, out)
        engine.start(f"{tag}{number}", prompt)
        running.append((f"{tag}{number}", outputs))
    for request_id, out in running:
        engine.finish(request_id, out)


@pytest.mark.parametrize("layout", ["vllm-0.32", "vllm-0.23-array", "vllm-0.33"])
def test_kvcache_index_equals_the_engine_cache_over_real_zmq(layout: str) -> None:
    pod = "10.0.0.1:8000"
    with _Kvcache() as kv:
        publisher = ZmqPublisher(kv.endpoint, f"kv@{pod}@m", layout=layout)
        try:
            assert publisher.wait_subscribed()
            engine, tee = _engine(publisher, pod)
            _run(engine, _workload(1, 80), "r")
            kv.wait_messages(publisher.sent)
        finally:
            publisher.close()
        assert engine.blocks_removed > 50  # the pool really churned
        assert kv.indexed(pod, tee.stored_keys()) == engine.held_keys()
        assert kv.pipeline.pod_states()[pod]["hash_mode"] == "identity"
        stats = kv.pipeline.statistics()
        assert stats["gaps"] == 0 and stats["resets"] == 0 and stats["hash_mismatches"] == 0
        assert stats["messages"] == len(tee.copy.batches)


def test_dropped_batches_are_gaps_kvcache_counts() -> None:
    pod = "10.0.0.2:8000"
    with _Kvcache() as kv:
        publisher = ZmqPublisher(kv.endpoint, f"kv@{pod}@m", drop_rate=0.3, rng=random.Random(7))
        try:
            assert publisher.wait_subscribed()
            engine, tee = _engine(publisher, pod)
            _run(engine, _workload(2, 40), "r")
            publisher.drop_rate = 0.0  # the last batch arrives, so every loss is visible
            engine.start("last", list(range(100, 100 + 2 * BS)))
            kv.wait_messages(publisher.sent)
        finally:
            publisher.close()
        assert publisher.dropped > 3
        assert publisher.sent == publisher.published - publisher.dropped
        stream = kv.stream(pod)
        assert stream["lost_batches"] == publisher.dropped
        assert stream["last_seq"] == publisher.published - 1
        assert kv.pipeline.statistics()["gaps"] == stream["gaps"] > 0
        # The loss is real: kvcache's view of the pod is now wrong somewhere.
        assert kv.indexed(pod, tee.stored_keys()) != engine.held_keys()


def test_restart_is_a_reset_that_clears_the_pod() -> None:
    pod = "10.0.0.3:8000"
    with _Kvcache() as kv:
        publisher = ZmqPublisher(kv.endpoint, f"kv@{pod}@m")
        try:
            assert publisher.wait_subscribed()
            engine, tee = _engine(publisher, pod)
            _run(engine, _workload(3, 20), "a")
            kv.wait_messages(publisher.sent)
            before = kv.indexed(pod, tee.stored_keys())
            assert before == engine.held_keys() and before
            engine.restart()
            assert publisher.next_seq == 0 and engine.held_keys() == set()
            _run(engine, _workload(4, 5), "b")
            kv.wait_messages(publisher.sent)
        finally:
            publisher.close()
        assert kv.pipeline.statistics()["resets"] == 1
        assert kv.indexed(pod, tee.stored_keys()) == engine.held_keys()
        assert kv.indexed(pod, before - engine.held_keys()) == set()  # old blocks are gone


def test_delayed_batches_wait_for_simulated_time() -> None:
    pod = "10.0.0.4:8000"
    now = [100.0]
    with _Kvcache() as kv:
        publisher = ZmqPublisher(kv.endpoint, f"kv@{pod}@m", delay_s=0.5, clock=lambda: now[0])
        try:
            assert publisher.wait_subscribed()
            engine, tee = _engine(publisher, pod)
            _run(engine, _workload(5, 6), "a")
            first = publisher.published
            now[0] = 100.25
            _run(engine, _workload(6, 6), "b")
            assert publisher.sent == 0 and publisher.held == publisher.published
            assert publisher.release_due(100.4) == 0
            assert publisher.release_due(100.5) == first  # only those due by then
            kv.wait_messages(first)
            assert publisher.release_due() == 0  # the clock still says 100.25
            now[0] = 100.75
            assert publisher.release_due() == publisher.published - first
            kv.wait_messages(publisher.published)
        finally:
            publisher.close()
        assert kv.indexed(pod, tee.stored_keys()) == engine.held_keys()
        assert kv.pipeline.statistics()["gaps"] == 0


def test_duplicate_sends_the_identical_message_twice() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    publisher = ZmqPublisher(f"tcp://127.0.0.1:{port}", "kv@p@m", duplicate_rate=1.0)
    try:
        deadline = time.monotonic() + 10
        while not publisher.wait_subscribed(0.01):
            assert time.monotonic() < deadline
            sub.poll(10)
        publisher.publish([AllBlocksCleared()])
        publisher.publish([AllBlocksCleared()])
        received = []
        for _ in range(4):
            assert sub.poll(10_000)
            received.append(sub.recv_multipart())
    finally:
        publisher.close()
        sub.close(linger=0)
    assert [int.from_bytes(frames[1], "big") for frames in received] == [0, 0, 1, 1]
    assert received[0] == received[1] and received[2] == received[3]
    assert publisher.statistics()["duplicated"] == 2


def test_redelivered_batches_are_harmless() -> None:
    pod = "10.0.0.5:8000"
    with _Kvcache() as kv:
        publisher = ZmqPublisher(
            kv.endpoint, f"kv@{pod}@m", duplicate_rate=0.5, rng=random.Random(11)
        )
        try:
            assert publisher.wait_subscribed()
            engine, tee = _engine(publisher, pod)
            _run(engine, _workload(7, 30), "r")
            kv.wait_messages(publisher.sent)
        finally:
            publisher.close()
        assert (
            publisher.duplicated > 3
            and publisher.sent == publisher.published + publisher.duplicated
        )
        assert kv.indexed(pod, tee.stored_keys()) == engine.held_keys()
        stats = kv.pipeline.statistics()
        assert stats["gaps"] == 0 and stats["resets"] == 0
        assert stats["duplicates"] == publisher.duplicated


_INPROC = itertools.count()  # a closed inproc endpoint is released asynchronously: never reuse


def test_fault_decisions_are_reproducible_from_the_seed() -> None:
    def faults(seed: int) -> list[tuple[int, int]]:
        sink_counts = []
        with ZmqPublisher(
            f"inproc://sim-faults-{next(_INPROC)}",
            "t",
            drop_rate=0.3,
            duplicate_rate=0.3,
            rng=random.Random(seed),
        ) as publisher:
            for _ in range(50):
                publisher.publish([AllBlocksCleared()])
                sink_counts.append((publisher.dropped, publisher.duplicated))
        return sink_counts

    assert faults(1) == faults(1)
    assert faults(1) != faults(2)
    assert faults(1)[-1][0] > 0 and faults(1)[-1][1] > 0
