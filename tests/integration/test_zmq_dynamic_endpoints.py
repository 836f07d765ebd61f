"""Real ZMQ sockets: endpoints added to and removed from a running subscriber (pod discovery)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from kvcache.errors import ConfigError
from kvcache.events.subscriber import Subscriber, validate_dial_endpoint

Context = zmq.Context[zmq.Socket[bytes]]


class Inbox:
    """A sink that records topics and lets the test wait for one to arrive."""

    def __init__(self) -> None:
        self.topics: list[bytes] = []
        self._arrived = threading.Condition()

    def __call__(self, frames: list[bytes]) -> None:
        with self._arrived:
            self.topics.append(frames[0])
            self._arrived.notify_all()

    def count(self, topic: bytes) -> int:
        with self._arrived:
            return self.topics.count(topic)


@pytest.fixture
def context() -> Context:
    return zmq.Context.instance()


@pytest.fixture
def publishers(context: Context) -> Iterator[Callable[[], tuple[zmq.Socket[bytes], str]]]:
    """Factory of engine-style PUB sockets bound on free loopback ports."""
    opened: list[zmq.Socket[bytes]] = []

    def make() -> tuple[zmq.Socket[bytes], str]:
        pub = context.socket(zmq.PUB)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        opened.append(pub)
        return pub, f"tcp://127.0.0.1:{port}"

    yield make
    for pub in opened:
        pub.close(linger=0)


def _has(inbox: Inbox, topic: bytes) -> Callable[[], bool]:
    return lambda: inbox.count(topic) > 0


def _send_until(pub: zmq.Socket[bytes], topic: bytes, arrived: Callable[[], bool]) -> int:
    """Publish ``topic`` until ``arrived()`` holds (PUB drops until the subscription lands)."""
    sent = 0
    deadline = time.monotonic() + 10
    while not arrived():
        assert time.monotonic() < deadline, f"{topic!r} never arrived"
        pub.send_multipart([topic, (sent).to_bytes(8, "big"), b"\x90"])
        sent += 1
        time.sleep(0.01)
    return sent


def test_added_endpoint_delivers_and_removed_endpoint_stops(
    context: Context, publishers: Callable[[], tuple[zmq.Socket[bytes], str]]
) -> None:
    engine, engine_endpoint = publishers()
    control, control_endpoint = publishers()
    inbox = Inbox()
    subscriber = Subscriber(inbox, connect=[control_endpoint])
    subscriber.start()
    try:
        _send_until(control, b"control-0", lambda: inbox.count(b"control-0") > 0)
        subscriber.add_endpoint(engine_endpoint)
        assert list(subscriber.endpoints) == [control_endpoint, engine_endpoint]
        _send_until(engine, b"kv@engine@m", lambda: inbox.count(b"kv@engine@m") > 0)

        subscriber.remove_endpoint(engine_endpoint)
        assert list(subscriber.endpoints) == [control_endpoint]
        # After removal returns, the engine's messages must never arrive, while the control
        # stream (sent after each of them) keeps arriving on the same socket.
        for round_number in range(20):
            engine.send_multipart([b"kv@engine-after@m", b"\x00" * 8, b"\x90"])
            marker = f"control-{round_number + 1}".encode()
            _send_until(control, marker, _has(inbox, marker))
    finally:
        subscriber.stop()
    assert inbox.count(b"kv@engine-after@m") == 0
    assert subscriber.endpoint_errors == 0


def test_endpoint_added_before_start_is_dialled_at_start(
    publishers: Callable[[], tuple[zmq.Socket[bytes], str]],
) -> None:
    engine, endpoint = publishers()
    inbox = Inbox()
    subscriber = Subscriber(inbox, dynamic=True)
    assert list(subscriber.endpoints) == []
    subscriber.add_endpoint(endpoint)
    subscriber.add_endpoint(endpoint)  # idempotent
    assert list(subscriber.endpoints) == [endpoint]
    subscriber.start()
    try:
        _send_until(engine, b"kv@early@m", lambda: inbox.count(b"kv@early@m") > 0)
    finally:
        subscriber.stop()


def test_re_adding_after_removal_resumes_delivery(
    publishers: Callable[[], tuple[zmq.Socket[bytes], str]],
) -> None:
    engine, endpoint = publishers()
    inbox = Inbox()
    subscriber = Subscriber(inbox, dynamic=True)
    subscriber.start()
    try:
        subscriber.add_endpoint(endpoint)
        _send_until(engine, b"kv@first@m", lambda: inbox.count(b"kv@first@m") > 0)
        subscriber.remove_endpoint(endpoint)
        subscriber.remove_endpoint(endpoint)  # idempotent
        subscriber.remove_endpoint("tcp://127.0.0.1:1")  # never added: ignored
        subscriber.add_endpoint(endpoint)
        _send_until(engine, b"kv@second@m", lambda: inbox.count(b"kv@second@m") > 0)
    finally:
        subscriber.stop()
    assert list(subscriber.endpoints) == [endpoint]


def test_sink_may_change_endpoints_from_the_receive_thread(
    publishers: Callable[[], tuple[zmq.Socket[bytes], str]],
) -> None:
    first, first_endpoint = publishers()
    second, second_endpoint = publishers()
    topics: list[bytes] = []
    subscriber: Subscriber

    def sink(frames: list[bytes]) -> None:
        topics.append(frames[0])
        # Calling back into the subscriber from its own thread must not deadlock.
        subscriber.add_endpoint(second_endpoint)

    subscriber = Subscriber(sink, connect=[first_endpoint])
    subscriber.start()
    try:
        _send_until(first, b"kv@first@m", lambda: b"kv@first@m" in topics)
        _send_until(second, b"kv@second@m", lambda: b"kv@second@m" in topics)
    finally:
        subscriber.stop()


@pytest.mark.parametrize(
    "endpoint",
    [
        "10.0.0.7:5557",
        "http://10.0.0.7:5557",
        "tcp://10.0.0.7",
        "tcp://10.0.0.7:0",
        "tcp://10.0.0.7:70000",
        "tcp://*:5557",
        "tcp://",
        "tcp:// 10.0.0.7:5557",
        "",
    ],
)
def test_endpoints_a_sub_socket_cannot_dial_are_refused(endpoint: str) -> None:
    subscriber = Subscriber(lambda frames: None, dynamic=True)
    with pytest.raises(ConfigError, match=r"events\.zmq"):
        subscriber.add_endpoint(endpoint)
    assert list(subscriber.endpoints) == []


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://10.0.0.7:5557", "tcp://[fd00::7]:5557", "tcp://vllm-0.vllm.llm:5557", "ipc:///tmp/x"],
)
def test_dialable_endpoints_pass_validation(endpoint: str) -> None:
    assert validate_dial_endpoint(endpoint) == endpoint


def test_without_dynamic_an_endpoint_is_still_required() -> None:
    with pytest.raises(ConfigError, match="at least one endpoint"):
        Subscriber(lambda frames: None)


def test_stop_returns_while_a_publisher_floods_a_slow_sink(
    publishers: Callable[[], tuple[zmq.Socket[bytes], str]],
) -> None:
    """A backlog that never drains (the engine publishes faster than the sink applies) must not
    keep the receive thread from seeing `stop`; the payload arrives as a zmq.Frame."""
    pub, endpoint = publishers()
    received: list[list[object]] = []

    def slow(frames: list[object]) -> None:
        received.append(frames)
        time.sleep(0.002)

    subscriber = Subscriber(slow, connect=[endpoint])
    subscriber.start()
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        sent = 0
        while flooding.is_set():
            pub.send_multipart([b"kv@engine@m", sent.to_bytes(8, "big"), b"\x90" * 64])
            sent += 1

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while len(received) < 50:
            assert time.monotonic() < deadline, "nothing arrived"
            time.sleep(0.01)
        subscriber.stop(timeout=5.0)
        assert not subscriber.running  # stopped with the backlog still queued
    finally:
        flooding.clear()
        sender.join(5)
    topic, seq, payload = received[0]
    assert topic == b"kv@engine@m" and isinstance(seq, bytes) and len(seq) == 8
    assert isinstance(payload, zmq.Frame) and payload.bytes == b"\x90" * 64
