"""A fleet of fake vLLM 0.32 engines in one process: one ZMQ PUB per pod, precomputed payloads.

Run by ``bench.ingest_bench`` as ``python -m bench.publisher --pods N --stored-blocks B``. It
builds the whole event stream before it says it is ready, binds one PUB socket per pod on
``tcp://127.0.0.1:<random port>`` (vLLM's engine-side PUB binds; consumers connect), then obeys
one JSON command per line on stdin and answers one JSON line per command on stdout:

* ``{"cmd": "probe"}``: one probe batch (a 1-block BlockStored of `PROBE_TOKENS`) on every pod.
* ``{"cmd": "stream"}``: the whole precomputed stream, as fast as the sockets take it.
* ``{"cmd": "paced", "blocks_per_s": R, "seconds": T}``: the stream over and over, paced at R
  block operations (stored + removed) per second, for T seconds.
* ``{"cmd": "quit"}``.

Workload, per pod: requests = one of a few fleet-wide system prompts + a distinct question. An
engine step (one batch) prefills 1-3 new requests (one BlockStored each, 8-64 new blocks, parent =
the system prompt's last block once that is cached), completes decode blocks of earlier requests
(1-block BlockStored events) and evicts the blocks of the oldest finished requests, tail first,
one BlockRemoved per block, whenever the pod's cache is over capacity: the layout of the events of
a real vLLM 0.32 engine (see tests/data/captures). Each pod's last batch stores `SENTINEL_TOKENS`
(4 blocks, parent None), so a consumer has applied a pod's whole stream once it holds them.

Hashes are real vLLM keys (sha256_cbor, PYTHONHASHSEED "42", block size 16), so a consumer
configured that way verifies them and indexes in identity mode. The event structs below mirror
vLLM 0.32's own definitions (``omit_defaults``, map-form events in an array batch); the
``--check-capture`` flag re-encodes the real vLLM 0.32 capture byte for byte with them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import zmq

from kvcache.hashing import VllmScheme

SCHEME: Final = "sha256_cbor"
SEED: Final = "42"
BLOCK_SIZE: Final = 16
VOCAB: Final = 128_256
MODEL: Final = "bench-model"
CAPTURE: Final = (
    Path(__file__).resolve().parents[1]
    / "tests/data/captures/vllm-0.32-sha256-pickle-default/frames.jsonl"
)


def _fixed_tokens(seed: int, blocks: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(blocks * BLOCK_SIZE)]


PROBE_TOKENS: Final = _fixed_tokens(1001, 1)
SENTINEL_TOKENS: Final = _fixed_tokens(1002, 4)


def pod_id(number: int) -> str:
    """The pod id of pod ``number`` (its topic is ``kv@<pod>@<model>``)."""
    return f"10.0.{number // 256}.{number % 256}:8000"


def topic(number: int) -> str:
    """The ZMQ topic pod ``number`` publishes under."""
    return f"kv@{pod_id(number)}@{MODEL}"


# --------------------------------------------------------------------------------------------
# vLLM 0.32 wire structs (vllm/distributed/kv_events.py): map-form events, array batch.
# --------------------------------------------------------------------------------------------


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_Event):
    """vLLM 0.32 BlockStored (``{"type": "BlockStored", ...}``; None defaults left out)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(_Event):
    """vLLM 0.32 BlockRemoved (one hash per event, as vLLM sends it)."""

    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(_Event):
    """vLLM 0.32 AllBlocksCleared."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """vLLM's KVEventBatch: ``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_ENCODER: Final = msgspec.msgpack.Encoder()


