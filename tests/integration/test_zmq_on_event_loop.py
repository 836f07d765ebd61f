"""Real ZMQ sockets read by callbacks on an asyncio event loop (how `kvcache serve` ingests)."""

from __future__ import annotations

import asyncio
import itertools
import socket as socket_module
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from kvcache.config import Config
from kvcache.errors import ConfigError
from kvcache.events.subscriber import LOOP_SLICE_S, Subscriber
from kvcache.service.app import Service, new_event_loop


class LoopThread:
    """An event loop run by a thread of its own; `call` runs a function on it and waits."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, function: Callable[[], object]) -> object:
        return asyncio.run_coroutine_threadsafe(_call(function), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _call(function: Callable[[], object]) -> object:
    return function()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture
def pub() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)


def _until(condition: Callable[[], bool], send: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        send()
        time.sleep(0.01)


def test_messages_reach_the_sink_on_the_loop_thread(
    loop_thread: LoopThread, pub: tuple[zmq.Socket[bytes], str]
) -> None:
    socket, endpoint = pub
    threads: set[threading.Thread] = set()
    received: list[list[object]] = []

    def sink(frames: list[object]) -> None:
        threads.add(threading.current_thread())
        received.append(frames)

    subscriber = Subscriber(sink, connect=[endpoint])
    loop_thread.call(lambda: subscriber.start(loop=loop_thread.loop))
    try:
        assert subscriber.running
        _until(
            lambda: len(received) > 0,
            lambda: socket.send_multipart([b"kv@a@m", b"\x00" * 8, b"\x90"]),
            "first message",
        )
        for n in range(1, 201):  # the subscription is live: none of these may be lost
            socket.send_multipart([b"kv@a@m", n.to_bytes(8, "big"), b"\x90"])
        _until(lambda: any(f[1] == (200).to_bytes(8, "big") for f in received), lambda: 0, "all")
    finally:
        subscriber.stop()  # from another thread than the loop's
    assert not subscriber.running
    assert threads == {loop_thread.thread}
    numbered = [int.from_bytes(bytes(f[1]), "big") for f in received if f[1] != b"\x00" * 8]
    assert numbered == list(range(1, 201))
    payload = received[-1][2]
    assert isinstance(payload, zmq.Frame) and payload.bytes == b"\x90"
    assert subscriber.received == len(received)


def test_a_flood_is_taken_in_slices_so_the_loop_runs_other_work(loop_thread: LoopThread) -> None:
    """With a backlog queued, the loop still runs other callbacks (an HTTP request, say)
    between slices of about LOOP_SLICE_S, instead of draining the whole backlog first."""
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.SNDHWM, 0)  # before binding: a pipe keeps the bound socket's HWM
    endpoint = f"tcp://127.0.0.1:{socket.bind_to_random_port('tcp://127.0.0.1')}"
    received: list[int] = []
    ticks: list[int] = []  # messages received when each tick ran

    def slow(frames: list[object]) -> None:
        received.append(1)
        time.sleep(LOOP_SLICE_S / 4)  # about four messages a slice

    subscriber = Subscriber(slow, connect=[endpoint], receive_hwm=0)
    loop_thread.call(lambda: subscriber.start(loop=loop_thread.loop))
    try:
        _until(
            lambda: len(received) > 0,
            lambda: socket.send_multipart([b"kv@a@m", b"\x00" * 8, b"\x90"]),
            "first message",
        )
        time.sleep(0.2)  # the first message's repeats are in
        start = len(received)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the loop is busy elsewhere while the backlog builds up
            held.set()
            release.wait(10)

        def tick() -> None:
            ticks.append(len(received))
            if len(received) < start + 2000:
                loop_thread.loop.call_soon(tick)

        loop_thread.loop.call_soon_threadsafe(hold)
        assert held.wait(10)
        for n in range(2000):
            socket.send_multipart([b"kv@a@m", n.to_bytes(8, "big"), b"\x90"])
        time.sleep(0.3)  # in the SUB socket's queue by now
        loop_thread.loop.call_soon_threadsafe(tick)
        release.set()
        deadline = time.monotonic() + 10
        while len(received) < start + 2000:
            assert time.monotonic() < deadline, f"{len(received) - start} of 2000 arrived"
            time.sleep(0.01)
    finally:
        subscriber.stop()
        socket.close(linger=0)
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    assert sum(steps) >= 1990 and len(ticks) >= 20
    assert max(steps) <= 64  # never the whole backlog between two turns of the loop


def test_endpoints_change_from_another_thread_while_the_loop_reads(
    loop_thread: LoopThread,
) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    first, second = context.socket(zmq.PUB), context.socket(zmq.PUB)
    try:
        endpoints = [
            f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}" for s in (first, second)
        ]
        topics: list[bytes] = []
        subscriber = Subscriber(lambda frames: topics.append(frames[0]), dynamic=True)
        loop_thread.call(lambda: subscriber.start(loop=loop_thread.loop))
        try:
            subscriber.add_endpoint(endpoints[0])  # returns once the loop has dialled it
            _until(lambda: b"one" in topics, lambda: first.send_multipart([b"one", b"", b""]), "1")
            subscriber.add_endpoint(endpoints[1])
            _until(lambda: b"two" in topics, lambda: second.send_multipart([b"two", b"", b""]), "2")
            subscriber.remove_endpoint(endpoints[0])
            for _ in range(20):  # nothing from the removed endpoint once removal returned
                first.send_multipart([b"one-after", b"", b""])
            _until(
                lambda: b"mark" in topics, lambda: second.send_multipart([b"mark", b"", b""]), "m"
            )
        finally:
            subscriber.stop()
        assert b"one-after" not in topics
        assert subscriber.endpoint_errors == 0
    finally:
        first.close(linger=0)
        second.close(linger=0)


def test_stop_on_the_loop_thread_and_after_the_loop_closed() -> None:
    runner = LoopThread()
    subscriber = Subscriber(lambda frames: None, bind=["tcp://127.0.0.1:0"])
    runner.call(lambda: subscriber.start(loop=runner.loop))
    assert subscriber.running and subscriber.bound[0].startswith("tcp://127.0.0.1:")
    runner.call(subscriber.stop)
    assert not subscriber.running

    # A loop this thread runs and that has stopped (or closed): stop() closes from here.
    loop = new_event_loop()
    late = Subscriber(lambda frames: None, bind=["tcp://127.0.0.1:0"])
    late.start(loop=loop)  # a loop this thread runs, not yet running
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    assert not late.running
    late.stop()  # closes the socket without the loop
    runner.close()


def test_a_socket_that_cannot_open_is_a_config_error(loop_thread: LoopThread) -> None:
    holder: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        subscriber = Subscriber(lambda frames: None, bind=[f"tcp://127.0.0.1:{port}"])
        with pytest.raises(ConfigError, match="cannot open subscriber"):
            loop_thread.call(lambda: subscriber.start(loop=loop_thread.loop))
        assert not subscriber.running
    finally:
        holder.close(linger=0)


def test_a_refused_endpoint_change_does_not_strand_pending_messages() -> None:
    """Connecting (here: refused) makes ZMQ take in its pending notifications: a message that
    arrived meanwhile must still be read, and so must every later one."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub: zmq.Socket[bytes] = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    got: list[bytes] = []
    subscriber = Subscriber(lambda f: got.append(bytes(f[0])), connect=[f"tcp://127.0.0.1:{port}"])
    loop = new_event_loop()
    busy_r, busy_w = socket_module.socketpair()
    busy_r.setblocking(False)

    def busy() -> None:  # another reader of the loop (a request) while the engine publishes
        busy_r.recv(16)
        pub.send_multipart([b"pending", b""])
        time.sleep(0.05)

    async def scenario() -> int:
        while not got:
            pub.send_multipart([b"warm", b""])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        before = len(got)
        loop.add_reader(busy_r.fileno(), busy)

        def change() -> None:  # the busy reader is ready first, then the endpoint change
            busy_w.send(b"x")
            subscriber.add_endpoint("ws://127.0.0.1:1")  # this libzmq has no ws transport

        loop.call_soon(change)
        await asyncio.sleep(0.3)
        for n in range(5):
            pub.send_multipart([b"later%d" % n, b""])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        return before

    try:
        subscriber.start(loop=loop)
        before = loop.run_until_complete(scenario())
    finally:
        subscriber.stop()
        loop.remove_reader(busy_r.fileno())
        loop.close()
        busy_r.close()
        busy_w.close()
        pub.close(linger=0)
    assert subscriber.endpoint_errors == 1
    assert got[before:] == [b"pending", *(b"later%d" % n for n in range(5))]


