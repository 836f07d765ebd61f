"""ZMQ SUB transport: receive raw event frames from engines and hand them on.

Two layouts: **bind** (engines connect to us, llm-d's centralised layout; default
``tcp://*:5557``) and **connect** (we dial each engine's PUB endpoint). ZMQ reconnects dialled
endpoints by itself, and a bound socket simply accepts publishers as they (re)appear.

Dialled endpoints can also change while running (`add_endpoint` / `remove_endpoint`, used by pod
discovery). ZMQ sockets are not thread-safe, so callers on other threads only record the wanted
set; the thread that reads the socket, woken through a socket pair, connects and disconnects to
match it.

Two ways to run: a receive thread of its own (`start()`), or callbacks on an asyncio event loop
(`start(loop=...)`, what `kvcache serve` does). On CPython the first makes ingest and HTTP scoring
two threads contending for one GIL: measured on a 2-core machine, ingesting 100k blocks/s in the
same process raised the HTTP score's p50 from ~0.33 to ~0.52 ms although ingest used a few % of
a core (each message's wake-up takes the GIL from the request being served). On the loop, ingest
and requests take turns on one thread: a request waits for at most one ingest slice
(`LOOP_SLICE_S`, or one message that takes longer to apply). What the sink does runs on the loop,
so it must not block: `kvcache serve` reads on the loop only when ingest applies inline to an
in-process index (kvcache.service.app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket as stdsocket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from kvcache.errors import ConfigError

log = logging.getLogger("kvcache.events")

FrameSink = Callable[[list[Any]], object]
"""Receives each message's frames: bytes, but the last (the payload) a `zmq.Frame`."""

LOOP_SLICE_S = 0.0002
"""On an event loop, messages are received and handed on for at most this long before the loop
runs its other work (requests) and comes back: a request waits at most about this long for
ingest, and the loop's own overhead stays small next to a slice (~100 messages/ms at most)."""

# Transports a SUB socket can dial; tcp addresses must also name a host and a port.
_TRANSPORTS = frozenset({"tcp", "ipc", "inproc", "pgm", "epgm", "tipc", "vmci", "ws", "wss"})
_TCP_ADDRESS = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]*/\s]+)):(?P<port>\d+)$"
)