def stored(keys: list[int], parent: int | None, tokens: list[int]) -> BlockStored:
    """A BlockStored exactly as vLLM 0.32 fills it for plain text on the GPU tier."""
    return BlockStored(
        keys,
        parent,
        tokens,
        BLOCK_SIZE,
        None,
        "GPU",
        None,
        extra_keys=[None] * len(keys),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def removed(key: int) -> BlockRemoved:
    """A BlockRemoved exactly as vLLM 0.32 sends it."""
    return BlockRemoved([key], "GPU", group_idx=0)


def encode_batch(events: list[BlockStored | BlockRemoved | AllBlocksCleared], ts: float) -> bytes:
    """The msgpack payload frame of one batch (data-parallel rank 0)."""
    return _ENCODER.encode(EventBatch(ts, events, 0))


def check_capture(path: Path = CAPTURE) -> int:
    """Re-encode every payload of a real vLLM 0.32 capture; returns how many matched exactly."""
    decoder = msgspec.msgpack.Decoder(EventBatch)
    matched = 0
    for line in path.read_text().splitlines():
        payload = bytes.fromhex(json.loads(line)["frames_hex"][2])
        if _ENCODER.encode(decoder.decode(payload)) != payload:
            raise AssertionError(f"capture payload not reproduced: {payload[:64].hex()}")
        matched += 1
    return matched


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass
class _Request:
    keys: list[int]
    """Keys of the blocks this request added to the pod (question + decode blocks)."""
    decode_left: int
    last_key: int
    last_digest: bytes
    next_block: int
    tokens: list[int]
    """Tokens of the decode blocks still to be completed."""


@dataclass
class _Pod:
    number: int
    cached_prompts: set[int] = field(default_factory=set)
    running: list[_Request] = field(default_factory=list)
    finished: deque[_Request] = field(default_factory=deque)
    resident: int = 0


@dataclass
class Workload:
    """The precomputed stream: ``(pod number, payload)`` in publish order, plus its totals."""

    messages: list[tuple[int, bytes]]
    pods: int
    blocks_stored: int
    blocks_removed: int
    events_stored: int
    events_removed: int
    payload_bytes: int
    sentinel_keys: list[int]
    probe_keys: list[int]


class _Generator:
    def __init__(self, pods: int, seed: int, capacity: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.scheme = VllmScheme(SCHEME, seed=SEED, block_size=BLOCK_SIZE)
        self.capacity = capacity
        self.pods = [_Pod(number) for number in range(pods)]
        # Four fleet-wide system prompts of 32-128 blocks (512-2048 tokens).
        self.prompts: list[tuple[list[int], list[bytes], list[int]]] = []
        for blocks in (32, 64, 96, 128):
            tokens = self._tokens(blocks)
            digests = self.scheme.block_digests(tokens)
            keys = [int.from_bytes(d[-8:], "big") for d in digests]
            self.prompts.append((tokens, digests, keys))
        self.blocks_stored = 0
        self.blocks_removed = 0
        self.events_stored = 0
        self.events_removed = 0

    def _tokens(self, blocks: int) -> list[int]:
        values: list[int] = self.rng.integers(0, VOCAB, size=blocks * BLOCK_SIZE).tolist()
        return values

    def _chain(self, tokens: list[int], parent: bytes, first: int) -> tuple[list[int], bytes]:
        digests = self.scheme.block_digests(tokens, parent=parent, first_block=first)
        return [int.from_bytes(d[-8:], "big") for d in digests], digests[-1]

    def _evict(self, pod: _Pod, need: int, events: list[BlockStored | BlockRemoved]) -> None:
        while pod.resident + need > self.capacity and pod.finished:
            request = pod.finished.popleft()
            for key in reversed(request.keys):  # vLLM frees a request's blocks tail first
                events.append(removed(key))
            pod.resident -= len(request.keys)
            self.blocks_removed += len(request.keys)
            self.events_removed += len(request.keys)

    def step(self, pod: _Pod) -> list[BlockStored | BlockRemoved]:
        """The events of one engine step of ``pod``."""
        rng = self.rng
        events: list[BlockStored | BlockRemoved] = []
        stores: list[BlockStored] = []
        # Decode: every running request completes one more block this step.
        still: list[_Request] = []
        for request in pod.running:
            tokens = request.tokens[:BLOCK_SIZE]
            request.tokens = request.tokens[BLOCK_SIZE:]
            keys, digest = self._chain(tokens, request.last_digest, request.next_block)
            stores.append(stored(keys, request.last_key, tokens))
            request.keys += keys
            request.last_key, request.last_digest = keys[-1], digest
            request.next_block += 1
            request.decode_left -= 1
            (still if request.decode_left else pod.finished).append(request)
        pod.running = still
        # Prefill: 1-3 new requests, each one BlockStored of its uncached blocks.
        for _ in range(int(rng.integers(1, 4))):
            choice = int(rng.integers(0, len(self.prompts)))
            prompt_tokens, prompt_digests, prompt_keys = self.prompts[choice]
            question_blocks = int(rng.integers(8, 65))
            decode_blocks = int(rng.integers(0, 4))
            question = self._tokens(question_blocks)
            keys, digest = self._chain(question, prompt_digests[-1], len(prompt_keys))
            if choice in pod.cached_prompts:
                stores.append(stored(keys, prompt_keys[-1], question))
            else:
                pod.cached_prompts.add(choice)  # system prompts stay hot: never evicted
                stores.append(stored(prompt_keys + keys, None, prompt_tokens + question))
            request = _Request(
                keys,
                decode_blocks,
                keys[-1],
                digest,
                len(prompt_keys) + question_blocks,
                self._tokens(decode_blocks),
            )
            (pod.running if decode_blocks else pod.finished).append(request)
        added = sum(len(event.block_hashes) for event in stores)
        self._evict(pod, added, events)  # removals first, as vLLM frees before it allocates
        events.extend(stores)
        pod.resident += added
        self.blocks_stored += added
        self.events_stored += len(stores)
        return events


def build_workload(pods: int, stored_blocks: int, seed: int = 1, capacity: int = 4096) -> Workload:
    """Round-robin engine steps over ``pods`` until ``stored_blocks`` blocks were stored."""
    generator = _Generator(pods, seed, capacity)
    scheme = generator.scheme
    messages: list[tuple[int, bytes]] = []
    ts = 1.8e9
    while generator.blocks_stored < stored_blocks:
        for pod in generator.pods:
            ts += 0.001
            messages.append((pod.number, encode_batch(list(generator.step(pod)), ts)))
    sentinel_keys = scheme.block_keys(SENTINEL_TOKENS)
    for pod in generator.pods:
        ts += 0.001
        messages.append(
            (pod.number, encode_batch([stored(sentinel_keys, None, SENTINEL_TOKENS)], ts))
        )
    generator.blocks_stored += len(sentinel_keys) * pods
    generator.events_stored += pods
    return Workload(
        messages=messages,
        pods=pods,
        blocks_stored=generator.blocks_stored,
        blocks_removed=generator.blocks_removed,
        events_stored=generator.events_stored,
        events_removed=generator.events_removed,
        payload_bytes=sum(len(payload) for _, payload in messages),
        sentinel_keys=sentinel_keys,
        probe_keys=scheme.block_keys(PROBE_TOKENS),
    )


def message_blocks(payload: bytes) -> int:
    """Block operations (stored + removed hashes) in one payload."""
    batch = msgspec.msgpack.decode(payload, type=EventBatch)
    return sum(
        len(event.block_hashes) for event in batch.events if not isinstance(event, AllBlocksCleared)
    )


# --------------------------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------------------------


class _Fleet:
    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []
        self.endpoints: list[str] = []
        for _ in range(workload.pods):
            socket = self.context.socket(zmq.PUB)
            socket.setsockopt(zmq.SNDHWM, 0)  # never drop: a slow consumer only queues
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind("tcp://127.0.0.1:0")
            self.sockets.append(socket)
            self.endpoints.append(socket.getsockopt_string(zmq.LAST_ENDPOINT))
        self.topics = [topic(number).encode() for number in range(workload.pods)]
        self.seqs = [0] * workload.pods
        self.blocks = [message_blocks(payload) for _, payload in workload.messages]
        probe_keys = workload.probe_keys
        self.probe_payload = encode_batch([stored(probe_keys, None, PROBE_TOKENS)], 1.7e9)

    def _send(self, number: int, payload: bytes) -> None:
        seq = self.seqs[number]
        self.seqs[number] = seq + 1
        self.sockets[number].send_multipart((self.topics[number], seq.to_bytes(8, "big"), payload))

    def probe(self) -> dict[str, Any]:
        for number in range(self.workload.pods):
            self._send(number, self.probe_payload)
        return {"ok": True}

    def stream(self) -> dict[str, Any]:
        send = self._send
        messages = self.workload.messages
        first = time.monotonic()
        for number, payload in messages:
            send(number, payload)
        last = time.monotonic()
        return {"t_first": first, "t_last": last, "messages": len(messages)}

    def paced(self, blocks_per_s: float, seconds: float) -> dict[str, Any]:
        send = self._send
        messages = self.workload.messages
        blocks = self.blocks
        first = time.monotonic()
        deadline = first + seconds
        sent_messages = sent_blocks = position = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            allowed = (now - first) * blocks_per_s
            while sent_blocks < allowed:
                number, payload = messages[position]
                send(number, payload)
                sent_blocks += blocks[position]
                sent_messages += 1
                position = (position + 1) % len(messages)
            time.sleep(0.001)
        return {
            "t_first": first,
            "t_last": time.monotonic(),
            "messages": sent_messages,
            "blocks": sent_blocks,
        }

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Build the workload, bind the sockets, then serve commands until quit or EOF."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=32)
    parser.add_argument("--stored-blocks", type=int, default=400_000)
    parser.add_argument("--capacity", type=int, default=4096, help="blocks cached per pod")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check-capture", action="store_true")
    args = parser.parse_args(argv)
    if args.check_capture:
        print(json.dumps({"capture_payloads_reproduced": check_capture()}))
        return
    started = time.monotonic()
    workload = build_workload(args.pods, args.stored_blocks, args.seed, args.capacity)
    fleet = _Fleet(workload)
    _reply(
        {
            "ready": True,
            "generate_s": time.monotonic() - started,
            "endpoints": fleet.endpoints,
            "topics": [t.decode() for t in fleet.topics],
            "messages": len(workload.messages),
            "pods": workload.pods,
            "blocks_stored": workload.blocks_stored,
            "blocks_removed": workload.blocks_removed,
            "events_stored": workload.events_stored,
            "events_removed": workload.events_removed,
            "payload_bytes": workload.payload_bytes,
            "sentinel_keys": workload.sentinel_keys,
            "probe_keys": workload.probe_keys,
        }
    )
    try:
        for line in sys.stdin:
            command = json.loads(line)
            name = command.get("cmd")
            if name == "probe":
                _reply(fleet.probe())
            elif name == "stream":
                _reply(fleet.stream())
            elif name == "paced":
                _reply(fleet.paced(float(command["blocks_per_s"]), float(command["seconds"])))
            elif name == "quit":
                _reply({"ok": True})
                break
            else:
                _reply({"error": f"unknown command {name!r}"})
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
