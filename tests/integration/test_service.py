"""`kvcache serve` as a real process: ZMQ in, HTTP out, metrics, bad input, clean shutdown."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from serve_process import ServeProcess, serve

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "captures"
PICKLE = CAPTURE / "vllm-0.32-sha256-pickle-default"


def _score(service: ServeProcess, payload: dict[str, Any]) -> tuple[int, Any]:
    status, _, body = service.request("POST", "/score_tokens", json.dumps(payload).encode())
    return status, json.loads(body)


@pytest.fixture(scope="module")
def service() -> Iterator[ServeProcess]:
    with serve(["--block-size", "32"]) as running:
        yield running


def _publish_capture(port: int) -> int:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.connect(f"tcp://127.0.0.1:{port}")
    lines = (PICKLE / "frames.jsonl").read_text().splitlines()
    frames = [[bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines]
    time.sleep(0.5)  # let the connection settle: PUB drops messages sent before it is up
    for message in frames:
        pub.send_multipart(message)
    pub.close(linger=2000)
    return len(frames)


def test_service_scores_what_a_real_engine_published(service: ServeProcess) -> None:
    sent = _publish_capture(service.zmq_port)
    requests = [json.loads(line) for line in (PICKLE / "requests.jsonl").read_text().splitlines()]
    # The last request of the capture (after the reset, a repeat) left 6 full blocks cached.
    prompt = requests[-1]["prompt_token_ids"] + requests[-1]["output_token_ids"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # ingest is asynchronous: wait for the last batch
        text = service.request("GET", "/metrics")[2].decode()
        received = f"kvcache_events_messages_received_total {float(sent)}" in text
        if received and "kvcache_queue_depth 0.0" in text:
            break
        time.sleep(0.1)
    status, body = _score(service, {"token_ids": prompt, "model": "tiny-llama"})
    assert status == 200
    assert body["scores"] == {"pod-a": 6.0}
    status, body = _score(service, {"token_ids": prompt, "pods": ["other"]})
    assert body["scores"] == {}
    status, _, metrics = service.request("GET", "/metrics")
    text = metrics.decode()
    assert status == 200
    assert f"kvcache_events_messages_received_total {float(sent)}" in text
    assert 'kvcache_events_applied_total{type="BlockStored"} 25.0' in text
    assert 'kvcache_pods{hash_mode="identity"} 1.0' in text
    assert "kvcache_index_lookup_requests_total" in text
    assert "kvcache_index_lookup_latency_seconds_bucket" in text


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/score_tokens", b"{", 400, "not valid JSON"),
        ("POST", "/score_tokens", b'{"token_ids": [-1]}', 400, "token_ids"),
        ("POST", "/score_tokens", b'{"token_ids": [1], "bogus": 1}', 400, "bogus"),
        ("POST", "/score_tokens", b'{"model": "m"}', 400, "token_ids"),
        ("GET", "/score_tokens", None, 405, "POST"),
        ("GET", "/nope", None, 404, "/nope"),
    ],
)
def test_bad_requests_get_clear_4xx(  # noqa: PLR0917 - pytest parameters
    service: ServeProcess, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, _, payload = service.request(method, path, body)
    assert got == status
    assert message in json.loads(payload)["error"]


def test_oversized_body_is_413(service: ServeProcess) -> None:
    # Announce a body over the 16 MiB limit; the server answers before reading it.
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as conn:
        conn.sendall(
            b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n{"
        )
        reply = b""
        while b"body larger than" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"body larger than" in reply


def test_sigterm_stops_cleanly(service: ServeProcess) -> None:
    service.process.send_signal(signal.SIGTERM)
    output, _ = service.process.communicate(timeout=30)
    assert service.process.returncode == 0, output
    assert "kvcache: HTTP on http://127.0.0.1" in output
    assert "--kv-events-config" in output
