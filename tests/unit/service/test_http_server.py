"""The built-in HTTP/1.1 server (`kvcache.service.http_server`) over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kvcache.blocks import PodEntry
from kvcache.indexer import Indexer
from kvcache.service.http import HttpApp
from kvcache.service.http_server import MAX_HEAD_BYTES, HttpServer


@dataclass
class Running:
    server: HttpServer
    loop: asyncio.AbstractEventLoop
    indexer: Indexer

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(30)

    def settle(self, state: Callable[[Any], bool], timeout: float = 30.0) -> None:
        """Wait until a connection of the server is in ``state`` (the server reads on its own
        loop, later than the client sends when the machine is busy); the timeout only bounds a
        failure."""
        deadline = time.monotonic() + timeout
        while not any(state(c) for c in list(self.server.connections)):
            assert time.monotonic() < deadline, "the server never got there"
            time.sleep(0.005)


def serve(
    app_factory: Callable[[Indexer], HttpApp],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    **server_args: Any,
) -> Iterator[Running]:
    """The server on its own loop in a thread (asyncio's loop, or ``loop_factory``'s: `kvcache
    serve` runs on uvloop's, whose transports differ in what they do on their own)."""
    indexer = Indexer()
    app = app_factory(indexer)
    loop = loop_factory()
    server = HttpServer(app, "127.0.0.1", 0, **server_args)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Running(server, loop, indexer)
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


READY = threading.Event()


def slow_ready() -> bool:
    """/readyz waits for the test to say so (an answer that has to wait, on a task)."""
    return READY.wait(10)


@pytest.fixture
def running() -> Iterator[Running]:
    READY.set()
    yield from serve(lambda indexer: HttpApp(indexer, CollectorRegistry(), ready=slow_ready))


class Reader:
    """Reads HTTP/1.1 responses off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed mid-response: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        pairs = (line.split(": ", 1) for line in lines[1:])
        headers = {name.lower(): value for name, value in pairs}
        size = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return status, headers, body

    def closed(self) -> bool:
        """Whether the server closed the connection (nothing more comes)."""
        return not self.buffer and not self._fill()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str, version: str = "1.1", method: str = "GET") -> bytes:
    return (
        "\r\n".join([f"{method} {path} HTTP/{version}", "Host: x", *extra]) + "\r\n\r\n"
    ).encode()


def test_keep_alive_scores_and_says_its_length(running: Running) -> None:
    running.indexer.index.add(None, running.indexer.block_keys(list(range(32))), [PodEntry("p")])
    with running.connect() as sock:
        reader = Reader(sock)
        for _ in range(3):  # one connection, several requests
            sock.sendall(post("/score_tokens", json.dumps({"token_ids": list(range(32))}).encode()))
            status, headers, body = reader.response()
            assert status == 200
            assert json.loads(body)["scores"] == {"p": 2.0}
            assert headers["content-length"] == str(len(body))
            assert headers["content-type"] == "application/json"
            assert "date" in headers
            assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(running: Running) -> None:
    READY.clear()  # /readyz waits on a task while the requests behind it are already read
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/readyz") + get("/healthz") + get("/nope") + get("/healthz"))
        time.sleep(0.2)
        READY.set()
        answers = [reader.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 404, 200]
    assert json.loads(answers[0][2]) == {"status": "ready"}
    assert json.loads(answers[1][2]) == {"status": "ok"}


def test_chunked_body_is_read_whole(running: Running) -> None:
    body = json.dumps({"token_ids": list(range(40))}).encode()
    chunks = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    request = (
        b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    with running.connect() as sock:
        sock.sendall(request)
        status, _, answer = Reader(sock).response()
    assert status == 200
    assert json.loads(answer)["blocks"] == 2


def test_expect_100_continue(running: Running) -> None:
    body = json.dumps({"token_ids": [1, 2, 3]}).encode()
    with running.connect() as sock:
        reader = Reader(sock)
        head, _, _ = post("/score_tokens", body, "Expect: 100-continue").partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        assert reader.response(head_only=True)[0] == 100
        sock.sendall(body)
        assert reader.response()[0] == 200


def test_announced_body_too_large_is_413_before_it_is_sent() -> None:
    factory = lambda indexer: HttpApp(indexer, CollectorRegistry(), max_body_bytes=100)  # noqa: E731
    for running in serve(factory):
        with running.connect() as sock:
            reader = Reader(sock)
            sock.sendall(
                b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            )
            status, headers, body = reader.response()
            assert status == 413
            assert "100 bytes" in json.loads(body)["error"]
            assert headers["connection"] == "close"
            assert reader.closed()
        with running.connect() as sock:  # no Content-Length to go by: refused once past the limit
            reader = Reader(sock)
            chunk = b"x" * 80
            sock.sendall(
                b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) * 2)
            assert reader.response()[0] == 413
            assert reader.closed()


def test_bearer_token_is_checked_before_the_body() -> None:
    factory = lambda indexer: HttpApp(indexer, CollectorRegistry(), token="s3cret")  # noqa: E731
    for running in serve(factory):
        with running.connect() as sock:
            reader = Reader(sock)
            sock.sendall(b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            status, headers, _ = reader.response()  # no body sent: the head was enough
            assert status == 401
            assert headers["www-authenticate"].startswith("Bearer")
        with running.connect() as sock:
            sock.sendall(get("/healthz"))  # probes need no token
            assert Reader(sock).response()[0] == 200


@pytest.mark.parametrize(
    "raw",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"],
)
def test_malformed_request_is_400_and_closes(running: Running, raw: bytes) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(raw)
        status, headers, body = reader.response()
        assert status == 400
        assert "invalid HTTP request" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        assert reader.closed()


def test_oversized_head_is_431(running: Running) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/healthz", f"X-Big: {'a' * MAX_HEAD_BYTES}"))
        assert reader.response()[0] == 431
        assert reader.closed()


def test_head_gets_no_body_and_paths_are_percent_decoded(running: Running) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/healthz", method="HEAD"))
        status, headers, _ = reader.response(head_only=True)
        assert status == 405 and int(headers["content-length"]) > 0
        sock.sendall(get("/pods/10.0.0.7%3A8000"))  # the next bytes are the next response
        status, _, body = reader.response()
    assert status == 501  # the pod route, reached with the decoded name
    assert "introspection" in json.loads(body)["error"]


def test_http_1_0_closes_unless_asked_to_keep_alive(running: Running) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/healthz", version="1.0"))
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()
    with running.connect() as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(get("/healthz", "Connection: keep-alive", version="1.0"))
            status, headers, _ = reader.response()
            # an HTTP/1.0 client closes unless the answer says otherwise
            assert status == 200 and headers["connection"] == "keep-alive"


def test_idle_connections_are_closed() -> None:
    for running in serve(
        lambda indexer: HttpApp(indexer, CollectorRegistry()), keepalive_timeout=0.2
    ):
        with running.connect() as sock:
            reader = Reader(sock)
            sock.sendall(get("/healthz"))
            assert reader.response()[0] == 200
            started = time.monotonic()
            assert reader.closed()
            assert time.monotonic() - started < 5
        with running.connect() as sock:  # a request half sent stalls too
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert Reader(sock).closed()


def test_client_gone_mid_request_leaves_the_server_serving(running: Running) -> None:
    READY.clear()
    with running.connect() as sock:
        sock.sendall(get("/readyz"))
        running.settle(lambda c: c.task is not None)
    READY.set()
    with running.connect() as sock:
        sock.sendall(get("/healthz"))
        assert Reader(sock).response()[0] == 200


def test_shutdown_finishes_requests_in_progress_then_refuses(running: Running) -> None:
    READY.clear()
    with running.connect() as busy, running.connect() as idle:
        idle_reader = Reader(idle)
        idle.sendall(get("/healthz"))
        assert idle_reader.response()[0] == 200
        busy.sendall(get("/readyz"))
        running.settle(lambda c: c.task is not None)  # /readyz is waiting
        stopping = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        time.sleep(0.2)
        assert idle_reader.closed()  # nothing owed: closed at once
        assert not stopping.done()  # the answer in progress holds shutdown
        READY.set()
        status, headers, body = Reader(busy).response()
        assert status == 200 and json.loads(body) == {"status": "ready"}
        assert headers["connection"] == "close"
        stopping.result(10)
    with pytest.raises(OSError):
        running.connect()


def test_address_names_the_bound_port(running: Running) -> None:
    assert running.server.port > 0
    assert running.server.address == f"http://127.0.0.1:{running.server.port}"


def test_refusals_are_counted_in_the_request_metrics() -> None:
    factory = lambda indexer: HttpApp(indexer, CollectorRegistry(), token="t")  # noqa: E731
    for running in serve(factory):
        app = running.server.app
        with running.connect() as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            assert Reader(sock).response()[0] == 400
        with running.connect() as sock:
            sock.sendall(post("/score_tokens", b"{}"))  # no bearer token
            assert Reader(sock).response()[0] == 401
        with running.connect() as sock:
            sock.sendall(get("/healthz", f"X-Big: {'a' * MAX_HEAD_BYTES}"))
            assert Reader(sock).response()[0] == 431
        counts = {key: s["count"] for key, s in app.statistics()["requests"].items()}
        assert counts == {
            ("unmatched", "400"): 1,
            ("/score_tokens", "401"): 1,
            ("unmatched", "431"): 1,  # refused before its head was parsed
        }
