"""The service's HTTP/1.1 server: httptools' C parser on the serving event loop, calling
`HttpApp` directly instead of through ASGI.

Why not an ASGI server: on the 8k-token score, uvicorn cost ~85 us of CPU per request on top
of the app (docs/design.md, "The HTTP server"): a task per request, ASGI message dicts, a
proxy-headers middleware, and the head and the body written in two sends, two segments the
client wakes up for. Here a route that never waits is answered inside `data_received`, in one
write; a route that waits (tokenization, a shared backend, /readyz) gets a task.

HTTP/1.1 as clients use it: keep-alive (HTTP/1.0's opt-in too), pipelined requests answered
in order, chunked request bodies, ``Expect: 100-continue``, HEAD. Limits: the app's body limit
(413 from the head when Content-Length announces too much, else as soon as the body passes
it), a request head of at most `MAX_HEAD_BYTES` (431), idle connections closed after
``keepalive_timeout``. A request the parser rejects gets 400 and the connection closes.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import time
from collections.abc import Awaitable
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools
import msgspec

from kvcache.service.http import Headers, HttpApp, Request, Response

log = logging.getLogger("kvcache.service.http")

MAX_HEAD_BYTES = 64 * 1024
"""Request line plus headers; a longer head gets 431."""
MAX_PIPELINED = 32
"""Requests parsed ahead of their answer on one connection before reading pauses."""
_JSON = [(b"content-type", b"application/json")]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Clock:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._header = b""

    def header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


class HttpServer:
    """Serves an `HttpApp` on ``host:port`` (0 picks a free port) on the running loop."""

    def __init__(
        self,
        app: HttpApp,
        host: str,
        port: int,
        *,
        keepalive_timeout: float = 5.0,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.keepalive_timeout = keepalive_timeout
        self.shutdown_timeout = shutdown_timeout
        self.clock = _Clock()
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """``http://host:port`` as bound (the real port when 0 was asked for)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; the bound port is in `port` afterwards."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        """Stop accepting, let requests in progress finish (at most ``shutdown_timeout``), then
        close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = time.monotonic() + self.shutdown_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _Refusal:
    """An answer decided before the body was read; the connection closes after it."""

    __slots__ = ("method", "response")

    def __init__(self, method: str, response: Response) -> None:
        self.method = method
        self.response = response


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, keep alive or close."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[Request, bool] | _Refusal] = collections.deque()
        self.task: asyncio.Task[None] | None = None  # answering a request that waits
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False  # close once the answers owed are written
        self.reading = True
        self.writable = True
        self.skip_body = False  # a refusal is queued: ignore the rest of this request
        self.in_request = False  # between a request's first byte and its last
        self.refused = False  # a refusal is queued: the connection reads no more
        self.url = b""
        self.headers: Headers = []
        self.head_bytes = 0
        self.method = ""
        self.path = ""
        self.chunks: list[bytes] = []
        self.body_bytes = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # answered as plain HTTP; nothing after it is ours to read
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid HTTP request: {exc}")
        self._answer()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests until it does.
        self.writable = False
        self._pause()

    def resume_writing(self) -> None:
        self.writable = True
        self._answer()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_request = True
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.chunks = []
        self.body_bytes = 0
        self.skip_body = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES and not self.skip_body:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        if self.skip_body:
            return
        self.method = self.parser.get_method().decode("ascii", "replace")
        try:
            self.path = unquote(httptools.parse_url(self.url).path.decode("latin-1"))
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "invalid request target")
            return
        refusal = self.app.precheck(self.method, self.path, self.headers)
        if refusal is not None:
            self._queue_refusal(refusal)
            return
        if (b"expect", b"100-continue") in self.headers and not self.queue and self.task is None:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.skip_body:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.app.max_body_bytes:
            self._refuse(413, f"body larger than {self.app.max_body_bytes} bytes")
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.in_request = False
        if self.skip_body:
            return
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        request = Request(self.method, self.path, self.headers, body)
        self.queue.append((request, self.parser.should_keep_alive()))
        self.chunks = []
        if len(self.queue) >= MAX_PIPELINED:
            self._pause()

    # -- answering --------------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        self._queue_refusal((status, msgspec.json.encode({"error": message}), list(_JSON)))

    def _queue_refusal(self, response: Response) -> None:
        self.skip_body = True
        self.refused = True
        self.queue.append(_Refusal(self.method, response))
        self._pause()  # nothing after a refusal is read: the connection closes after it

    def _answer(self) -> None:
        """Answer the queued requests in order, until one has to wait."""
        while self.queue and self.task is None and self.writable and self.transport is not None:
            item = self.queue.popleft()
            if isinstance(item, _Refusal):
                self.queue.clear()
                self._write(item.method, item.response, keep_alive=False)
                return
            request, keep_alive = item
            outcome = self.app.respond(request)
            if isinstance(outcome, tuple):
                self._write(request.method, outcome, keep_alive)
            else:
                self.task = asyncio.get_running_loop().create_task(
                    self._answer_later(request, keep_alive, outcome)
                )
                return
        if self.transport is None or self.transport.is_closing():
            return
        if not self.queue and self.task is None:
            if self.closing and not self.in_request:
                self.transport.close()
                return
            self._arm_timer()
        if (
            self.writable
            and not self.reading
            and not self.refused
            and len(self.queue) < MAX_PIPELINED
        ):
            self.reading = True
            self.transport.resume_reading()

    async def _answer_later(
        self, request: Request, keep_alive: bool, pending: Awaitable[Response]
    ) -> None:
        response = await pending  # HttpApp answers its own errors
        self.task = None
        if self.transport is not None and not self.transport.is_closing():
            self._write(request.method, response, keep_alive)
            self._answer()

    def _write(self, method: str, response: Response, keep_alive: bool) -> None:
        assert self.transport is not None
        status, body, headers = response
        keep_alive = keep_alive and not self.closing
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)), self.server.clock.header()]
        parts.extend(name + b": " + value + b"\r\n" for name, value in headers)
        parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        if method != "HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self.closing = True
            self.queue.clear()
            self.transport.close()

    # -- connection state -------------------------------------------------------------------------

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.keepalive_timeout, self._idle)

    def _idle(self) -> None:
        # No byte for keepalive_timeout, and no answer owed: a request half sent stalls too.
        self.timer = None
        if self.task is None and not self.queue and self.transport is not None:
            self.transport.close()

    def close_when_idle(self) -> None:
        """Shutdown: close now if no answer is owed, else right after the last one."""
        self.closing = True
        if self.task is None and not self.queue and not self.in_request and self.transport:
            self.transport.close()

    def abort(self) -> None:
        """Shutdown's deadline passed: drop the connection."""
        if self.transport is not None:
            self.transport.abort()
