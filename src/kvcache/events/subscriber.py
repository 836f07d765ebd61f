"""ZMQ SUB transport: receive raw event frames from engines and hand them on.

Two layouts: **bind** (engines connect to us, llm-d's centralised layout; default
``tcp://*:5557``) and **connect** (we dial each engine's PUB endpoint). ZMQ reconnects dialled
endpoints by itself, and a bound socket simply accepts publishers as they (re)appear.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import zmq

from kvcache.errors import ConfigError

log = logging.getLogger("kvcache.events")

FrameSink = Callable[[list[bytes]], object]


class Subscriber:
    """One SUB socket on a background thread, feeding every message to ``sink``."""

    def __init__(
        self,
        sink: FrameSink,
        *,
        bind: Sequence[str] = (),
        connect: Sequence[str] = (),
        topic_filter: str = "",
        receive_hwm: int = 100_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if not bind and not connect:
            raise ConfigError("events.zmq", "need at least one endpoint to bind or connect")
        for endpoint in (*bind, *connect):
            if "://" not in endpoint:
                raise ConfigError("events.zmq", f"not a ZMQ endpoint: {endpoint!r}")
        self._sink = sink
        self._bind = list(bind)
        self._connect = list(connect)
        self._topic = topic_filter.encode("utf-8")
        self._hwm = receive_hwm
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.bound: list[str] = []
        """The endpoints actually bound (with the port the OS chose for ``tcp://...:0``)."""
        self.received = 0

    def start(self, timeout: float = 10.0) -> None:
        """Open the socket on the receive thread; returns once it is bound/connected."""
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

    @property
    def running(self) -> bool:
        """Whether the receive thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            socket = self._context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, self._hwm)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, self._topic)
            for endpoint in self._bind:
                socket.bind(endpoint)
                self.bound.append(socket.getsockopt_string(zmq.LAST_ENDPOINT))
            for endpoint in self._connect:
                socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        sink = self._sink
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                # Drain what is queued before polling again: one poll per burst, not per message.
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.received += 1
                    sink(frames)
        except Exception:  # the sink must never kill the transport silently
            log.exception("ZMQ subscriber stopped by an unexpected error")
            raise
        finally:
            socket.close(linger=0)
