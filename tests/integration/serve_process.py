"""`kvcache serve` as a real process for integration tests: free ports, readiness, shutdown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServeProcess:
    """A running `kvcache serve`: its ports, its process, and plain HTTP requests to it."""

    def __init__(self, http_port: int, zmq_port: int, process: subprocess.Popen[str]) -> None:
        self.http_port = http_port
        self.zmq_port = zmq_port
        self.process = process

    def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); HTTP errors are answers, not exceptions."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


@contextmanager
def serve(args: Sequence[str] = (), *, ready_path: str = "/healthz") -> Iterator[ServeProcess]:
    """Start `kvcache serve` on free loopback ports with ``args``, wait until ``ready_path``
    answers 200, and stop it (SIGTERM, then kill) afterwards."""
    http_port, zmq_port = free_port(), free_port()
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
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = ServeProcess(http_port, zmq_port, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if running.request("GET", ready_path)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError(f"kvcache serve did not start: {process.communicate()[0]}")
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