def test_endpoint_changes_on_the_loop_thread_apply_before_returning(
    pub: tuple[zmq.Socket[bytes], str],
) -> None:
    socket, endpoint = pub
    got: list[bytes] = []
    subscriber = Subscriber(lambda f: got.append(bytes(f[0])), dynamic=True)
    loop = new_event_loop()

    async def scenario() -> None:
        subscriber.add_endpoint(endpoint)  # on the loop's own thread: dialled on return
        while b"one" not in got:
            socket.send_multipart([b"one", b""])
            await asyncio.sleep(0.01)
        subscriber.remove_endpoint(endpoint)  # disconnected on return
        socket.send_multipart([b"after", b""])
        time.sleep(0.1)  # in the SUB socket's queue by now, were it still connected
        for _ in range(5):
            socket.send_multipart([b"after", b""])
            await asyncio.sleep(0.02)

    try:
        subscriber.start(loop=loop)
        loop.run_until_complete(asyncio.wait_for(scenario(), 10))
    finally:
        subscriber.stop()
        loop.close()
    assert b"after" not in got


def test_stop_from_another_thread_once_the_loop_has_stopped_and_start_on_a_wrong_thread() -> None:
    runner = LoopThread()
    subscriber = Subscriber(lambda frames: None, bind=["tcp://127.0.0.1:0"])
    runner.call(lambda: subscriber.start(loop=runner.loop))
    runner.loop.call_soon_threadsafe(runner.loop.stop)
    runner.thread.join(10)
    assert not runner.loop.is_running() and not runner.loop.is_closed()
    started = time.monotonic()
    subscriber.stop(timeout=5.0)  # nothing runs the loop: closed from here, at once
    assert time.monotonic() - started < 1.0 and not subscriber.running
    runner.loop.close()

    other = LoopThread()  # running on its own thread
    try:
        with pytest.raises(RuntimeError, match="loop's thread"):
            Subscriber(lambda frames: None, bind=["tcp://127.0.0.1:0"]).start(loop=other.loop)
    finally:
        other.close()


@pytest.mark.parametrize(("events", "on_loop"), [({}, True), ({"shards": 2}, False)])
def test_the_service_reads_on_its_loop_only_when_ingest_applies_inline(
    events: dict[str, object], on_loop: bool
) -> None:
    """One shard and an in-process index: the socket is read on the HTTP loop, and ingest no
    longer waits on the scoring gate (it would block the loop the readers need). Otherwise
    (queued shards here; Redis too) the subscriber keeps its receive thread and the gate."""
    config = Config.from_mapping({"events": {"zmq_bind": ["tcp://127.0.0.1:0"], **events}})
    service = Service(config)
    loop = new_event_loop()
    try:
        assert service.ingest_on_loop is on_loop
        service.start(loop=loop)
        assert service.subscriber.running
        assert (service.subscriber.loop is loop) is on_loop
        assert (service.pipeline.priority is None) is on_loop
    finally:
        service.stop()
        loop.close()
    assert not service.subscriber.running
