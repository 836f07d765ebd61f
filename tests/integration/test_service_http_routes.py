"""`kvcache serve` as a real process, over real HTTP: /readyz, /pods, /openapi.json, scoring."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "tests" / "data" / "captures" / "vllm-0.32-sha256-pickle-default"
POD = "10.0.0.7:8000"
POD_PATH = "/pods/10.0.0.7%3A8000"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Running:
    def __init__(self, http_port: int, zmq_port: int, process: subprocess.Popen[str]) -> None:
        self.http_port = http_port
        self.zmq_port = zmq_port
        self.process = process

    def request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, payload = self.request(method, path, body)
        return status, json.loads(payload)


@pytest.fixture(scope="module")
def service() -> Iterator[Running]:
    http_port, zmq_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kvcache.service.cli import main; sys.exit(main())",
            "serve",
            "--http-port",
            str(http_port),
            "--zmq-endpoint",
            f"tcp://127.0.0.1:{zmq_port}",
            "--block-size",
            "32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Running(http_port, zmq_port, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if running.request("GET", "/readyz")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError(f"service did not become ready: {process.communicate()[0]}")
    yield running
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def _gauge(service: Running, name: str) -> int:
    text = service.request("GET", "/metrics")[2].decode()
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return int(float(line.split()[1]))


def test_readyz_and_openapi(service: Running) -> None:
    assert service.json("GET", "/readyz") == (200, {"status": "ready"})
    assert service.json("GET", "/healthz") == (200, {"status": "ok"})
    status, headers, body = service.request("GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads((ROOT / "docs" / "openapi.json").read_text())


def test_pods_scores_and_clear_over_http(service: Running) -> None:
    last_seq = _publish_capture(service.zmq_port)
    deadline = time.monotonic() + 20
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # ingest is asynchronous: wait for the last batch
        pods = service.json("GET", "/pods")[1]["pods"]
        if pods and pods[0]["last_seq"] == last_seq:
            break
        time.sleep(0.1)
    assert [p["pod"] for p in pods] == [POD]
    assert pods[0]["hash_mode"] == "identity"
    assert pods[0]["gaps"] == 0

    # The pod id holds ':' — sent percent-encoded, as a client must.
    status, one = service.json("GET", POD_PATH)
    assert status == 200
    assert one == pods[0]
    assert service.json("GET", "/pods/10.0.0.9%3A1")[0] == 404

    requests = [json.loads(line) for line in (CAPTURE / "requests.jsonl").read_text().splitlines()]
    # The capture's last request (a repeat after the reset) left 6 full 32-token blocks cached.
    prompt = requests[-1]["prompt_token_ids"] + requests[-1]["output_token_ids"]
    status, scored = service.json(
        "POST", "/score_tokens", {"token_ids": prompt, "pods": [POD, "x"]}
    )
    assert status == 200
    assert scored["scores"] == {POD: 6.0}
    assert scored["matched_blocks"] == {POD: 6}
    assert scored["normalized"] == {POD: 1.0, "x": 0.0}
    assert scored["blocks"] == len(prompt) // 32

    entries = _gauge(service, "kvcache_index_entries")
    assert entries >= 6
    status, cleared = service.json("DELETE", POD_PATH)
    assert (status, cleared) == (200, {"pod": POD, "removed": entries})
    assert _gauge(service, "kvcache_index_entries") == 0
    assert service.json("POST", "/score_tokens", {"token_ids": prompt})[1]["scores"] == {}
    assert service.json("GET", POD_PATH)[0] == 404


def test_wrong_method_is_405_with_allow(service: Running) -> None:
    status, headers, body = service.request("POST", "/pods")
    assert status == 405
    assert headers["allow"] == "GET"
    assert "use GET" in json.loads(body)["error"]
