"""The service's HTTP/1.1 server: httptools' C parser on the serving event loop, calling
`HttpApp` directly instead of through ASGI.

Why not an ASGI server: on the 8k-token score, uvicorn cost ~85 us of CPU per request on top
of the app (docs/design.md, "The HTTP server"): a task per request, ASGI message dicts, a
proxy-headers middleware, and the head and the body written in two sends, two segments the
client wakes up for. Here a route that never waits is answered inside `data_received`, in one
write; a route that waits (tokenization, a shared backend, /readyz) gets a task.

HTTP/1.1 as clients use it: keep-alive (HTTP/1.0's opt-in too), pipelined requests answered
in order, chunked request bodies, ``Expect: 100-continue``, HEAD, a client's half-close (its
answers still come). Limits: the app's body limit (413 from the head when Content-Length
announces too much, else as soon as the body passes it), a request head of at most
`MAX_HEAD_BYTES` (431, also while one line of it streams in), a head whole within
``head_timeout`` of its first byte, idle connections closed after ``keepalive_timeout``, and
so are clients that stop reading their answers for as long. A request the parser rejects gets
400 and the connection closes. After a refusal the server stops writing but reads and drops
what the client still sends for `LINGER_SECONDS`: closing on unread bytes would make the kernel
reset the connection, and a client still sending its body would see a send error instead of
the answer.
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

from kvcache.service.http import Headers, HttpApp, Request, Response, error_response

log = logging.getLogger("kvcache.service.http")

MAX_HEAD_BYTES = 64 * 1024
"""Request line plus headers; a longer head gets 431."""
MAX_PIPELINED = 32
"""Requests parsed ahead of their answer on one connection before reading pauses."""
LINGER_SECONDS = 2.0
"""After a refusal, how long what the client still sends is read and dropped before closing."""
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
"""Made once: formatting one per response cost ~0.6 us."""


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def _has_body(request: Request) -> bool:
    """Whether the request's head announces a body."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
        for name, value in request.headers
    )


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
        keepalive_timeout: float = 120.0,
        shutdown_timeout: float = 20.0,
        head_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.keepalive_timeout = keepalive_timeout
        # A head never gets longer than an idle connection would.
        self.head_timeout = min(head_timeout, keepalive_timeout)
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
        # (request, keep alive, HTTP/1.0) or a refusal, in arrival order
        self.queue: collections.deque[tuple[Request, bool, bool] | _Refusal] = collections.deque()
        self.task: asyncio.Task[None] | None = None  # answering a request that waits
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False  # close once the answers owed are written
        self.reading = True
        self.writable = True
        self.skip_body = False  # ignore the rest of this request (refused, or shutting down)
        self.in_request = False  # between a request's first byte and its last
        self.in_head = False  # between a request's first byte and the end of its head
        self.finished = False  # no more requests are parsed (a refusal, an upgrade): bytes dropped
        self.eof = False  # the client sends no more
        self.url = b""
        self.headers: Headers = []
        self.head_bytes = 0
        self.unparsed = 0  # see data_received
        self.method = ""
        self.path = ""
        self.chunks: list[bytes] = []
        self.body_bytes = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.connections.add(self)
        self._arm_timer(self.server.keepalive_timeout)

    def eof_received(self) -> bool:
        # The client half-closed: it sends no more but still reads. Returning False (asyncio's
        # default) would close the transport now and cancel the answers it is owed.
        self.closing = self.eof = True
        self.in_request = self.in_head = False  # a request cut short never completes
        return bool(self.queue) or self.task is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return  # after a refusal (see LINGER_SECONDS) or an upgrade: dropped
        headers, body_bytes = self.headers, self.body_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserCallbackError as exc:
            log.error("internal error reading a request", exc_info=exc.__context__)
            self._refuse(500, "internal server error")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid HTTP request: {exc}")
        if self.in_request and not self.finished:
            if self.headers is not headers:  # a request began in these bytes
                self.unparsed = 0
                if self.in_head:  # its head gets head_timeout from here, however it trickles
                    self._arm_timer(self.server.head_timeout)
            elif self.body_bytes != body_bytes:
                self.unparsed = 0
            else:
                # All of these bytes are the same request's head or trailers, which httptools
                # holds unparsed until their line ends: bound them as they come.
                self.unparsed += len(data)
                if self.unparsed > MAX_HEAD_BYTES:
                    self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        self._answer()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests until it does, and
        # drop it if it takes nothing for keepalive_timeout.
        self.writable = False
        self._pause()
        self._arm_timer(self.server.keepalive_timeout)

    def resume_writing(self) -> None:
        self.writable = True
        self._answer()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_request = self.in_head = True
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.chunks = []
        self.body_bytes = 0
        # Shutting down: only the requests begun before are answered (then the connection
        # closes), so a client that keeps sending cannot hold it open.
        self.skip_body = self.closing

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.skip_body:
            return
        self.method = self.parser.get_method().decode("ascii", "replace")
        if self.head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        try:
            # An absolute-form target may have an empty path: it means "/".
            target = httptools.parse_url(self.url).path or b"/"
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "invalid request target")
            return
        self.path = unquote(target.decode("latin-1"))
        refusal = self.app.precheck(self.method, self.path, self.headers)
        if refusal is not None:
            self._queue_refusal(self.method, refusal)
            return
        if not self.queue and self.task is None:
            for name, value in self.headers:
                if name == b"expect":
                    if value.lower() == b"100-continue":
                        assert self.transport is not None
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    break

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
        legacy = self.parser.get_http_version() == "1.0"
        self.queue.append((request, self.parser.should_keep_alive(), legacy))
        self.chunks = []
        if len(self.queue) >= MAX_PIPELINED:
            self._pause()

    # -- answering --------------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        # Before its head is parsed a request's method is not known (self.method is the last
        # one's): the refusal then keeps its body, even for a HEAD (the connection closes).
        known = self.in_request and not self.in_head
        self.app.count_refusal(self.path if known else "", status)
        self._queue_refusal(self.method if known else "", error_response(status, message))

    def _queue_refusal(self, method: str, response: Response) -> None:
        self.skip_body = True
        self.finished = True
        self.queue.append(_Refusal(method, response))
        self._pause()  # nothing after a refusal is parsed: the connection closes after it

    def _upgrade(self) -> None:
        # Answered as plain HTTP/1.1 (no 101); what follows is not ours to read, so close after
        # the answers. httptools skipped the request's body as the other protocol's: a request
        # that has one cannot be answered.
        self.closing = self.finished = True
        self._pause()
        last = self.queue[-1] if self.queue else None
        # (The last request queued may be an earlier one: this one was skipped, shutting down.)
        if isinstance(last, tuple) and last[0].headers is self.headers and _has_body(last[0]):
            self.queue.pop()
            message = "a request that asks to upgrade the connection cannot have a body here"
            self.app.count_refusal(last[0].path, 400)
            self._queue_refusal(last[0].method, error_response(400, message))
        elif last is None and self.task is None and self.transport is not None:
            self.transport.close()  # nothing owed (a request begun while shutting down)

    def _answer(self) -> None:
        """Answer the queued requests in order, until one has to wait."""
        while self.queue and self.task is None and self.writable and self.transport is not None:
            item = self.queue.popleft()
            if isinstance(item, _Refusal):
                self._write(item.method, item.response, keep_alive=False, linger=True)
                return
            request, keep_alive, legacy = item
            outcome = self.app.respond(request)
            if isinstance(outcome, tuple):
                self._write(request.method, outcome, keep_alive, legacy)
            else:
                self.task = asyncio.get_running_loop().create_task(
                    self._answer_later(request, keep_alive, legacy, outcome)
                )
                return
        if self.transport is None or self.transport.is_closing() or self.finished:
            return
        if not self.queue and self.task is None:
            if self.closing and not self.in_request:
                self.transport.close()
                return
            if not self.in_head:
                self._arm_timer(self.server.keepalive_timeout)
            elif self.timer is None:  # a head begun while an answer was owed
                self._arm_timer(self.server.head_timeout)
        if self.writable and not self.reading and len(self.queue) < MAX_PIPELINED:
            self.reading = True
            self.transport.resume_reading()

    async def _answer_later(
        self, request: Request, keep_alive: bool, legacy: bool, pending: Awaitable[Response]
    ) -> None:
        response = await pending  # HttpApp answers its own errors
        self.task = None
        if self.transport is not None and not self.transport.is_closing():
            self._write(request.method, response, keep_alive, legacy)
            self._answer()

    def _write(
        self,
        method: str,
        response: Response,
        keep_alive: bool,
        legacy: bool = False,
        linger: bool = False,
    ) -> None:
        assert self.transport is not None
        status, body, headers = response
        if self.closing and not self.queue:
            keep_alive = False  # the last answer owed before closing
        parts = [_status_line(status), self.server.clock.header()]
        parts.extend(name + b": " + value + b"\r\n" for name, value in headers)
        parts.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            parts.append(b"connection: close\r\n\r\n")
        else:  # HTTP/1.0 closes unless told otherwise (ApacheBench -k waits for this)
            parts.append(b"connection: keep-alive\r\n\r\n" if legacy else b"\r\n")
        if method != "HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self.closing = True
            self.queue.clear()
            if linger:
                self._linger()
            else:
                self.transport.close()

    def _linger(self) -> None:
        """Close after a refusal: the client may still be sending the request refused."""
        transport = self.transport
        assert transport is not None
        self.finished = True
        if self.eof or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the answer, then FIN: the client reads it and closes
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        self._arm_timer(LINGER_SECONDS)  # then _idle closes

    # -- connection state -------------------------------------------------------------------------

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _arm_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(delay, self._idle)

    def _idle(self) -> None:
        # The connection's deadline: idle, a head not whole in time, a client that took none of
        # its answers, or a linger over. While an answer is on its way it is not idle.
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.writable or transport.get_write_buffer_size():
            # It has not read what it was sent: closing would wait for that forever.
            transport.abort()
        elif self.task is None and not self.queue:
            transport.close()

    def close_when_idle(self) -> None:
        """Shutdown: close now if no answer is owed, else right after the last one."""
        self.closing = True
        if self.task is None and not self.queue and not self.in_request and self.transport:
            self.transport.close()

    def abort(self) -> None:
        """Shutdown's deadline passed: drop the connection."""
        if self.transport is not None:
            self.transport.abort()