def validate_dial_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if a SUB socket can dial it, else raise ConfigError saying why."""
    scheme, sep, address = endpoint.partition("://")
    if not sep or scheme not in _TRANSPORTS or not address or address != address.strip():
        raise ConfigError("events.zmq", f"not a ZMQ endpoint to connect to: {endpoint!r}")
    if scheme == "tcp":
        match = _TCP_ADDRESS.match(address)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ConfigError(
                "events.zmq", f"tcp endpoints to connect to are tcp://host:port: {endpoint!r}"
            )
    return endpoint


class Subscriber:
    """One SUB socket, read on a thread of its own or on an event loop, feeding every message to
    ``sink``."""

    def __init__(
        self,
        sink: FrameSink,
        *,
        bind: Sequence[str] = (),
        connect: Sequence[str] = (),
        topic_filter: str = "",
        receive_hwm: int = 100_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        dynamic: bool = False,
    ) -> None:
        """``dynamic=True`` allows starting with no endpoint: they come from `add_endpoint`."""
        if not bind and not connect and not dynamic:
            raise ConfigError("events.zmq", "need at least one endpoint to bind or connect")
        for endpoint in (*bind, *connect):
            if "://" not in endpoint:
                raise ConfigError("events.zmq", f"not a ZMQ endpoint: {endpoint!r}")
        self._sink = sink
        self._bind = list(bind)
        # The dialled endpoints wanted (insertion-ordered). Guarded by _lock; the receive thread
        # makes the socket match it whenever _generation moves past _applied.
        self._wanted: dict[str, None] = dict.fromkeys(connect)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._generation = 0
        self._applied = 0
        self._wake: tuple[stdsocket.socket, stdsocket.socket] | None = None
        self._topic = topic_filter.encode("utf-8")
        self._hwm = receive_hwm
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._fd = -1  # the socket's descriptor, on a loop
        self._dialled: set[str] = set()
        self._refused: set[str] = set()
        self._error: BaseException | None = None
        self.bound: list[str] = []
        """The endpoints actually bound (with the port the OS chose for ``tcp://...:0``)."""
        self.received = 0
        self.endpoint_errors = 0
        """Dynamic connects/disconnects that ZMQ refused (logged; the endpoint stays wanted)."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints dialled (or to be dialled once started), in the order added."""
        with self._lock:
            return tuple(self._wanted)

    def add_endpoint(self, endpoint: str, timeout: float = 5.0) -> None:
        """Dial ``endpoint`` too; idempotent, callable before or after `start` from any thread.

        When running, returns once the socket dials it (or ``timeout`` passed).
        Raises ConfigError for anything a SUB socket cannot dial.
        """
        validate_dial_endpoint(endpoint)
        with self._lock:
            if endpoint in self._wanted:
                return
            self._wanted[endpoint] = None
            self._generation += 1
            generation = self._generation
        self._await_sync(generation, timeout)

    def remove_endpoint(self, endpoint: str, timeout: float = 5.0) -> None:
        """Stop dialling ``endpoint``; unknown endpoints are ignored.

        When running, returns once the socket has disconnected: from then on nothing more
        arrives from that endpoint (ZMQ discards what it had not yet handed over).
        """
        with self._lock:
            if endpoint not in self._wanted:
                return
            del self._wanted[endpoint]
            self._generation += 1
            generation = self._generation
        self._await_sync(generation, timeout)

    def _await_sync(self, generation: int, timeout: float) -> None:
        wake = self._wake
        if wake is None:
            return  # not started: start() dials what is wanted then
        # OSError: the buffer is full (a wake-up is already pending) or the thread closed it.
        with contextlib.suppress(OSError):
            wake[1].send(b"\x00")
        current = threading.current_thread()
        if current is self._loop_thread and self._socket is not None:
            self._on_wake()  # the socket's own thread: apply now, between two receives
            return
        if current is self._thread:
            return  # called from the sink: the receive loop applies it after this batch
        with self._synced:
            self._synced.wait_for(
                lambda: self._applied >= generation or self._wake is None, timeout
            )

    def start(
        self, timeout: float = 10.0, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """Open the socket and receive; returns once it is bound/connected.

        Without ``loop``, on a receive thread of its own. With ``loop`` (an event loop, running
        or not, that this thread runs), no thread: the socket is read by callbacks on that loop,
        a slice at a time (see the module docstring); RuntimeError when another thread runs it.
        """
        if loop is not None and loop.is_running():
            try:
                current = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if current is not loop:
                raise RuntimeError("Subscriber.start(loop=...) must run on the loop's thread")
        receiver, sender = stdsocket.socketpair()
        receiver.setblocking(False)
        sender.setblocking(False)
        self._wake = (receiver, sender)
        if loop is not None:
            self._start_on(loop)
            return
        self._thread = threading.Thread(target=self._run, name="kvcache-zmq-sub", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("ZMQ subscriber did not start")
        if self._error is not None:
            raise ConfigError("events.zmq", f"cannot open subscriber: {self._error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving and close the socket (already-delivered messages are unaffected)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        loop = self._loop
        if loop is None or self._socket is None:
            return
        if (
            loop.is_closed()
            or not loop.is_running()  # nothing runs the callbacks: close from here
            or threading.current_thread() is self._loop_thread
        ):
            self._close_on_loop()
            return
        # Another thread: the loop's thread owns the socket and the reader registrations.
        done = threading.Event()

        def close() -> None:
            self._close_on_loop()
            done.set()

        try:
            loop.call_soon_threadsafe(close)
        except RuntimeError:  # the loop closed meanwhile
            self._close_on_loop()
            return
        done.wait(timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop reading the socket, or None (a receive thread, or not started)."""
        return self._loop

    @property
    def running(self) -> bool:
        """Whether messages are being received (the thread is alive, or the loop reads)."""
        if self._loop is not None:
            return self._socket is not None and not self._loop.is_closed()
        return self._thread is not None and self._thread.is_alive()

    def _open(self) -> zmq.Socket[bytes]:
        """The SUB socket, bound and dialling what is wanted (ZMQError when it cannot)."""
        socket = self._context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.RCVHWM, self._hwm)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, self._topic)
            for endpoint in self._bind:
                socket.bind(endpoint)
                self.bound.append(socket.getsockopt_string(zmq.LAST_ENDPOINT))
            with self._lock:
                initial, self._applied = list(self._wanted), self._generation
            for endpoint in initial:
                _dial(socket, endpoint)
                self._dialled.add(endpoint)
        except zmq.ZMQError:
            socket.close(linger=0)
            raise
        return socket

    def _receive(self, recv: Callable[..., Any]) -> bool:
        """Hand one queued message to the sink; False when none is queued."""
        # Frame by frame without copies: half the cost of recv_multipart, which asks the
        # socket for RCVMORE after every frame. The parts of a message arrive together, so
        # only the first recv may find none.
        try:
            frame = recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        frames: list[Any] = []
        while frame.more:
            frames.append(frame.bytes)
            frame = recv(copy=False)
        frames.append(frame)  # the payload, read in place by the decoder
        self.received += 1
        self._sink(frames)
        return True

    # -- on an event loop ------------------------------------------------------------------------

    def _start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._wake is not None
        try:
            socket = self._open()
        except zmq.ZMQError as exc:
            self._close_wake()
            raise ConfigError("events.zmq", f"cannot open subscriber: {exc}") from None
        self._loop, self._loop_thread, self._socket = loop, threading.current_thread(), socket
        # ZMQ's descriptor signals edges ("the socket's state may have changed"): each callback
        # reads until the socket has nothing, or comes back once the loop ran its other work.
        fd = socket.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        loop.add_reader(fd, self._on_readable)
        loop.add_reader(self._wake[0].fileno(), self._on_wake)
        self._ready.set()
        # Messages already queued before the loop runs: the descriptor only signals new edges.
        loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        socket, loop = self._socket, self._loop
        if socket is None or loop is None or self._stop.is_set():
            return
        recv = socket.recv
        deadline = time.perf_counter() + LOOP_SLICE_S
        try:
            while self._receive(recv):
                if time.perf_counter() >= deadline:
                    loop.call_soon(self._on_readable)  # the rest after the loop's other work
                    return
            # A receive can take in ZMQ's pending notifications, so a message that arrived
            # meanwhile may never make the descriptor readable: ask the socket itself (which
            # also re-arms the descriptor).
            events = socket.getsockopt(zmq.EVENTS)
            if isinstance(events, int) and events & zmq.POLLIN:
                loop.call_soon(self._on_readable)
        except zmq.ZMQError:  # the socket itself failed: stop, so health checks see it
            log.exception("ZMQ subscriber stopped by a socket error")
            self._close_on_loop()
        except Exception:  # a sink bug must not stop ingest for every other message
            log.exception("ZMQ subscriber: a message could not be handed on")
            loop.call_soon(self._on_readable)

    def _on_wake(self) -> None:
        wake, socket, loop = self._wake, self._socket, self._loop
        if wake is None or socket is None or loop is None:
            return
        with contextlib.suppress(BlockingIOError):
            wake[0].recv(4096)
        self._sync_endpoints(socket, self._dialled, self._refused)
        # Connecting or disconnecting can take in the notification of a message that arrived
        # meanwhile, and the descriptor would not signal it again: read what is there.
        loop.call_soon(self._on_readable)

    def _close_on_loop(self) -> None:
        socket, self._socket = self._socket, None
        loop = self._loop
        if socket is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._fd)
            if self._wake is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(self._wake[0].fileno())
        socket.close(linger=0)
        self._close_wake()

    # -- on a thread of its own ------------------------------------------------------------------

    def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        try:
            socket = self._open()
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            self._close_wake()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        wake_fd = wake.fileno()  # the poller reports native sockets by descriptor
        poller.register(wake_fd, zmq.POLLIN)
        recv = socket.recv
        stopping = self._stop.is_set
        try:
            while not stopping():
                ready = dict(poller.poll(100))
                if socket in ready:
                    # Drain what is queued before polling again: one poll per burst, but a
                    # publisher that never pauses must not keep `stop` waiting.
                    while not stopping() and self._receive(recv):
                        pass
                if wake_fd in ready:
                    with contextlib.suppress(BlockingIOError):
                        wake.recv(4096)
                    self._sync_endpoints(socket, self._dialled, self._refused)
        except Exception:  # the sink must never kill the transport silently
            log.exception("ZMQ subscriber stopped by an unexpected error")
            raise
        finally:
            socket.close(linger=0)
            self._close_wake()

    def _sync_endpoints(
        self, socket: zmq.Socket[bytes], dialled: set[str], refused: set[str]
    ) -> None:
        """Connect/disconnect so the socket dials exactly the wanted endpoints."""
        with self._lock:
            wanted, generation = list(self._wanted), self._generation
        refused.intersection_update(wanted)
        for endpoint in dialled - set(wanted):
            dialled.discard(endpoint)
            try:
                socket.disconnect(endpoint)
            except zmq.ZMQError as exc:
                self.endpoint_errors += 1
                log.warning("ZMQ subscriber: cannot disconnect %s: %s", endpoint, exc)
        for endpoint in wanted:
            if endpoint in dialled or endpoint in refused:
                continue
            try:
                _dial(socket, endpoint)
            except zmq.ZMQError as exc:
                # Not retried on every wake-up: it would only repeat the same refusal.
                refused.add(endpoint)
                self.endpoint_errors += 1
                log.warning("ZMQ subscriber: cannot connect %s: %s", endpoint, exc)
            else:
                dialled.add(endpoint)
        with self._synced:
            self._applied = max(self._applied, generation)
            self._synced.notify_all()

    def _close_wake(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake[0].close()
            wake[1].close()
        with self._synced:
            self._synced.notify_all()  # waiters see the thread gone


def _dial(socket: zmq.Socket[bytes], endpoint: str) -> None:
    # IPv6 pod addresses (tcp://[fd00::7]:5557) need the option set before connecting.
    if endpoint.startswith("tcp://["):
        socket.setsockopt(zmq.IPV6, 1)
    socket.connect(endpoint)
