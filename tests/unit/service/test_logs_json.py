"""Structured logs: JSON lines with context, text lines, and `kvcache serve --log-format json`."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kvcache.config import LoggingConfig
from kvcache.service.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """configure_logging's handler on a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_core_fields_and_the_extra_context(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="json"), stream)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    logging.getLogger("kvcache.events.apply").warning(
        "pod=%s lost batches", "10.0.0.7:8000", extra={"pod": "10.0.0.7:8000", "seq": 42}
    )
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "kvcache.events.apply"
    assert entry["message"] == "pod=10.0.0.7:8000 lost batches"
    assert (entry["pod"], entry["seq"]) == ("10.0.0.7:8000", 42)
    assert entry["ts"].endswith("Z")
    ts = datetime.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
    assert ts >= before
    assert list(entry)[:4] == ["ts", "level", "logger", "message"]


def test_json_keeps_core_fields_and_writes_odd_values_as_text(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="json"), stream)

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    logging.getLogger("t").warning("m", extra={"level": "spoof", "thing": Opaque(), "rank": 1})
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "warning"
    assert entry["extra_level"] == "spoof"
    assert entry["thing"] == "opaque!"
    assert entry["rank"] == 1


def test_json_exception_is_one_line_with_the_traceback(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="json"), stream)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        logging.getLogger("t").exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "error"
    assert "ZeroDivisionError: boom" in entry["exc_info"]


def test_text_lines_append_the_context_and_level_filters(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="text", level="warning"), stream)
    log = logging.getLogger("kvcache.x")
    log.info("hidden")
    log.warning("gap", extra={"pod": "p1", "seq": 7})
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" WARNING kvcache.x: gap [pod=p1 seq=7]")


def test_configuring_twice_replaces_the_handler(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="text"), stream)
    configure_logging(LoggingConfig(format="json", level="debug"), stream)
    logging.getLogger("t").debug("once")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "once"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def test_serve_writes_json_lines_with_the_file_warnings_and_ingest_context(
    tmp_path: Path,
) -> None:
    http_port, zmq_port = _free_port(), _free_port()
    config = tmp_path / "scorer.yaml"  # Go shape with a field kvcache warns about
    config.write_text(
        "tokenProcessorConfig: {blockSize: 16}\n"
        "indexerConfig: {tokenizersPoolConfig: {modelName: some/model}}\n"
        f"kvEventsConfig: {{zmqEndpoint: 'tcp://127.0.0.1:{zmq_port}', discoverPods: false}}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "kvcache.service.cli", "serve", "--config", str(config)),
            *("--http-port", str(http_port), "--log-format", "json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _metrics(http_port)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "no start"
                time.sleep(0.1)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        pub = context.socket(zmq.PUB)
        pub.connect(f"tcp://127.0.0.1:{zmq_port}")
        try:
            # A message that is not msgpack: the applier logs it with its pod and seq.
            while 'reason="frame_' not in _metrics(http_port):
                assert time.monotonic() < deadline, "the bad message never arrived"
                pub.send_multipart([b"kv@pod-a:8000@m", (7).to_bytes(8, "big"), b"\xc1"])
                time.sleep(0.2)
        finally:
            pub.close(linger=0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"HTTP on http://127.0.0.1:{http_port}" in stdout  # where it listens, on stdout
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    warnings = [e["message"] for e in entries if e["logger"] == "kvcache.config"]
    assert any(m.startswith("indexerConfig.tokenizersPoolConfig.modelName") for m in warnings)
    skipped = [e for e in entries if "skipped a message" in e["message"]]
    assert skipped and "pod=pod-a:8000" in skipped[0]["message"]
