"""Offline events: a dummy vLLM publisher feeds the kvcache service, then a router queries it.

    .venv/bin/python examples/offline_events.py

Everything runs in this process on loopback: the service (`kvcache.service.app.Service`: ZMQ SUB
bound on a free port, ingest pipeline, index, and its HTTP app served on a free port by the
server `kvcache serve` uses, on an event loop of its own thread),
and a "pod" that publishes KV events exactly as vLLM 0.32 does (topic ``kv@<pod>@<model>``, an
8-byte sequence number, a msgpack batch of map-form events) with block hashes computed by vLLM's
own algorithm (`kvcache.hashing`). For a real engine instead, see online_vllm.md.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import Any

import msgspec
import zmq

from kvcache import Config
from kvcache.hashing import VllmScheme
from kvcache.service.app import Service
from kvcache.service.http_server import HttpServer

# The engines' hashing flags: --prefix-caching-hash-algo sha256_cbor, PYTHONHASHSEED=42,
# --block-size 16 (llm-d's deployments). The service is configured to match.
ALGO, SEED, BLOCK = "sha256_cbor", "42", 16
MODEL = "demo-model"


# vLLM 0.32's wire structs (vllm/distributed/kv_events.py), with the fields a plain-text store on
# the GPU carries: events are maps tagged by "type", the batch is [ts, events, dp_rank].
class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int]
    medium: str | None = "GPU"


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved]
    data_parallel_rank: int | None = None


class DummyEngine:
    """One pod's KV-event publisher (vLLM's PUB socket, connecting to the service's bind)."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, pod: str) -> None:
        # XPUB is PUB plus a way to see subscriptions arrive: waiting for one means no event
        # is sent before the service listens (a plain PUB drops those: ZMQ's "slow joiner").
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.RCVTIMEO, 10_000)  # zmq.Again if the service never listens
        self.socket.connect(endpoint)
        self.socket.recv()  # the service's subscription
        self.topic = f"kv@{pod}@{MODEL}".encode()
        self.seq = 0

    def publish(self, *events: BlockStored | BlockRemoved) -> None:
        payload = msgspec.msgpack.encode(EventBatch(time.time(), list(events), 0))
        self.socket.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.seq += 1


def http(port: int, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST a JSON body to) the service and decode its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data, timeout=5) as response:
        return json.load(response)


def main() -> None:
    """Start the service, publish events for two pods, wait until ingested, score a prompt."""
    config = Config.from_mapping(
        {
            "hashing": {"scheme": ALGO, "seed": SEED, "block_size": BLOCK},
            "events": {"zmq_bind": ["tcp://127.0.0.1:0"]},  # 0: a free port
            "http": {"port": 0},
        }
    )
    service = Service(config)
    service.start()
    loop = asyncio.new_event_loop()
    server = HttpServer(service.http, "127.0.0.1", 0)  # 0: a free port
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context: zmq.Context[Any] = zmq.Context()
    try:
        port = server.port
        endpoint = service.subscriber.bound[0]
        print(f"service: HTTP on port {port}, events on {endpoint}")

        scheme = VllmScheme(ALGO, seed=SEED, block_size=BLOCK)
        prompt = list(range(100, 100 + 8 * BLOCK))  # 8 blocks
        keys = scheme.block_keys(prompt)  # exactly the hashes vLLM publishes for these tokens

        pod_a = DummyEngine(context, endpoint, "10.0.0.7:8000")
        pod_b = DummyEngine(context, endpoint, "10.0.0.8:8000")
        # Pod A prefills the whole prompt, then evicts its last 2 blocks (tail first, one hash
        # per event, as vLLM does); pod B caches the first 4 blocks.
        pod_a.publish(BlockStored(keys, None, prompt, BLOCK))
        pod_a.publish(BlockRemoved([keys[7]]), BlockRemoved([keys[6]]))
        pod_b.publish(BlockStored(keys[:4], None, prompt[: 4 * BLOCK], BLOCK))

        # Ingest is asynchronous: wait until every pod's last batch was applied.
        sent = {"10.0.0.7:8000": pod_a.seq - 1, "10.0.0.8:8000": pod_b.seq - 1}
        deadline = time.monotonic() + 10
        while True:
            pods = {p["pod"]: p for p in http(port, "/pods")["pods"]}
            if all(pod in pods and pods[pod]["last_seq"] >= seq for pod, seq in sent.items()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"events not ingested: {pods}")
            time.sleep(0.02)
        for pod, info in sorted(pods.items()):
            print(f"pod {pod}: hash_mode={info['hash_mode']} blocks={info['blocks']}")

        answer = http(port, "/score_tokens", {"token_ids": prompt, "model": MODEL})
        print("scores:", json.dumps(answer["scores"]))
        print("normalized:", json.dumps(answer["normalized"]))
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        loop.close()
        service.stop()
        context.destroy(linger=0)


if __name__ == "__main__":
    main()
