"""Two routers sharing one Valkey: what one ingests, the other scores."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from redis_servers import ServerProcess, free_port, standalone, valkey_binary

from kvcache.blocks import KeyType, PodEntry
from kvcache.index.redis import RedisIndex

CAPTURE = (
    Path(__file__).resolve().parents[2] / "data" / "captures" / "vllm-0.32-sha256-pickle-default"
)
A, B = PodEntry("pod-a"), PodEntry("pod-b", "cpu", group=1)


@pytest.fixture(scope="module")
def valkey() -> Iterator[ServerProcess]:
    binary = valkey_binary()
    if binary is None:
        pytest.fail("no valkey-server binary (install the test extra)")
    with standalone(binary) as server:
        yield server


def test_two_indexes_share_state(valkey: ServerProcess) -> None:
    url = valkey.url.replace("redis://", "valkey://")
    with RedisIndex(url, key_prefix="shared") as one, RedisIndex(url, key_prefix="shared") as two:
        one.add([1, 2, 3], [11, 12, 13], [A])
        two.add(None, [11, 12], [B])  # entry ids allocated by each, decoded by both
        assert two.lookup([11, 12, 13]) == [frozenset({A, B})] * 2 + [frozenset({A})]
        assert one.lookup([11, 12, 13], ["pod-b"]) == [frozenset({B})] * 2
        assert two.request_key(2) == 12
        two.evict(2, KeyType.ENGINE, [A])  # queued: the other router sees it once flushed
        deadline = time.monotonic() + 5
        while one.lookup([12]) != [frozenset({B})]:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert one.clear("pod-b") == 2
        assert two.lookup([11, 12, 13]) == [frozenset({A})]
        assert two.add(None, [11], [A]) == [11]  # "already held" is seen across routers


class Router:
    def __init__(self, url: str) -> None:
        self.http_port, self.zmq_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from kvcache.service.cli import main; sys.exit(main())",
                "serve",
                "--index",
                url,
                "--http-port",
                str(self.http_port),
                "--zmq-endpoint",
                f"tcp://127.0.0.1:{self.zmq_port}",
                "--block-size",
                "32",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def request(self, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST" if body else "GET"
        )
        with urllib.request.urlopen(req, timeout=10) as response:
            data = response.read()
        return json.loads(data) if path != "/metrics" else data.decode()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.request("/healthz")
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"router did not start: {self.process.communicate()[0]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def test_two_router_processes_share_one_valkey(valkey: ServerProcess) -> None:
    url = valkey.url.replace("redis://", "valkey://")
    with contextlib.closing(valkey.client()) as client:
        client.flushall()
    routers = [Router(url), Router(url)]
    try:
        for router in routers:
            router.wait_ready()
        ingest, scorer = routers
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        pub = context.socket(zmq.PUB)
        pub.connect(f"tcp://127.0.0.1:{ingest.zmq_port}")
        lines = (CAPTURE / "frames.jsonl").read_text().splitlines()
        frames = [[bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines]
        time.sleep(0.5)  # PUB drops what it sends before the connection is up
        for message in frames:
            pub.send_multipart(message)
        pub.close(linger=2000)
        requests = [json.loads(x) for x in (CAPTURE / "requests.jsonl").read_text().splitlines()]
        prompt = requests[-1]["prompt_token_ids"] + requests[-1]["output_token_ids"]
        body = json.dumps({"token_ids": prompt, "model": "tiny-llama"}).encode()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = ingest.request("/metrics")
            if f"kvcache_events_messages_received_total {float(len(frames))}" in text and (
                "kvcache_queue_depth 0.0" in text
            ):
                break
            time.sleep(0.1)
        time.sleep(0.05)  # queued evictions are flushed within a millisecond
        assert scorer.request("/score_tokens", body)["scores"] == {"pod-a": 6.0}
        assert ingest.request("/score_tokens", body)["scores"] == {"pod-a": 6.0}
    finally:
        for router in routers:
            router.stop()
