"""Real ZMQ sockets: engine-style PUB -> kvcache SUB (bind and connect) -> pipeline -> index."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.events.pipeline import IngestPipeline, shard_of
from kvcache.events.schema import AllBlocksCleared, BlockStored, EventBatch
from kvcache.events.subscriber import Subscriber
from kvcache.indexer import Indexer

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "captures"
_encode = msgspec.msgpack.Encoder().encode


def _capture_frames() -> list[list[bytes]]:
    lines = (CAPTURE / "vllm-0.32-sha256-pickle-default" / "frames.jsonl").read_text()
    return [
        [bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines.splitlines()
    ]


@pytest.fixture
def indexer() -> Indexer:
    return Indexer(Config.from_mapping({"hashing": {"block_size": 32}}))


@pytest.fixture
def pipeline(indexer: Indexer) -> Iterator[IngestPipeline]:
    pipe = IngestPipeline(indexer.index, indexer.scheme, shards=2, queue_size=1000)
    pipe.start()
    yield pipe
    pipe.stop()


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def _publish_until_received(
    pub: zmq.Socket[bytes], subscriber: Subscriber, frames: list[list[bytes]]
) -> None:
    """PUB/SUB drops messages until the subscription propagates: probe first, then send."""
    probe = [b"probe", (0).to_bytes(8, "big"), b"\x92\x00\x90"]
    deadline = time.monotonic() + 10
    while subscriber.received == 0 and time.monotonic() < deadline:
        pub.send_multipart(probe)
        time.sleep(0.05)
    assert subscriber.received > 0
    for message in frames:
        pub.send_multipart(message)


def test_bind_mode_ingests_a_real_capture(indexer: Indexer, pipeline: IngestPipeline) -> None:
    subscriber = Subscriber(pipeline.submit, bind=["tcp://127.0.0.1:0"])
    subscriber.start()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.connect(subscriber.bound[0])  # vLLM with a connect-style endpoint does exactly this
    try:
        frames = _capture_frames()
        _publish_until_received(pub, subscriber, frames)
        _wait(lambda: pipeline.statistics()["messages"] >= len(frames) + 1)
        assert pipeline.drain()
    finally:
        pub.close(linger=0)
        subscriber.stop()
    stats = pipeline.statistics()
    assert stats["events_applied"] == {"BlockStored": 25, "BlockRemoved": 32, "AllBlocksCleared": 1}
    assert stats["gaps"] == 0 and stats["resets"] == 0
    assert stats["pods_by_hash_mode"]["identity"] == 1
    states = pipeline.pod_states()
    assert states["pod-a"]["hash_mode"] == "identity"
    assert states["pod-a"]["streams"]["0"]["last_seq"] == 25


def test_connect_mode_dials_an_engine_that_binds(
    indexer: Indexer, pipeline: IngestPipeline
) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    subscriber = Subscriber(pipeline.submit, connect=[f"tcp://127.0.0.1:{port}"])
    subscriber.start()
    keys = indexer.block_keys(list(range(64)))
    try:
        batch = EventBatch(
            ts=1.0,
            events=[BlockStored(keys, None, list(range(64)), 32, medium="CPU")],
            dp_rank=0,
        )
        frame = [b"kv@10.0.0.7:8000@m", (0).to_bytes(8, "big"), _encode(batch)]
        _publish_until_received(pub, subscriber, [frame])
        _wait(lambda: indexer.index.lookup(keys) != [])
    finally:
        pub.close(linger=0)
        subscriber.stop()
    assert indexer.index.lookup(keys)[1] == {PodEntry("10.0.0.7:8000", "cpu", False, None)}
    assert indexer.score_tokens(list(range(64))) == {"10.0.0.7:8000": 1.6}


def test_restart_clears_pod_and_gap_is_counted(indexer: Indexer, pipeline: IngestPipeline) -> None:
    def message(seq: int, *events: object) -> list[bytes]:
        batch = EventBatch(ts=1.0, events=list(events), dp_rank=0)  # type: ignore[arg-type]
        return [b"kv@p1@m", seq.to_bytes(8, "big"), _encode(batch)]

    k1, k2 = indexer.block_keys(list(range(64)))
    (k3,) = indexer.block_keys(list(range(100, 132)))
    first = BlockStored([k1], None, list(range(32)), 32)
    second = BlockStored([k2], k1, list(range(32, 64)), 32)
    for frames in (message(0, first), message(5, second)):
        pipeline.submit(frames)
    assert pipeline.drain()
    assert pipeline.statistics()["gaps"] == 1
    assert len(indexer.index.lookup([k1, k2])) == 2
    pipeline.submit(message(0, BlockStored([k3], None, list(range(100, 132)), 32)))  # restarted
    assert pipeline.drain()
    assert indexer.index.lookup([k1]) == []
    assert indexer.index.lookup([k3]) != []
    assert pipeline.statistics()["resets"] == 1
    pipeline.submit(message(1, AllBlocksCleared()))
    assert pipeline.drain()
    assert indexer.index.lookup([k3]) == []


def test_full_queue_drops_counts_and_shows_as_gap(indexer: Indexer) -> None:
    pipe = IngestPipeline(indexer.index, indexer.scheme, shards=2, queue_size=1)
    batch = _encode(EventBatch(ts=1.0, events=[], dp_rank=0))
    assert pipe.submit([b"kv@p@m", (0).to_bytes(8, "big"), batch])
    assert not pipe.submit([b"kv@p@m", (1).to_bytes(8, "big"), batch])
    pipe.start()
    assert pipe.drain()
    assert pipe.submit([b"kv@p@m", (2).to_bytes(8, "big"), batch])
    pipe.stop()
    stats = pipe.statistics()
    assert stats["queue_overflow"] == 1
    assert stats["gaps"] == 1
    assert stats["messages"] == 2


def test_stop_applies_everything_queued(indexer: Indexer) -> None:
    pipe = IngestPipeline(indexer.index, indexer.scheme, shards=2, queue_size=10_000)
    for seq, frames in enumerate(_capture_frames()):
        assert seq == int.from_bytes(frames[1], "big")
        pipe.submit(frames)
    pipe.start()
    pipe.stop()
    assert pipe.statistics()["messages"] == 26


def test_bad_frames_are_counted_not_fatal(indexer: Indexer, pipeline: IngestPipeline) -> None:
    pipeline.submit([b"kv@p@m", b"\x00\x01", b"\x90"])  # short sequence frame
    pipeline.submit([b"kv@p@m", (0).to_bytes(8, "big"), b"\xc1garbage"])
    pipeline.submit([b"only-one-frame"])
    assert pipeline.drain()
    rejected = pipeline.statistics()["frames_rejected"]
    assert sum(rejected.values()) == 3


def test_shard_is_stable() -> None:
    assert shard_of("10.0.0.7:8000", 4) == shard_of("10.0.0.7:8000", 4)
    assert {shard_of(f"pod-{i}", 4) for i in range(64)} == {0, 1, 2, 3}


def test_one_shard_applies_inline_before_submit_returns(indexer: Indexer) -> None:
    pipe = IngestPipeline(indexer.index, indexer.scheme, shards=1)
    pipe.start()  # no worker thread to start
    tokens = list(range(100, 132))
    key = indexer.block_keys(tokens)[0]
    batch = _encode(EventBatch(ts=1.0, events=[BlockStored([key], None, tokens, 32)]))
    assert pipe.submit([b"kv@p@m", (0).to_bytes(8, "big"), batch])
    assert indexer.index.lookup([key]) != []  # no drain needed
    assert pipe.queue_depths() == [0]
    pipe.stop()


@pytest.mark.parametrize("shards", [1, 3])
def test_forget_pod_clears_entries_in_order(indexer: Indexer, shards: int) -> None:
    pipe = IngestPipeline(indexer.index, indexer.scheme, shards=shards)
    pipe.start()
    tokens = list(range(100, 132))
    key = indexer.block_keys(tokens)[0]
    for pod in (b"a:1", b"b:1"):
        batch = _encode(EventBatch(ts=1.0, events=[BlockStored([key], None, tokens, 32)]))
        pipe.submit([b"kv@" + pod + b"@m", (0).to_bytes(8, "big"), batch])
    assert pipe.forget_pod("a:1") == 1  # runs after the pod's queued message
    assert pipe.drain()
    assert {e.pod for e in indexer.index.lookup([key])[0]} == {"b:1"}
    assert "a:1" not in pipe.pod_states()
    pipe.stop()
