"""The built-in HTTP/1.1 server at its edges, over real loopback sockets: heads that never end,
clients that half-close, stop reading or keep sending a refused body, odd request targets, and
the same stream cut at every byte. Each runs on asyncio's loop and on uvloop's (the service's)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop
from prometheus_client import CollectorRegistry
from test_http_server import READY, Reader, Running, get, post, serve, slow_ready

from kvcache.blocks import PodEntry
from kvcache.indexer import Indexer
from kvcache.service.http import Headers, HttpApp, Response
from kvcache.service.http_server import MAX_HEAD_BYTES, MAX_PIPELINED

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop


def plain(indexer: Indexer) -> HttpApp:
    return HttpApp(indexer, CollectorRegistry(), ready=slow_ready)


@pytest.fixture
def running(loop_factory: LoopFactory) -> Iterator[Running]:
    READY.set()
    try:
        yield from serve(plain, loop_factory)
    finally:
        READY.set()


class Sender(threading.Thread):
    """Sends ``data`` in 64 KiB pieces from a thread until done or the server cuts it off."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.data = sock, data
        self.start()

    def run(self) -> None:
        try:
            for i in range(0, len(self.data), 65536):
                self.sock.sendall(self.data[i : i + 65536])
        except OSError:
            pass  # the server closed: what it answered is still to be read


# -- heads ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [
        b"GET /",
        b"GET /healthz HTTP/1.1\r\nX-Long: ",
        b"POST /score_tokens HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ",
    ],
    ids=["url", "header", "trailer"],
)
def test_a_head_line_that_never_ends_is_431(running: Running, start: bytes) -> None:
    # httptools holds a URL or header line whole until it ends: without a bound as it arrives,
    # a client streaming one line grows the server's memory for as long as it likes.
    with running.connect() as sock:
        sender = Sender(sock, start + b"a" * (64 * MAX_HEAD_BYTES))
        status, headers, body = Reader(sock).response()
        sender.join(30)
    assert status == 431
    assert "larger than" in json.loads(body)["error"]
    assert headers["connection"] == "close"


def test_a_head_trickled_in_is_cut_off(loop_factory: LoopFactory) -> None:
    # Slowloris: one byte now and then re-arms an idle timer forever; a head gets head_timeout
    # from its first byte however it trickles in.
    for running in serve(plain, loop_factory, keepalive_timeout=60, head_timeout=0.2):
        with running.connect() as sock:
            head = get("/healthz", "X-Pad: " + "a" * 400)
            sent = 0
            for byte in head:
                if select.select([sock], [], [], 0.01)[0]:
                    break  # the server spoke: it closed
                sock.send(bytes([byte]))
                sent += 1
            assert sent < len(head)  # cut off before the head was whole
            assert Reader(sock).closed()
        with running.connect() as sock:  # a head sent at once is still answered
            sock.sendall(head)
            assert Reader(sock).response()[0] == 200


@pytest.mark.parametrize(
    "refused",
    [b"BAD\x01 / HTTP/1.1\r\n\r\n", get("/healthz", f"X-Big: {'a' * MAX_HEAD_BYTES}")],
    ids=["400", "431"],
)
def test_a_refusal_after_a_head_request_carries_its_body(running: Running, refused: bytes) -> None:
    # The refusal comes before this request's method is known: it must not be written as the
    # answer to the previous request's HEAD (a Content-Length and no body).
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/healthz", method="HEAD") + refused)
        assert reader.response(head_only=True)[0] == 405
        status, _, body = reader.response()
        assert status in (400, 431)
        assert json.loads(body)["error"]
        assert reader.closed()


def test_absolute_form_and_asterisk_targets(running: Running) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("http://x:80/healthz?probe=1"))
        assert reader.response()[0] == 200
        sock.sendall(get("http://x:80"))  # an empty path is "/" (RFC 9112, 3.2.2)
        status, _, body = reader.response()
        assert status == 404 and json.loads(body) == {"error": "no such endpoint: /"}
        sock.sendall(get("*", method="OPTIONS"))
        assert reader.response()[0] == 404


def test_expect_100_continue_is_case_insensitive(running: Running) -> None:
    body = json.dumps({"token_ids": [1, 2, 3]}).encode()
    head, _, _ = post("/score_tokens", body, "Expect: 100-Continue").partition(b"\r\n\r\n")
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(head + b"\r\n\r\n")
        assert reader.response(head_only=True)[0] == 100  # Java's HttpClient spells it so
        sock.sendall(body)
        assert reader.response()[0] == 200


