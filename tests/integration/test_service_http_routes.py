"""`kvcache serve` as a real process, over real HTTP: /readyz, /pods, /openapi.json, scoring."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from serve_process import ServeProcess, serve

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "tests" / "data" / "captures" / "vllm-0.32-sha256-pickle-default"
POD = "10.0.0.7:8000"
POD_PATH = "/pods/10.0.0.7%3A8000"


def _json(service: ServeProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    status, _, payload = service.request(method, path, data)
    return status, json.loads(payload)


@pytest.fixture(scope="module")
def service() -> Iterator[ServeProcess]:
    with serve(["--block-size", "32"], ready_path="/readyz") as running:
        yield running


def _publish_capture(port: int) -> int:
    """Send the real capture's messages as pod POD; returns the last sequence number."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.connect(f"tcp://127.0.0.1:{port}")
    messages = []
    for line in (CAPTURE / "frames.jsonl").read_text().splitlines():
        parts = [bytes.fromhex(f) for f in json.loads(line)["frames_hex"]]
        parts[0] = f"kv@{POD}@tiny-llama".encode()
        messages.append(parts)
    time.sleep(0.5)  # let the connection settle: PUB drops messages sent before it is up
    for message in messages:
        pub.send_multipart(message)
    pub.close(linger=2000)
    return int.from_bytes(messages[-1][1], "big")


def _gauge(service: ServeProcess, name: str) -> int:
    text = service.request("GET", "/metrics")[2].decode()
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return int(float(line.split()[1]))


def test_readyz_and_openapi(service: ServeProcess) -> None:
    assert _json(service, "GET", "/readyz") == (200, {"status": "ready"})
    assert _json(service, "GET", "/healthz") == (200, {"status": "ok"})
    status, headers, body = service.request("GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads((ROOT / "docs" / "openapi.json").read_text())


def test_pods_scores_and_clear_over_http(service: ServeProcess) -> None:
    last_seq = _publish_capture(service.zmq_port)
    deadline = time.monotonic() + 20
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # ingest is asynchronous: wait for the last batch
        pods = _json(service, "GET", "/pods")[1]["pods"]
        if pods and pods[0]["last_seq"] == last_seq:
            break
        time.sleep(0.1)
    assert [p["pod"] for p in pods] == [POD]
    assert pods[0]["hash_mode"] == "identity"
    assert pods[0]["gaps"] == 0

    # The pod id holds ':' — sent percent-encoded, as a client must.
    status, one = _json(service, "GET", POD_PATH)
    assert status == 200
    assert one == pods[0]
    assert _json(service, "GET", "/pods/10.0.0.9%3A1")[0] == 404

    requests = [json.loads(line) for line in (CAPTURE / "requests.jsonl").read_text().splitlines()]
    # The capture's last request (a repeat after the reset) left 6 full 32-token blocks cached.
    prompt = requests[-1]["prompt_token_ids"] + requests[-1]["output_token_ids"]
    status, scored = _json(
        service, "POST", "/score_tokens", {"token_ids": prompt, "pods": [POD, "x"]}
    )
    assert status == 200
    assert scored["scores"] == {POD: 6.0}
    assert scored["matched_blocks"] == {POD: 6}
    assert scored["normalized"] == {POD: 1.0, "x": 0.0}
    assert scored["blocks"] == len(prompt) // 32

    entries = _gauge(service, "kvcache_index_entries")
    assert entries >= 6
    status, cleared = _json(service, "DELETE", POD_PATH)
    assert (status, cleared) == (200, {"pod": POD, "removed": entries})
    assert _gauge(service, "kvcache_index_entries") == 0
    assert _json(service, "POST", "/score_tokens", {"token_ids": prompt})[1]["scores"] == {}
    assert _json(service, "GET", POD_PATH)[0] == 404


def test_wrong_method_is_405_with_allow(service: ServeProcess) -> None:
    status, headers, body = service.request("POST", "/pods")
    assert status == 405
    assert headers["allow"] == "GET"
    assert "use GET" in json.loads(body)["error"]