def test_upgrade_is_answered_as_http_1_1_and_closes(running: Running) -> None:
    upgrade = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk")
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(get("/healthz", *upgrade))
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()
    body = json.dumps({"token_ids": [1, 2, 3]}).encode()
    with running.connect() as sock:  # httptools skips the body as the other protocol's
        reader = Reader(sock)
        sock.sendall(post("/score_tokens", body, *upgrade))
        status, _, answer = reader.response()
        assert status == 400 and "upgrade" in json.loads(answer)["error"]
        assert reader.closed()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /score_tokens HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /score_tokens HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /healthz HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n",
        b"POST /score_tokens HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /score_tokens HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n",
        b"POST /score_tokens HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"GET /healthz HTTP/1.1\nHost: x\n\n",
    ],
    ids=["cl-and-te", "two-cl", "obs-fold", "bad-chunk", "chunk-overflow", "te-not-last", "lf"],
)
def test_ambiguous_framing_is_400_and_nothing_after_it_is_read(
    running: Running, raw: bytes
) -> None:
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(raw + get("/healthz"))  # a smuggled request would be answered too
        status, headers, _ = reader.response()
        assert status == 400 and headers["connection"] == "close"
        assert reader.closed()


def test_parser_callback_bug_is_a_logged_500(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(HttpApp):
        def precheck(self, method: str, path: str, headers: Headers) -> Response | None:
            raise RuntimeError("a bug in precheck")

    for running in serve(lambda indexer: Broken(indexer, CollectorRegistry()), loop_factory):
        with (
            caplog.at_level(logging.ERROR, logger="kvcache.service.http"),
            running.connect() as sock,
        ):
            sock.sendall(get("/healthz"))
            status, _, body = Reader(sock).response()
        assert status == 500 and json.loads(body) == {"error": "internal server error"}
        assert any(
            record.exc_info and "a bug in precheck" in str(record.exc_info[1])
            for record in caplog.records
        )


# -- connections ------------------------------------------------------------------------------


def test_a_refusal_waits_for_the_answer_before_it(running: Running) -> None:
    READY.clear()
    big = b"POST /score_tokens HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"
    with running.connect() as sock:
        sock.sendall(get("/readyz") + big + get("/healthz"))
        running.settle(lambda c: c.task is not None and c.finished)  # waiting, refusal queued
        READY.set()
        reader = Reader(sock)
        assert reader.response()[0] == 200
        status, headers, _ = reader.response()
        assert status == 413 and headers["connection"] == "close"
        assert reader.closed()  # nothing after the refusal is answered


def test_connection_close_mid_pipeline_ends_it_there(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(get("/healthz") + get("/healthz", "Connection: close") + get("/healthz"))
        reader = Reader(sock)
        assert "connection" not in reader.response()[1]
        assert reader.response()[1]["connection"] == "close"
        assert reader.closed()


def test_shutdown_answers_no_request_begun_after_it(running: Running) -> None:
    # Else a client that keeps sending (pipelining behind a slow answer) holds the connection
    # until the deadline drops it, answers owed and all.
    READY.clear()
    with running.connect() as sock:
        sock.sendall(get("/readyz"))
        running.settle(lambda c: c.task is not None)
        stopping = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        running.settle(lambda c: c.closing)
        sock.sendall(get("/healthz"))
        time.sleep(0.1)
        READY.set()
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert json.loads(body) == {"status": "ready"}
        assert reader.closed()  # the client retries /healthz elsewhere
        stopping.result(10)


def test_shutdown_lets_a_half_received_request_finish(running: Running) -> None:
    with running.connect() as sock:
        request = get("/healthz")
        sock.sendall(request[:10])
        running.settle(lambda c: c.in_request)
        stopping = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        time.sleep(0.1)
        assert not stopping.done()
        sock.sendall(request[10:])
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()
        stopping.result(10)


def test_shutdown_drops_what_outlives_its_deadline(loop_factory: LoopFactory) -> None:
    READY.clear()
    try:
        for running in serve(plain, loop_factory, shutdown_timeout=0.2):
            with running.connect() as sock:
                sock.sendall(get("/readyz"))
                running.settle(lambda c: c.task is not None)
                running.shutdown()  # returns: the deadline passed, the connection dropped
                assert not running.server.connections
                with pytest.raises(ConnectionError):
                    Reader(sock).response()
    finally:
        READY.set()


def test_a_half_closed_client_gets_every_answer_owed(running: Running) -> None:
    # curl --no-keepalive, nc -N, a proxy closing its write side: EOF after the requests.
    READY.clear()
    with running.connect() as sock:
        sock.sendall(get("/readyz") + get("/healthz") + get("/nope"))
        sock.shutdown(socket.SHUT_WR)
        running.settle(lambda c: c.eof)  # the EOF arrives while /readyz waits
        READY.set()
        reader = Reader(sock)
        answers = [reader.response() for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 404]
        assert "connection" not in answers[0][1]
        assert answers[2][1]["connection"] == "close"
        assert reader.closed()


def test_shutdown_answers_every_request_already_read(running: Running) -> None:
    READY.clear()
    with running.connect() as sock:
        sock.sendall(get("/readyz") + get("/healthz") + get("/nope"))
        running.settle(lambda c: c.task is not None and len(c.queue) == 2)
        stopping = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        time.sleep(0.1)
        READY.set()
        reader = Reader(sock)
        answers = [reader.response() for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 404]
        assert answers[2][1]["connection"] == "close"
        assert reader.closed()
        stopping.result(10)


@pytest.mark.parametrize(
    ("auth", "chunked", "status"),
    [("Bearer wrong", False, 401), ("Bearer s3cret", False, 413), ("Bearer s3cret", True, 413)],
    ids=["401", "413-announced", "413-chunked"],
)
def test_a_refusal_reaches_a_client_still_sending_its_body(
    loop_factory: LoopFactory, auth: str, chunked: bool, status: int
) -> None:
    # http.client (and most proxies) send the whole body before reading: closing on unread
    # bytes makes the kernel reset the connection and the client's send fails instead.
    def factory(indexer: Indexer) -> HttpApp:
        return HttpApp(indexer, CollectorRegistry(), token="s3cret", max_body_bytes=1000)

    body = b"x" * 4_000_000
    for running in serve(factory, loop_factory):
        client = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
        pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
        client.request(
            "POST",
            "/score_tokens",
            body=pieces if chunked else body,
            headers={"Authorization": auth},
            encode_chunked=chunked,
        )
        response = client.getresponse()
        assert response.status == status
        assert json.loads(response.read())["error"]
        client.close()


def test_a_client_that_reads_no_answers_is_dropped(loop_factory: LoopFactory) -> None:
    # Pipelined requests whose answers are never read: reading pauses (memory stays bounded),
    # and after keepalive_timeout without the client taking a byte the connection goes.
    for running in serve(plain, loop_factory, keepalive_timeout=0.3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.server.port))
        with sock:
            sender = Sender(sock, get("/openapi.json") * 20_000)
            deadline = time.monotonic() + 30
            while running.server.connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running.server.connections
            sender.join(30)


def test_a_pipelined_flood_is_answered_in_order_once_the_client_reads(running: Running) -> None:
    count = 100_000
    with running.connect() as sock:
        sender = Sender(sock, (get("/healthz") + get("/nope")) * (count // 2))
        # Its answers back up until the server stops reading, holding at most one read's
        # requests (asyncio and uvloop read 256 KiB at a time). How soon depends on the
        # machine's load: wait for it (the deadline only bounds a failure).
        deadline = time.monotonic() + 30
        while not running.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)  # accepted by the kernel before the server's loop sees it
        connection = next(iter(running.server.connections))
        while (connection.reading or connection.writable) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not connection.reading and not connection.writable
        assert len(connection.queue) <= 256 * 1024 // len(get("/nope")) + MAX_PIPELINED
        reader = Reader(sock)
        statuses = [reader.response()[0] for _ in range(count)]
        sender.join(30)
    assert statuses == [200, 404] * (count // 2)


def stream() -> bytes:
    body = json.dumps({"token_ids": list(range(40))}).encode()
    chunks = b"".join(
        b"%x;ext=1\r\n%b\r\n" % (len(body[i : i + 7]), body[i : i + 7])
        for i in range(0, len(body), 7)
    )
    return b"".join(
        [
            post("/score_tokens", body),
            get("/readyz"),
            b"POST /score_tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunks + b"0\r\nX-Trailer: 1\r\n\r\n",
            get("/healthz", method="HEAD"),
            get("http://x/pods/a%3Ab?q=1"),
            post("/score_tokens", body, "Expect: 100-continue"),
            get("/healthz", "Connection: close"),
        ]
    )


def exchange(running: Running, data: bytes, step: int) -> bytes:
    """The server's whole answer to ``data`` sent ``step`` bytes at a time."""
    with running.connect() as sock:
        for i in range(0, len(data), step):
            sock.sendall(data[i : i + step])
            if step == 1:
                time.sleep(0.0002)  # most bytes reach the server in a read of their own
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    received = re.sub(rb"date: [^\r]*\r\n", b"", received)
    return received.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")


def test_a_stream_cut_anywhere_gets_the_same_answers(running: Running) -> None:
    running.indexer.index.add(None, running.indexer.block_keys(list(range(32))), [PodEntry("p")])
    data = stream()
    whole = exchange(running, data, len(data))
    assert whole.count(b"HTTP/1.1 ") == 7
    assert b'"scores":{"p":2.0}' in whole
    for step in (1, 2, 3, 7, 64):
        assert exchange(running, data, step) == whole


def test_route_label_stays_bounded_whatever_the_paths(running: Running) -> None:
    app = running.server.app
    with running.connect() as sock:
        reader = Reader(sock)
        for i in range(50):
            sock.sendall(get(f"/scan/{i}") + get(f"/pods/pod-{i}", method="PUT"))
            reader.response()
            reader.response()
    routes = set(app.statistics()["requests"])
    assert routes == {("unmatched", "404"), ("/pods/{pod}", "405")}
